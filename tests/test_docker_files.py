"""The deployment files (Dockerfile, compose, Prometheus, Grafana, Kubernetes) agree with
each other and with the service: names, ports, paths and the metric names the dashboard
queries. No Docker engine needed: the files are parsed, not run."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from service.metrics import ServiceMetrics

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "gga.json"
DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDERS = DOCKER / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml"
K8S = DOCKER / "k8s" / "deployment.yaml"
RULES_DIR = DOCKER / "prometheus" / "rules"  # the drift alarm's rules (tests/test_alerts.py)
METRIC_TOKEN = re.compile(r"gga_[a-z_]+")
RECORDED_TOKEN = re.compile(r"gga:[a-z0-9_:]+")


# --- helpers -----------------------------------------------------------------------------


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _host_mounts(service: dict) -> dict[str, Path]:
    """Bind mounts of a compose service: container path -> host path (relative to docker/)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (COMPOSE.parent / source).resolve()
    return mounts


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def _arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    defaults = {}
    for keyword, args in instructions:
        if keyword == "ARG" and "=" in args:
            name, value = args.split("=", 1)
            defaults[name] = value
    return defaults


def _expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)


def _exposed_sample_names() -> set[str]:
    """Every sample name the service's metrics expose, from a fresh registry.

    Labelled metrics have no samples until a child exists, so the names follow from each
    family's type: counters ``_total``/``_created``, histograms ``_bucket``/``_sum``/
    ``_count``/``_created``, gauges the bare name.
    """
    registry = CollectorRegistry()
    ServiceMetrics(registry)
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",)}
    names: set[str] = set()
    collected: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
        collected.update(sample.name for sample in family.samples)
    assert collected and collected <= names, f"samples {collected - names} not derived from the family types"
    return names


def _recorded_names() -> set[str]:
    """Names the compose Prometheus records from its rule files."""
    return {rule["record"] for path in RULES_DIR.glob("*.yml")
            for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"] if "record" in rule}


def _dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows included."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(dashboard["panels"])
    for panel in dashboard["panels"]:
        panels.extend(panel.get("panels", []))
    return [(panel["title"], target["expr"]) for panel in panels for target in panel.get("targets", [])]


# --- compose + Prometheus ------------------------------------------------------------------


def test_compose_has_the_three_services_and_their_ports():
    services = _compose()["services"]
    assert set(services) == {"gga", "prometheus", "grafana"}
    assert services["gga"]["ports"] == ["8000:8000"]
    assert services["prometheus"]["ports"] == ["9090:9090"]
    assert services["grafana"]["ports"] == ["3000:3000"]
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")


def test_compose_builds_the_service_from_the_repository_root_with_a_data_volume():
    compose = _compose()
    gga = compose["services"]["gga"]
    context = (COMPOSE.parent / gga["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / gga["build"]["dockerfile"]).is_file()
    assert gga["environment"]["GGA_ADMIN_TOKEN"] == "${GGA_ADMIN_TOKEN:-}"
    named = {v.split(":")[0]: v.split(":")[1] for v in gga["volumes"]}
    assert named.get("gga-data") == "/data"
    assert "gga-data" in compose["volumes"]


def test_prometheus_config_is_mounted_and_scrapes_the_service():
    prometheus = _compose()["services"]["prometheus"]
    config_path = _host_mounts(prometheus)["/etc/prometheus/prometheus.yml"]
    assert config_path.is_file(), f"compose mounts {config_path}, which does not exist"
    jobs = yaml.safe_load(config_path.read_text())["scrape_configs"]
    gga_jobs = [job for job in jobs if any("gga:8000" in sc["targets"] for sc in job["static_configs"])]
    assert len(gga_jobs) == 1
    assert gga_jobs[0]["metrics_path"] == "/metrics"
    assert gga_jobs[0]["scrape_interval"] == "5s"


# --- Grafana -------------------------------------------------------------------------------


def test_grafana_provisioning_parses_and_points_at_the_mounted_folders():
    grafana = _compose()["services"]["grafana"]
    mounts = _host_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == DOCKER / "grafana" / "provisioning"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"

    (datasource,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert datasource["uid"] == "prometheus"
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"

    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file"
    dashboards_in_container = provider["options"]["path"]
    assert mounts[dashboards_in_container] == DASHBOARD.parent


def test_dashboard_panels_use_the_provisioned_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]


def test_every_metric_the_dashboard_queries_is_exposed_by_the_service():
    exposed = _exposed_sample_names()
    recorded = _recorded_names()
    exprs = _dashboard_exprs()
    assert exprs
    for title, expr in exprs:
        tokens, rules = METRIC_TOKEN.findall(expr), RECORDED_TOKEN.findall(expr)
        assert tokens or rules, f"panel {title!r} queries no gga_ metric or gga: recording rule: {expr}"
        unknown = sorted(set(tokens) - exposed)
        assert not unknown, f"panel {title!r} queries {unknown}, which the service does not expose"
        unrecorded = sorted(set(rules) - recorded)
        assert not unrecorded, f"panel {title!r} queries {unrecorded}, which no rule in {RULES_DIR} records"


@pytest.mark.parametrize("needle", [
    'histogram_quantile(0.5, sum by (le) (rate(gga_request_duration_seconds_bucket{route="/predict"}',
    'histogram_quantile(0.99, sum by (le) (rate(gga_request_duration_seconds_bucket{route="/predict"}',
    "rate(gga_rows_total[",
    "rate(gga_batch_rows_sum[$__rate_interval])) / sum(rate(gga_batch_rows_count[",
    "gga_queue_rows",
    "rate(gga_flagged_total[$__rate_interval])) / sum(rate(gga_rows_total[",
    "gga_trust_bucket",
    "sum by (route, status) (rate(gga_requests_total[",
    "sum by (stage) (rate(gga_compute_seconds_sum[",
    "gga_detector_info",
    "gga:flag_rate:ratio15m",
    "gga:flag_rate:bound15m",
    "gga:alpha",
])
def test_dashboard_has_the_required_queries(needle):
    assert any(needle in expr for _, expr in _dashboard_exprs()), f"no panel queries {needle!r}"


def test_http_paths_in_the_deployment_files_are_routes_of_the_service():
    from service.routes import router  # imports torch: only here

    paths = {route.path for route in router.routes}
    referenced = {"/metrics"}  # the Prometheus scrape path, checked above
    referenced.update(m[1] for _, expr in _dashboard_exprs() for m in re.finditer(r'route="([^"]+)"', expr))
    referenced.update(re.findall(r"/[a-z]+z\b", (ROOT / "Dockerfile").read_text()))  # HEALTHCHECK
    for doc in yaml.safe_load_all(K8S.read_text()):
        if doc["kind"] == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                referenced.add(container["livenessProbe"]["httpGet"]["path"])
                referenced.add(container["readinessProbe"]["httpGet"]["path"])
    assert {"/predict", "/healthz", "/readyz"} <= referenced
    assert referenced <= paths, f"{sorted(referenced - paths)} are not routes of the service"


# --- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_installs_pinned_torch_before_the_project():
    instructions = _dockerfile()
    variables = _arg_defaults(instructions)
    runs = [(i, _expand(args, variables)) for i, (keyword, args) in enumerate(instructions) if keyword == "RUN"]
    torch_runs = [i for i, cmd in runs if re.search(r"pip install\b.*\btorch==2\.13\.0\b", cmd)]
    project_runs = [i for i, cmd in runs if re.search(r"pip install \.(\s|$)", cmd)]
    assert torch_runs and project_runs, "the Dockerfile must pip install torch==2.13.0 and the project (.)"
    assert torch_runs[0] < project_runs[0]
    assert variables["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert variables["BASE_IMAGE"] == "python:3.11-slim"
    assert instructions[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    assert ("FROM", "${BASE_IMAGE}") in instructions


def test_dockerfile_runs_gga_serve_as_a_non_root_user():
    instructions = _dockerfile()
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    cmd = [args for keyword, args in instructions if keyword == "CMD"]
    assert len(cmd) == 1 and json.loads(cmd[0]) == ["gga-serve"]
    env = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    assert env["GGA_HOST"] == "0.0.0.0"
    assert env["GGA_PORT"] == "8000"
    assert env["GGA_ARTIFACT_DIR"] == "/data/artifacts"
    assert ("EXPOSE", "8000") in instructions
    assert any(keyword == "VOLUME" and "/data" in args for keyword, args in instructions)
    assert ("WORKDIR", "/app") in instructions
    (healthcheck,) = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert "urllib.request" in healthcheck and "/healthz" in healthcheck


def test_dockerfile_copies_only_existing_sources_that_dockerignore_keeps():
    copied = []
    for keyword, args in _dockerfile():
        if keyword == "COPY":
            assert not args.startswith("--from"), "single-stage build expected"
            copied.extend(args.split()[:-1])
    assert {s.rstrip("/") for s in copied} == {"pyproject.toml", "README.md", "detectors", "service"}
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    for pattern in (".venv", ".git", "artifacts", "benchmarks/results", ".pytest_cache"):
        assert pattern in ignore
    for source in copied:
        name = source.rstrip("/")
        assert not any(fnmatch.fnmatch(name, p) for p in ignore if not p.startswith("!")), f"{name} is dockerignored"
    assert (ROOT / "service" / "default_model" / "model.safetensors").is_file()
    missing = sorted(s.rstrip("/") for s in copied if not (ROOT / s.rstrip("/")).exists())
    assert not missing, f"the Dockerfile copies {missing}, which do not exist"

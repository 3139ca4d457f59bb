"""The drift alarm (README "Drift alarm"): Prometheus rules in docker/prometheus/rules/,
the same groups as a Kubernetes PrometheusRule, and the Grafana panel's queries.

On in-distribution traffic the k flagged rows among n scored rows are Binomial(n, alpha);
the alert fires when k/n > alpha + z sqrt(alpha (1 - alpha) / n) with z = 3.09 (one-sided
0.001 per evaluation, normal approximation) and n alpha >= 10, for 5 minutes.

Two evaluators check the rules on the same series (docker/prometheus/tests/gga-drift.test.yml):
``promtool test rules`` (skipped where promtool is absent; .ci/run installs Debian's
``prometheus`` package, which ships it) and a small Python evaluator here, which mirrors
the pinned rule expressions (``increase`` with Prometheus' extrapolation, the sums by job,
the bound, the ``for`` state machine) and so tests the logic without promtool. Exact
numbers: the bound on given counter values, the service's own counters after clean and
out-of-distribution requests.
"""

from __future__ import annotations

import fnmatch
import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.test_docker_files import _compose, _exposed_sample_names, _host_mounts

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
RULES = DOCKER / "prometheus" / "rules" / "gga-drift.yml"
PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
K8S_RULES = DOCKER / "k8s" / "prometheus-rules.yaml"
PROMTOOL_TEST = DOCKER / "prometheus" / "tests" / "gga-drift.test.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not on PATH (Debian's prometheus package ships it; .ci/run puts it in "
    "the CI venv); the Python evaluator tests still check the rules")

# The documented constants (the rules file is the one place they are set; pinned here).
WINDOW_S = 15 * 60
Z = 3.09
MIN_EXPECTED_FLAGS = 10  # n * alpha >= 10: at alpha = 0.05, n >= 200
FOR_S = 5 * 60
ALERT = "GGAFlagRateAboveAlpha"

# What the Python evaluator implements; a change to the rules must change this too.
EXPECTED_EXPRS = {
    "gga:alpha": "max by (job) (gga_alpha)",
    "gga:rows:increase15m": "sum by (job) (increase(gga_rows_total[15m]))",
    "gga:flagged:increase15m": "sum by (job) (increase(gga_flagged_total[15m]))",
    "gga:flag_rate:ratio15m": "gga:flagged:increase15m / gga:rows:increase15m",
    "gga:flag_rate:bound15m": "gga:alpha + 3.09 * sqrt(gga:alpha * (1 - gga:alpha) / gga:rows:increase15m)",
    ALERT: "gga:flag_rate:ratio15m > gga:flag_rate:bound15m and gga:rows:increase15m * gga:alpha >= 10",
}


# --- the rule logic in Python ------------------------------------------------------------


def bound(alpha: float, n: float, z: float = Z) -> float:
    """gga:flag_rate:bound15m: the largest in-distribution flag rate at the stated false-alarm rate."""
    return alpha + z * math.sqrt(alpha * (1 - alpha) / n) if n > 0 else math.inf


def alarm(alpha: float, n: float, k: float) -> bool:
    """The GGAFlagRateAboveAlpha condition (before its ``for``) on n scored, k flagged rows."""
    if n <= 0:
        return False  # 0/0 is NaN in PromQL: no comparison holds
    return k / n > bound(alpha, n) and n * alpha >= MIN_EXPECTED_FLAGS


def _normal_upper_tail(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


def _binomial_upper_tail(n: int, p: float, k: int) -> float:
    """P(K >= k) for K ~ Binomial(n, p), exact up to float rounding (terms in log space)."""
    log_pmf = (math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
               + i * math.log(p) + (n - i) * math.log1p(-p) for i in range(k, n + 1))
    return math.fsum(math.exp(v) for v in log_pmf)


def _false_alarm_exact(n: int, alpha: float) -> float:
    """P(alarm) per evaluation for Binomial(n, alpha) flags: P(K > bound * n)."""
    first = math.floor(bound(alpha, n) * n) + 1  # smallest k with k / n > bound
    return _binomial_upper_tail(n, alpha, first)


# --- a small evaluator of the rules on promtool's input series ----------------------------


@dataclass
class Series:
    name: str
    labels: dict[str, str]
    samples: list[tuple[float, float]]  # (t seconds, value)


def _duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)", text)
    assert m, f"unsupported duration {text!r}"
    return int(m[1]) * units[m[2]]


def _expand(values: str) -> list[float | None]:
    """promtool's expanding notation: 'a+bxn' (n + 1 values), 'a-bxn', 'a', '_', '_xn'."""
    out: list[float | None] = []
    for token in values.split():
        if m := re.fullmatch(r"_x(\d+)", token):
            out.extend([None] * int(m[1]))
        elif token == "_":
            out.append(None)
        elif m := re.fullmatch(r"(-?[\d.]+)([+-])([\d.]+)x(\d+)", token):
            start, step = float(m[1]), float(m[3]) * (1 if m[2] == "+" else -1)
            out.extend(start + i * step for i in range(int(m[4]) + 1))
        else:
            out.append(float(token))
    return out


def _selector(text: str) -> tuple[str, dict[str, str]]:
    m = re.fullmatch(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{(.*)\})?\s*", text)
    assert m, f"unsupported series {text!r}"
    labels = dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', m[2] or ""))
    return m[1], labels


def _load_series(test: dict) -> list[Series]:
    step = _duration_s(test["interval"])
    out = []
    for item in test["input_series"]:
        name, labels = _selector(item["series"])
        values = _expand(item["values"])
        out.append(Series(name, labels, [(i * step, v) for i, v in enumerate(values) if v is not None]))
    return out


def _increase(samples: list[tuple[float, float]], t: float, window: float) -> float | None:
    """Prometheus 2.x ``increase``: samples in [t - window, t], counter resets added back,
    extrapolated to the window's edges (as promql/functions.go extrapolatedRate)."""
    points = [(ts, v) for ts, v in samples if t - window <= ts <= t]
    if len(points) < 2:
        return None
    result = points[-1][1] - points[0][1]
    last = 0.0
    for _, v in points:
        if v < last:
            result += last
        last = v
    to_start, to_end = points[0][0] - (t - window), t - points[-1][0]
    sampled = points[-1][0] - points[0][0]
    average = sampled / (len(points) - 1)
    if result > 0 and points[0][1] >= 0:
        to_start = min(to_start, sampled * (points[0][1] / result))
    threshold = average * 1.1
    interval = sampled
    interval += to_start if to_start < threshold else average / 2
    interval += to_end if to_end < threshold else average / 2
    return result * (interval / sampled)


def _instant(samples: list[tuple[float, float]], t: float, lookback: float = 300.0) -> float | None:
    before = [v for ts, v in samples if t - lookback < ts <= t]
    return before[-1] if before else None


def evaluate(series: list[Series], t: float) -> dict[str, dict[str, float]]:
    """The recording rules at time t: {record name: {job: value}}, plus the alert condition."""
    jobs = sorted({s.labels["job"] for s in series})
    out: dict[str, dict[str, float]] = {name: {} for name in EXPECTED_EXPRS}
    for job in jobs:
        mine = [s for s in series if s.labels["job"] == job]
        alphas = [v for s in mine if s.name == "gga_alpha" if (v := _instant(s.samples, t)) is not None]
        rows = [v for s in mine if s.name == "gga_rows_total" if (v := _increase(s.samples, t, WINDOW_S)) is not None]
        flags = [v for s in mine if s.name == "gga_flagged_total"
                 if (v := _increase(s.samples, t, WINDOW_S)) is not None]
        if alphas:
            out["gga:alpha"][job] = max(alphas)
        if rows:
            out["gga:rows:increase15m"][job] = math.fsum(rows)
        if flags:
            out["gga:flagged:increase15m"][job] = math.fsum(flags)
        if rows and flags:
            n, k = out["gga:rows:increase15m"][job], out["gga:flagged:increase15m"][job]
            out["gga:flag_rate:ratio15m"][job] = k / n if n else (math.nan if k == 0 else math.inf)
            if alphas:
                a = out["gga:alpha"][job]
                out["gga:flag_rate:bound15m"][job] = bound(a, n)
                if alarm(a, n, k):
                    out[ALERT][job] = out["gga:flag_rate:ratio15m"][job]
    return out


def firing(series: list[Series], t_end: float, step: float) -> dict[str, float]:
    """Alerts firing at t_end ({job: value}), evaluating every ``step`` from 0 (the ``for`` state)."""
    active_since: dict[str, float] = {}
    fired: dict[str, float] = {}
    for i in range(int(round(t_end / step)) + 1):
        t = i * step
        now = evaluate(series, t)[ALERT]
        active_since = {job: active_since.get(job, t) for job in now}
        fired = {job: value for job, value in now.items() if t - active_since[job] >= FOR_S}
    return fired


def _humanize_percentage(value: float) -> str:
    return f"{value * 100:.4g}%"


def _render(template: str, labels: dict[str, str], value: float) -> str:
    """The two template forms the rules use: {{ $labels.x }} and {{ $value | humanizePercentage }}."""
    text = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels[m[1]], template)
    text = re.sub(r"\{\{\s*\$value\s*\|\s*humanizePercentage\s*\}\}", _humanize_percentage(value), text)
    assert "{{" not in text, f"template form not covered by this test: {template!r}"
    return text


# --- helpers --------------------------------------------------------------------------------


def _groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["groups"]


def _rules() -> dict[str, dict]:
    return {rule.get("record") or rule["alert"]: rule for group in _groups() for rule in group["rules"]}


def _promtool_test() -> dict:
    return yaml.safe_load(PROMTOOL_TEST.read_text())


# --- the rules files --------------------------------------------------------------------------


def test_the_rules_are_the_pinned_expressions_in_dependency_order():
    (group,) = _groups()
    names = [rule.get("record") or rule["alert"] for rule in group["rules"]]
    assert names == list(EXPECTED_EXPRS)  # one group, evaluated in order: each rule reads the ones above
    rules = _rules()
    for name, expr in EXPECTED_EXPRS.items():
        assert " ".join(rules[name]["expr"].split()) == expr, name
    alert = rules[ALERT]
    assert _duration_s(alert["for"]) == FOR_S
    assert alert["labels"] == {"severity": "warning"}
    assert set(alert["annotations"]) == {"summary", "description"}


def test_the_rules_read_only_metrics_the_service_exposes():
    exposed = _exposed_sample_names()
    assert "gga_alpha" in exposed
    for name, rule in _rules().items():
        unknown = set(re.findall(r"gga_[a-z_]+", rule["expr"])) - exposed
        assert not unknown, f"{name} reads {sorted(unknown)}, which the service does not expose"
        for recorded in re.findall(r"gga:[a-z0-9_:]+", rule["expr"]):
            assert recorded in _rules(), f"{name} reads {recorded}, which no rule records"


def test_compose_prometheus_loads_the_rules_file():
    prometheus = _compose()["services"]["prometheus"]
    mounts = _host_mounts(prometheus)
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    loaded = []
    for pattern in config["rule_files"]:
        folder, _, glob = pattern.rpartition("/")
        assert folder in mounts, f"rule_files {pattern!r} is in no folder compose mounts"
        loaded.extend(p for p in mounts[folder].iterdir() if fnmatch.fnmatch(p.name, glob))
    assert RULES in loaded
    # the promtool unit test is not under the loaded folder (it is not a rules file)
    assert PROMTOOL_TEST not in loaded


def test_kubernetes_prometheus_rule_holds_the_same_groups():
    (doc,) = [d for d in yaml.safe_load_all(K8S_RULES.read_text()) if d]
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "gga"
    assert doc["spec"] == {"groups": _groups()}


# --- the bound, exact numbers ----------------------------------------------------------------


def test_z_is_the_one_sided_normal_quantile_of_the_stated_false_alarm_rate():
    assert _normal_upper_tail(Z) == pytest.approx(0.001, rel=1e-3)  # 0.0010008
    assert _normal_upper_tail(Z) > 0.001 > _normal_upper_tail(Z + 0.01)


def test_bound_on_recorded_counter_values():
    # two scrapes 15 minutes apart: rows 1000 -> 2500, flagged 50 -> k
    n = 2500 - 1000
    assert bound(0.05, n) == 0.05 + 3.09 * math.sqrt(0.05 * 0.95 / 1500) == 0.06738840130661816
    assert bound(0.05, n) * n == pytest.approx(101.0826, abs=1e-4)
    assert not alarm(0.05, n, 125 - 50)  # 5.0%: alpha itself
    assert not alarm(0.05, n, 151 - 50)  # 101 flags, 6.73%: inside the bound
    assert alarm(0.05, n, 152 - 50)  # 102 flags, 6.80%: above
    # alpha 0.01: the bound is relative to the served alpha
    assert bound(0.01, 1500) == pytest.approx(0.017938, abs=1e-6)
    assert not alarm(0.01, 1500, 26) and alarm(0.01, 1500, 27)


def test_too_few_rows_never_alarm():
    # n alpha >= 10: 200 rows at alpha 0.05, 1000 at alpha 0.01
    assert not alarm(0.05, 199, 199) and alarm(0.05, 200, 40)
    assert not alarm(0.01, 999, 999) and alarm(0.01, 1000, 40)
    assert not alarm(0.05, 0, 0)
    assert bound(0.05, 200) == pytest.approx(0.097620, abs=1e-6)  # at the smallest n: flag rate > 9.76%


def test_false_alarm_rate_exact_binomial():
    """The normal approximation's 0.001 against the exact binomial tail (README numbers)."""
    exact = {n: _false_alarm_exact(n, 0.05) for n in (200, 1000, 20000)}
    assert exact[200] == pytest.approx(0.0027, abs=5e-5)  # fires at k >= 20 of 200
    assert exact[1000] == pytest.approx(0.0015, abs=5e-5)
    assert exact[20000] == pytest.approx(0.0011, abs=5e-5)
    assert _false_alarm_exact(1000, 0.01) == pytest.approx(0.0033, abs=5e-5)
    # conformal flags are at most alpha: a true flag rate below alpha alarms even less
    first = math.floor(bound(0.05, 1000) * 1000) + 1
    assert _binomial_upper_tail(1000, 0.045, first) < _false_alarm_exact(1000, 0.05) / 3


# --- the scenarios of the promtool test, in Python --------------------------------------------


def test_python_evaluator_agrees_with_the_promtool_expectations():
    spec = _promtool_test()
    step = _duration_s(spec["evaluation_interval"])
    assert spec["rule_files"] == ["../rules/gga-drift.yml"]
    (test,) = spec["tests"]
    series = _load_series(test)
    checked = 0
    for case in test["promql_expr_test"]:
        name, selector = _selector(case["expr"])
        values = evaluate(series, _duration_s(case["eval_time"]))[name]
        got = {job: v for job, v in values.items() if selector.get("job", job) == job}
        expected = {}
        for sample in case["exp_samples"]:
            sample_name, labels = _selector(sample["labels"])
            assert sample_name == name and set(labels) == {"job"}
            expected[labels["job"]] = float(sample["value"])
        assert got == expected, case  # exact: the same float operations as Prometheus
        checked += len(expected)
    alerts = 0
    for case in test["alert_rule_test"]:
        assert case["alertname"] == ALERT
        fired = firing(series, _duration_s(case["eval_time"]), step)
        labels_and_annotations = []
        for job, value in fired.items():
            labels = {"job": job, **_rules()[ALERT]["labels"]}
            annotations = {k: _render(v, labels, value) for k, v in _rules()[ALERT]["annotations"].items()}
            labels_and_annotations.append((labels, annotations))
        expected = [(a["exp_labels"], a["exp_annotations"]) for a in case["exp_alerts"]]
        assert labels_and_annotations == expected, case["eval_time"]
        alerts += len(expected)
    assert checked >= 20 and alerts == 2


def test_drift_scenario_timeline():
    """The drift job's 15-minute flag rate is 0.05 + t/150, t minutes into the drift (minute 30):
    over the bound from t = 3, firing from t = 8 (for: 5m); steady, within, restart, quiet never."""
    (test,) = _promtool_test()["tests"]
    series = _load_series(test)
    onset = None
    for minute in range(0, 61):
        rules = evaluate(series, minute * 60.0)
        if minute >= 15:
            assert rules["gga:flag_rate:ratio15m"]["steady"] == 0.05
            assert rules["gga:rows:increase15m"]["restart"] == 1500  # across the counter reset too
        if 30 <= minute <= 45:
            assert rules["gga:flag_rate:ratio15m"]["drift"] == pytest.approx(0.05 + (minute - 30) / 150, abs=1e-15)
        if onset is None and "drift" in rules[ALERT]:
            onset = minute
        assert set(rules[ALERT]) <= {"drift"}
    assert onset == 33
    assert firing(series, 37 * 60.0, 60.0) == {}
    assert set(firing(series, 38 * 60.0, 60.0)) == {"drift"}


# --- promtool -----------------------------------------------------------------------------------


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


@needs_promtool
def test_promtool_checks_the_rules_and_the_kubernetes_copy(tmp_path):
    done = _promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    spec = next(d for d in yaml.safe_load_all(K8S_RULES.read_text()) if d)["spec"]
    (tmp_path / "k8s.yml").write_text(yaml.safe_dump(spec))
    done = _promtool("check", "rules", str(tmp_path / "k8s.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_checks_the_prometheus_config_with_its_rules(tmp_path):
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    mounts = _host_mounts(_compose()["services"]["prometheus"])
    config["rule_files"] = [str(mounts[p.rpartition("/")[0]] / p.rpartition("/")[2]) for p in config["rule_files"]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    done = _promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 rules found" in done.stdout + done.stderr


@needs_promtool
def test_promtool_unit_test_of_the_rules():
    done = _promtool("test", "rules", PROMTOOL_TEST.name, cwd=PROMTOOL_TEST.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


@needs_promtool
@pytest.mark.parametrize(("old", "new"), [
    ("3.09 *", "2 *"),  # a lower z: the drift alarms before minute 38
    ("for: 5m", "for: 4m"),
    (">= 10", ">= 7"),  # the quiet job (7.5 expected flags) alarms
    ("[15m]", "[10m]"),
])
def test_promtool_unit_test_catches_a_changed_rule(tmp_path, old, new):
    text = RULES.read_text()
    assert old in text
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "rules" / RULES.name).write_text(text.replace(old, new))
    (tmp_path / "tests" / PROMTOOL_TEST.name).write_text(PROMTOOL_TEST.read_text())
    done = _promtool("test", "rules", PROMTOOL_TEST.name, cwd=tmp_path / "tests")
    assert done.returncode != 0 and "FAILED" in done.stdout + done.stderr


# --- the service's counters -----------------------------------------------------------------------


MNIST = ROOT.parent / "shared" / "data"


@pytest.mark.slow
def test_alarm_on_the_service_counters_clean_then_out_of_distribution(tmp_path):
    """gga_alpha is the served alpha; the counters of clean MNIST digits stay inside the bound,
    those of Fashion-MNIST images (out of distribution) go above it."""
    from detectors.datasets import load_idx_split
    from service.worker import DetectorSlot
    from tests.service.conftest import Running, make_settings, npy_bytes, run

    if not (MNIST / "mnist").is_dir() or not (MNIST / "fashion_mnist").is_dir():
        pytest.skip(f"MNIST / Fashion-MNIST not found under {MNIST}")
    clean = load_idx_split(MNIST / "mnist", "t10k")[0][:400]
    fashion = load_idx_split(MNIST / "fashion_mnist", "t10k")[0][:200]

    def counters(m):
        return m[("gga_alpha", ())], m[("gga_rows_total", ())], m[("gga_flagged_total", ())]

    async def go(settings, batches):
        async with Running(settings) as svc:
            seen = [counters(await svc.metrics())]
            for x in batches:
                r = await svc.client.post("/predict", content=npy_bytes(x),
                                          headers={"content-type": "application/x-npy"})
                assert r.status_code == 200, r.text
                seen.append(counters(await svc.metrics()))
            return seen

    seen = run(go(make_settings(tmp_path), [clean, fashion]))
    (alpha, n0, k0), (_, n1, k1), (_, n2, k2) = seen
    assert alpha == 0.05  # the bundled detector's alpha
    assert (n0, k0) == (0, 0) and n1 - n0 == 400 and n2 - n1 == 200
    assert not alarm(alpha, n1 - n0, k1 - k0), f"clean digits: {k1 - k0} of 400 flagged"
    assert (k1 - k0) / 400 <= bound(alpha, 400)
    assert alarm(alpha, n2 - n1, k2 - k1), f"Fashion-MNIST: {k2 - k1} of 200 flagged"

    (alpha, *_), = run(go(make_settings(tmp_path, alpha=0.1), []))
    assert alpha == 0.1  # GGA_ALPHA overrides the detector's

    async def swapped():
        async with Running(make_settings(tmp_path)) as svc:
            detector, _ = svc.app.state.slot.get()
            DetectorSlot.swap(svc.app.state.slot, SimpleNamespace(alpha=0.2), "v9")  # as a fit with alpha 0.2
            try:
                return counters(await svc.metrics())[0]
            finally:
                DetectorSlot.swap(svc.app.state.slot, detector, "v0")

    assert run(swapped()) == 0.2  # read at each scrape: follows the served detector

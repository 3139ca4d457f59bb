"""Replicas that share one artifact store, and fitting as a job (README "Replicas and fitting as a job").

1. On loopback: three real ``gga-serve`` processes on one artifact directory behind nginx
   (Debian's package; the test writes its own nginx.conf and runs nginx in the foreground
   with a temporary prefix). A fit through the balancer (``POST /fit``) and one with
   ``gga-fit`` on the same store: after each, every replica answers ``/info`` with the new
   version within 10 s of its being written (the default ``GGA_RELOAD_INTERVAL_S`` of 5 s),
   while a client keeps sending ``/predict`` through nginx and gets no error. Skipped only
   where no nginx binary can be found (.ci/run unpacks one).
2. The Kubernetes manifests in docker/k8s/: validated offline against the Kubernetes JSON
   schemas bundled in the PyPI package ``kubernetes-validate`` (strict: unknown fields are
   errors), and checked for what the topology needs (one ReadWriteMany claim mounted by
   every replica and by the fit Job, non-root pods with a read-only root file system, a
   GPU variant, an autoscaler on ``gga_queue_rows`` that the adapter rule serves).
"""

from __future__ import annotations

import collections
import copy
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from benchmarks.serverproc import free_port, start_server

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"
K8S = ROOT / "docker" / "k8s"
TOKEN = "replica-test-token"
REPLICAS = 3
PROPAGATION_LIMIT_S = 10.0


def _find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


NGINX = _find_nginx()


# --- loopback: replicas behind nginx ----------------------------------------------------------------


NGINX_CONF = """\
# written by tests/test_replicas.py: a round-robin balancer over the replicas, in the foreground
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format upstream '$upstream_addr $status $request_method $uri';
    access_log {prefix}/access.log upstream;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    client_max_body_size 64m;
    upstream gga {{
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://gga;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;  # stream bodies (fit uploads): no temporary files
            proxy_buffering off;
            proxy_read_timeout 60s;
            add_header X-Upstream $upstream_addr always;
        }}
    }}
}}
"""


@contextmanager
def nginx_balancer(prefix: Path, upstreams: list[str]):
    """nginx in the foreground on a free loopback port, balancing over ``upstreams`` (http://host:port)."""
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    servers = "\n".join(f"        server {u.removeprefix('http://')};" for u in upstreams)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, servers=servers))
    check = subprocess.run([NGINX, "-t", "-p", str(prefix), "-c", str(conf), "-e", "stderr"],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, f"nginx -t failed:\n{check.stderr}"
    proc = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(conf), "-e", "stderr"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, f"nginx exited with {proc.returncode}: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "nginx did not answer within 20 s"
            time.sleep(0.1)
        yield base
    finally:
        proc.send_signal(signal.SIGQUIT)  # graceful stop
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def replicas(n: int, env: dict[str, str], logs: Path):
    """``n`` gga-serve processes started side by side; yields [(base url, log file)]."""
    logs.mkdir(parents=True, exist_ok=True)
    started: list[tuple[subprocess.Popen, str, Path]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        log = logs / f"replica{i}.log"
        with open(log, "w") as out:
            proc, base = start_server(env, timeout=180, stdout=out, stderr=subprocess.STDOUT)
        with lock:
            started.append((proc, base, log))

    try:
        with ThreadPoolExecutor(n) as pool:
            for f in [pool.submit(one, i) for i in range(n)]:
                f.result()
        yield [(base, log) for _, base, log in started]
    finally:
        for proc, _, _ in started:
            proc.terminate()
        for proc, _, _ in started:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


class PredictClient(threading.Thread):
    """Sends /predict through the balancer one after another until stopped (or ``max_s``, ``max_requests``)."""

    def __init__(self, base: str, body: dict, max_s: float = 600.0, max_requests: int = 200_000) -> None:
        super().__init__(name="predict-client", daemon=True)
        self.base, self.body, self.max_s, self.max_requests = base, body, max_s, max_requests
        self.stop = threading.Event()
        self.statuses: collections.Counter = collections.Counter()
        self.errors: list[str] = []
        self.versions: collections.Counter = collections.Counter()
        self.upstreams: collections.Counter = collections.Counter()
        self.last_version: str | None = None

    def run(self) -> None:
        deadline = time.monotonic() + self.max_s
        with httpx.Client(base_url=self.base, timeout=60) as client:
            while not self.stop.is_set() and time.monotonic() < deadline and sum(self.statuses.values()) < \
                    self.max_requests:
                try:
                    r = client.post("/predict", json=self.body)
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                    self.statuses["transport error"] += 1
                    continue
                self.statuses[r.status_code] += 1
                if r.status_code != 200:
                    self.errors.append(f"{r.status_code}: {r.text[:300]}")
                    continue
                self.last_version = r.json()["predictions"][0]["detector_version"]
                self.versions[self.last_version] += 1
                self.upstreams[r.headers.get("x-upstream")] += 1
                time.sleep(0.005)


def _version_of(base: str) -> str | None:
    return httpx.get(f"{base}/info", timeout=10).json()["detector_version"]


def _wait_everywhere(bases: list[str], version: str, written_at: float, limit: float) -> dict[str, float]:
    """Seconds from ``written_at`` (epoch) until each replica's /info first showed ``version`` (polled every 50 ms)."""
    seen: dict[str, float] = {}
    while len(seen) < len(bases):
        for base in bases:
            if base not in seen and _version_of(base) == version:
                seen[base] = time.time() - written_at
        if len(seen) < len(bases):
            late = [b for b in bases if b not in seen]
            assert time.time() - written_at < limit, f"{late} still not serving {version} after {limit} s"
            time.sleep(0.05)
    return seen


def _written_at(path: str) -> float:
    """When the version folder got its last entry: the save's last step before the rename (a lower bound of it)."""
    return os.stat(path).st_ctime


def _npz_bytes(x: np.ndarray, y: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    return buf.getvalue()


@pytest.mark.skipif(NGINX is None, reason="nginx not found (PATH, /usr/sbin): install Debian's nginx package "
                    "(.ci/run unpacks its binary) to run the replica test")
def test_replicas_behind_nginx_pick_up_every_new_version(tmp_path, record_property):
    from detectors.datasets import load_idx_split

    if not MNIST.exists():
        pytest.skip(f"MNIST not found under {MNIST}")
    x, y = load_idx_split(MNIST, "t10k")
    artifacts = tmp_path / "artifacts"
    env = {"GGA_ARTIFACT_DIR": str(artifacts), "GGA_ADMIN_TOKEN": TOKEN, "GGA_DEVICE": "cpu",
           "GGA_STRATEGY": "device", "GGA_TORCH_THREADS": "1", "GGA_FIT_BATCH_SIZE": "128"}
    # GGA_RELOAD_INTERVAL_S is left at its default (5 s): the figure measured is the one deployments get
    auth = {"authorization": f"Bearer {TOKEN}"}
    figures: dict[str, object] = {}
    with ExitStack() as stack:
        served = stack.enter_context(replicas(REPLICAS, env, tmp_path / "logs"))
        bases = [base for base, _ in served]
        balancer = stack.enter_context(nginx_balancer(tmp_path / "nginx", bases))
        assert {_version_of(b) for b in bases} == {"v0"}  # the bundled detector everywhere

        client = PredictClient(balancer, {"inputs": x[:1].tolist()})
        client.start()
        stack.callback(client.join, 30)
        stack.callback(client.stop.set)
        time.sleep(1.0)

        # (a) a fit through the balancer: one replica runs it, the others reload the version it wrote
        t0 = time.monotonic()
        r = httpx.post(f"{balancer}/fit", headers=auth, files={"file": ("fit.npz", _npz_bytes(x[:600], y[:600]))},
                       data={"preset": "gga"}, timeout=60)
        assert r.status_code == 202, r.text
        fitter = "http://" + r.headers["x-upstream"]
        assert fitter in bases
        job_url = f"{fitter}{r.json()['status_url']}"
        while (job := httpx.get(job_url, headers=auth, timeout=10).json())["state"] == "running":
            assert time.monotonic() - t0 < 180, f"the fit job did not finish: {job}"
            time.sleep(0.1)
        assert job["state"] == "succeeded", job
        v1 = job["result"]["version"]
        assert v1 == "v1"
        seen_a = _wait_everywhere(bases, v1, _written_at(job["result"]["path"]), PROPAGATION_LIMIT_S)
        figures["fit_seconds_post"] = round(job["finished_at"] - job["started_at"], 2)
        figures["propagation_s_post_fit"] = {b: round(s, 2) for b, s in seen_a.items()}

        # (b) gga-fit, the batch job, on the same store: every replica reloads
        (tmp_path / "job").mkdir()
        np.savez(tmp_path / "job" / "train.npz", x=x[600:1200], y=y[600:1200])
        job_env = {k: v for k, v in os.environ.items() if not k.startswith("GGA_")}
        job_env.update(GGA_DEVICE="cpu", GGA_TORCH_THREADS="1")
        t1 = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "service.fitcli", "--data", str(tmp_path / "job" / "train.npz"),
                               "--artifact-dir", str(artifacts), "--preset", "gga", "--no-progress"],
                              cwd=ROOT, env=job_env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["version"] == "v2"
        figures["fit_seconds_gga_fit_process"] = round(time.monotonic() - t1, 2)
        seen_b = _wait_everywhere(bases, "v2", _written_at(result["path"]), PROPAGATION_LIMIT_S)
        figures["propagation_s_gga_fit"] = {b: round(s, 2) for b, s in seen_b.items()}

        # the balancer's own answers now come from v2 too
        deadline = time.monotonic() + 10
        while client.last_version != "v2":
            assert time.monotonic() < deadline and client.is_alive(), "the client never saw v2"
            time.sleep(0.05)
        time.sleep(0.5)
        client.stop.set()
        client.join(60)
        assert not client.is_alive()

    logs = {base: log.read_text() for base, log in served}
    access = (tmp_path / "nginx" / "access.log").read_text().splitlines()
    figures["predict_statuses"] = {str(k): v for k, v in client.statuses.items()}
    figures["predict_versions"] = dict(client.versions)
    record_property("replica_figures", json.dumps(figures))
    print("\nreplica figures:", json.dumps(figures))

    assert client.errors == [], client.errors[:5]
    assert set(client.statuses) == {200} and client.statuses[200] >= 50
    assert {"v0", "v1", "v2"} <= set(client.versions)
    # round robin: every replica answered /predict through the balancer
    assert {f"http://{u}" for u in client.upstreams} == set(bases), client.upstreams
    predicts = [line for line in access if line.endswith("POST /predict")]
    assert len(predicts) == sum(client.statuses.values())
    # every other replica reloaded v1 (the fitting one swapped it in itself; tests/service/test_reload.py
    # checks that it is not loaded again there); all reloaded v2
    assert max(seen_a.values()) <= PROPAGATION_LIMIT_S and max(seen_b.values()) <= PROPAGATION_LIMIT_S
    for base, text in logs.items():
        reloaded = re.findall(r"reloaded detector (v\d+)", text)
        if base == fitter:  # a poll that lists v1 in the instant between its rename and the job's swap may win
            assert reloaded in (["v2"], ["v1", "v2"]), (base, reloaded)
        else:
            assert reloaded == ["v1", "v2"], (base, reloaded)
        assert "skipping detector artifact" not in text and "Traceback" not in text, text[-3000:]


def test_the_nginx_config_is_valid_for_the_skip_reason():
    """The skip above names nginx; where it exists, its own syntax check accepts the config the test writes."""
    if NGINX is None:
        pytest.skip("nginx not found: nothing to check the configuration with")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        conf = Path(d) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=d, port=free_port(), servers="        server 127.0.0.1:9;"))
        check = subprocess.run([NGINX, "-t", "-p", d, "-c", str(conf), "-e", "stderr"], capture_output=True,
                               text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    assert "syntax is ok" in check.stderr


# --- Kubernetes manifests ------------------------------------------------------------------------------

K8S_VERSION = "1.30"  # the oldest API level the manifests are meant for; every kind used is GA there
CRD_KINDS = {("monitoring.coreos.com/v1", "PrometheusRule")}  # Prometheus operator: no schema in the package


def _manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend((path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def _by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in _manifests() if doc["kind"] == kind]


def _one(kind: str, name: str) -> dict:
    (found,) = [d for d in _by_kind(kind) if d["metadata"]["name"] == name]
    return found


def _pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def kubernetes_validate():
    return pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (PyPI) not installed: "
                              "pip install kubernetes-validate (.ci/run does)")


def test_the_validator_uses_its_bundled_schemas_and_catches_errors(kubernetes_validate):
    """The check below can fail: a wrong type, an unknown field (strict) and a missing field are errors."""
    deployment = _one("Deployment", "gga")
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    for mutate in (lambda d: d["spec"].__setitem__("replicas", "two"),
                   lambda d: _pod_spec(d)["containers"][0].__setitem__("imagePullPolicy2", "Always"),
                   lambda d: d["spec"].pop("selector")):
        bad = copy.deepcopy(deployment)
        mutate(bad)
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    schemas = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    assert any(schemas.glob(f"v{K8S_VERSION}*-local-strict/deployment-apps-v1.json"))  # on disk: no network


@pytest.mark.parametrize("name,doc", [pytest.param(n, d, id=f"{n}:{d['kind']}/{d['metadata']['name']}")
                                      for n, d in _manifests()])
def test_every_manifest_is_valid_against_the_kubernetes_schema(kubernetes_validate, name, doc):
    if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
        pytest.skip(f"{doc['kind']} is a custom resource (no schema bundled); tests/test_alerts.py checks it")
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_manifests_hold_the_whole_topology():
    kinds = collections.Counter(doc["kind"] for _, doc in _manifests())
    assert kinds >= collections.Counter({"Deployment": 2, "Service": 1, "PersistentVolumeClaim": 1, "Job": 1,
                                         "HorizontalPodAutoscaler": 1, "ConfigMap": 1, "PrometheusRule": 1})


def test_every_replica_and_the_fit_job_mount_one_read_write_many_claim():
    (pvc,) = _by_kind("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    workloads = _by_kind("Deployment") + _by_kind("Job")
    for doc in workloads:
        spec = _pod_spec(doc)
        volumes = {v["name"]: v for v in spec["volumes"]}
        (container,) = spec["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        env = {e["name"]: e.get("value") for e in container["env"]}
        artifacts = mounts["/data"]
        assert volumes[artifacts["name"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"], doc
        assert not artifacts.get("readOnly", False)
        assert env["GGA_ARTIFACT_DIR"] == "/data/artifacts"
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


def test_pods_run_as_non_root_with_a_read_only_root_file_system():
    for doc in _by_kind("Deployment") + _by_kind("Job"):
        spec = _pod_spec(doc)
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["HOME"] == "/tmp"  # anything that writes under ~ lands on the writable emptyDir


def test_the_gpu_variant_asks_for_one_gpu_and_the_cuda_image():
    cpu, gpu = _one("Deployment", "gga"), _one("Deployment", "gga-gpu")
    (c_cpu,), (c_gpu,) = _pod_spec(cpu)["containers"], _pod_spec(gpu)["containers"]
    assert c_gpu["resources"]["requests"]["nvidia.com/gpu"] == 1 and c_gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert not any("nvidia.com/gpu" in c_cpu["resources"].get(k, {}) for k in ("requests", "limits"))
    assert c_gpu["image"].endswith(":cuda") and not c_cpu["image"].endswith(":cuda")
    env = {e["name"]: e.get("value") for e in c_gpu["env"]}
    assert env["GGA_DEVICE"] == "cuda"
    # the image is the Dockerfile's CUDA build: the manifest's header gives the build args the Dockerfile documents
    header = (K8S / "deployment-gpu.yaml").read_text()
    for arg in ("BASE_IMAGE=nvidia/cuda:", "TORCH_INDEX=https://download.pytorch.org/whl/cu"):
        assert arg in header and arg in (ROOT / "Dockerfile").read_text()
    # both variants sit behind the one Service
    (service,) = _by_kind("Service")
    for doc in (cpu, gpu):
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()


def test_the_fit_job_runs_gga_fit_on_the_shared_store():
    (job,) = _by_kind("Job")
    (container,) = _pod_spec(job)["containers"]
    command = container.get("command", []) + container.get("args", [])
    assert command[0] == "gga-fit" and "--data" in command
    data = Path(command[command.index("--data") + 1])
    assert data.is_relative_to("/data") and not data.is_relative_to("/data/artifacts")
    assert _pod_spec(job)["restartPolicy"] == "Never"
    image = {d["metadata"]["name"]: _pod_spec(d)["containers"][0]["image"] for d in _by_kind("Deployment")}
    assert container["image"] == image["gga"]


def test_the_autoscaler_scales_on_queue_depth_served_by_the_adapter_rule():
    (hpa,) = _by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gga"}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    (adapter,) = _by_kind("ConfigMap")
    config = yaml.safe_load(adapter["data"]["config.yaml"])
    rules = [r for r in config["rules"] if "gga_queue_rows" in r["seriesQuery"]]
    assert len(rules) == 1
    rule = rules[0]
    # the adapter names the series as the HPA asks for it, per pod, from the service's gauge
    assert re.sub(rule["name"]["matches"], rule["name"]["as"], "gga_queue_rows") == name
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
    from prometheus_client import CollectorRegistry

    from service.metrics import ServiceMetrics

    registry = CollectorRegistry()
    ServiceMetrics(registry)
    gauges = {f.name for f in registry.collect() if f.type == "gauge"}
    assert "gga_queue_rows" in gauges
    # a target below the queue that one replica refuses at (GGA_MAX_QUEUE_ROWS, default 2048) and above 0
    target = float(metric["pods"]["target"]["averageValue"])
    env = {e["name"]: e.get("value") for e in _pod_spec(_one("Deployment", "gga"))["containers"][0]["env"]}
    assert 0 < target < int(env.get("GGA_MAX_QUEUE_ROWS", 2048))

"""Fault benchmark: cold start, restart after ``kill -9`` mid-fit, fallback past a corrupt newest version.

    python -m benchmarks.faults            # about 2 minutes; writes benchmarks/results/faults.{json,md}
    python -m benchmarks.faults --runs 1 --out benchmarks/results/tmp   # smoke test

Loopback only, the bundled default model (``mnist_cnn`` and its detector); each number is
the time from starting ``gga-serve`` (``python -m service.cli``, its console script's
module) to the first ``GET /readyz`` 200, polled every 20 ms, median of ``--runs`` runs,
every run on a fresh artifact store:

- **cold start**: an empty store (the bundled detector serves, version ``v0``);
- **restart after kill -9**: a store holding one good version ``v1`` (the bundled
  detector written by ``ArtifactStore.save_new``); a server is started on it (not timed),
  ``POST /fit`` a job of 4000 samples, SIGKILL once the job reports features done > 0,
  then a new server is started on the same store (timed; ``v1`` serves, no ``.tmp-*``
  left). Also reported: kill to ready (includes reaping the killed process);
- **fallback**: ``v1`` good and a newest ``v2`` corrupted by hand (NaN calibration
  scores, or a wrong-shaped ``reference.sorted``): the startup skips ``v2`` with a log line
  and serves ``v1``. The extra cost over the restart is loading and rejecting ``v2``.

Each scenario runs with the service's defaults (``GGA_STRATEGY=auto``: the per-class
gradient strategy is timed at startup, which is part of readiness) and with
``GGA_STRATEGY=device`` (no measurement). ``GGA_LOG_LEVEL=warning``, CPU device.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.cpustat import cpu_model
from benchmarks.harness import git_info
from benchmarks.serverproc import free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
POLL_S = 0.02
FIT_SAMPLES = 4000
CONFIGS = {"defaults (GGA_STRATEGY=auto)": {}, "GGA_STRATEGY=device": {"GGA_STRATEGY": "device"}}
SCENARIOS = ("cold start", "restart after kill -9", "fallback: NaN calibration", "fallback: wrong-shaped tensor")


def _machine() -> dict:
    import torch
    import uvicorn

    cpu = cpu_model()
    disk = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        disk = subprocess.run(["df", "-T", tempfile.gettempdir()], capture_output=True, text=True,
                              timeout=10).stdout.splitlines()[-1].split()[1]
    return {"host": platform.node(), "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "uvicorn": uvicorn.__version__,
            "tmp_filesystem": disk, "loadavg_start": os.getloadavg()}


class Server:
    """``python -m service.cli`` on a free port, its output in a file; ``wait_ready`` times it."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        full = dict(os.environ, GGA_HOST="127.0.0.1", GGA_PORT=str(self.port), **env)
        self._out = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli"], env=full, cwd=ROOT,
                                     stdout=self._out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> tuple[float, dict]:
        """Seconds from the start to the first /readyz 200, and its body."""
        with httpx.Client(timeout=2.0) as c:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    r = c.get(f"{self.base}/readyz")
                    if r.status_code == 200:
                        return time.perf_counter() - self.t0, r.json()
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.log.read_text()}")
                if time.perf_counter() - self.t0 > timeout:
                    raise RuntimeError(f"not ready within {timeout} s: {self.log.read_text()}")
                time.sleep(POLL_S)

    def stop(self, sig: int = signal.SIGTERM) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._out.close()
        return self.log.read_text()


def _good_store(art: Path) -> Path:
    """``art`` with one good version, v1 (the bundled detector, through ``save_new``); returns the store folder."""
    from safetensors.torch import load_file

    from detectors.fingerprint import model_fingerprint
    from detectors.persist import load_detector
    from detectors.zoo import MnistCNN
    from service.artifacts import ArtifactStore
    from service.settings import DEFAULT_MODEL_DIR

    model = MnistCNN()
    model.load_state_dict(load_file(str(DEFAULT_MODEL_DIR / "model.safetensors")))
    model.eval()
    store = ArtifactStore(art, model_fingerprint(model))
    version, _ = store.save_new(load_detector(DEFAULT_MODEL_DIR / "detector", model))
    assert version == "v1", version
    return store.dir


def _corrupt_copy(store: Path, how: str) -> None:
    """v0002: a copy of v0001 with one tensor broken by hand."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(store / "v0001", store / "v0002")
    path = store / "v0002" / "detector.safetensors"
    tensors = load_file(str(path))
    if how == "nan":
        tensors["calibration_scores"] = torch.full_like(tensors["calibration_scores"], float("nan"))
    else:
        tensors["reference.sorted"] = tensors["reference.sorted"][:, :3].contiguous()
    save_file(tensors, str(path))


def _fit_body() -> bytes:
    rng = np.random.default_rng(0)  # the content does not matter: the server is killed while computing features
    buf = io.BytesIO()
    np.savez(buf, x=rng.random((FIT_SAMPLES, 1, 28, 28), dtype=np.float32),
             y=rng.integers(0, 10, FIT_SAMPLES))
    return buf.getvalue()


def _leftovers(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if p.name.startswith(".tmp-")) if store.is_dir() else []


def run_once(scenario: str, env: dict[str, str], work: Path, fit_body: bytes) -> dict:
    art = work / "art"
    env = {"GGA_ARTIFACT_DIR": str(art), "GGA_LOG_LEVEL": "warning", "GGA_DEVICE": "cpu", **env}
    row: dict = {}
    if scenario == "cold start":
        expected = "v0"
    else:
        store = _good_store(art)
        expected = "v1"
        if scenario.startswith("fallback"):
            _corrupt_copy(store, "nan" if "NaN" in scenario else "shape")
        else:  # kill -9 a server in the middle of a fit
            first = Server({**env, "GGA_ADMIN_TOKEN": "t", "GGA_FIT_BATCH_SIZE": "16"}, work / "killed.log")
            try:
                first.wait_ready()
                with httpx.Client(base_url=first.base, timeout=60) as c:
                    auth = {"Authorization": "Bearer t"}
                    r = c.post("/fit", files={"file": ("d.npz", fit_body)}, headers=auth)
                    r.raise_for_status()
                    job = r.json()["id"]
                    while True:
                        view = c.get(f"/fit/{job}", headers=auth).json()
                        if view["state"] != "running":
                            raise RuntimeError(f"the fit ended before the kill: {view}")
                        if view["phase"] == "features" and view["progress"]["done"] > 0:
                            break
                        time.sleep(POLL_S)
            finally:
                t_kill = time.perf_counter()
                first.stop(signal.SIGKILL)
            assert first.proc.returncode == -signal.SIGKILL
            row["killed_at"] = view["progress"]
    server = Server(env, work / "server.log")
    try:
        ready_s, body = server.wait_ready()
    finally:
        out = server.stop()
    if body.get("detector_version") != expected:
        raise RuntimeError(f"{scenario}: served {body}, expected {expected}")
    if scenario.startswith("fallback") and "skipping detector artifact" not in out:
        raise RuntimeError(f"{scenario}: no log line for the skipped version: {out}")
    if scenario != "cold start":
        left = _leftovers(store)
        if left:
            raise RuntimeError(f"{scenario}: leftovers after the restart: {left}")
    row.update(ready_s=ready_s, version=body["detector_version"])
    if scenario == "restart after kill -9":
        row["kill_to_ready_s"] = server.t0 - t_kill + ready_s
    return row


def _fmt_runs(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def to_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Fault benchmark: start, restart after kill -9, fallback",
        "",
        f"- Date: {result['date']}; command: `{result['command']}`; commit `{result['git']['commit'][:12]}`"
        + (f" (working tree with uncommitted changes: {', '.join(result['git']['changed_files'])})"
           if result["git"]["dirty"] else ""),
        f"- Machine: {m['cpu']}, {m['cpu_count']} cores; {m['platform']}; Python {m['python']}, "
        f"torch {m['torch']}, uvicorn {m['uvicorn']}; temporary files on {m['tmp_filesystem'] or 'unknown'}",
        f"- Load average at start / end: {', '.join(f'{v:.2f}' for v in m['loadavg_start'])} / "
        f"{', '.join(f'{v:.2f}' for v in m['loadavg_end'])} (a shared machine: other processes compete for "
        "its cores)",
        f"- Each number: seconds from starting `gga-serve` to the first `GET /readyz` 200 (polled every "
        f"{POLL_S * 1000:.0f} ms), median of {result['runs']} runs, each on a fresh artifact store; bundled "
        "`mnist_cnn` model, CPU, `GGA_LOG_LEVEL=warning`",
        "- Restart after kill -9: the server was SIGKILLed while a `POST /fit` of "
        f"{FIT_SAMPLES} samples computed features; kill to ready adds reaping the killed process",
        "- Fallback: the newest version `v2` corrupted by hand; the startup validates it, logs "
        "`skipping detector artifact` and serves `v1`",
        "- `GGA_STRATEGY=auto` (the default) times the gradient strategies at startup before it is ready: that "
        "measurement is most of its start time and, on a busy machine, most of its spread; `GGA_STRATEGY=device` "
        "shows the cost of the start itself (model, store, validation, warm-up)",
        "",
        "| scenario | settings | served | median s | runs s | kill to ready, median s |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        k2r = f"{row['kill_to_ready_median_s']:.2f}" if "kill_to_ready_median_s" in row else "–"
        lines.append(f"| {row['scenario']} | {row['config']} | {row['version']} | {row['median_s']:.2f} | "
                     f"{_fmt_runs(row['runs_s'])} | {k2r} |")
    lines += ["", f"Wall time of the benchmark: {result['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="runs per scenario and settings (median reported)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for faults.json and faults.md")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    cmd = "python -m benchmarks.faults" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    result = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "command": cmd.strip(),
              "git": git_info(), "machine": _machine(), "runs": args.runs, "poll_s": POLL_S, "rows": []}
    fit_body = _fit_body()
    for config, env in CONFIGS.items():
        for scenario in SCENARIOS:
            rows = []
            for i in range(args.runs):
                with tempfile.TemporaryDirectory(prefix="gga-faults-") as work:
                    rows.append(run_once(scenario, env, Path(work), fit_body))
                print(f"{config:32s} {scenario:30s} run {i + 1}: {rows[-1]['ready_s']:.2f} s", flush=True)
            times = [r["ready_s"] for r in rows]
            out = {"scenario": scenario, "config": config, "env": env, "version": rows[0]["version"],
                   "median_s": statistics.median(times), "runs_s": times}
            if "kill_to_ready_s" in rows[0]:
                out["kill_to_ready_median_s"] = statistics.median(r["kill_to_ready_s"] for r in rows)
                out["killed_at"] = [r["killed_at"] for r in rows]
            result["rows"].append(out)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "faults.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "faults.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()

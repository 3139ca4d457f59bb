"""What every benchmark run records and starts: server processes, the git state, the machine, the log.

- :class:`Server`: a server process in its own session, ready when a path answers 200,
  stopped with its whole process group; :func:`metric_values` reads its ``/metrics``;
- :func:`git_info` (commit, dirty, changed files), :func:`machine_info` (CPU, cores,
  library versions, load average);
- :func:`log` (a line on stderr with the seconds since start), :func:`fmt_value` (a
  number for a table, "–" when missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.cpustat import cpu_model
from benchmarks.loadgen import Conn, Pinning, http_request
from benchmarks.serverproc import ROOT, free_port

__all__ = ["RESULTS", "ROOT", "Server", "fmt_value", "free_port", "git_info", "log", "machine_info", "metric_values"]

RESULTS = ROOT / "benchmarks" / "results"


class Server:
    """A server process started in its own session (stopped with its whole process group)."""

    def __init__(self, cmd: list[str], env: dict[str, str], port: int, ready_path: str, log: Path,
                 timeout: float = 180.0) -> None:
        self.port, self.log = port, log
        self._logf = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self._logf, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.get(ready_path)[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{cmd[-1]} exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{cmd[-1]} not ready within {timeout} s:\n{self.tail()}")
            time.sleep(0.25)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def get(self, path: str) -> tuple[int, bytes]:
        async def go():
            c = await Conn.open("127.0.0.1", self.port)
            try:
                return await c.request(http_request("127.0.0.1", self.port, "GET", path))
            finally:
                c.close()
        return asyncio.run(go())

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self._logf.closed:  # stopped already
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # leftovers of the group (LitServe workers)
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._logf.close()


def metric_values(text: str) -> dict[str, float]:
    """The unlabelled samples of a Prometheus text exposition (``/metrics``): name -> value."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value.split()[0])
    return out


def git_info() -> dict:
    """``{"commit", "dirty", "changed_files"}`` of the checkout (tracked files only; empty without git)."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    changed = [ln[3:] for ln in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(changed), "changed_files": changed}


def machine_info(pin: Pinning) -> dict:
    """Host, platform, CPU, cores (usable: ``pin.cores``), library versions and the load average now."""
    import fastapi
    import torch
    import uvicorn

    from benchmarks.litserve_api import LITSERVE

    cpu = cpu_model()

    def has(mod: str) -> bool:
        import importlib.util

        return importlib.util.find_spec(mod) is not None

    return {
        "host": platform.node(), "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "usable_cores": pin.cores, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__,
        "litserve": getattr(LITSERVE, "__version__", None),
        "uvicorn_loop_http": f"{'uvloop' if has('uvloop') else 'asyncio'}/{'httptools' if has('httptools') else 'h11'}",
        "loadavg_start": os.getloadavg(),
    }


_T0 = time.perf_counter()


def log(msg: str) -> None:
    """``msg`` on stderr, after the seconds since this module was imported (the run's start)."""
    print(f"{time.perf_counter() - _T0:6.1f} s {msg}", file=sys.stderr, flush=True)


def fmt_value(v, nd: int = 0) -> str:
    """A float with ``nd`` decimals and thousands separators; "–" for None or a non-finite float."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)

"""Start ``gga-serve`` as a real uvicorn subprocess on a free loopback port (benchmarks, tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict[str, str], timeout: float = 120.0, **popen) -> tuple[subprocess.Popen, str]:
    """Run ``python -m service.cli`` with ``GGA_*`` overrides; returns once /readyz answers 200."""
    port = free_port()
    full_env = dict(os.environ, GGA_HOST="127.0.0.1", GGA_PORT=str(port), **env)
    proc = subprocess.Popen([sys.executable, "-m", "service.cli"], env=full_env, cwd=ROOT, **popen)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"the server exited with {proc.returncode}: {out}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not become ready within {timeout} s")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """SIGTERM (uvicorn's graceful shutdown), wait, return what the server printed (killed past ``timeout``)."""
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return out or ""

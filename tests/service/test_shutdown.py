"""SIGTERM against a real uvicorn process: stop admitting, finish what can be finished within the
grace period, answer the rest 503 (never a bare 500 or a cut connection), then exit."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time

import httpx
import pytest

from benchmarks.serverproc import start_server
from service.server import margin_s
from service.settings import Settings, SettingsError
from tests.support.fakes import slow_server_env


def test_margin() -> None:
    assert margin_s(10.0, None) == 1.0  # nothing measured: 1 s
    assert margin_s(10.0, 0.2) == 1.0
    assert margin_s(10.0, 1.5) == 3.0  # two batches
    assert margin_s(4.0, 3.0) == 2.0  # at most half the grace


def test_sigterm_drains_then_answers_503_then_exits(tmp_path, mnist_test) -> None:
    env = slow_server_env(tmp_path, 0.4, GGA_LOG_LEVEL="info", GGA_SHUTDOWN_GRACE_S="3")
    proc, base = start_server(env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    x = mnist_test[0][:1].tolist()
    n = 12

    async def go():
        limits = httpx.Limits(max_connections=n + 2, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as c:
            tasks = [asyncio.create_task(c.post("/predict", json={"inputs": x})) for _ in range(n)]
            # all sent, one batch answered (so the worker is past its first batch), the rest queued
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            try:
                late = (await c.post("/predict", json={"inputs": x})).status_code
            except httpx.TransportError:
                late = "refused"  # the listener is closed: a balancer sends it elsewhere
            answers = await asyncio.gather(*tasks, return_exceptions=True)
            return t0, late, answers

    try:
        t0, late, answers = asyncio.run(go())
        out, _ = proc.communicate(timeout=20)
        exited_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert late in ("refused", 503)
    errors = [a for a in answers if isinstance(a, BaseException)]
    assert not errors, errors  # every request got an answer
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 503}, statuses
    ok = [a for a in answers if a.status_code == 200]
    shed = [a for a in answers if a.status_code == 503]
    # 0.4 s per batch (and more: the forward runs once per gradient pass), 3 s of grace of which the
    # last 1 s is the margin: some queued requests were computed after SIGTERM, the rest got 503
    assert 2 <= len(ok) < n and shed, statuses
    assert all(a.json()["predictions"][0]["label"] == 7 for a in ok)
    assert {a.json()["error"]["type"] for a in shed} == {"unavailable"}
    assert {a.json()["error"]["message"] for a in shed} == {"the service is shutting down"}
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert exited_s < 3 + 5, out
    assert "queued rows answered 503 (not computed)" in out, out
    assert "Traceback" not in out and "Cancel" not in out, out


def test_grace_must_be_positive() -> None:
    with pytest.raises(SettingsError, match="GGA_SHUTDOWN_GRACE_S=0: Input should be greater than 0"):
        Settings(_env_file=None, shutdown_grace_s=0)

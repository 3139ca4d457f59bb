"""Against a real uvicorn process on a free loopback port, with a real HTTP client."""

from __future__ import annotations

import asyncio
import signal
import subprocess

import httpx

from benchmarks.serverproc import start_server, stop_server
from tests.support.service import expected_rows, parse_metrics


def test_real_server_burst_metrics_and_clean_shutdown(tmp_path, mnist_test, reference):
    env = dict(GGA_ARTIFACT_DIR=str(tmp_path / "a"), GGA_MAX_BATCH_ROWS="16", GGA_MAX_DELAY_MS="20",
               GGA_LOG_LEVEL="warning")
    proc, base = start_server(env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        x = mnist_test[0][100:132]
        exp = expected_rows(reference, x)

        async def burst():
            async with httpx.AsyncClient(base_url=base, timeout=30) as c:
                rs = await asyncio.gather(*(c.post("/predict", json={"inputs": x[i:i + 1].tolist()})
                                            for i in range(32)))
                bad = await c.post("/predict", json={"inputs": [[1, 2]]})
                return rs, bad, (await c.get("/metrics")).text

        responses, bad, text = asyncio.run(burst())
        for r, e in zip(responses, exp, strict=True):
            assert r.status_code == 200
            (row,) = r.json()["predictions"]
            assert row["label"] == e["label"] and row["flagged"] == e["flagged"]
            assert abs(row["trust"] - e["trust"]) < 1e-12
        assert bad.status_code == 422 and bad.json()["error"]["type"] == "invalid_shape"
        m = parse_metrics(text)
        assert m[("gga_rows_total", ())] == 32
        assert m[("gga_requests_total", (("route", "/predict"), ("status", "200")))] == 32
        assert m[("gga_requests_total", (("route", "/predict"), ("status", "422")))] == 1
        assert m[("gga_batch_rows_count", ())] < 32
        labels = [p["label"] for r in responses for p in r.json()["predictions"]]
        assert labels == mnist_test[1][100:132].tolist()
    finally:
        out = stop_server(proc)
    # uvicorn shuts down gracefully, then re-raises the captured SIGTERM
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Traceback" not in out, out

"""Overload: a full queue answers 503 at once, a queue wait past the timeout 504."""

from __future__ import annotations

import asyncio
import time

from service.settings import DEFAULT_MODEL_DIR
from tests.service import fakes
from tests.service.conftest import Running, make_settings, run


def test_full_queue_503_then_timeout_504_then_healthy(tmp_path, mnist_test):
    x = mnist_test[0][:1].tolist()
    settings = make_settings(
        tmp_path, model="factory:tests.service.fakes:gated_mnist",
        model_weights=DEFAULT_MODEL_DIR / "model.safetensors",
        max_batch_rows=1, max_queue_rows=1, max_delay_ms=0, request_timeout_s=0.5,
    )

    async def go():
        async with Running(settings) as svc:
            fakes.ENTERED.clear()
            fakes.GATE.clear()
            try:
                busy = asyncio.create_task(svc.client.post("/predict", json={"inputs": x}))
                while not fakes.ENTERED.is_set():  # the worker is now stuck in forward
                    await asyncio.sleep(0.01)
                queued = asyncio.create_task(svc.client.post("/predict", json={"inputs": x}))
                await asyncio.sleep(0.05)
                queue_gauge = (await svc.metrics())[("gga_queue_rows", ())]
                t0 = time.perf_counter()
                full = await svc.client.post("/predict", json={"inputs": x})
                full_s = time.perf_counter() - t0
                # the queue is full: refused before the body is read (a malformed body gets 503, not 400)
                unread = await svc.client.post("/predict", content=b"{not json",
                                               headers={"content-type": "application/json"})
                timed_out = await queued  # waits 0.5 s in the queue behind the stuck batch
            finally:
                fakes.GATE.set()
            first = await busy
            after = await svc.client.post("/predict", json={"inputs": x})
            health = await svc.client.get("/healthz")
            ready = await svc.client.get("/readyz")
            return full, full_s, timed_out, first, after, health, ready, await svc.metrics(), queue_gauge, unread

    full, full_s, timed_out, first, after, health, ready, m, queue_gauge, unread = run(go())
    assert queue_gauge == 1  # gga_queue_rows: the one queued row while the worker was stuck
    assert m[("gga_queue_rows", ())] == 0
    assert unread.status_code == 503 and unread.json()["error"]["type"] == "overloaded"
    assert unread.headers["retry-after"] == "1"
    assert full.status_code == 503
    assert full.json()["error"]["type"] == "overloaded"
    assert int(full.headers["retry-after"]) >= 1
    assert full_s < 0.4  # answered at once, not after the stuck batch
    assert timed_out.status_code == 504 and timed_out.json()["error"]["type"] == "timeout"
    assert first.status_code == 200 and after.status_code == 200
    assert first.json()["predictions"][0]["label"] == after.json()["predictions"][0]["label"] == 7
    assert health.status_code == 200 and ready.status_code == 200
    assert m[("gga_requests_total", (("route", "/predict"), ("status", "503")))] == 2
    assert m[("gga_requests_total", (("route", "/predict"), ("status", "504")))] == 1
    assert m[("gga_rows_total", ())] == 2  # the timed-out request was never computed

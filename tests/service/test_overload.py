"""Overload: a full queue answers 503 at once, a queue wait past the timeout 504."""

from __future__ import annotations

import asyncio
import time

from service.settings import DEFAULT_MODEL_DIR
from tests.support import fakes
from tests.support.service import Running, make_settings, run


def test_full_queue_503_then_timeout_504_then_healthy(tmp_path, mnist_test):
    x = mnist_test[0][:1].tolist()
    settings = make_settings(
        tmp_path, model="factory:tests.support.fakes:gated_mnist",
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


def test_wait_bound_sheds_by_estimated_time_before_the_body_is_read(tmp_path, mnist_test):
    """GGA_MAX_QUEUE_WAIT_S refuses a request whose estimated wait (queued rows times the measured
    compute per row) is over the bound, before its body is read."""
    x = mnist_test[0][:1].tolist()
    settings = make_settings(
        tmp_path, model="factory:tests.support.fakes:gated_mnist",
        model_weights=DEFAULT_MODEL_DIR / "model.safetensors",
        max_batch_rows=1, max_queue_rows=64, max_queue_wait_s=1.9,
    )

    async def held(svc, seconds: float):
        """One /predict whose compute is held ``seconds`` by the gate."""
        fakes.ENTERED.clear()
        fakes.GATE.clear()
        task = asyncio.create_task(svc.client.post("/predict", json={"inputs": x}))
        while not fakes.ENTERED.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(seconds)
        return task

    async def go():
        async with Running(settings) as svc:
            batcher = svc.app.state.batcher
            try:
                first = await held(svc, 1.0)
                fakes.GATE.set()
                assert (await first).status_code == 200
                row_s = batcher.row_compute_s  # the held batch: 1 row in 1.0 s and a little
                busy = await held(svc, row_s + 0.05)  # past its expected end: nothing left of it in the estimate
                queued = asyncio.create_task(svc.client.post("/predict", json={"inputs": x}))  # ~row_s: admitted
                while batcher.queued_rows < 1:
                    await asyncio.sleep(0.01)
                unread = await svc.client.post("/predict", content=b"{not json",
                                               headers={"content-type": "application/json"})
                health = await svc.client.get("/healthz")
            finally:
                fakes.GATE.set()
            answers = [await busy, await queued]
            return row_s, unread, health, answers, batcher.counters, await svc.metrics()

    row_s, unread, health, answers, counters, m = run(go())
    assert 1.0 <= row_s < 1.9  # (admitted: 1 row_s <= 1.9; refused: 2 row_s >= 2.0 > 1.9)
    assert unread.status_code == 503 and unread.json()["error"]["type"] == "overloaded"  # malformed body never read
    assert unread.json()["error"]["message"].startswith("the queue is full (estimated wait ")
    assert unread.headers["retry-after"] == "1"
    assert [a.status_code for a in answers] == [200, 200]
    assert health.status_code == 200
    # refused by the route's check, before submit (completed is counted just after the answer is handed over)
    assert (counters.submitted, counters.rejected) == (3, 0)
    assert m[("gga_requests_total", (("route", "/predict"), ("status", "503")))] == 1


def test_concurrency_limit_sheds_before_routing_but_never_probes(tmp_path, mnist_test):
    settings = make_settings(tmp_path, max_concurrent_requests=1)

    async def go():
        async with Running(settings) as svc:
            # a /predict whose body never comes: in progress, holding the one place
            sent: list[dict] = []
            never = asyncio.Event()

            async def receive():
                await never.wait()
                return {"type": "http.disconnect"}

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/predict", "raw_path": b"/predict", "query_string": b"",
                     "root_path": "", "headers": [(b"content-type", b"application/json"), (b"content-length", b"9")],
                     "client": ("127.0.0.1", 1), "server": ("test", 80), "state": {}}
            hanging = asyncio.create_task(svc.app(scope, receive, send))
            await asyncio.sleep(0.05)
            shed = await svc.client.post("/predict", json={"inputs": mnist_test[0][:1].tolist()})
            info = await svc.client.get("/info")
            probes = [await svc.client.get(p) for p in ("/healthz", "/readyz", "/metrics")]
            never.set()  # the client goes away: the held request ends, its place is free again
            await hanging
            after = await svc.client.post("/predict", json={"inputs": mnist_test[0][:1].tolist()})
            return shed, info, probes, after, await svc.metrics()

    shed, info, probes, after, m = run(go())
    assert shed.status_code == 503 and shed.headers["retry-after"] == "1"
    assert shed.json() == {"error": {"type": "overloaded", "message": "too many requests in progress (1); retry later"}}
    assert info.status_code == 503
    assert [p.status_code for p in probes] == [200, 200, 200]
    assert after.status_code == 200 and after.json()["predictions"][0]["label"] == 7
    assert m[("gga_requests_total", (("route", "/predict"), ("status", "503")))] == 1
    assert m[("gga_requests_total", (("route", "/info"), ("status", "503")))] == 1

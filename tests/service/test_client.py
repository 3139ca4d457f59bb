"""service.client: against the real app (ASGI in process, and one real uvicorn process) and against
fake transports for the retry policy and the typed errors."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import subprocess
import warnings

import httpx
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from benchmarks.serverproc import ROOT, start_server, stop_server
from service.app import create_app
from service.client import (
    AsyncGGAClient,
    BadRequest,
    Conflict,
    GGAClient,
    GGAError,
    NotFound,
    Overloaded,
    ServerError,
    Timeout,
    Unauthorized,
)
from tests.support.service import MNIST, Running, expected_rows, make_settings, run

with warnings.catch_warnings():  # starlette announces its move to httpx2; the TestClient is still an httpx.Client
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from fastapi.testclient import TestClient

TOKEN = "client-token"
SHAPE = (1, 28, 28)


def _assert_same_as_json(res, body: dict) -> None:
    rows = body["predictions"]
    assert res.labels.tolist() == [r["label"] for r in rows]
    assert res.trust.tolist() == [r["trust"] for r in rows]
    assert res.flagged.tolist() == [r["flagged"] for r in rows]
    assert res.top_classes.tolist() == [[t["label"] for t in r["top_classes"]] for r in rows]
    assert res.label_names == [r["label_name"] for r in rows]
    assert res.detector_version == [r["detector_version"] for r in rows]
    np.testing.assert_allclose(res.score, [r["score"] for r in rows], rtol=1e-5)
    np.testing.assert_allclose(res.confidence, [r["confidence"] for r in rows], rtol=1e-5)
    assert (res.model, res.alpha) == (body["model"], body["alpha"])


# --------------------------------------------------------------------------- against the app


def test_async_predict_equals_json_predict(tmp_path, mnist_test):
    x, y = mnist_test[0][:4], mnist_test[1][:4]

    async def go():
        async with Running(make_settings(tmp_path)) as svc:
            body = (await svc.client.post("/predict", json={"inputs": x.tolist()})).json()
            async with AsyncGGAClient("http://test", client=svc.client) as c:
                res = await c.predict(x)
                one = await c.predict(x[2])  # one sample of the input shape: sent as a batch of one
                csm = await c.predict(x[:2], return_csm=True)
                info, health, ready = await c.info(), await c.health(), await c.ready()
            assert not svc.client.is_closed  # an injected client is not closed by the client
            return body, res, one, csm, info, health, ready

    body, res, one, csm, info, health, ready = run(go())
    _assert_same_as_json(res, body)
    assert res.labels.tolist() == y.tolist()
    assert res.labels.dtype == np.int64 and res.trust.dtype == np.float64 and res.flagged.dtype == bool
    assert res.csm is None and res.raw == body and len(res) == 4
    assert one.labels.tolist() == [y[2]] and one.trust.tolist() == [res.trust[2]]
    assert csm.csm.shape == (2, 5, 5) and csm.labels.tolist() == y[:2].tolist()
    np.testing.assert_array_equal(csm.csm, csm.csm.transpose(0, 2, 1))
    assert info["input_shape"] == list(SHAPE) and health == {"status": "ok"} and ready is True


def test_sync_predict_equals_json_predict(tmp_path, mnist_test, reference):
    x, y = mnist_test[0][10:14], mnist_test[1][10:14]
    app = create_app(make_settings(tmp_path), registry=CollectorRegistry())
    with TestClient(app) as http:  # an httpx.Client that runs the app (and its lifespan) in process
        body = http.post("/predict", json={"inputs": x.tolist()}).json()
        c = GGAClient("http://testserver", client=http)
        res = c.predict(x.astype(np.float64))  # sent as float32
        assert c.input_shape == SHAPE  # read from /info on the first predict
        assert c.ready() and c.health() == {"status": "ok"}
        with pytest.raises(BadRequest) as bad:
            c.predict(np.zeros((2, 28, 28), np.float32))
        with pytest.raises(BadRequest) as scale:  # pixels in 0..255 for a model that takes [0, 1]
            c.predict(x * 255)
        with pytest.raises(Unauthorized) as forbidden:  # no GGA_ADMIN_TOKEN on this service
            c.fit(x, y)
        c.close()
        assert not http.is_closed
    _assert_same_as_json(res, body)
    assert res.labels.tolist() == y.tolist()
    exp = expected_rows(reference, x)
    assert res.trust.tolist() == pytest.approx([e["trust"] for e in exp], abs=1e-12)
    assert (bad.value.status, bad.value.type) == (422, "invalid_shape")
    assert "(B, 1, 28, 28)" in bad.value.message
    assert (scale.value.status, scale.value.type) == (422, "out_of_range")
    assert (forbidden.value.status, forbidden.value.type) == (403, "fit_disabled")
    assert res.warnings == []


def test_fit_and_wait_fit_against_the_app(tmp_path, mnist_test):
    x, y = mnist_test[0][:300], mnist_test[1][:300]
    settings = make_settings(tmp_path, admin_token=TOKEN)

    async def go():
        async with Running(settings) as svc:
            anon = AsyncGGAClient("http://test", client=svc.client)
            with pytest.raises(Unauthorized) as unauth:
                await anon.fit(x, y, preset="gga")
            c = AsyncGGAClient("http://test", token=TOKEN, client=svc.client)
            with pytest.raises(BadRequest) as bad_option:
                await c.fit(x, y, preset="gga", top_n=11)
            with pytest.raises(NotFound):
                await c.fit_status("no-such-job")
            job = await c.fit(x, y, preset="gga", top_n=4, alpha=0.1)
            assert job["state"] in ("queued", "running") and job["status_url"] == f"/fit/{job['id']}"
            done = await c.wait_fit(job, poll_s=0.05, timeout_s=300)
            after = await c.predict(x[:4])
            info = await c.info()
            return unauth.value, bad_option.value, done, after, info

    unauth, bad_option, done, after, info = run(go())
    assert (unauth.status, unauth.type) == (401, "unauthorized")
    assert (bad_option.status, bad_option.type) == (422, "invalid_option")
    assert done["state"] == "succeeded", done
    res = done["result"]
    assert (res["version"], res["n_samples"], res["preset"]) == ("v1", 300, "gga")
    assert res["config"]["top_n"] == 4 and res["config"]["alpha"] == 0.1
    assert res["n_calibration"] >= 20
    assert after.detector_version == ["v1"] * 4 and after.top_classes.shape == (4, 4)
    assert info["detector_version"] == "v1"


def test_sync_fit_from_an_npz_file(tmp_path, mnist_test):
    path = tmp_path / "fit.npz"
    np.savez(path, x=mnist_test[0][:200], y=mnist_test[1][:200], x_cal=mnist_test[0][200:260],
             y_cal=mnist_test[1][200:260])
    app = create_app(make_settings(tmp_path, admin_token=TOKEN), registry=CollectorRegistry())
    with TestClient(app) as http:
        c = GGAClient("http://testserver", token=TOKEN, client=http)
        done = c.wait_fit(c.fit(path, preset="gga"), poll_s=0.05, timeout_s=300)
    assert done["state"] == "succeeded", done
    # n_samples counts x and x_cal; the calibration uses the correctly classified part of x_cal
    assert done["result"]["n_samples"] == 260 and 20 <= done["result"]["n_calibration"] <= 60


# --------------------------------------------------------------------------- retries and errors (fake transports)


def _envelope(status: int, type_: str, message: str, headers: dict | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"type": type_, "message": message}}, headers=headers)


def _ok_body(n: int) -> dict:
    row = {"label": 7, "label_name": "7", "confidence": 0.9, "top_classes": [{"label": 7, "name": "7"}],
           "score": None, "trust": 0.5, "flagged": False, "detector_version": "v0"}
    return {"model": "fake", "alpha": 0.05, "predictions": [row] * n, "warnings": [{"sample": 1, "message": "m"}]}


class Recorder:
    """A fake service: answers from a list (the last one repeats); records requests."""

    def __init__(self, *answers: httpx.Response) -> None:
        self.answers, self.requests = list(answers), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answers[min(len(self.requests), len(self.answers)) - 1]


def test_503_retry_after_is_honoured_then_succeeds():
    busy = _envelope(503, "overloaded", "the queue is full", {"Retry-After": "1"})
    fake = Recorder(busy, busy, httpx.Response(200, json=_ok_body(2)))
    sleeps = []
    c = GGAClient("http://svc", transport=httpx.MockTransport(fake), input_shape=SHAPE, sleep=sleeps.append)
    res = c.predict(np.zeros((2, *SHAPE), np.float32))
    assert len(fake.requests) == 3 and sleeps == [1, 1]
    assert res.labels.tolist() == [7, 7] and np.isnan(res.score).all()
    assert res.warnings == [{"sample": 1, "message": "m"}]
    # every try sent the same float32 .npy batch
    for req in fake.requests:
        assert req.headers["content-type"] == "application/x-npy" and req.url.path == "/predict"
        arr = np.load(io.BytesIO(req.content), allow_pickle=False)
        assert arr.dtype == np.float32 and arr.shape == (2, *SHAPE)


def test_503_retry_async_and_wait_capped():
    busy = _envelope(503, "overloaded", "the queue is full", {"Retry-After": "120"})
    fake = Recorder(busy, httpx.Response(200, json=_ok_body(1)))
    sleeps = []

    async def record(s):
        sleeps.append(s)

    async def go():
        async with AsyncGGAClient("http://svc", transport=httpx.MockTransport(fake), input_shape=SHAPE,
                                  max_retry_wait_s=5, sleep=record) as c:
            return await c.predict(np.zeros(SHAPE, np.float32))

    res = run(go())
    assert len(fake.requests) == 2 and sleeps == [5] and res.labels.tolist() == [7]
    assert np.load(io.BytesIO(fake.requests[-1].content)).shape == (1, *SHAPE)


@pytest.mark.parametrize("max_retries", [0, 3])
def test_503_forever_raises_overloaded(max_retries):
    fake = Recorder(_envelope(503, "overloaded", "the queue is full (64 of 64 rows)", {"Retry-After": "2"}))
    sleeps = []
    c = GGAClient("http://svc", transport=httpx.MockTransport(fake), input_shape=SHAPE, max_retries=max_retries,
                  sleep=sleeps.append)
    with pytest.raises(Overloaded) as err:
        c.predict(np.zeros((1, *SHAPE), np.float32))
    assert len(fake.requests) == max_retries + 1 and sleeps == [2] * max_retries
    e = err.value
    assert (e.status, e.type, e.retry_after) == (503, "overloaded", 2)
    assert e.message == "the queue is full (64 of 64 rows)"
    assert isinstance(e, ServerError) and isinstance(e, GGAError)
    assert e.envelope == {"error": {"type": "overloaded", "message": e.message}}


def test_503_forever_async():
    fake = Recorder(_envelope(503, "overloaded", "full", {"Retry-After": "1"}))
    sleeps = []

    async def record(s):
        sleeps.append(s)

    async def go():
        c = AsyncGGAClient("http://svc", transport=httpx.MockTransport(fake), input_shape=SHAPE, sleep=record)
        try:
            await c.predict(np.zeros((1, *SHAPE), np.float32))
        finally:
            await c.aclose()

    with pytest.raises(Overloaded):
        run(go())
    assert len(fake.requests) == 4 and sleeps == [1, 1, 1]


def test_503_without_retry_after_is_not_retried():
    fake = Recorder(_envelope(503, "no_detector", "no fitted detector for this model yet: POST /fit"))
    sleeps = []
    c = GGAClient("http://svc", transport=httpx.MockTransport(fake), input_shape=SHAPE, sleep=sleeps.append)
    with pytest.raises(Overloaded) as err:
        c.predict(np.zeros((1, *SHAPE), np.float32))
    assert len(fake.requests) == 1 and sleeps == []
    assert (err.value.type, err.value.retry_after) == ("no_detector", None)
    assert c.ready() is False


def test_422_is_bad_request_with_the_servers_envelope():
    msg = "input has shape (1, 28, 27); expected (B, 1, 28, 28)"
    fake = Recorder(_envelope(422, "invalid_shape", msg))
    c = GGAClient("http://svc", transport=httpx.MockTransport(fake), input_shape=SHAPE)
    with pytest.raises(BadRequest) as err:
        c.predict(np.zeros((1, 1, 28, 27), np.float32))
    assert (err.value.status, err.value.type, err.value.message) == (422, "invalid_shape", msg)
    assert len(fake.requests) == 1


@pytest.mark.parametrize(("status", "cls"), [
    (400, BadRequest), (413, BadRequest), (415, BadRequest), (422, BadRequest), (401, Unauthorized),
    (403, Unauthorized), (404, NotFound), (409, Conflict), (500, ServerError), (503, Overloaded), (504, Timeout),
])
def test_status_maps_to_typed_error(status, cls):
    fake = Recorder(_envelope(status, f"t{status}", f"m{status}"))
    c = GGAClient("http://svc", token="t", transport=httpx.MockTransport(fake), max_retries=0)
    with pytest.raises(cls) as err:
        c.fit_status("job")
    assert (err.value.status, err.value.type, err.value.message) == (status, f"t{status}", f"m{status}")
    assert fake.requests[0].headers["authorization"] == "Bearer t"


def test_non_envelope_error_and_fit_upload():
    fake = Recorder(httpx.Response(502, text="<html>bad gateway</html>"),
                    httpx.Response(202, json={"id": "j1", "state": "running", "status_url": "/fit/j1"}))
    c = GGAClient("http://svc/", token="tok", transport=httpx.MockTransport(fake))
    with pytest.raises(ServerError) as err:
        c.health()
    assert (err.value.status, err.value.type) == (502, "http_502") and "bad gateway" in err.value.message
    x = np.ones((3, *SHAPE))
    job = c.fit(x, [1, 2, 3], x_cal=x, y_cal=np.array([0, 1, 2]), preset="composite", top_n="all", alpha=0.01)
    assert job["id"] == "j1"
    req = fake.requests[-1]
    assert str(req.url) == "http://svc/fit" and req.headers["authorization"] == "Bearer tok"
    assert req.headers["content-type"].startswith("multipart/form-data")
    body = req.content
    for field, value in (("preset", b"composite"), ("top_n", b"all"), ("alpha", b"0.01")):
        assert f'name="{field}"'.encode() in body and value in body
    with pytest.raises(TypeError):
        c.fit(x)
    with pytest.raises(TypeError):
        c.fit(x, [1, 2, 3], x_cal=x)


def test_ready_is_false_without_a_server():
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    assert GGAClient("http://svc", transport=httpx.MockTransport(refuse)).ready() is False


# --------------------------------------------------------------------------- a real uvicorn process


def test_predict_against_a_real_server(tmp_path, mnist_test, reference):
    env = dict(GGA_ARTIFACT_DIR=str(tmp_path / "a"), GGA_LOG_LEVEL="warning")
    proc, base = start_server(env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        x = mnist_test[0][20:23]
        with GGAClient(base, timeout=30) as c:
            assert c.ready()
            res = c.predict(x)
            body = httpx.post(f"{base}/predict", json={"inputs": x.tolist()}, timeout=30).json()

        async def one():
            async with AsyncGGAClient(base, timeout=30) as c:
                return await c.predict(x[0])

        single = asyncio.run(one())
    finally:
        out = stop_server(proc)
    _assert_same_as_json(res, body)
    assert res.labels.tolist() == mnist_test[1][20:23].tolist()
    exp = expected_rows(reference, x)
    assert res.trust.tolist() == pytest.approx([e["trust"] for e in exp], abs=1e-12)
    assert single.labels.tolist() == [res.labels[0]] and single.trust.tolist() == [res.trust[0]]
    assert "Traceback" not in out, out
    json.dumps(res.raw)  # the raw answer is plain JSON


@pytest.mark.slow
def test_readme_client_examples_against_a_real_server(tmp_path, capsys):
    """The README's "Python client" code blocks, run in order against a real server (with a fit, ~20 s)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Python client\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 4
    env = dict(GGA_ARTIFACT_DIR=str(tmp_path / "a"), GGA_ADMIN_TOKEN="change-me", GGA_LOG_LEVEL="warning")
    proc, base = start_server(env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        code = "\n".join(blocks).replace("http://127.0.0.1:8000", base).replace('"../shared/data/mnist"',
                                                                               repr(str(MNIST)))
        exec(compile(code, "README.md#python-client", "exec"), {"__name__": "readme"})
    finally:
        stop_server(proc)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[7 2 1 0] [") and out[0].endswith("[False False False False]"), out
    assert out[1] == "succeeded v1", out
    assert out[2].startswith("[7, 2, 1, 0, 4, 1, 4, 9"), out
    assert out[3].startswith("422 invalid_shape input has shape (2, 28, 28); expected (B, 1, 28, 28)"), out


# --------------------------------------------------------------------------- credentials


READER, ADMIN = "reader-token", "admin-token"


class _Recorder:
    """A fake service that answers every call and records (method, path, Authorization) of each."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.method, request.url.path, request.headers.get("authorization")))
        if request.url.path == "/info":
            return httpx.Response(200, json={"input_shape": list(SHAPE)})
        if request.url.path == "/predict":
            return httpx.Response(200, json=_ok_body(1))
        if request.url.path.startswith("/fit"):
            return httpx.Response(200, json={"id": "j1", "state": "succeeded"})
        return httpx.Response(200, json={"status": "ok"})


def _every_call(c: GGAClient) -> None:
    c.predict(np.zeros(SHAPE, np.float32))  # reads /info first (no input_shape given)
    c.info()
    c.health()
    c.fit(np.zeros((2, *SHAPE), np.float32), np.zeros(2, np.int64))
    c.wait_fit("j1")


async def _every_call_async(c: AsyncGGAClient) -> None:
    await c.predict(np.zeros(SHAPE, np.float32))
    await c.info()
    await c.health()
    await c.fit(np.zeros((2, *SHAPE), np.float32), np.zeros(2, np.int64))
    await c.wait_fit("j1")


@pytest.mark.parametrize(("token", "read_token", "reader_sends", "admin_sends"), [
    (ADMIN, READER, f"Bearer {READER}", f"Bearer {ADMIN}"),  # each call its own token
    (ADMIN, None, f"Bearer {ADMIN}", f"Bearer {ADMIN}"),  # the admin token opens the reader calls too
    (None, READER, f"Bearer {READER}", None),  # a reader: the fit calls go without (the service answers 401)
    (None, None, None, None),
])
def test_each_call_carries_its_credential(token, read_token, reader_sends, admin_sends):
    expected = [("GET", "/info", reader_sends), ("POST", "/predict", reader_sends), ("GET", "/info", reader_sends),
                ("GET", "/healthz", None), ("POST", "/fit", admin_sends), ("GET", "/fit/j1", admin_sends)]
    sync = _Recorder()
    _every_call(GGAClient("http://svc", token=token, read_token=read_token, transport=httpx.MockTransport(sync)))
    assert sync.seen == expected
    asyn = _Recorder()

    async def go():
        async with AsyncGGAClient("http://svc", token=token, read_token=read_token,
                                  transport=httpx.MockTransport(asyn)) as c:
            await _every_call_async(c)

    asyncio.run(go())
    assert asyn.seen == expected


def test_read_token_against_a_real_server(tmp_path, mnist_test, reference, monkeypatch):
    """A service with GGA_READ_TOKEN and GGA_ADMIN_TOKEN: /info and predict (which reads /info for the
    shape) need a token, the read token or the admin token; both clients; gga-eval --url with it."""
    from detectors.metrics import auroc, tnr_at_tpr
    from service.evalcli import main as gga_eval

    x, y = mnist_test[0][:24], mnist_test[1][:24]
    noise = np.random.default_rng(0).uniform(0, 1, (24, *SHAPE)).astype(np.float32)
    np.savez(tmp_path / "clean.npz", x=x, y=y)
    np.savez(tmp_path / "noise.npz", x=noise)
    monkeypatch.delenv("GGA_READ_TOKEN", raising=False)

    def evaluate(out, *extra) -> tuple[int, str]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = gga_eval(["--in", str(tmp_path / "clean.npz"), "--ood", f"noise={tmp_path / 'noise.npz'}",
                             "--url", base, "--out", str(tmp_path / out), "--no-progress", "--batch-size", "8",
                             *extra])
        return code, err.getvalue()

    env = dict(GGA_ARTIFACT_DIR=str(tmp_path / "a"), GGA_LOG_LEVEL="warning", GGA_READ_TOKEN=READER,
               GGA_ADMIN_TOKEN=ADMIN)
    proc, base = start_server(env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        refused = []
        for kwargs in ({}, {"read_token": "wrong"}):
            with GGAClient(base, timeout=30, **kwargs) as c:
                for call in (c.info, lambda c=c: c.predict(x[:2])):
                    with pytest.raises(Unauthorized) as e:
                        call()
                    refused.append((e.value.status, e.value.type))
        with GGAClient(base, read_token=READER, timeout=30) as c:
            info = c.info()
            res = c.predict(x[:3])
        with GGAClient(base, token=ADMIN, timeout=30) as c:  # one admin token for every call
            res_admin = c.predict(x[:3])

        async def go():
            async with AsyncGGAClient(base, timeout=30) as c:
                with pytest.raises(Unauthorized) as e:
                    await c.info()
            async with AsyncGGAClient(base, read_token=READER, timeout=30) as c:
                return e.value.status, await c.predict(x[:3])

        async_refused, res_async = asyncio.run(go())
        no_token = evaluate("r_none")
        with_flag = evaluate("r_flag", "--read-token", READER)
        monkeypatch.setenv("GGA_READ_TOKEN", READER)  # the environment's, as for the service
        with_env = evaluate("r_env")
    finally:
        out = stop_server(proc)
    assert refused == [(401, "unauthorized")] * 4
    assert async_refused == 401
    assert info["input_shape"] == list(SHAPE)
    assert res.labels.tolist() == res_admin.labels.tolist() == res_async.labels.tolist() == y[:3].tolist()
    exp = expected_rows(reference, x[:3])
    assert res.trust.tolist() == pytest.approx([e["trust"] for e in exp], abs=1e-12)
    assert res_async.trust.tolist() == res.trust.tolist() == res_admin.trust.tolist()

    code, err = no_token
    assert code == 1 and "/info answered 401 unauthorized" in err and "--read-token, or GGA_READ_TOKEN" in err, err
    assert not (tmp_path / "r_none").exists()
    for (code, err), name in ((with_flag, "r_flag"), (with_env, "r_env")):
        assert code == 0, err
        doc = json.loads((tmp_path / name / "report.json").read_text())
        assert READER not in (tmp_path / name / "report.md").read_text()
        assert doc["mode"] == "url" and doc["clean"]["n"] == 24 and doc["sets"]["noise"]["n"] == 24
        with np.load(tmp_path / name / "scores.npz") as z:
            right = z["clean.label"] == y
            s_in, s_out = z["clean.score"][right], z["noise.score"]
            np.testing.assert_allclose(z["clean.score"], reference.score(torch.from_numpy(x)).score.numpy(),
                                       rtol=1e-5)
        assert doc["clean"]["n_positives"] == int(right.sum())
        assert doc["sets"]["noise"]["auroc"] == auroc(s_in, s_out)
        assert doc["sets"]["noise"]["tnr_at_95_tpr"] == tnr_at_tpr(s_in, s_out, 0.95)
    assert "--read-token HIDDEN" in json.loads((tmp_path / "r_flag" / "report.json").read_text())["command"]
    assert "Traceback" not in out, out

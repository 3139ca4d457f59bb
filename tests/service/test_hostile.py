"""Hostile requests: each gets a 4xx in the error envelope, nothing changes, everything is counted.

Deeply nested JSON, integer literals of hundreds of digits, values finite in float64 but
not in float32, NUL bytes in paths, chunked uploads over the limit, zip bombs and .npy
headers that lie; a catch-all for everything unhandled (500 ``internal``, logged, counted);
a blank admin token that must not open /fit.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import signal
import struct
import subprocess
import zipfile

import httpx
import numpy as np
from fastapi import APIRouter, HTTPException

from benchmarks.serverproc import start_server, stop_server
from service.errors import ApiError
from service.settings import Settings
from tests.support.service import Running, make_settings, npy_bytes, parse_metrics, run

TOKEN = "hostile-s3cret-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
JSON = {"content-type": "application/json"}
NPY = {"content-type": "application/x-npy"}
ROW = "[" + ",".join(["0"] * 28) + "]"


def _json_inputs(*first_pixels: str) -> bytes:
    """{"inputs": [...]} with one [1, 28, 28] sample per argument, zeros except its first pixel."""
    samples = ["[[[" + ",".join([p] + ["0"] * 27) + "]," + ",".join([ROW] * 27) + "]]" for p in first_pixels]
    return ('{"inputs": [' + ",".join(samples) + "]}").encode()


def _float64_batch(n: int, bad_sample: int, value: float) -> np.ndarray:
    x = np.zeros((n, 1, 28, 28), np.float64)
    x[bad_sample, 0, 5, 7] = value
    return x


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """A .npy header declaring ``shape`` and no data after it."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _npz(**members: bytes | np.ndarray) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(f"{name}.npy", data if isinstance(data, bytes) else npy_bytes(data))
    return buf.getvalue()


def _bomb(n_rows: int) -> bytes:
    """An .npz whose x.npy is n_rows zero MNIST images (3136 bytes each), deflated to a sliver."""
    buf, block = io.BytesIO(), bytes(1 << 20)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as f:
            f.write(_npy_header((n_rows, 1, 28, 28)))
            left = n_rows * 3136
            while left:
                f.write(block[:min(left, len(block))])
                left -= min(left, len(block))
        zf.writestr("y.npy", npy_bytes(np.zeros(n_rows, np.int64)))
    return buf.getvalue()


def _forged(declared: int) -> bytes:
    """A stored (uncompressed) .npz whose x.npy claims ``declared`` bytes in the zip directory but
    holds one image. Read, it is a valid one-sample archive (a fit job would start): only a
    check of the declared size, before reading, answers 413."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("x.npy", npy_bytes(np.zeros((1, 1, 28, 28), np.float32)))
        zf.writestr("y.npy", npy_bytes(np.zeros(1, np.int64)))
    data = bytearray(buf.getvalue())
    struct.pack_into("<I", data, data.index(b"PK\x03\x04") + 22, declared)  # local header of x.npy
    struct.pack_into("<I", data, data.index(b"PK\x01\x02") + 24, declared)  # its central directory entry
    return bytes(data)


def _multipart(npz: bytes) -> tuple[bytes, dict[str, str]]:
    req = httpx.Request("POST", "http://test/fit", files={"file": ("d.npz", npz, "application/octet-stream")})
    return req.read(), {"content-type": req.headers["content-type"]}


class Feed:
    """A request body sent chunked (no Content-Length), counting what the server pulled."""

    def __init__(self, data: bytes, chunk: int = 16 * 1024) -> None:
        self.data, self.chunk, self.sent = data, chunk, 0

    async def __aiter__(self):
        for i in range(0, len(self.data), self.chunk):
            piece = self.data[i:i + self.chunk]
            self.sent += len(piece)
            yield piece


def _error(r: httpx.Response) -> tuple[int, str, str]:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    return r.status_code, body["error"]["type"], body["error"]["message"]


HOSTILE_PREDICT = [
    # (description, kwargs for client.post, status, error type, text the message must hold)
    ("JSON nested 1,000 deep", {"content": b'{"inputs": ' + b"[" * 1000 + b"0" + b"]" * 1000 + b"}",
                                "headers": JSON}, 400, "malformed_json", "nested too deeply"),
    ("JSON nested 100,000 deep", {"content": b"[" * 100_000 + b"]" * 100_000, "headers": JSON}, 400,
     "malformed_json", "nested too deeply"),
    ("objects nested 100,000 deep", {"content": b'{"a":' * 100_000 + b"0" + b"}" * 100_000, "headers": JSON}, 400,
     "malformed_json", "nested too deeply"),
    ("integer of 400 digits", {"content": _json_inputs("0", "1" + "0" * 400), "headers": JSON}, 422,
     "non_finite_input", "sample 1 "),
    ("integer of 5,000 digits", {"content": _json_inputs("0", "0", "-" + "9" * 5000), "headers": JSON}, 422,
     "non_finite_input", "sample 2 "),
    ("integer of 60 digits (finite in float64, not in float32)",
     {"content": _json_inputs("0", "1" + "0" * 59), "headers": JSON}, 422, "non_finite_input", "sample 1 "),
    ("1e39 in JSON", {"content": _json_inputs("0", "0", "1e39"), "headers": JSON}, 422, "non_finite_input",
     "sample 2 "),
    ("-1e39 in JSON", {"content": _json_inputs("-1e39"), "headers": JSON}, 422, "non_finite_input", "sample 0 "),
    ("float64 .npy of 1e300", {"content": npy_bytes(_float64_batch(3, 1, 1e300)), "headers": NPY}, 422,
     "non_finite_input", "sample 1 "),
    ("float64 .npy just over float32 max", {"content": npy_bytes(_float64_batch(2, 0, 3.5e38)), "headers": NPY},
     422, "non_finite_input", "sample 0 "),
    ("float64 .npy of -1e39", {"content": npy_bytes(_float64_batch(4, 3, -1e39)), "headers": NPY}, 422,
     "non_finite_input", "sample 3 "),
    (".npy header declaring 3 TB", {"content": _npy_header((10**9, 1, 28, 28)), "headers": NPY}, 400,
     "malformed_npy", "bytes of data follow"),
    (".npy header declaring 4 images, holding 1", {"content": _npy_header((4, 1, 28, 28)) + bytes(3136),
                                                   "headers": NPY}, 400, "malformed_npy", "bytes of data follow"),
    (".npz sent to /predict", {"content": _npz(x=np.zeros((1, 1, 28, 28), np.float32)), "headers": NPY}, 400,
     "malformed_npy", "not an .npz"),
    ("3e38 everywhere: finite in float32, outside the card's value range",
     {"content": npy_bytes(np.concatenate([np.zeros((1, 1, 28, 28), np.float32),
                                           np.full((1, 1, 28, 28), 3e38, np.float32)])), "headers": NPY},
     422, "out_of_range", "sample 1 "),
    ("Content-Length of 5,000 digits", {"content": b"{}", "headers": {**JSON, "content-length": "9" * 5000}},
     413, "payload_too_large", "limit"),
]


def test_hostile_predict_bodies_get_4xx_and_change_nothing(tmp_path, mnist_test, caplog):
    x = mnist_test[0][:1]

    async def go():
        async with Running(make_settings(tmp_path)) as svc:
            before = (await svc.client.post("/predict", json={"inputs": x.tolist()})).json()
            got = [_error(await svc.client.post("/predict", **kwargs)) for _, kwargs, *_ in HOSTILE_PREDICT]
            after = (await svc.client.post("/predict", json={"inputs": x.tolist()})).json()
            info = (await svc.client.get("/info")).json()
            return before, got, after, info, await svc.metrics()

    before, got, after, info, m = run(go())
    for (name, _, status, etype, text), (s, t, msg) in zip(HOSTILE_PREDICT, got, strict=True):
        assert (s, t) == (status, etype), (name, msg)
        assert text in msg, (name, msg)
    assert before == after and info["detector_version"] == "v0"
    assert m[("gga_rows_total", ())] == 2  # only the two valid requests were computed
    counts = {status: sum(1 for *_, s, _, _ in HOSTILE_PREDICT if s == status) for status in (400, 413, 422)}
    for status, n in counts.items():
        assert m[("gga_requests_total", (("route", "/predict"), ("status", str(status))))] == n
    assert m[("gga_requests_total", (("route", "/predict"), ("status", "200")))] == 2
    assert ("gga_requests_total", (("route", "/predict"), ("status", "500"))) not in m
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


boom = APIRouter()


@boom.get("/boom")
async def _boom() -> None:
    raise RuntimeError("secret internals of the failure")


@boom.get("/boom-sync")
def _boom_sync() -> None:  # runs on the thread pool
    raise KeyError("secret key")


@boom.get("/teapot")
async def _teapot() -> None:
    raise ApiError(418, "teapot", "short and stout")


@boom.get("/taken")
async def _taken() -> None:
    raise HTTPException(409, "already taken")


def test_catch_all_answers_500_envelope_logs_it_and_every_response_is_counted(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    svc = Running(make_settings(tmp_path, admin_token=TOKEN))
    svc.app.include_router(boom)

    async def go():
        async with svc:
            c = svc.client  # raises if an exception escaped the app (httpx raise_app_exceptions)
            rs = [await c.get("/boom"), await c.get("/boom"), await c.get("/boom-sync"), await c.get("/teapot"),
                  await c.get("/taken"), await c.get("/nope"), await c.get("/healthz"),
                  await c.post("/fit", headers={"authorization": "Bearer wrong"}),
                  await c.post("/fit", files={"file": ("d.npz", b"not a zip")}, headers=AUTH)]
            return rs, await svc.metrics()

    rs, m = run(go())
    assert [r.status_code for r in rs] == [500, 500, 500, 418, 409, 404, 200, 401, 400]
    ids = []
    for r in rs[:3]:
        status, etype, msg = _error(r)
        assert etype == "internal" and "secret" not in r.text and "Traceback" not in r.text
        ids.append(re.search(r"error id ([0-9a-f]{12})", msg).group(1))
    assert len(set(ids)) == 3
    assert [_error(r)[1] for r in rs[3:6]] == ["teapot", "conflict", "not_found"]
    logged = [r for r in caplog.records if r.name == "service.errors" and r.levelno == logging.ERROR]
    assert [type(r.exc_info[1]) for r in logged] == [RuntimeError, RuntimeError, KeyError]
    assert [r.getMessage() for r in logged] == [
        f"unhandled RuntimeError in GET /boom (error id {ids[0]})",
        f"unhandled RuntimeError in GET /boom (error id {ids[1]})",
        f"unhandled KeyError in GET /boom-sync (error id {ids[2]})"]
    assert TOKEN not in caplog.text
    req = {k[1]: v for k, v in m.items() if k[0] == "gga_requests_total"}
    assert req == {
        (("route", "/boom"), ("status", "500")): 2,
        (("route", "/boom-sync"), ("status", "500")): 1,
        (("route", "/teapot"), ("status", "418")): 1,
        (("route", "/taken"), ("status", "409")): 1,
        (("route", "unmatched"), ("status", "404")): 1,
        (("route", "/healthz"), ("status", "200")): 1,
        (("route", "/fit"), ("status", "401")): 1,
        (("route", "/fit"), ("status", "400")): 1,
    }
    assert m[("gga_request_duration_seconds_count", (("route", "/boom"),))] == 2


def test_blank_admin_token_is_unset_and_warns(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="service.settings")
    for blank in ("", "   ", "\t\n"):
        monkeypatch.setenv("GGA_ADMIN_TOKEN", blank)
        assert Settings(_env_file=None).auth.admin_token is None
    assert [r.levelno for r in caplog.records] == [logging.WARNING] * 3
    assert all("GGA_ADMIN_TOKEN is set but empty" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("GGA_ADMIN_TOKEN", f"  {TOKEN}\n")  # a token file's trailing newline
    s = Settings(_env_file=None)
    assert s.auth.admin_token.get_secret_value() == TOKEN and TOKEN not in repr(s)
    assert len(caplog.records) == 3 and TOKEN not in caplog.text
    monkeypatch.delenv("GGA_ADMIN_TOKEN")

    async def go(token):
        async with Running(make_settings(tmp_path, admin_token=token)) as svc:
            c = svc.client
            return [await c.post("/fit", files={"file": ("d.npz", b"not a zip")}, headers={"authorization": h})
                    for h in ("Bearer ", "Bearer", "bearer  ", "Bearer x", "Basic " + TOKEN, "Bearer " + TOKEN,
                              f"bearer   {TOKEN}  ")] + [await c.get("/fit/abc", headers={"authorization": "Bearer "})]

    blank = run(go(""))
    assert [_error(r)[:2] for r in blank] == [(403, "fit_disabled")] * 8
    assert "not empty" in _error(blank[0])[2]
    real = run(go(f" {TOKEN} "))
    # the right token gets past auth (the upload itself is then refused: 400), nothing else does
    assert [r.status_code for r in real] == [401, 401, 401, 401, 401, 400, 400, 401]
    assert real[0].headers["www-authenticate"] == "Bearer"


def test_fit_limits_bombs_and_hostile_values_are_refused_and_change_nothing(tmp_path, caplog):
    limit = 1 << 20
    (tmp_path / "data").mkdir()
    settings = make_settings(tmp_path, admin_token=TOKEN, max_fit_bytes=limit, data_dir=tmp_path / "data")
    x = np.zeros((100, 1, 28, 28), np.float32)
    y = np.zeros(100, np.int64)
    noise = np.random.default_rng(0).uniform(0, 1, (480, 1, 28, 28)).astype(np.float32)  # 1.5 MB, incompressible
    too_big, too_big_headers = _multipart(_npz(x=noise, y=np.zeros(480, np.int64)))
    zeros, labels = np.zeros((180, 1, 28, 28), np.float32), np.zeros(180, np.int64)  # 565 KB each, deflated to KB
    together = 2 * len(npy_bytes(zeros)) + 2 * len(npy_bytes(labels))
    assert len(npy_bytes(zeros)) < limit < together
    bomb_size = 20480 * 3136 + len(_npy_header((20480, 1, 28, 28)))
    # a file in GGA_DATA_DIR is the operator's own: larger than the upload limit is fine (then its labels fail)
    (tmp_path / "data" / "large.npz").write_bytes(_npz(x=np.zeros((400, 1, 28, 28), np.float32),
                                                       y=np.full(400, 10, np.int64)))
    assert len(too_big) > limit
    ok_body, ok_headers = _multipart(_npz(x=x, y=y + 10))  # parses, then its labels are refused

    async def go():
        async with Running(settings) as svc:
            c = svc.client

            async def upload(npz: bytes):
                return await c.post("/fit", files={"file": ("d.npz", npz, "application/octet-stream")}, headers=AUTH)

            chunked, under = Feed(too_big), Feed(ok_body)
            out = {
                "chunked over the limit": await c.post("/fit", content=chunked, headers={**AUTH, **too_big_headers}),
                "declared over the limit": await c.post("/fit", content=too_big, headers={**AUTH, **too_big_headers}),
                "chunked under the limit": await c.post("/fit", content=under, headers={**AUTH, **ok_headers}),
                "deflate bomb (64 MB of zeros)": await upload(_bomb(20480)),
                "forged member size": await upload(_forged(0xF0000000)),
                "members over the limit together": await upload(_npz(x=zeros, y=labels, x_cal=zeros, y_cal=labels)),
                "npy header over the limit": await upload(_npz(x=_npy_header((10**9, 1, 28, 28)), y=y)),
                "npy header without its data": await upload(_npz(x=_npy_header((100, 1, 28, 28)), y=y)),
                "object array": await upload(_npz(x=_npy_header((1,), "|O") + b"\x80", y=y)),
                "float64 x of 1e300": await upload(_npz(x=_float64_batch(5, 3, 1e300), y=y[:5])),
                "x_cal of 1e39": await upload(_npz(x=x, y=y, x_cal=_float64_batch(2, 0, 1e39), y_cal=y[:2])),
                "NUL byte in path": await c.post("/fit", json={"path": "a\x00b.npz"}, headers=AUTH),
                "lone surrogate in path": await c.post("/fit", content=b'{"path": "\\ud800.npz"}',
                                                       headers={**AUTH, **JSON}),
                "path too long": await c.post("/fit", json={"path": "a" * 5000}, headers=AUTH),
                "empty path": await c.post("/fit", json={"path": " "}, headers=AUTH),
                "data-dir file over the upload limit": await c.post("/fit", json={"path": "large.npz"}, headers=AUTH),
                "JSON nested 30,000 deep": await c.post("/fit", content=b"[" * 30_000 + b"]" * 30_000,
                                                        headers={**AUTH, **JSON}),
                "multipart without boundary": await c.post("/fit", content=b"--x--",
                                                           headers={**AUTH, "content-type": "multipart/form-data"}),
            }
            info = (await c.get("/info")).json()
            return out, chunked.sent, under.sent, info, await svc.metrics()

    out, sent, under_sent, info, m = run(go())
    expected = {
        "chunked over the limit": (413, "payload_too_large", "exceeds the limit"),
        "declared over the limit": (413, "payload_too_large", f"the limit is {limit} bytes"),
        "chunked under the limit": (422, "invalid_input", "labels in y"),
        "deflate bomb (64 MB of zeros)": (413, "payload_too_large", f"'x.npy' expands to {bomb_size} bytes"),
        "forged member size": (413, "payload_too_large", f"'x.npy' expands to {0xF0000000} bytes"),
        "members over the limit together": (413, "payload_too_large", f"expand to {together} bytes"),
        "npy header over the limit": (413, "payload_too_large", "array 'x' declares an array of 3136000000000 bytes"),
        "npy header without its data": (400, "malformed_npz", "only 0 bytes of data follow"),
        "object array": (400, "malformed_npz", "object arrays are refused"),
        "float64 x of 1e300": (422, "non_finite_input", "x sample 3 "),
        "x_cal of 1e39": (422, "non_finite_input", "x_cal sample 0 "),
        "NUL byte in path": (422, "invalid_input", "no NUL bytes"),
        "lone surrogate in path": (422, "invalid_input", "not a usable file name"),
        "path too long": (422, "invalid_input", "File name too long"),
        "empty path": (422, "invalid_input", "not empty"),
        "data-dir file over the upload limit": (422, "invalid_input", "labels in y"),
        "JSON nested 30,000 deep": (400, "malformed_json", "nested too deeply"),
        "multipart without boundary": (400, "malformed_multipart", "boundary"),
    }
    for name, (status, etype, text) in expected.items():
        s, t, msg = _error(out[name])
        assert (s, t) == (status, etype), (name, msg)
        assert text in msg, (name, msg)
    # the chunked upload was refused at the limit: the server pulled at most one chunk past it
    assert limit < sent <= limit + 16 * 1024 < len(too_big)
    assert under_sent == len(ok_body)
    # nothing changed: no job ran, no version was written, v0 still serves
    assert info["detector_version"] == "v0"
    assert m[("gga_fit_jobs_total", (("state", "succeeded"),))] == 0
    assert m[("gga_fit_jobs_total", (("state", "failed"),))] == 0
    assert not (tmp_path / "artifacts").exists() or not list((tmp_path / "artifacts").glob("*/*"))
    for status in (400, 413, 422):
        n = sum(1 for s, _, _ in expected.values() if s == status)
        assert m[("gga_requests_total", (("route", "/fit"), ("status", str(status))))] == n
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def _stop(proc: subprocess.Popen) -> str:
    out = stop_server(proc)
    assert proc.returncode in (0, -signal.SIGTERM), out
    return out


def test_real_server_hostile_requests_keep_the_connection_and_are_counted(tmp_path):
    """uvicorn, a blank GGA_ADMIN_TOKEN (what compose passes) and a 64 KiB /fit limit."""
    env = dict(GGA_ARTIFACT_DIR=str(tmp_path / "a"), GGA_ADMIN_TOKEN="", GGA_MAX_FIT_BYTES=str(64 * 1024),
               GGA_LOG_LEVEL="warning")
    proc, base = start_server(env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        async def go():
            async with httpx.AsyncClient(base_url=base, timeout=30) as c:
                deep = await c.post("/predict", content=b"[" * 100_000 + b"]" * 100_000, headers=JSON)
                big = await c.post("/predict", content=_json_inputs("0", "1e39"), headers=JSON)
                # "Authorization: Bearer " reaches the server as "Bearer" (trailing whitespace is not part of it)
                fit = await c.post("/fit", files={"file": ("d.npz", b"x")}, headers={"authorization": "Bearer"})
                chunked = await c.post("/fit", content=Feed(bytes(256 * 1024)),
                                       headers={"authorization": "Bearer", "content-type": "multipart/form-data"})
                return deep, big, fit, chunked, (await c.get("/metrics")).text

        deep, big, fit, chunked, text = asyncio.run(go())
    finally:
        out = _stop(proc)
    assert _error(deep)[:2] == (400, "malformed_json")
    assert _error(big)[:2] == (422, "non_finite_input") and "sample 1 " in _error(big)[2]
    assert _error(fit)[:2] == (403, "fit_disabled") and _error(chunked)[:2] == (403, "fit_disabled")
    for r in (deep, big):  # answered, not dropped: the connection stays open for the next request
        assert r.headers.get("connection") != "close"
    m = parse_metrics(text)
    assert m[("gga_requests_total", (("route", "/predict"), ("status", "400")))] == 1
    assert m[("gga_requests_total", (("route", "/predict"), ("status", "422")))] == 1
    assert m[("gga_requests_total", (("route", "/fit"), ("status", "403")))] == 2
    assert "GGA_ADMIN_TOKEN is set but empty" in out
    assert "Traceback" not in out, out


def test_real_server_refuses_a_chunked_upload_over_the_limit(tmp_path):
    env = dict(GGA_ARTIFACT_DIR=str(tmp_path / "a"), GGA_ADMIN_TOKEN=TOKEN, GGA_MAX_FIT_BYTES=str(64 * 1024),
               GGA_LOG_LEVEL="warning")
    body, headers = _multipart(_npz(x=np.random.default_rng(1).uniform(0, 1, (60, 1, 28, 28)).astype(np.float32),
                                    y=np.zeros(60, np.int64)))
    assert len(body) > 2 * 64 * 1024
    proc, base = start_server(env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        async def go():
            async with httpx.AsyncClient(base_url=base, timeout=30) as c:
                chunked = await c.post("/fit", content=Feed(body), headers={**AUTH, **headers})
                declared = await c.post("/fit", content=body, headers={**AUTH, **headers})
                info = (await c.get("/info")).json()
                return chunked, declared, info, (await c.get("/metrics")).text

        chunked, declared, info, text = asyncio.run(go())
    finally:
        out = _stop(proc)
    assert _error(chunked)[:2] == (413, "payload_too_large")
    assert _error(declared)[:2] == (413, "payload_too_large")
    assert info["detector_version"] == "v0"
    m = parse_metrics(text)
    assert m[("gga_requests_total", (("route", "/fit"), ("status", "413")))] == 2
    assert m[("gga_fit_jobs_total", (("state", "succeeded"),))] == 0
    assert TOKEN not in out and "Traceback" not in out, out


def test_json_int_literals_stay_ints_when_short():
    from service.decode import parse_json_body

    doc = parse_json_body(b'{"a": 5, "b": -12, "c": ' + b"7" * 65 + b', "d": 1.5}')
    assert doc["a"] == 5 and type(doc["a"]) is int and doc["b"] == -12
    assert type(doc["c"]) is float and doc["c"] == float("7" * 65) and doc["d"] == 1.5

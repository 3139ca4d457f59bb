"""The Open Inference Protocol (KServe v2) against a real uvicorn process, with the ecosystem's own clients.

One ``gga-serve`` process (the bundled MNIST model and detector, a read token set) is called
with ``tritonclient.http`` (JSON and binary tensors, request compression, output selection),
with KServe's ``InferenceRESTClient`` (protocol v2, JSON and binary), and with raw httpx for
the bad-input probe. Every output is compared with the native ``POST /predict`` of the same
rows sent alone (so the batch composition is the same): equal bit for bit. Requests are sent
one at a time, so each forms its own batch. The clients come from the optional ``oip`` extra
(``pip install -e ".[oip]"``; .ci/run installs it); without them their tests are skipped.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess

import httpx
import numpy as np
import pytest

from benchmarks.serverproc import start_server, stop_server
from tests.support.service import npy_bytes, parse_metrics

TOKEN = "oip-read-token"
MODEL = "mnist_cnn"
SHAPE = (1, 28, 28)
MAX_BODY = 64 * 1024  # GGA_MAX_REQUEST_BYTES of the test server: 20 samples of float32 fit, 30 do not
OUTPUTS = ("label", "confidence", "trust", "flagged", "score", "top_classes")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = dict(GGA_ARTIFACT_DIR=str(tmp_path_factory.mktemp("oip") / "a"), GGA_MAX_BATCH_ROWS="16",
               GGA_MAX_DELAY_MS="2", GGA_LOG_LEVEL="warning", GGA_READ_TOKEN=TOKEN,
               GGA_MAX_REQUEST_BYTES=str(MAX_BODY), GGA_TORCH_THREADS="1")
    proc, base = start_server(env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield base
    finally:
        out = stop_server(proc)
        assert "Traceback" not in out, out


@pytest.fixture(scope="module")
def rows(mnist_test):
    return mnist_test[0][:7]


def native(base: str, x: np.ndarray, csm: bool = False) -> dict[str, np.ndarray]:
    """``POST /predict`` (npy body) of ``x`` alone, as the v2 outputs' tensors."""
    r = httpx.post(f"{base}/predict", content=npy_bytes(x), params={"return_csm": str(csm).lower()},
                   headers={"content-type": "application/x-npy"}, timeout=60)
    assert r.status_code == 200, r.text
    p = r.json()["predictions"]
    out = {"label": np.array([q["label"] for q in p], np.int64),
           "confidence": np.array([q["confidence"] for q in p], np.float32),
           "trust": np.array([q["trust"] for q in p], np.float64),
           "flagged": np.array([q["flagged"] for q in p], bool),
           "score": np.array([np.nan if q["score"] is None else q["score"] for q in p], np.float64),
           "top_classes": np.array([[c["label"] for c in q["top_classes"]] for q in p], np.int64)}
    if all(q.get("prediction_set") is not None for q in p):  # a detector with prediction sets (and a gate)
        out["prediction_set"] = np.array([[c in q["prediction_set"] for c in range(10)] for q in p], bool)
    if all(q.get("accept") is not None for q in p):
        out["accept"] = np.array([q["accept"] for q in p], bool)
    if csm:
        out["csm"] = np.array([q["csm"] for q in p], np.float32)
    return out


def pick(expected: dict[str, np.ndarray], names) -> dict[str, np.ndarray]:
    return {n: expected[n] for n in names}


def assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(got) == list(expected)
    for name, arr in expected.items():
        assert got[name].dtype == arr.dtype, name
        assert got[name].shape == arr.shape, name
        assert got[name].tobytes() == arr.tobytes(), name  # bit for bit


def host(base: str) -> str:
    return base.removeprefix("http://")


# -- tritonclient ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def triton(server):
    httpclient = pytest.importorskip("tritonclient.http", reason="the oip extra (tritonclient[http]) is not installed")
    client = httpclient.InferenceServerClient(host(server), network_timeout=60.0)
    yield httpclient, client
    client.close()


def test_tritonclient_health_and_metadata(triton):
    httpclient, client = triton
    from tritonclient.utils import InferenceServerException

    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "v0")
    assert not client.is_model_ready("resnet50") and not client.is_model_ready(MODEL, "v9")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get_server_metadata(headers=auth) == {"name": "gga-trust", "version": "0.1.0",
                                                       "extensions": ["binary_tensor_data", "parameters"]}
    meta = client.get_model_metadata(MODEL, headers=auth)
    assert meta["name"] == MODEL and meta["versions"] == ["v0"] and meta["platform"] == "pytorch"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]][:7] == [
        ("label", "INT64", [-1]), ("confidence", "FP32", [-1]), ("trust", "FP64", [-1]), ("flagged", "BOOL", [-1]),
        ("score", "FP64", [-1]), ("top_classes", "INT64", [-1, 5]), ("csm", "FP32", [-1, 5, 5])]
    assert client.get_model_metadata(MODEL, "v0", headers=auth) == meta
    with pytest.raises(InferenceServerException) as err:  # metadata needs the read token, as /info does
        client.get_model_metadata(MODEL)
    assert "read token" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("resnet50", headers=auth)
    assert err.value.message() == "unknown model 'resnet50'; this server serves 'mnist_cnn'"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_outputs_equal_native_predict(server, triton, rows, binary):
    httpclient, client = triton
    x = rows[:5]
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    wanted = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in (*OUTPUTS, "csm")]
    result = client.infer(MODEL, [inp], outputs=wanted, request_id=f"req-{binary}")
    response = result.get_response()
    assert response["id"] == f"req-{binary}" and response["model_name"] == MODEL
    assert response["model_version"] == "v0" and response["parameters"] == {"alpha": 0.05}
    got = {n: result.as_numpy(n) for n in (*OUTPUTS, "csm")}
    assert_same(got, pick(native(server, x, csm=True), (*OUTPUTS, "csm")))
    assert got["label"].tolist() == [7, 2, 1, 0, 4]  # the first five test digits


def test_tritonclient_defaults_selection_compression_and_versions(server, triton, rows):
    httpclient, client = triton
    x = rows[2:5]
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    expected = native(server, x)
    # no outputs named: the default outputs (the six, and the decisions where the detector has them), binary
    # (tritonclient asks for binary_data_output), no csm
    result = client.infer(MODEL, [inp], request_compression_algorithm="gzip")
    assert [o["name"] for o in result.get_response()["outputs"]] == list(expected)
    assert_same({n: result.as_numpy(n) for n in expected}, expected)
    # two outputs in the order asked, one JSON and one binary; the versioned path
    wanted = [httpclient.InferRequestedOutput("trust", binary_data=False),
              httpclient.InferRequestedOutput("label", binary_data=True)]
    result = client.infer(MODEL, [inp], outputs=wanted, model_version="v0", request_compression_algorithm="deflate")
    outs = result.get_response()["outputs"]
    assert [(o["name"], "data" in o) for o in outs] == [("trust", True), ("label", False)]
    assert_same({n: result.as_numpy(n) for n in ("trust", "label")},
                {"trust": expected["trust"], "label": expected["label"]})
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, [inp], model_version="v7")
    assert err.value.message() == "model 'mnist_cnn' has no version 'v7'; the served version is 'v0'"


@pytest.mark.parametrize("dtype", ["FP64", "FP16", "UINT8"])
def test_other_input_datatypes_are_converted_like_the_npy_body(server, triton, rows, dtype):
    httpclient, client = triton
    np_dtype = {"FP64": np.float64, "FP16": np.float16, "UINT8": np.uint8}[dtype]
    x = (rows[:3] > 0.5) if dtype == "UINT8" else rows[:3]  # UINT8: 0/1 pixels, inside the value range [0, 1]
    x = x.astype(np_dtype)
    inp = httpclient.InferInput("input", list(x.shape), dtype)
    inp.set_data_from_numpy(x, binary_data=True)
    result = client.infer(MODEL, [inp])
    expected = native(server, x.astype(np.float32))
    assert_same({n: result.as_numpy(n) for n in expected}, expected)
    if dtype == "UINT8":  # raw 0..255 pixels are outside the model's range: the /predict rule, as a 400
        from tritonclient.utils import InferenceServerException

        inp.set_data_from_numpy((x * 255).astype(np.uint8), binary_data=True)
        with pytest.raises(InferenceServerException) as err:
            client.infer(MODEL, [inp])
        assert err.value.status() == "400"
        assert err.value.message().startswith("sample 0 (and 2 more) has values in [0, 255]; this model takes values "
                                              "in [0, 1]")


# -- KServe's client ---------------------------------------------------------------------------------------

def test_kserve_rest_client_v2(server, rows):
    kserve = pytest.importorskip("kserve", reason="the oip extra (kserve) is not installed")
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
    from kserve.protocol.infer_type import RequestedOutput

    x = rows[1:7]
    expected = pick(native(server, x), OUTPUTS)

    async def calls():
        async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=60)) as client:
            assert await client.is_server_live(server) is True
            assert await client.is_server_ready(server) is True
            assert await client.is_model_ready(server, MODEL) is True
            assert await client.is_model_ready(server, "resnet50") is False
            got = []
            for binary in (False, True):
                inp = InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=binary)
                req = InferRequest(MODEL, [inp], request_id=f"k-{binary}", request_outputs=[
                    RequestedOutput(n, parameters={"binary_data": binary}) for n in OUTPUTS])
                got.append(await client.infer(server, req, model_name=MODEL))
            return got

    for response, rid in zip(asyncio.run(calls()), ("k-False", "k-True"), strict=True):
        assert isinstance(response, kserve.InferResponse) and response.id == rid
        assert response.model_name == MODEL
        assert_same({o.name: o.as_numpy() for o in response.outputs}, expected)


# -- the bad-input probe, auth and metrics (raw HTTP, following the specification) --------------------------

def _head(inputs: list, **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def _fp32(shape, size=None, **params):
    p = {"binary_data_size": size} if size is not None else {}
    return {"name": "input", "shape": shape, "datatype": "FP32", "parameters": {**p, **params}}


ONE = np.zeros((1, *SHAPE), np.float32).tobytes()  # 3136 bytes
HEAD1 = _head([_fp32([1, 1, 28, 28], 3136)])
PROBES = [  # (what, body, extra headers, status, error message start)
    ("wrong datatype", _head([{"name": "input", "shape": [1, 1, 28, 28], "datatype": "INT32", "data": [0] * 784}]),
     {}, 400, "input 'input': datatype 'INT32' is not accepted; send FP32 (or FP64, FP16, UINT8)"),
    ("BYTES datatype", _head([{"name": "input", "shape": [1, 1, 28, 28], "datatype": "BYTES", "data": ["x"] * 784}]),
     {}, 400, "input 'input': datatype 'BYTES' is not accepted"),
    ("shape mismatch", _head([{"name": "input", "shape": [1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]),
     {}, 400, "input 'input' has shape [1, 28, 28]; expected [B, 1, 28, 28]"),
    ("data shorter than shape", _head([{"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32",
                                        "data": [0.0] * 784}]), {}, 400,
     "input 'input': data holds 784 values; its shape needs 1568"),
    ("strings in data", _head([{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                "data": ["0"] * 784}]), {}, 400, "input 'input': data must hold numbers only"),
    ("NaN in data", b'{"inputs":[{"name":"input","shape":[1,1,28,28],"datatype":"FP32","data":[NaN' + b",0" * 783
     + b"]}]}", {}, 400, "sample 0 contains NaN"),
    ("beyond float32", _head([{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP64",
                               "data": [1e300] + [0.0] * 783}]), {}, 400, "sample 0 contains NaN, infinity"),
    ("unknown input", _head([{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0] * 784}]),
     {}, 400, "inputs are named ['pixels']; this model takes exactly one input, 'input'"),
    ("no inputs", b'{"inputs": []}', {}, 400, "inputs must be a non-empty list of tensors"),
    ("not JSON", b"\x93NUMPY", {}, 400, "body is not valid JSON"),
    ("id not a string", _head([_fp32([1, 1, 28, 28])], id=7), {}, 400, "id must be a string"),
    ("unknown output", _head([{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0] * 784}],
                             outputs=[{"name": "logits"}]), {}, 400, "unknown output 'logits'"),
    ("shared memory", _head([_fp32([1, 1, 28, 28], shared_memory_region="r")]), {}, 400,
     "input 'input': parameter 'shared_memory_region' is not supported"),
    ("truncated binary", HEAD1 + ONE[:3000], {"Inference-Header-Content-Length": str(len(HEAD1))}, 400,
     "input 'input': binary_data_size is 3136 bytes but only 3000 bytes of binary data follow"),
    ("binary past the declared size", HEAD1 + ONE + b"\0\0\0\0", {"Inference-Header-Content-Length": str(len(HEAD1))},
     400, "4 bytes of binary data follow the inputs' declared binary_data_size"),
    ("binary size not the shape's", _head([_fp32([1, 1, 28, 28], 3000)]) + ONE[:3000],
     {"Inference-Header-Content-Length": str(len(_head([_fp32([1, 1, 28, 28], 3000)])))}, 400,
     "input 'input': binary_data_size is 3000 bytes; its shape and datatype need 3136"),
    ("header length past the body", HEAD1 + ONE, {"Inference-Header-Content-Length": "999999"}, 400,
     f"Inference-Header-Content-Length is 999999 but the body has only {len(HEAD1) + 3136} bytes"),
    ("header length not a number", HEAD1 + ONE, {"Inference-Header-Content-Length": "-5"}, 400,
     "Inference-Header-Content-Length must be a byte count"),
    ("header length cuts the JSON", HEAD1 + ONE, {"Inference-Header-Content-Length": "20"}, 400,
     "body is not valid JSON"),
    ("binary without the header", HEAD1 + ONE, {}, 400, "body is not valid JSON"),
    ("huge declared batch", _head([_fp32([10 ** 15, 1, 28, 28], 3136 * 10 ** 15)]) + ONE,
     {"Inference-Header-Content-Length": str(len(_head([_fp32([10 ** 15, 1, 28, 28], 3136 * 10 ** 15)])))}, 400,
     "input 'input': binary_data_size is 3136000000000000000 bytes but only 3136 bytes"),
    ("huge data", _head([{"name": "input", "shape": [40, 1, 28, 28], "datatype": "FP32", "data": [0.5] * 31360}]),
     {}, 413, "request body is 156"),
    ("gzip bomb", gzip.compress(b" " * (MAX_BODY + 1)), {"Content-Encoding": "gzip"}, 413,
     f"the request body inflates past the limit of {MAX_BODY} bytes"),
    ("unknown encoding", HEAD1, {"Content-Encoding": "br"}, 400, "Content-Encoding 'br' is not supported"),
]


def test_bad_input_probe_answers_4xx_never_5xx(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        before = parse_metrics(c.get("/metrics").text)
        for what, body, headers, status, message in PROBES:
            r = c.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
            assert (r.status_code, r.headers["content-type"]) == (status, "application/json"), (what, r.text)
            error = r.json()
            assert set(error) == {"error"} and error["error"].startswith(message), (what, error)
        r = c.post("/v2/models/resnet50/infer", content=HEAD1 + ONE,
                   headers={"Inference-Header-Content-Length": str(len(HEAD1))})
        assert (r.status_code, r.json()) == (404, {"error": "unknown model 'resnet50'; this server serves 'mnist_cnn'"})
        r = c.get(f"/v2/models/{MODEL}/stats")
        assert (r.status_code, r.json()) == (404, {"error": f"no such endpoint of the inference protocol: GET "
                                                            f"/v2/models/{MODEL}/stats"})
        r = c.post(f"/v2/models/{MODEL}/infer", content=HEAD1 + ONE,  # the same header, well formed: served
                   headers={"Inference-Header-Content-Length": str(len(HEAD1))})
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert [o["name"] for o in r.json()["outputs"]][:6] == list(OUTPUTS)
        after = parse_metrics(c.get("/metrics").text)

    def delta(route, status):
        key = ("gga_requests_total", (("route", route), ("status", str(status))))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("v2_infer", 400) == sum(s == 400 for *_, s, _ in PROBES)
    assert delta("v2_infer", 413) == 2 and delta("v2_infer", 404) == 1 and delta("v2_infer", 200) == 1
    assert delta("unmatched", 404) == 1
    assert not [k for k, v in after.items() if k[0] == "gga_requests_total" and dict(k[1])["status"].startswith("5")
                and v > before.get(k, 0)]


def test_auth_and_metrics_labels_of_the_v2_routes(server):
    with httpx.Client(base_url=server, timeout=30) as c:
        before = parse_metrics(c.get("/metrics").text)
        assert (c.get("/v2/health/live").json(), c.get("/v2/health/ready").json()) == ({"live": True}, {"ready": True})
        denied = c.get("/v2")
        assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
        assert denied.json() == {"error": "this endpoint needs the read token (GGA_READ_TOKEN) or the admin token: "
                                          "'Authorization: Bearer <token>'"}
        assert c.get(f"/v2/models/{MODEL}", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get(f"/v2/models/{MODEL}", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert c.get(f"/v2/models/{MODEL}/versions/v0/ready").json() == {"name": MODEL, "ready": True}
        after = parse_metrics(c.get("/metrics").text)
    counts = {(dict(k[1])["route"], dict(k[1])["status"]): v - before.get(k, 0) for k, v in after.items()
              if k[0] == "gga_requests_total" and dict(k[1])["route"].startswith("v2_") and v != before.get(k, 0)}
    assert counts == {("v2_health_live", "200"): 1, ("v2_health_ready", "200"): 1, ("v2_server_metadata", "401"): 1,
                      ("v2_model_metadata", "401"): 1, ("v2_model_metadata", "200"): 1, ("v2_model_ready", "200"): 1}


def test_the_load_benchmarks_v2_request_is_served(server, rows):
    """benchmarks/loadgen.py's raw v2 binary request (the load benchmark's v2 format) answers the native rows."""
    from benchmarks.loadgen import Conn, v2_request

    h, p = host(server).split(":")

    async def send() -> tuple[int, bytes]:
        conn = await Conn.open(h, int(p))
        try:
            return await conn.request(v2_request(h, int(p), rows[3:4]))
        finally:
            conn.close()

    status, body = asyncio.run(send())
    assert status == 200
    header, end = json.JSONDecoder().raw_decode(body.decode("latin-1"))
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    expected = native(server, rows[3:4])
    assert [o["name"] for o in header["outputs"]] == list(expected) and end + sum(sizes) == len(body)
    got, offset = {}, end
    for o, size in zip(header["outputs"], sizes, strict=True):
        dtype = {"INT64": "<i8", "FP32": "<f4", "FP64": "<f8", "BOOL": "?"}[o["datatype"]]
        got[o["name"]] = np.frombuffer(body[offset:offset + size], dtype=dtype).reshape(o["shape"])
        offset += size
    assert_same({k: v.astype(expected[k].dtype) for k, v in got.items()}, expected)


def test_decision_outputs_come_where_the_rows_carry_them():
    """prediction_set (class indices in the native rows) as one flag per class, accept as BOOL: by default where
    every row has them; asked for where the detector gives none, a 400."""
    from service.errors import ApiError
    from service.oip import InferRequest, build_response

    def row(label, pset, accept):
        return {"label": label, "confidence": 0.5, "trust": 0.25, "flagged": False, "score": None,
                "top_classes": [{"label": label, "name": str(label)}], "prediction_set": pset, "accept": accept,
                "detector_version": "v3"}

    x = np.zeros((2, *SHAPE), np.float32)
    body = build_response(InferRequest(x, None, False, "d-1"), [row(3, [1, 3], True), row(0, [], False)], MODEL,
                          0.05, 10, []).body
    doc = json.loads(body)
    outs = {o["name"]: o for o in doc["outputs"]}
    assert list(outs) == [*OUTPUTS, "prediction_set", "accept"] and doc["id"] == "d-1"
    assert outs["prediction_set"]["datatype"] == "BOOL" and outs["prediction_set"]["shape"] == [2, 10]
    assert outs["prediction_set"]["data"] == [i in (1, 3) for i in range(10)] + [False] * 10
    assert (outs["accept"]["data"], outs["score"]["data"]) == ([True, False], [None, None])  # NaN as JSON null
    binary = build_response(InferRequest(x, [("accept", True), ("prediction_set", True)]),
                            [row(3, [1, 3], True), row(0, [], False)], MODEL, 0.05, 10, [])
    n = int(binary.headers["inference-header-content-length"])
    assert binary.body[n:] == bytes([1, 0]) + bytes(i in (1, 3) for i in range(10)) + bytes(10)
    plain = [row(3, None, None), row(0, None, None)]  # a detector without decisions
    doc = json.loads(build_response(InferRequest(x, None), plain, MODEL, 0.05, 10, []).body)
    assert [o["name"] for o in doc["outputs"]] == list(OUTPUTS)
    with pytest.raises(ApiError) as err:
        build_response(InferRequest(x, [("accept", False)]), plain, MODEL, 0.05, 10, [])
    assert err.value.status == 400 and err.value.message.startswith("output 'accept' is not given")


def test_v2_infer_is_shed_and_timed_out_like_predict(tmp_path, mnist_test):
    """A full queue answers a v2 inference 503 before its body is read; a queue wait past the timeout is a 504;
    both in the protocol's error body, counted under v2_infer. In process, with the worker held in forward."""
    from service.settings import DEFAULT_MODEL_DIR
    from tests.support import fakes
    from tests.support.service import Running, make_settings, run

    settings = make_settings(tmp_path, model="factory:tests.support.fakes:gated_mnist",
                             model_weights=DEFAULT_MODEL_DIR / "model.safetensors", max_batch_rows=1,
                             max_queue_rows=1, max_delay_ms=0, request_timeout_s=0.5)
    x = mnist_test[0][:1]
    v2 = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": x.ravel().tolist()}]}
    url = f"/v2/models/{MODEL}/infer"

    async def go():
        async with Running(settings) as svc:
            fakes.ENTERED.clear()
            fakes.GATE.clear()
            try:
                busy = asyncio.create_task(svc.client.post(url, json=v2))
                while not fakes.ENTERED.is_set():  # the worker is now stuck in forward
                    await asyncio.sleep(0.01)
                queued = asyncio.create_task(svc.client.post(url, json=v2))
                await asyncio.sleep(0.05)
                unread = await svc.client.post(url, content=b"{not json")  # refused before the body is read
                ready = await svc.client.get("/v2/health/ready")
                timed_out = await queued
            finally:
                fakes.GATE.set()
            return await busy, unread, ready, timed_out, await svc.metrics()

    first, unread, ready, timed_out, m = run(go())
    assert first.status_code == 200 and first.json()["outputs"][0]["data"] == [7]
    assert (unread.status_code, unread.headers["retry-after"]) == (503, "1")
    assert unread.json() == {"error": "the queue is full (1 of 1 rows queued); retry later"}
    assert ready.json() == {"ready": True}
    assert timed_out.status_code == 504 and timed_out.json() == {
        "error": "the request could not be computed within 0.5 s of its arrival (it waited in the queue) and was not computed"}
    counts = [m[("gga_requests_total", (("route", "v2_infer"), ("status", s)))] for s in ("200", "503", "504")]
    assert counts == [1, 1, 1]


def test_route_labels_of_the_v2_paths():
    from service.oip import route_label

    labels = {path: route_label(path) for path in (
        "/v2", "/v2/", "/v2/health/live", "/v2/health/ready", "/v2/models/m", "/v2/models/m/versions/v1",
        "/v2/models/m/ready", "/v2/models/m/versions/v1/ready", "/v2/models/m/infer", "/v2/models/m/versions/v1/infer",
        "/v2/models/m/stats", "/v2/models//infer", "/predict", "/v2x")}
    assert labels == {
        "/v2": "v2_server_metadata", "/v2/": "unmatched", "/v2/health/live": "v2_health_live",
        "/v2/health/ready": "v2_health_ready", "/v2/models/m": "v2_model_metadata",
        "/v2/models/m/versions/v1": "v2_model_metadata", "/v2/models/m/ready": "v2_model_ready",
        "/v2/models/m/versions/v1/ready": "v2_model_ready", "/v2/models/m/infer": "v2_infer",
        "/v2/models/m/versions/v1/infer": "v2_infer", "/v2/models/m/stats": "unmatched",
        "/v2/models//infer": "unmatched", "/predict": None, "/v2x": None}

"""Property-based fuzzing of every operation in ``/openapi.json`` (schemathesis + Hypothesis).

Each operation of the service's own OpenAPI schema is fuzzed in-process, on the ASGI app
with the bundled model (its lifespan entered once, on an event loop of its own, as in
``conftest.Running``): schemathesis generates the cases, positive (schema-valid) and, where
the schema can be violated, negative; an example count per operation bounds the run and
``derandomize`` makes it the same run every time. Beside the raw schema cases, part of the
examples put data the service can act on into the generated case, so the deep paths are
fuzzed too: real ``.npy`` bodies and JSON ``inputs`` of the model's shape (and near it)
with hostile values, ``.npz`` uploads and data-directory paths for ``POST /fit`` (a fit job
on 200 MNIST samples takes about a second; every job is waited for before the app stops),
known job ids for ``GET /fit/{job_id}``, and Authorization headers that are not the token.

Every response must pass:

- ``no_5xx_but_503_504``: a 5xx other than 503 (overloaded, no detector) or 504 (queue
  timeout) is a bug;
- ``error_envelope``: every 4xx/5xx body is ``{"error": {"type": str, "message": str}}``;
- schemathesis' ``response_schema_conformance``, ``status_code_conformance``,
  ``content_type_conformance`` and ``response_headers_conformance``. Where the schema is
  knowingly loose, nothing is relaxed but nothing is checked either: ``/healthz`` and
  ``/readyz`` declare no 200 body schema, ``/metrics`` no content at all (its content type
  is checked here), and ``Info.detector``, ``model_card``, ``batching`` and
  ``FitJobView.result`` are free-form objects.

The requests sent per operation, their statuses and error types, and the 5xx seen are
counted; ``test_fuzz_summary`` prints them (``FUZZ`` lines, shown even under capture) and
requires every operation to have been reached.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections import Counter, defaultdict

import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from schemathesis import GenerationMode
from schemathesis.core.transport import Response
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.transport.serialization import Binary, serialize_binary

from detectors.datasets import load_idx_split
from service.settings import DEFAULT_MODEL_DIR
from tests.support.service import MNIST, Running, make_settings, npy_bytes

TOKEN = "fuzz-s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SHAPE = (1, 28, 28)
BASE = "http://test"
REQUEST_TIMEOUT_S = 60.0

# Hypothesis examples per fuzz target: bounded so that the module takes about a minute on 2 busy cores.
EXAMPLES = {
    "predict_json": 200,
    "predict_npy": 200,
    "predict_npy_warn": 100,
    "fit_multipart": 80,
    "fit_json": 100,
    "fit_no_token": 50,
    "fit_status": 50,
    "fit_status_no_token": 25,
    "plain_get": 15,
}


@schemathesis.serializer("application/x-npy")
def _npy_serializer(ctx, value):
    """The raw bytes (schemathesis has no serializer for this media type: it would never pick it)."""
    return serialize_binary(value)


# -- checks ------------------------------------------------------------------------------------


def no_5xx_but_503_504(ctx, response: Response, case) -> None:
    """503 and 504 are the service's answers to overload and queue timeouts; any other 5xx is a bug."""
    if response.status_code >= 500 and response.status_code not in (503, 504):
        raise AssertionError(f"{case.operation.label} answered {response.status_code}: {response.content[:500]!r}")


def error_envelope(ctx, response: Response, case) -> None:
    """Every 4xx/5xx answers ``{"error": {"type": str, "message": str}}`` as application/json."""
    if response.status_code < 400:
        return
    ctype = (response.headers.get("content-type") or [""])[0]
    assert ctype.startswith("application/json"), f"{response.status_code} with content type {ctype!r}"
    try:
        body = json.loads(response.content)
    except ValueError as exc:
        raise AssertionError(f"{response.status_code} body is not JSON: {response.content[:300]!r}") from exc
    ok = (isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], dict)
          and set(body["error"]) == {"type", "message"}
          and all(isinstance(body["error"][k], str) and body["error"][k] for k in ("type", "message")))
    assert ok, f"{response.status_code} body is not the error envelope: {body!r}"


def metrics_content_type(ctx, response: Response, case) -> None:
    """``/metrics`` declares no content in the schema: its 200 must be Prometheus text."""
    if case.operation.path == "/metrics" and response.status_code == 200:
        ctype = (response.headers.get("content-type") or [""])[0]
        assert ctype.startswith("text/plain"), f"/metrics content type {ctype!r}"
        assert b"gga_requests_total" in response.content


CHECKS = [no_5xx_but_503_504, error_envelope, metrics_content_type, response_schema_conformance,
          status_code_conformance, content_type_conformance, response_headers_conformance]

# -- the service on an event loop of its own ----------------------------------------------------

REQUESTS: Counter[str] = Counter()  # per operation label
STATUSES: dict[str, Counter[int]] = defaultdict(Counter)
FIVE_XX: list[str] = []
ERRORS: dict[str, Counter[str]] = defaultdict(Counter)  # error types of the 4xx/5xx
BY_TARGET: Counter[str] = Counter()  # requests per fuzz target (test)
CURRENT = {"target": "(none)"}


class LoopService:
    """``conftest.Running`` with its lifespan entered on an event loop in a thread, so that the
    (synchronous) Hypothesis tests can send requests to it one by one."""

    def __init__(self, settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self.thread.start()
        self.svc = Running(settings)
        self._call(self.svc.__aenter__())
        self.app = self.svc.app
        self.schema = schemathesis.openapi.from_dict(self.app.openapi())

    def _call(self, coro, timeout: float = REQUEST_TIMEOUT_S):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def send(self, case, headers: dict[str, str] | None = None) -> Response:
        """The case as schemathesis would send it (requests' encoding), through the ASGI transport."""
        kwargs = case.as_transport_kwargs(base_url=BASE, headers=headers)
        if "json" in kwargs:  # requests refuses NaN and infinities: send them as Python's json writes them
            kwargs["data"] = json.dumps(kwargs.pop("json")).encode()
        allowed = ("method", "url", "headers", "params", "json", "data", "files", "cookies")
        prepared = requests.Request(**{k: v for k, v in kwargs.items() if k in allowed}).prepare()
        body = prepared.body.encode() if isinstance(prepared.body, str) else prepared.body
        raw_headers = [(k.encode("latin-1"), v.encode("latin-1") if isinstance(v, str) else v)
                       for k, v in prepared.headers.items()]
        label = case.operation.label
        REQUESTS[label] += 1
        BY_TARGET[f"{CURRENT['target']} ({label})"] += 1
        t0 = time.perf_counter()
        r = self._call(self.svc.client.request(prepared.method, prepared.url, headers=raw_headers, content=body))
        STATUSES[label][r.status_code] += 1
        if r.status_code >= 400:
            try:
                ERRORS[label][r.json()["error"]["type"]] += 1
            except (ValueError, KeyError, TypeError):
                ERRORS[label]["(not the envelope)"] += 1
        if r.status_code >= 500:
            FIVE_XX.append(f"{label} {r.status_code}")
        headers_out: dict[str, list[str]] = defaultdict(list)
        for k, v in r.headers.multi_items():
            headers_out[k].append(v)
        return Response(status_code=r.status_code, headers=dict(headers_out), content=r.content, request=prepared,
                        elapsed=time.perf_counter() - t0, verify=True, encoding=r.encoding)

    def wait_for_fits(self, timeout: float = 60.0) -> None:
        fits = self.app.state.fits
        deadline = time.monotonic() + timeout
        while fits.running is not None and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        try:
            self.wait_for_fits()
            self._call(self.svc.__aexit__(None, None, None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture(scope="module")
def mnist_sample() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_idx_split(MNIST, "t10k")
    return x[:200], y[:200]


@pytest.fixture(scope="module")
def service(tmp_path_factory, mnist_sample):
    tmp = tmp_path_factory.mktemp("fuzz")
    data = tmp / "data"
    data.mkdir()
    x, y = mnist_sample
    np.savez(data / "tiny.npz", x=x, y=y)  # enough for a fit job that succeeds (about a second)
    np.savez(data / "few.npz", x=x[:8], y=y[:8])  # a job that fails: too few samples
    (data / "sub").mkdir()
    (data / "not-a-zip.npz").write_bytes(b"PK\x03\x04 and then nothing")
    np.savez(tmp / "outside.npz", x=x[:8], y=y[:8])
    settings = make_settings(tmp, admin_token=TOKEN, data_dir=data, max_fit_bytes=4 * 1024 * 1024,
                             torch_threads=1, request_timeout_s=20.0)
    svc = LoopService(settings)
    try:
        yield svc
    finally:
        svc.close()


@pytest.fixture(scope="module")
def known_jobs(service) -> list[str]:
    """Ids of a succeeded and a failed fit job, for GET /fit/{job_id}."""
    ids = []
    for path in ("tiny.npz", "few.npz"):
        service.wait_for_fits()
        r = service._call(service.svc.client.post("/fit", json={"path": path}, headers=AUTH))
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
        service.wait_for_fits()
    states = [service.app.state.fits.jobs[i].state for i in ids]
    assert states == ["succeeded", "failed"], states
    return ids


@pytest.fixture(scope="module")
def warn_service(tmp_path_factory):
    """The bundled model with value_range_policy 'warn': out-of-range values reach the network."""
    tmp = tmp_path_factory.mktemp("fuzz-warn")
    card = json.loads((DEFAULT_MODEL_DIR / "model_card.json").read_text())
    card["value_range_policy"] = "warn"
    (tmp / "card.json").write_text(json.dumps(card))
    svc = LoopService(make_settings(tmp, model_card=tmp / "card.json", torch_threads=1))
    try:
        yield svc
    finally:
        svc.close()


# -- strategies for the data the service acts on ------------------------------------------------

FLOAT_DTYPES = ["<f4", "<f2", "<f8", ">f4", ">f8"]
OTHER_DTYPES = ["<i4", "|u1", "|b1", "<c8", "<U2", "<i8"]


def _shapes():
    good = st.integers(1, 3).map(lambda b: (b, *SHAPE))
    near = st.sampled_from([(0, *SHAPE), (1, 28, 28), (2, 1, 28, 27), (1, 3, 28, 28), (1, 1, 28, 28, 1), (784,), ()])
    return st.one_of(good, good, good, near)


@st.composite
def npy_arrays(draw, out_of_range: bool = False) -> np.ndarray:
    """Arrays of the model's shape (mostly) and dtype (mostly): in [0, 1]; noise scaled by 10^k up to
    beyond the float32 maximum (overflow inside the network); or a few values of anything the dtype
    holds (NaN, infinities, the float32 maximum, subnormals, values beyond float32 in float64).
    ``out_of_range``: only the last two, always a float batch of the model's shape."""
    dtype = np.dtype(draw(st.sampled_from(FLOAT_DTYPES if out_of_range else FLOAT_DTYPES * 4 + OTHER_DTYPES)))
    shape = draw(st.integers(1, 3).map(lambda b: (b, *SHAPE)) if out_of_range else _shapes())
    unit = hnp.from_dtype(dtype, min_value=0, max_value=1) if dtype.kind in "fiub" else None
    mode = draw(st.sampled_from(["scaled", "scaled", "hostile"] if out_of_range else ["unit", "scaled", "hostile"]))
    if dtype.kind != "f":
        return draw(hnp.arrays(dtype, shape, elements=hnp.from_dtype(dtype), fill=unit))
    if mode == "unit":
        return draw(hnp.arrays(dtype, shape, elements=unit))
    if mode == "scaled":
        # dense noise (a seeded generator: Hypothesis shrinks the seed), non-negative or of both signs
        rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1), label="noise seed"))
        base = rng.uniform(draw(st.sampled_from([0.0, -1.0])), 1.0, shape)
        exponent = draw(st.one_of(st.integers(0, 40), st.floats(36.0, 38.6)))  # float32 ends at 10^38.53
        with np.errstate(over="ignore"):
            return (base * 10.0 ** exponent).astype(dtype)
    extremes = [v for v in (3.0e38, -3.0e38, 3.4028235e38, 1e39, 1e300, 6.5e4, 1e-45, 5e-324)
                if dtype.itemsize == 8 or abs(v) <= float(np.finfo(dtype).max)]
    elements = st.one_of(hnp.from_dtype(dtype), st.sampled_from(extremes))
    return draw(hnp.arrays(dtype, shape, elements=elements, fill=unit))


HOSTILE_SCALARS = st.one_of(
    st.integers(-(10 ** 400), 10 ** 400), st.floats(), st.booleans(), st.none(), st.text(max_size=4),
    st.just([]), st.just([0.5]), st.just({"a": 1}), st.just(1e39), st.just(-3.4e38))


@st.composite
def json_inputs(draw) -> list:
    """``inputs`` of (near) the model's shape: in [0, 1] or hostile, sometimes with one odd value planted."""
    shape = draw(_shapes())
    if not shape:
        return draw(HOSTILE_SCALARS)
    arr = draw(hnp.arrays(np.float64, shape, elements=st.one_of(st.floats(0, 1), st.floats()),
                          fill=st.floats(0, 1)))
    nested = arr.tolist()
    if arr.size and draw(st.booleans()):
        at = tuple(draw(st.integers(0, n - 1)) for n in shape)
        target = nested
        for i in at[:-1]:
            target = target[i]
        target[at[-1]] = draw(HOSTILE_SCALARS)
    return nested


def _fit_uploads(x: np.ndarray, y: np.ndarray) -> list[bytes]:
    small_x, small_y = x[:32], y[:32]
    nan_x = small_x.copy()
    nan_x[3, 0, 4, 4] = np.nan
    buf = io.BytesIO()
    np.savez(buf, x=np.array([object()], dtype=object), y=small_y[:1])  # a pickle inside
    return [
        _npz(x=small_x, y=small_y),  # a job that starts (and fails: too few samples)
        _npz(x=small_x),
        _npz(x=small_x, y=small_y + 10),
        _npz(x=(small_x * 255).astype(np.uint8), y=small_y),
        _npz(x=small_x, y=small_y, x_cal=small_x),
        _npz(x=small_x, y=small_y, x_cal=small_x[:4], y_cal=small_y[:5]),
        _npz(x=nan_x, y=small_y),
        _npz(x=small_x.astype(np.float64) * 1e39, y=small_y),
        _npz(x=small_x[:, 0], y=small_y),
        buf.getvalue(),
        b"PK\x05\x06" + bytes(18),  # an empty zip
        npy_bytes(small_x),  # an .npy, not an .npz
    ]


TOP_N_TEXT = ["3", "all", "ALL", " 5 ", "2", "0", "-1", "10", "11", "1e3", "5.0", "9" * 40, "", "\x00", "nan"]
ALPHA_TEXT = ["0.05", "0.5", "0", "1", "-0.1", "nan", "inf", "-inf", "1e-320", "0x1p-3", "", "5%", "\x00"]
PATHS = ["tiny.npz", "few.npz", "not-a-zip.npz", "sub", "sub/../tiny.npz", "../outside.npz", "/etc/passwd",
         "missing.npz", "tiny.npz\x00.txt", "a" * 5000, "%2e%2e/outside.npz", " ", "\udcff", "tiny.npz/x", "."]


# mostly None (the media type schemathesis chose), else a Content-Type that is not, or not quite, that one
CONTENT_TYPES = st.one_of(st.none(), st.none(), st.none(), st.sampled_from(
    ["text/plain", "application/json; charset=latin-1", "APPLICATION/JSON", "application/x-npy",
     "application/octet-stream", "multipart/form-data", "multipart/form-data; boundary=x", "", ";", "*/*",
     "application/json\x00"]).map(lambda ctype: {"Content-Type": ctype}))


def _settings(name: str) -> settings:
    return settings(max_examples=EXAMPLES[name], derandomize=True, database=None, deadline=None,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink], print_blob=False,
                    suppress_health_check=list(HealthCheck))


def _cases(operation, *, negative: bool = True):
    modes = [operation.as_strategy(GenerationMode.POSITIVE)]
    if negative:
        modes.append(operation.as_strategy(GenerationMode.NEGATIVE))
    return st.one_of(*modes)


def _validate(case, response: Response) -> None:
    case.validate_response(response, checks=CHECKS)


# -- the fuzz targets ---------------------------------------------------------------------------

RAN: set[str] = set()  # the fuzz targets that ran (with pytest -k, not all of them do)


@pytest.fixture(autouse=True)
def _record_target(request):
    CURRENT["target"] = request.node.name
    yield
    RAN.add(request.node.originalname)


def test_schema_lists_every_operation(service):
    """The targets below cover every operation of /openapi.json (a new route needs a target here)."""
    labels = {op.ok().label for op in service.schema.get_all_operations()}
    assert labels == {"POST /predict", "POST /fit", "GET /fit/{job_id}", "GET /info", "GET /healthz",
                      "GET /readyz", "GET /metrics"}


def test_fuzz_predict_json(service):
    op = service.schema["/predict"]["POST"]

    @_settings("predict_json")
    @given(case=_cases(op), data=st.data())
    def fuzz(case, data):
        if case.media_type == "application/json" and data.draw(st.booleans(), label="shaped"):
            body = {"inputs": data.draw(json_inputs(), label="inputs")}
            if data.draw(st.booleans(), label="csm"):
                body["return_csm"] = data.draw(st.one_of(st.booleans(), HOSTILE_SCALARS), label="return_csm")
            case.body = body
        _validate(case, service.send(case, headers=data.draw(CONTENT_TYPES, label="content type")))

    fuzz()


def test_fuzz_predict_npy(service):
    op = service.schema["/predict"]["POST"]

    @_settings("predict_npy")
    @given(case=_cases(op).filter(lambda c: c.media_type == "application/x-npy"), data=st.data())
    def fuzz(case, data):
        if data.draw(st.integers(0, 4), label="kind") > 0:  # mostly a real .npy
            case.body = Binary(npy_bytes(data.draw(npy_arrays(), label="array")))
        _validate(case, service.send(case))

    fuzz()


def test_fuzz_predict_npy_out_of_range_served(warn_service):
    """With value_range_policy 'warn' hostile values reach the network (float32 overflow inside it)."""
    svc = warn_service
    op = svc.schema["/predict"]["POST"]

    @_settings("predict_npy_warn")
    @given(case=op.as_strategy(GenerationMode.POSITIVE), data=st.data())
    def fuzz(case, data):
        x = data.draw(npy_arrays(out_of_range=True), label="array")
        if data.draw(st.booleans(), label="as json") and x.dtype.kind == "f" and x.dtype.itemsize > 2:
            case.media_type = "application/json"
            case.body = {"inputs": x.astype(np.float64).tolist()}
        else:
            case.media_type = "application/x-npy"
            case.body = Binary(npy_bytes(x))
        _validate(case, svc.send(case))

    fuzz()


def test_fuzz_fit_multipart(service, mnist_sample):
    op = service.schema["/fit"]["POST"]
    uploads = _fit_uploads(*mnist_sample)

    @_settings("fit_multipart")
    @given(case=_cases(op).filter(lambda c: c.media_type == "multipart/form-data"), data=st.data())
    def fuzz(case, data):
        if isinstance(case.body, dict) and data.draw(st.booleans(), label="real upload"):
            body = dict(case.body)
            body["file"] = Binary(data.draw(st.sampled_from(uploads), label="npz"))
            for key, texts in (("top_n", TOP_N_TEXT), ("alpha", ALPHA_TEXT)):
                if data.draw(st.booleans(), label=key):
                    body[key] = data.draw(st.sampled_from(texts), label=f"{key} text")
            case.body = body
        _validate(case, service.send(case, headers=AUTH))

    fuzz()


def test_fuzz_fit_json(service):
    op = service.schema["/fit"]["POST"]

    @_settings("fit_json")
    @given(case=_cases(op).filter(lambda c: c.media_type == "application/json"), data=st.data())
    def fuzz(case, data):
        if isinstance(case.body, dict) and data.draw(st.booleans(), label="known path"):
            body = dict(case.body)
            body["path"] = data.draw(st.sampled_from(PATHS), label="path")
            if data.draw(st.booleans(), label="options"):
                body["top_n"] = data.draw(st.sampled_from([None, 3, 10, 2, "all", 10 ** 30, True, 3.5]), label="top_n")
                body["alpha"] = data.draw(st.sampled_from([None, 0.05, 0, 1, float("nan"), "0.1", 1e-320]),
                                          label="alpha")
            case.body = body
        _validate(case, service.send(case, headers={**AUTH, **(data.draw(CONTENT_TYPES, label="content type") or {})}))

    fuzz()


AUTH_HEADERS = st.one_of(
    st.none(),
    st.sampled_from(["", "Bearer", "Bearer ", "Bearer  ", f"Basic {TOKEN}", f"Bearer {TOKEN[:-1]}", f"{TOKEN}",
                     f"Bearer {TOKEN}x", f"Bearer\t{TOKEN}", f"Bearer {TOKEN.upper()}", f"Bearer {TOKEN}\xff"]),
    st.text(st.characters(codec="latin-1", exclude_categories=("Cc",)), max_size=40).map(lambda t: f"Bearer {t}"),
)


def _not_the_token(value: str | None) -> bool:
    if value is None:
        return True
    scheme, _, given = value.partition(" ")
    return not (scheme.lower() == "bearer" and given.strip() == TOKEN)


def test_fuzz_fit_without_token(service):
    """POST /fit without the configured token: 401 whatever the body, nothing starts."""
    op = service.schema["/fit"]["POST"]
    jobs_before = len(service.app.state.fits.jobs)

    @_settings("fit_no_token")
    @given(case=_cases(op), auth=AUTH_HEADERS.filter(_not_the_token))
    def fuzz(case, auth):
        response = service.send(case, headers=None if auth is None else {"Authorization": auth})
        _validate(case, response)
        assert response.status_code == 401, response.content[:300]

    fuzz()
    assert len(service.app.state.fits.jobs) == jobs_before


def test_fuzz_fit_status(service, known_jobs):
    op = service.schema["/fit/{job_id}"]["GET"]

    @_settings("fit_status")
    @given(case=_cases(op, negative=False), data=st.data())
    def fuzz(case, data):
        if data.draw(st.booleans(), label="known id"):
            case.path_parameters = {"job_id": data.draw(st.sampled_from(known_jobs), label="job_id")}
        response = service.send(case, headers=AUTH)
        _validate(case, response)
        assert response.status_code in (200, 404), response.content[:300]

    fuzz()


def test_fuzz_fit_status_without_token(service, known_jobs):
    op = service.schema["/fit/{job_id}"]["GET"]

    @_settings("fit_status_no_token")
    @given(case=_cases(op, negative=False), auth=AUTH_HEADERS.filter(_not_the_token), data=st.data())
    def fuzz(case, auth, data):
        if data.draw(st.booleans(), label="known id"):
            case.path_parameters = {"job_id": data.draw(st.sampled_from(known_jobs), label="job_id")}
        response = service.send(case, headers=None if auth is None else {"Authorization": auth})
        _validate(case, response)
        assert response.status_code == 401, response.content[:300]

    fuzz()


JUNK_TEXT = st.text(st.characters(codec="latin-1", exclude_categories=("Cc",)), max_size=20)
JUNK_HEADERS = st.dictionaries(
    st.sampled_from(["Accept", "Content-Type", "Accept-Encoding", "X-Forwarded-For", "If-None-Match", "Range",
                     "Cookie", "Authorization"]), JUNK_TEXT, max_size=3)


@pytest.mark.parametrize("path", ["/info", "/healthz", "/readyz", "/metrics"])
def test_fuzz_plain_get(service, path):
    """Operations without parameters: schemathesis generates one case each; the examples after it add
    undeclared query parameters, headers and a body, which the service must ignore."""
    op = service.schema[path]["GET"]

    @_settings("plain_get")
    @given(case=_cases(op, negative=False), data=st.data())
    def fuzz(case, data):
        headers = None
        if data.draw(st.booleans(), label="junk"):
            case.query = data.draw(st.dictionaries(JUNK_TEXT, JUNK_TEXT, max_size=3), label="query")
            headers = data.draw(JUNK_HEADERS, label="headers")
            if data.draw(st.booleans(), label="body"):
                case.body, case.media_type = data.draw(st.binary(max_size=64), label="body"), "application/octet-stream"
        response = service.send(case, headers=headers)
        _validate(case, response)
        assert response.status_code == 200, response.content[:300]

    fuzz()


def test_fuzz_summary(service, capsys):
    """Every operation was reached (when every target ran); the 5xx seen, none but 503/504, are reported."""
    service.wait_for_fits()
    operations = {op.ok().label for op in service.schema.get_all_operations()}
    targets = {name for name in globals() if name.startswith("test_fuzz_") and name != "test_fuzz_summary"}
    missing = operations - set(REQUESTS) if targets <= RAN else set()
    lines = [f"FUZZ {label}: {REQUESTS[label]} requests, statuses {dict(sorted(STATUSES[label].items()))}, "
             f"errors {dict(ERRORS[label].most_common())}" for label in sorted(REQUESTS)]
    lines += [f"FUZZ   {target}: {n}" for target, n in BY_TARGET.items()]
    lines.append(f"FUZZ total: {sum(REQUESTS.values())} requests, 5xx: {len(FIVE_XX)} {Counter(FIVE_XX)}")
    with capsys.disabled():  # in the test log whatever the capture mode
        print("\n" + "\n".join(lines))
    assert not missing, f"operations never fuzzed: {missing}"
    assert not [s for s in FIVE_XX if not s.endswith((" 503", " 504"))], FIVE_XX

"""The Open Inference Protocol (KServe v2 inference protocol), REST, beside the native API.

The same app, batcher and detector as ``POST /predict``: a v2 inference request is decoded
into the same float32 batch, checked by the same rules (byte limit, shape, finite values,
the model card's value range), queued in the same batcher as one ``PredictPayload`` and
computed by the same worker, so its outputs are the native response's rows, as tensors.

Endpoints (the model's name is the model card's; its version is the served detector version):

- ``GET /v2/health/live``, ``GET /v2/health/ready``: ``{"live": true}`` / ``{"ready": true}``
  (503 while starting, stopping or without a detector);
- ``GET /v2``: server metadata; ``GET /v2/models/{name}[/versions/{version}]``: model
  metadata (both need the read token where ``GGA_READ_TOKEN`` is set, like ``/info``);
- ``GET /v2/models/{name}[/versions/{version}]/ready``;
- ``POST /v2/models/{name}[/versions/{version}]/infer``.

Input: one tensor ``input`` of shape ``[B, *input_shape]``, datatype FP32 (FP64, FP16 and
UINT8 are accepted and converted to float32 like the ``.npy`` body), its ``data`` flat
row-major (nested lists are accepted too) or binary (:mod:`service.oip_binary`). Outputs:
``label`` INT64 [B], ``confidence`` FP32 [B], ``trust`` FP64 [B], ``flagged`` BOOL [B],
``score`` FP64 [B] (NaN where the native answer has null), ``top_classes`` INT64 [B, N];
``csm`` FP32 [B, N, N] only when named in ``outputs``; ``prediction_set`` BOOL [B, C] (one
flag per class) and ``accept`` BOOL [B], also by default, where the served detector gives them
(fitted decisions, a gate). ``outputs`` in the request selects and orders what comes back; the
request ``id`` is echoed.

Errors are the protocol's ``{"error": "<message>"}``: 400 for a bad request or tensor
(what ``/predict`` answers with 415 or 422), 404 for an unknown model, version or
endpoint, 413 past the byte limit, 503 when overloaded, not ready or without a detector,
504 past the queue timeout, 401 without the read token.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from service.auth import matches, presented, secret_of
from service.decode import body_stream, parse_json_body, validate_batch
from service.errors import ApiError
from service.oip_binary import HEADER_LENGTH, BinaryReader, encode_response, inflate, split_body, tensor_bytes
from service.submit import range_warnings, score_rows

router = APIRouter(prefix="/v2", include_in_schema=False)  # the protocol's own specification documents it
OFFLOAD_BYTES = 256 * 1024  # decode larger bodies on a thread, not on the event loop (as /predict)
INPUT = "input"
INPUT_DTYPES = ("FP32", "FP64", "FP16", "UINT8")
EXTENSIONS = ["binary_tensor_data", "parameters"]
# outputs: name -> datatype; the first six come back when the request names none
DEFAULT_OUTPUTS = ("label", "confidence", "trust", "flagged", "score", "top_classes")
SET_OUTPUTS = ("prediction_set", "accept")  # also by default where the detector gives them (prediction sets, gate)
DATATYPES = {"label": "INT64", "confidence": "FP32", "trust": "FP64", "flagged": "BOOL", "score": "FP64",
             "top_classes": "INT64", "csm": "FP32", "prediction_set": "BOOL", "accept": "BOOL"}
UNSUPPORTED_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset",
                          "classification")


# -- route labels and errors, also used by the request middleware (service.app) ------------------------

def is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def route_label(path: str) -> str | None:
    """The metrics' route label of a v2 path (``v2_infer``, ``v2_model_metadata``, ...), None for any other path.

    A ``/versions/{version}`` segment pair after the model name gives the same label as without it."""
    if not is_v2(path):
        return None
    parts = path.split("/")[2:]
    if not parts:
        return "v2_server_metadata"
    if parts in (["health", "live"], ["health", "ready"]):
        return f"v2_health_{parts[1]}"
    if len(parts) >= 2 and parts[0] == "models" and parts[1]:
        rest = parts[2:]
        if len(rest) >= 2 and rest[0] == "versions" and rest[1]:
            rest = rest[2:]
        if not rest:
            return "v2_model_metadata"
        if rest == ["ready"]:
            return "v2_model_ready"
        if rest == ["infer"]:
            return "v2_infer"
    return "unmatched"


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The protocol's error body, ``{"error": "<message>"}``."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _v2_status(status: int) -> int:
    return 400 if status in (415, 422) else status  # the protocol answers a bad request or tensor with 400


def _error_of(exc: ApiError) -> JSONResponse:
    return error_response(_v2_status(exc.status), exc.message, exc.headers)


# -- checks shared by the endpoints ----------------------------------------------------------------------

def _served(request: Request, name: str, version: str | None):
    """(state, detector, detector version) once ``name`` (and ``version``, if given) are the served model; 404 else."""
    st = request.app.state
    card = getattr(st, "card", None)
    if card is None:  # (before the lifespan has loaded the model)
        raise ApiError(503, "unavailable", "the service is starting")
    if name != card.name:
        raise ApiError(404, "not_found", f"unknown model {name!r}; this server serves {card.name!r}")
    detector, served = st.slot.get()
    if version is not None and version != served:
        raise ApiError(404, "not_found", f"model {name!r} has no version {version!r}; the served version is "
                       f"{served!r}")
    return st, detector, served


def _require_reader(request: Request) -> None:
    """Metadata describes the deployment: the read token where one is set (as ``/info``), bearer or basic."""
    auth = request.app.state.settings.auth
    reader = secret_of(auth.read_token)
    if reader and not matches(presented(request.headers.get("authorization", ""), basic=True), reader,
                              secret_of(auth.admin_token)):
        raise ApiError(401, "unauthorized", "this endpoint needs the read token (GGA_READ_TOKEN) or the admin "
                       "token: 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"})


def _ready_error(st) -> ApiError | None:
    if not getattr(st, "ready", False):
        return ApiError(503, "unavailable", "the service is starting or stopping")
    if st.slot.get()[0] is None:
        return ApiError(503, "no_detector", "no fitted detector for this model yet: calibrate one with POST /fit")
    return None


# -- health and metadata ---------------------------------------------------------------------------------

@router.get("/health/live")
async def live() -> Response:
    return JSONResponse({"live": True})


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    err = _ready_error(request.app.state)
    return _error_of(err) if err is not None else JSONResponse({"ready": True})


@router.get("")
async def server_metadata(request: Request) -> Response:
    try:
        _require_reader(request)
    except ApiError as exc:
        return _error_of(exc)
    return JSONResponse({"name": "gga-trust", "version": request.app.version, "extensions": EXTENSIONS})


def output_shapes(st, detector) -> dict[str, list[int]]:
    """Each output's shape, ``-1`` for the batch axis (and for N while no detector is loaded)."""
    top_n = getattr(detector, "top_n", None) if detector is not None else None
    n_classes = len(st.card.class_names)
    n = -1 if detector is None else min(top_n or n_classes, n_classes)
    shapes = {name: [-1] for name in ("label", "confidence", "trust", "flagged", "score")}
    shapes["top_classes"] = [-1, -1 if n < 0 else min(n, 5)]
    shapes["csm"] = [-1, n, n]
    for name in set_outputs(detector):
        shapes[name] = [-1, n_classes] if name == "prediction_set" else [-1]
    return shapes


def set_outputs(detector) -> tuple[str, ...]:
    """The decision outputs the detector gives: ``prediction_set`` with fitted decisions, ``accept`` with a gate."""
    decisions = getattr(detector, "decisions", None)
    if decisions is None:
        return ()
    return SET_OUTPUTS if getattr(decisions, "gate", None) is not None else SET_OUTPUTS[:1]


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(name: str, request: Request, version: str | None = None) -> Response:
    try:
        _require_reader(request)
        st, detector, served = _served(request, name, version)
    except ApiError as exc:
        return _error_of(exc)
    shapes = output_shapes(st, detector)
    outputs = [{"name": k, "datatype": DATATYPES[k], "shape": shape} for k, shape in shapes.items()]
    return JSONResponse({
        "name": st.card.name,
        "versions": [served] if served is not None else [],
        "platform": "pytorch",
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, *st.card.input_shape]}],
        "outputs": outputs,
    })


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(name: str, request: Request, version: str | None = None) -> Response:
    try:
        st, _, _ = _served(request, name, version)
    except ApiError as exc:
        return _error_of(exc)
    err = _ready_error(st)
    return _error_of(err) if err is not None else JSONResponse({"name": name, "ready": True})


# -- inference -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InferRequest:
    x: np.ndarray  # float32 [B, *input_shape], checked
    outputs: list[tuple[str, bool]] | None  # (name, binary) in the order asked; None: the defaults
    binary_output: bool = False  # the request's binary_data_output: the defaults' encoding
    id: str | None = None

    @property
    def return_csm(self) -> bool:
        return any(name == "csm" for name, _ in self.outputs or ())


def _params(obj: dict, where: str) -> dict:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise ApiError(400, "bad_request", f"{where}: parameters must be an object")
    for key in UNSUPPORTED_PARAMETERS:
        if key in params:
            raise ApiError(400, "bad_request", f"{where}: parameter {key!r} is not supported by this server")
    return params


def _flag(params: dict, key: str, default: bool, where: str) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise ApiError(400, "bad_request", f"{where}: parameter {key!r} must be true or false")
    return value


def _tensor(inp: dict, input_shape: tuple[int, ...], reader: BinaryReader) -> np.ndarray:
    """The input tensor of one ``inputs`` entry as a float32 array of its declared shape (values not yet checked)."""
    expected = [-1, *input_shape]
    shape, datatype = inp.get("shape"), inp.get("datatype")
    if not isinstance(shape, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in shape):
        raise ApiError(400, "bad_request", f"input {INPUT!r}: shape must be a list of integers like {expected}")
    if len(shape) != len(expected) or tuple(shape[1:]) != tuple(input_shape) or shape[0] < 0:
        raise ApiError(400, "bad_request", f"input {INPUT!r} has shape {shape[:8]}; expected [B, "
                       f"{', '.join(map(str, input_shape))}] with B >= 1")
    if shape[0] == 0:
        raise ApiError(400, "bad_request", f"input {INPUT!r}: no samples (B = 0); expected B >= 1")
    if datatype not in INPUT_DTYPES:
        raise ApiError(400, "bad_request", f"input {INPUT!r}: datatype {str(datatype)[:20]!r} is not accepted; send "
                       f"FP32 (or {', '.join(INPUT_DTYPES[1:])})")
    count = math.prod(shape)
    params = _params(inp, f"input {INPUT!r}")
    if "binary_data_size" in params:
        if "data" in inp:
            raise ApiError(400, "bad_request", f"input {INPUT!r} has both data and binary_data_size")
        raw = reader.take(INPUT, params["binary_data_size"], count, np.dtype(_np_dtype(datatype)))
        arr = raw.astype(np.float32) if datatype != "FP64" else raw  # (astype copies: the body is not kept)
    else:
        if "data" not in inp:
            raise ApiError(400, "bad_request", f"input {INPUT!r} has neither data nor parameters.binary_data_size")
        arr = _json_data(inp["data"], datatype, count)
    return arr.reshape(shape)


def _np_dtype(datatype: str) -> str:
    return {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2", "UINT8": "u1"}[datatype]


def _json_data(data: object, datatype: str, count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise ApiError(400, "bad_request", f"input {INPUT!r}: data must be a list of numbers (flat, row-major)")
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ApiError(400, "bad_request", f"input {INPUT!r}: data must be a flat list of numbers (or lists of the "
                       f"tensor's shape): {str(exc)[:200]}") from exc
    if arr.dtype.kind not in "iuf":
        raise ApiError(400, "bad_request", f"input {INPUT!r}: data must hold numbers only ({datatype})")
    if arr.size != count:
        raise ApiError(400, "bad_request", f"input {INPUT!r}: data holds {arr.size} values; its shape needs {count}")
    if datatype == "UINT8":
        if arr.dtype.kind == "f" or (arr.size and (arr.min() < 0 or arr.max() > 255)):
            raise ApiError(400, "bad_request", f"input {INPUT!r}: UINT8 data must be integers in [0, 255]")
        return arr.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # beyond the datatype's range: inf, refused by the checks
        return arr.astype(np.float64 if datatype == "FP64" else np.float16 if datatype == "FP16" else np.float32)


def parse_infer(body: bytes, header_length: str | None, st) -> InferRequest:
    """The checked inference request of a v2 body (JSON, or JSON + binary per ``Inference-Header-Content-Length``)."""
    head, binary = split_body(body, header_length)
    try:
        doc = parse_json_body(head)
    except ApiError as exc:  # the native messages name {"inputs": [...]}, as the protocol's request does too
        raise ApiError(400, exc.type, exc.message) from exc
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ApiError(400, "bad_request", "id must be a string")
    params = _params(doc, "request")
    binary_out = _flag(params, "binary_data_output", False, "request")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, dict) for i in inputs):
        raise ApiError(400, "bad_request", f"inputs must be a non-empty list of tensors; this model takes one, "
                       f"{INPUT!r}")
    names = [i.get("name") for i in inputs]
    if names != [INPUT]:
        raise ApiError(400, "bad_request", f"inputs are named {[str(n)[:40] for n in names[:4]]}; this model takes "
                       f"exactly one input, {INPUT!r} (FP32 [B, {', '.join(map(str, st.card.input_shape))}])")
    reader = BinaryReader(binary)
    arr = _tensor(inputs[0], st.card.input_shape, reader)
    reader.finish()
    if arr.dtype == np.float32 and not arr.flags.writeable:
        arr = arr.copy()
    x = validate_batch(arr, st.card.input_shape)
    return InferRequest(x, _outputs(doc, binary_out), binary_out, request_id)


def _outputs(doc: dict, binary_out: bool) -> list[tuple[str, bool]] | None:
    asked = doc.get("outputs")
    if asked is None:
        return None
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise ApiError(400, "bad_request", "outputs must be a list of objects {\"name\": ...}")
    out, seen = [], set()
    for o in asked:
        name = o.get("name")
        if name not in DATATYPES:
            raise ApiError(400, "bad_request", f"unknown output {str(name)[:40]!r}; outputs: "
                           f"{', '.join(DATATYPES)}")
        if name in seen:
            raise ApiError(400, "bad_request", f"output {name!r} is asked for twice")
        seen.add(name)
        out.append((name, _flag(_params(o, f"output {name!r}"), "binary_data", binary_out, f"output {name!r}")))
    return out


def _column(rows: list[dict], name: str, n_classes: int) -> np.ndarray:
    """Output ``name`` of the native rows as its tensor."""
    if name == "score":
        return np.array([np.nan if r["score"] is None else r["score"] for r in rows], dtype=np.float64)
    if name == "top_classes":
        tops = [[c["label"] for c in r["top_classes"]] for r in rows]
        width = max(len(t) for t in tops)
        return np.array([t + [-1] * (width - len(t)) for t in tops], dtype=np.int64)  # -1: no class (a swap mid-batch)
    if name == "csm":
        return np.array([r["csm"] for r in rows], dtype=np.float32)
    if name == "prediction_set":
        return np.array([_class_mask(r["prediction_set"], n_classes) for r in rows], dtype=bool)
    dtype = {"INT64": np.int64, "FP32": np.float32, "FP64": np.float64, "BOOL": bool}[DATATYPES[name]]
    return np.array([r[name] for r in rows], dtype=dtype)


def _class_mask(members: list, n_classes: int) -> list[bool]:
    """A prediction set as one flag per class, from flags, class indices or ``{"label": ...}`` entries."""
    if len(members) == n_classes and all(isinstance(m, bool) for m in members):
        return members
    mask = [False] * n_classes
    for m in members:
        mask[m["label"] if isinstance(m, dict) else int(m)] = True
    return mask


def _json_values(arr: np.ndarray) -> list:
    flat = arr.ravel()
    values = flat.tolist()
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():  # JSON has no NaN: null, read back as NaN
        values = [v if math.isfinite(v) else None for v in values]
    return values


def _dumps(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def build_response(req: InferRequest, rows: list[dict], model: str, alpha: float, n_classes: int,
                   warnings: list[dict]) -> Response:
    """The v2 response of the native rows: the outputs asked for, JSON or binary each."""
    given = [k for k in SET_OUTPUTS if all(r.get(k) is not None for r in rows)]  # by the detector that computed
    asked = req.outputs if req.outputs is not None else \
        [(name, req.binary_output) for name in (*DEFAULT_OUTPUTS, *given)]
    outputs, blobs = [], []
    for name, binary in asked:
        if name in SET_OUTPUTS and name not in given:
            raise ApiError(400, "bad_request", f"output {name!r} is not given by the served detector (prediction "
                           "sets and the accept gate are fitted with the detector)")
        arr = _column(rows, name, n_classes)
        entry = {"name": name, "datatype": DATATYPES[name], "shape": list(arr.shape)}
        if binary:
            blob = tensor_bytes(arr, DATATYPES[name])
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_values(arr)
        outputs.append(entry)
    header = {"model_name": model, "model_version": rows[0]["detector_version"]}
    if req.id is not None:
        header["id"] = req.id
    params: dict = {"alpha": alpha}
    if warnings:
        params["warnings"] = "; ".join(f"sample {w['sample']}: {w['message']}" for w in warnings)
    header["parameters"] = params
    header["outputs"] = outputs
    body, headers = encode_response(header, blobs, _dumps)
    return Response(body, media_type="application/octet-stream" if blobs else "application/json", headers=headers)


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(name: str, request: Request, version: str | None = None) -> Response:
    try:
        return await _infer(name, version, request)
    except ApiError as exc:
        return _error_of(exc)


async def _infer(name: str, version: str | None, request: Request) -> Response:
    st, _, _ = _served(request, name, version)
    if not getattr(st, "ready", False):
        raise ApiError(503, "unavailable", "the service is starting or stopping")
    limit = st.settings.limits.max_request_bytes
    body = b"".join([chunk async for chunk in body_stream(request, limit)])
    body = inflate(body, request.headers.get("content-encoding"), limit)
    header_length = request.headers.get(HEADER_LENGTH)
    req = await run_in_threadpool(parse_infer, body, header_length, st) if len(body) > OFFLOAD_BYTES \
        else parse_infer(body, header_length, st)
    warnings = range_warnings(st.card, req.x)  # exactly as /predict applies it
    detector, _ = st.slot.get()
    if detector is None:
        raise ApiError(503, "no_detector", "no fitted detector for this model yet: calibrate one with POST /fit")
    rows = await score_rows(st, req.x, req.return_csm)
    served = st.settings.model.alpha
    alpha = served if served is not None else detector.alpha
    return build_response(req, rows, st.card.name, alpha, len(st.card.class_names), warnings)


@router.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
async def not_found(rest: str, request: Request) -> Response:
    return error_response(404, f"no such endpoint of the inference protocol: {request.method} /v2/{rest[:200]}")

"""HTTP routes: /predict, /fit, /fit/{id}, /info, /healthz, /readyz, /metrics."""

from __future__ import annotations

import io
import secrets
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from service.batcher import BatcherClosedError, QueueFullError, QueueTimeoutError, RequestTooLargeError
from service.decode import (
    NPY_TYPES,
    decode_json_inputs,
    decode_npy,
    media_type,
    parse_json_body,
    validate_batch,
)
from service.errors import ApiError
from service.fitjobs import FitBusyError
from service.schemas import (
    ErrorResponse,
    FitAccepted,
    FitJobView,
    FitPathRequest,
    Info,
    PredictRequest,
    PredictResponse,
)
from service.worker import NoDetectorError, PredictPayload, merge_results, split_payload

router = APIRouter()
OFFLOAD_BYTES = 256 * 1024  # decode larger bodies on a thread, not on the event loop

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 503, 504)}
_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": PredictRequest.model_json_schema()},
            "application/x-npy": {"schema": {"type": "string", "format": "binary",
                                             "description": "one .npy array (B, *input_shape), float32"}},
        },
    }
}
_FIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "file": {"type": "string", "format": "binary", "description": ".npz with x (n, *input_shape) "
                         "float and y (n,) integer labels; optionally x_cal, y_cal: held-out data for the "
                         "calibration (else a seeded split of x)"}}, "required": ["file"]}},
            "application/json": {"schema": FitPathRequest.model_json_schema()},
        },
    }
}


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "payload_too_large", f"request body is {declared} bytes; the limit is {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("/predict", response_model=PredictResponse, responses=_ERRORS, openapi_extra=_PREDICT_BODY,
             summary="Predict and score trust for a batch of samples")
async def predict(request: Request, return_csm: bool = False) -> Response:
    """Each sample's prediction with its GGA trust score and flag.

    Send JSON ``{"inputs": [...], "return_csm": false}`` or an ``application/x-npy``
    body (then ``?return_csm=true`` asks for the CSM). Full queue: 503 with
    Retry-After; queue wait beyond the timeout: 504.
    """
    st = request.app.state
    if not getattr(st, "ready", False):
        raise ApiError(503, "unavailable", "the service is starting or stopping")
    ctype = media_type(request.headers.get("content-type"))
    if ctype != "application/json" and ctype not in NPY_TYPES:
        raise ApiError(415, "unsupported_media_type", f"content type {ctype or '(none)'!r} is not supported; send "
                       "application/json ({\"inputs\": [...]}) or application/x-npy (one .npy array)")
    body = await _read_body(request, st.settings.max_request_bytes)
    shape = st.card.input_shape
    if ctype == "application/json":
        doc = parse_json_body(body)
        flag = doc.get("return_csm", return_csm)
        if not isinstance(flag, bool):
            raise ApiError(422, "invalid_input", '"return_csm" must be true or false')
        return_csm = flag
        if len(body) > OFFLOAD_BYTES:
            x = await run_in_threadpool(decode_json_inputs, doc, shape)
        else:
            x = decode_json_inputs(doc, shape)
    else:
        x = await run_in_threadpool(decode_npy, body, shape) if len(body) > OFFLOAD_BYTES else decode_npy(body, shape)
    detector, _ = st.slot.get()
    if detector is None:
        raise ApiError(503, "no_detector", "no fitted detector for this model yet: calibrate one with POST /fit")
    try:
        rows = await st.batcher.submit(PredictPayload(x, return_csm), len(x), split=split_payload,
                                       merge=merge_results)
    except QueueFullError as exc:
        retry = max(1, int(np.ceil(exc.retry_after_s)))
        raise ApiError(503, "overloaded", f"the queue is full ({exc.queued_rows} of {exc.max_queue_rows} rows); "
                       "retry later", headers={"Retry-After": str(retry)}) from exc
    except QueueTimeoutError as exc:
        raise ApiError(504, "timeout", f"the request waited more than {st.settings.request_timeout_s} s in the "
                       "queue and was not computed") from exc
    except RequestTooLargeError as exc:
        raise ApiError(413, "payload_too_large", str(exc)) from exc
    except BatcherClosedError as exc:
        raise ApiError(503, "unavailable", "the service is shutting down") from exc
    except NoDetectorError as exc:
        raise ApiError(503, "no_detector", str(exc)) from exc
    alpha = st.settings.alpha if st.settings.alpha is not None else detector.alpha
    return JSONResponse({"model": st.card.name, "alpha": alpha, "predictions": rows})


def _require_admin(request: Request) -> None:
    token = request.app.state.settings.admin_token
    if token is None:
        raise ApiError(403, "fit_disabled", "POST /fit is disabled: start the service with GGA_ADMIN_TOKEN set and "
                       "send it as 'Authorization: Bearer <token>'")
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(),
                                                                token.get_secret_value().encode()):
        raise ApiError(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)",
                       headers={"WWW-Authenticate": "Bearer"})


FitData = tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]


def _load_npz(data: bytes | Path, input_shape: tuple[int, ...], n_classes: int) -> FitData:
    """x, y and the optional calibration pair (x_cal, y_cal) of a /fit archive, validated."""
    try:
        with np.load(io.BytesIO(data) if isinstance(data, bytes) else data, allow_pickle=False) as npz:
            if not hasattr(npz, "files") or "x" not in npz.files or "y" not in npz.files:
                raise ApiError(422, "invalid_input", "the .npz must hold arrays 'x' (n, *input_shape) and 'y' (n,)")
            if ("x_cal" in npz.files) != ("y_cal" in npz.files):
                raise ApiError(422, "invalid_input", "calibration data needs both 'x_cal' and 'y_cal'")
            arrays = {k: npz[k] for k in ("x", "y", "x_cal", "y_cal") if k in npz.files}
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy raises several types for a bad archive
        raise ApiError(400, "malformed_npz", f"not a valid .npz archive (pickled arrays are refused): {exc}") from exc
    x, y = _check_pair(arrays["x"], arrays["y"], "x", "y", input_shape, n_classes)
    cal = None
    if "x_cal" in arrays:
        cal = _check_pair(arrays["x_cal"], arrays["y_cal"], "x_cal", "y_cal", input_shape, n_classes)
    return x, y, cal


def _check_pair(x: np.ndarray, y: np.ndarray, xn: str, yn: str, input_shape: tuple[int, ...],
                n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if x.dtype.kind not in "f":
        raise ApiError(422, "invalid_dtype", f"{xn} has dtype {x.dtype}; expected floats (float32) scaled like the "
                       "model's input")
    x = validate_batch(x, input_shape)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ApiError(422, "invalid_input", f"{yn} must be a 1-D integer array of labels, got {y.dtype} {y.shape}")
    if len(y) != len(x):
        raise ApiError(422, "invalid_input", f"{xn} has {len(x)} samples but {yn} has {len(y)} labels")
    if y.min() < 0 or y.max() >= n_classes:
        raise ApiError(422, "invalid_input", f"labels in {yn} must be in [0, {n_classes - 1}]")
    return x, y.astype(np.int64)


@router.post("/fit", status_code=202, response_model=FitAccepted, openapi_extra=_FIT_BODY,
             responses={code: {"model": ErrorResponse} for code in (400, 401, 403, 409, 413, 415, 422)},
             summary="Calibrate a new detector version from labelled in-distribution data")
async def fit(request: Request) -> Response:
    """Starts a fit job (admin token required) on an uploaded .npz (multipart field
    ``file``) or on ``{"path": ...}`` inside ``GGA_DATA_DIR``; 202 with the job id."""
    _require_admin(request)
    st = request.app.state
    ctype = media_type(request.headers.get("content-type"))
    limit = st.settings.max_fit_bytes
    shape, n_classes = st.card.input_shape, len(st.card.class_names)
    if ctype == "multipart/form-data":
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "payload_too_large", f"upload is {declared} bytes; the limit is {limit} bytes")
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "invalid_input", "multipart upload needs a file field named 'file' (.npz)")
        data = await upload.read()
        x, y, cal = await run_in_threadpool(_load_npz, data, shape, n_classes)
    elif ctype == "application/json":
        doc = parse_json_body(await _read_body(request, 64 * 1024))
        if not isinstance(doc.get("path"), str):
            raise ApiError(422, "invalid_input", 'expected {"path": "<file inside GGA_DATA_DIR>"}')
        path = _data_path(st.settings.data_dir, doc["path"])
        x, y, cal = await run_in_threadpool(_load_npz, path, shape, n_classes)
    else:
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data with a 'file' field (.npz) or JSON "
                       '{"path": ...}')
    try:
        job = st.fits.submit(x, y, cal)
    except FitBusyError as exc:
        raise ApiError(409, "conflict", str(exc)) from exc
    url = f"/fit/{job.id}"
    return JSONResponse({"id": job.id, "state": job.state, "status_url": url}, status_code=202,
                        headers={"Location": url})


def _data_path(data_dir: Path | None, rel: str) -> Path:
    if data_dir is None:
        raise ApiError(403, "forbidden", "fitting from a server path is disabled: set GGA_DATA_DIR")
    root = data_dir.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise ApiError(403, "forbidden", f"path {rel!r} is outside the data directory")
    if not path.is_file():
        raise ApiError(404, "not_found", f"no file {rel!r} in the data directory")
    return path


@router.get("/fit/{job_id}", response_model=FitJobView, responses={404: {"model": ErrorResponse}},
            summary="State, progress and result of a fit job")
async def fit_status(job_id: str, request: Request) -> Response:
    _require_admin(request)
    job = request.app.state.fits.jobs.get(job_id)
    if job is None:
        raise ApiError(404, "not_found", f"no fit job {job_id!r}")
    return JSONResponse(job.view())


@router.get("/info", response_model=Info, summary="Model, classes, detector version and batching settings")
async def info(request: Request) -> Response:
    st = request.app.state
    detector, version = st.slot.get()
    s = st.settings
    return JSONResponse({
        "model": st.card.name,
        "input_shape": list(st.card.input_shape),
        "class_names": st.card.class_names,
        "device": str(st.device),
        "detector_version": version,
        "detector": _detector_info(detector),
        "alpha": s.alpha if s.alpha is not None else (detector.alpha if detector else None),
        "batching": {"max_batch_rows": s.max_batch_rows, "max_delay_ms": s.max_delay_ms,
                     "max_queue_rows": s.max_queue_rows, "request_timeout_s": s.request_timeout_s,
                     "max_request_bytes": s.max_request_bytes},
        "model_card": st.card.extra,
    })


def _detector_info(detector) -> dict | None:
    if detector is None:
        return None
    meta = detector.metadata()
    fit = dict(meta["fit"])
    if not np.isfinite(fit["threshold"]):
        fit["threshold"] = None
    return {"config": meta["config"], "fit": fit, "model_fingerprint": meta["model_fingerprint"]}


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: model and detector loaded",
            responses={503: {"model": ErrorResponse}})
async def readyz(request: Request) -> Response:
    st = request.app.state
    if not getattr(st, "ready", False):
        raise ApiError(503, "not_ready", "the service is starting or stopping")
    _, version = st.slot.get()
    if version is None:
        raise ApiError(503, "no_detector", "no fitted detector for this model yet: POST /fit")
    return JSONResponse({"status": "ready", "detector_version": version})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)

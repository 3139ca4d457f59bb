"""HTTP routes: /predict, /fit, /fit/{id}, /info, /healthz, /readyz, /metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from detectors.presets import describe
from service.auth import matches, presented, secret_of
from service.decisions import FIT_DECISION_FIELDS, decisions_info
from service.decode import NPY_TYPES, body_stream, decode_json_inputs, decode_npy, media_type, parse_json_body
from service.errors import ApiError
from service.fitdata import load_npz as _load_npz
from service.fitdata import read_form
from service.fitjobs import FitBusyError, FitOptions
from service.images import IMAGE_TYPES, MULTIPART, read_images
from service.schemas import (
    ErrorResponse,
    FitAccepted,
    FitJobView,
    FitPathRequest,
    Info,
    PredictRequest,
    PredictResponse,
)
from service.submit import range_warnings, score_rows

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
            **{t: {"schema": {"type": "string", "format": "binary", "description": "one image: the model card's "
                              "preprocessing makes it one sample"}} for t in IMAGE_TYPES},
            MULTIPART: {"schema": {"type": "object", "properties": {"file": {
                "type": "array", "items": {"type": "string", "format": "binary"},
                "description": "PNG, JPEG or WebP images, one prediction per file, in order"}},
                "required": ["file"]}},
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
                         "calibration (else a seeded split of x)"},
                "preset": {"type": "string", "enum": ["composite", "fast", "gga", "paper"],
                           "description": "detector preset (default: GGA_DETECTOR)"},
                "top_n": {"type": "string", "description": "classes in the CSM: an integer >= 3 or 'all' "
                          "(default: GGA_TOP_N, else the preset's choice)"},
                "alpha": {"type": "number", "description": "flag when trust < alpha (default: GGA_FIT_ALPHA, "
                          "0.05)"},
                **FIT_DECISION_FIELDS},
                "required": ["file"]}},
            "application/json": {"schema": FitPathRequest.model_json_schema()},
        },
    }
}


def admission_refusal(state) -> ApiError | None:
    """The 503 for a ``POST /predict`` while the queue admits nothing now (not even one row), else None.

    Asked by the request middleware before routing, before the body is read: under overload
    most requests are refused here, and each refusal costs the event loop next to nothing.
    None while the service is not ready (the route answers that)."""
    batcher = getattr(state, "batcher", None)
    if not getattr(state, "ready", False) or batcher is None or batcher.admits(1):
        return None
    wait = batcher.estimated_wait_s(1)
    why = f"estimated wait {wait:.1f} s" if wait is not None and batcher.queued_rows < batcher.max_queue_rows \
        else f"{batcher.queued_rows} of {batcher.max_queue_rows} rows queued"
    return ApiError(503, "overloaded", f"the queue is full ({why}); retry later", headers={"Retry-After": "1"})


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body; 413 as soon as it exceeds ``limit`` bytes (Content-Length or the running count)."""
    return b"".join([chunk async for chunk in body_stream(request, limit)])


@router.post("/predict", response_model=PredictResponse, responses=_ERRORS, openapi_extra=_PREDICT_BODY,
             summary="Predict and score trust for a batch of samples")
async def predict(request: Request, return_csm: bool = False, explain: bool = False) -> Response:
    """Each sample's prediction with its GGA trust score and flag.

    Send JSON ``{"inputs": [...], "return_csm": false, "explain": false}``, an
    ``application/x-npy`` body, one image (``image/png``, ``image/jpeg``, ``image/webp``)
    or several as ``multipart/form-data`` ``file`` fields (then ``?return_csm=true`` asks
    for the CSM, ``?explain=true`` for each detector component's p-value). Full queue:
    503 with Retry-After; queue wait beyond the timeout: 504.
    """
    st = request.app.state
    if not getattr(st, "ready", False):
        raise ApiError(503, "unavailable", "the service is starting or stopping")
    ctype = media_type(request.headers.get("content-type"))
    if ctype != "application/json" and ctype not in NPY_TYPES and ctype not in IMAGE_TYPES and ctype != MULTIPART:
        raise ApiError(415, "unsupported_media_type", f"content type {ctype or '(none)'!r} is not supported; send "
                       "application/json ({\"inputs\": [...]}), application/x-npy (one .npy array), an image "
                       "(image/png, image/jpeg, image/webp) or multipart/form-data with 'file' fields")
    # (a queue that admits nothing now was answered 503 before routing: RequestMetrics, admission_refusal)
    shape = st.card.input_shape
    if ctype in IMAGE_TYPES or ctype == MULTIPART:
        body = b""
        x = await read_images(request, ctype, st.card, st.settings, st.batcher.max_queue_rows)
    else:
        body = await _read_body(request, st.settings.limits.max_request_bytes)
    if ctype == "application/json":
        doc = parse_json_body(body)
        flag = doc.get("return_csm", return_csm)
        if not isinstance(flag, bool):
            raise ApiError(422, "invalid_input", '"return_csm" must be true or false')
        return_csm = flag
        explain = doc.get("explain", explain)
        if not isinstance(explain, bool):
            raise ApiError(422, "invalid_input", '"explain" must be true or false')
        if len(body) > OFFLOAD_BYTES:
            x = await run_in_threadpool(decode_json_inputs, doc, shape)
        else:
            x = decode_json_inputs(doc, shape)
    elif ctype in NPY_TYPES:
        x = await run_in_threadpool(decode_npy, body, shape) if len(body) > OFFLOAD_BYTES else decode_npy(body, shape)
    warnings = range_warnings(st.card, x)
    detector, _ = st.slot.get()
    if detector is None:
        raise ApiError(503, "no_detector", "no fitted detector for this model yet: calibrate one with POST /fit")
    rows = await score_rows(st, x, return_csm, explain)
    served = st.settings.model.alpha
    alpha = served if served is not None else detector.alpha
    answer = {"model": st.card.name, "alpha": alpha, "predictions": rows}
    if warnings:
        answer["warnings"] = warnings
    return JSONResponse(answer)


def _require_admin(request: Request) -> None:
    secret = secret_of(request.app.state.settings.auth.admin_token)
    if not secret:  # unset or blank (Settings turns a blank one into None; this holds for any Settings)
        raise ApiError(403, "fit_disabled", "POST /fit is disabled: start the service with GGA_ADMIN_TOKEN set (not "
                       "empty) and send it as 'Authorization: Bearer <token>'")
    if not matches(presented(request.headers.get("authorization", "")), secret):
        raise ApiError(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)",
                       headers={"WWW-Authenticate": "Bearer"})


@router.post("/fit", status_code=202, response_model=FitAccepted, openapi_extra=_FIT_BODY,
             responses={code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 415, 422)},
             summary="Calibrate a new detector version from labelled in-distribution data")
async def fit(request: Request) -> Response:
    """Starts a fit job (admin token required) on an uploaded .npz (multipart field
    ``file``) or on ``{"path": ...}`` inside ``GGA_DATA_DIR``; 202 with the job id."""
    _require_admin(request)
    st = request.app.state
    ctype = media_type(request.headers.get("content-type"))
    limit = st.settings.limits.max_fit_bytes
    shape, n_classes = st.card.input_shape, len(st.card.class_names)
    if ctype == "multipart/form-data":
        form = await read_form(request, limit)
        upload = form.get("file")
        try:  # the upload spooled to a temporary file: read the archive from there, not from a copy in memory
            if upload is None or isinstance(upload, str):
                raise ApiError(422, "invalid_input", "multipart upload needs a file field named 'file' (.npz)")
            options = _fit_options(st, {k: form.get(k) for k in FIT_OPTION_FIELDS if form.get(k) is not None},
                                   from_form=True)
            x, y, cal = await run_in_threadpool(_load_npz, upload.file, shape, n_classes, limit)
        finally:
            await form.close()
    elif ctype == "application/json":
        doc = parse_json_body(await _read_body(request, 64 * 1024))
        if not isinstance(doc.get("path"), str):
            raise ApiError(422, "invalid_input", 'expected {"path": "<file inside GGA_DATA_DIR>"}')
        options = _fit_options(st, {k: doc[k] for k in FIT_OPTION_FIELDS if k in doc}, from_form=False)
        path = _data_path(st.settings.fit.data_dir, doc["path"])
        x, y, cal = await run_in_threadpool(_load_npz, path, shape, n_classes, None)  # the operator's file: no limit
    else:
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data with a 'file' field (.npz) or JSON "
                       '{"path": ...}')
    try:
        job = st.fits.submit(x, y, cal, options)
    except FitBusyError as exc:
        raise ApiError(409, "conflict", str(exc)) from exc
    except ValueError as exc:
        raise ApiError(422, "invalid_option", str(exc)) from exc
    url = f"/fit/{job.id}"
    return JSONResponse({"id": job.id, "state": job.state, "status_url": url}, status_code=202,
                        headers={"Location": url})


FIT_OPTION_FIELDS = ("preset", "top_n", "alpha", "set_alpha", "risk_target", "delta")


def _fit_options(st, given: dict, *, from_form: bool) -> FitOptions:
    """The fit's options: what the request names, else the service's settings (GGA_DETECTOR, GGA_TOP_N,
    GGA_FIT_ALPHA). Form fields arrive as text: top_n as an integer or "all" (every class of the model), alpha
    as a number; JSON top_n null means the preset's choice."""
    f = st.settings.fit
    opts = {"preset": f.preset, "top_n": f.top_n, "alpha": f.alpha}
    for key, value in given.items():
        if from_form and isinstance(value, str):
            text = value.strip()
            try:
                value = ("all" if text.lower() == "all" else int(text)) if key == "top_n" else \
                    float(text) if key in ("alpha", "set_alpha", "risk_target", "delta") else text
            except ValueError as exc:
                raise ApiError(422, "invalid_option", f"{key} must be a number, got {value!r}") from exc
        if key == "top_n" and value == "all":
            value = len(st.card.class_names)
        opts[key] = value
    try:
        return FitOptions(**opts)
    except ValueError as exc:
        raise ApiError(422, "invalid_option", str(exc)) from exc


def _data_path(data_dir: Path | None, rel: str) -> Path:
    if data_dir is None:
        raise ApiError(403, "forbidden", "fitting from a server path is disabled: set GGA_DATA_DIR")
    if not rel.strip() or "\x00" in rel:
        raise ApiError(422, "invalid_input", '"path" must name a file inside GGA_DATA_DIR (not empty, no NUL bytes)')
    try:
        root = data_dir.resolve()
        path = (root / rel).resolve()
        inside = path.is_relative_to(root)
        found = inside and path.is_file()
    except (OSError, ValueError, RuntimeError) as exc:  # too long, not encodable, a symlink loop
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ApiError(422, "invalid_input", f"path {rel[:200]!r} is not a usable file name: {reason}") from exc
    if not inside:
        raise ApiError(403, "forbidden", f"path {rel!r} is outside the data directory")
    if not found:
        raise ApiError(404, "not_found", f"no file {rel!r} in the data directory")
    return path


@router.get("/fit/{job_id}", response_model=FitJobView,
            responses={code: {"model": ErrorResponse} for code in (401, 403, 404)},
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
        "artifact_dir": str(s.storage.artifact_dir),
        "detector": _detector_info(detector),
        "decisions": decisions_info(detector),
        "alpha": s.model.alpha if s.model.alpha is not None else (detector.alpha if detector else None),
        "batching": {**s.batching.model_dump(), "max_concurrent_requests": s.limits.max_concurrent_requests,
                     "max_request_bytes": s.limits.max_request_bytes},
        "strategy": st.strategy.info(detector),
        "model_card": st.card.extra,
        "preprocessing": st.card.preprocessing.describe() if st.card.preprocessing is not None else None,
    })


def _detector_info(detector) -> dict | None:
    if detector is None:
        return None
    meta = detector.metadata()
    fit = dict(meta["fit"])
    if not np.isfinite(fit["threshold"]):
        fit["threshold"] = None
    return {**describe(detector), "config": meta["config"], "fit": fit,
            "model_fingerprint": meta["model_fingerprint"], "evaluation": meta.get("evaluation")}


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

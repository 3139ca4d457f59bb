"""Turning request bodies into validated float32 batches [B, *input_shape].

Accepted: ``application/json`` with ``{"inputs": [...]}`` (a list of samples, each a
nested list of the model's input shape) and ``application/x-npy`` (one .npy array of
shape (B, *input_shape), float32 or float64, no pickles). Every problem raises
:class:`ApiError` with a 4xx status and a message naming what was expected.
"""

from __future__ import annotations

import io
import json

import numpy as np

from service.errors import ApiError

NPY_TYPES = ("application/x-npy", "application/octet-stream")
FLOAT_KINDS = ("float16", "float32", "float64")


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def parse_json_body(body: bytes) -> dict:
    if not body:
        raise ApiError(400, "bad_request", 'empty body: expected JSON {"inputs": [...]}')
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "malformed_json", f"body is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ApiError(422, "invalid_input", 'expected a JSON object {"inputs": [...]}')
    return doc


def decode_json_inputs(doc: dict, input_shape: tuple[int, ...]) -> np.ndarray:
    if "inputs" not in doc:
        raise ApiError(422, "invalid_input", 'missing field "inputs": a list of samples, each of shape '
                       f"{list(input_shape)}")
    inputs = doc["inputs"]
    if not isinstance(inputs, list):
        raise ApiError(422, "invalid_input", f'"inputs" must be a list of samples of shape {list(input_shape)}')
    try:
        arr = np.asarray(inputs, dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise ApiError(422, "invalid_input", '"inputs" must be a rectangular nested list of numbers, each sample '
                       f"of shape {list(input_shape)}: {exc}") from exc
    return validate_batch(arr, input_shape)


def decode_npy(body: bytes, input_shape: tuple[int, ...]) -> np.ndarray:
    if not body:
        raise ApiError(400, "bad_request", f"empty body: expected one .npy array of shape (B, {_shape(input_shape)})")
    try:
        arr = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises several types for a bad header
        raise ApiError(400, "malformed_npy", f"body is not a valid .npy array (object arrays are refused): "
                       f"{exc}") from exc
    if not isinstance(arr, np.ndarray):
        raise ApiError(400, "malformed_npy", "expected a single .npy array, not an .npz archive")
    if arr.dtype.name not in FLOAT_KINDS:
        raise ApiError(422, "invalid_dtype", f"array dtype is {arr.dtype}; expected float32 (or float16/float64)")
    return validate_batch(arr, input_shape)


def validate_batch(arr: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    expected = f"(B, {_shape(input_shape)})"
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise ApiError(422, "empty_input", f"no samples: expected an array of shape {expected} with B >= 1")
    if tuple(arr.shape[1:]) != tuple(input_shape):
        raise ApiError(422, "invalid_shape", f"input has shape {tuple(arr.shape)}; expected {expected}")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).reshape(len(arr), -1).any(axis=1).argmax())
        raise ApiError(422, "non_finite_input", f"sample {bad} contains NaN or infinity; every value must be finite")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _shape(input_shape: tuple[int, ...]) -> str:
    return ", ".join(str(v) for v in input_shape)

"""Turning request bodies into validated float32 batches [B, *input_shape].

Accepted: ``application/json`` with ``{"inputs": [...]}`` (a list of samples, each a
nested list of the model's input shape) and ``application/x-npy`` (one .npy array of
shape (B, *input_shape), float16/32/64, no pickles). Every problem raises
:class:`ApiError` with a 4xx status and a message naming what was expected: 400 for a
body that cannot be parsed (malformed, nested too deeply, a .npy header that does not
match its data), 413 for one over the byte limit, 422 for values the model cannot take.

Values are checked after the conversion to the model's dtype (float32): a float64 value
beyond the float32 range (|v| > 3.4e38) becomes infinite there and is refused like NaN.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import AsyncIterator
from typing import BinaryIO

import numpy as np
from starlette.requests import ClientDisconnect, Request

from service.errors import ApiError

NPY_TYPES = ("application/x-npy", "application/octet-stream")
FLOAT_KINDS = ("float16", "float32", "float64")
MODEL_DTYPE = np.float32
# longer integer literals are parsed as floats (inf beyond float64): int() of a long digit
# string is quadratic, and such a value cannot be a float32 input anyway
MAX_INT_DIGITS = 64


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def too_large(declared: str | None, limit: int) -> bool:
    """Whether a Content-Length header declares more than ``limit`` bytes (ASCII digits only)."""
    if declared is None or not (declared.isascii() and declared.isdigit()):
        return False
    return len(declared) > 20 or int(declared) > limit


async def body_stream(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body chunk by chunk, refused with 413 as soon as it exceeds ``limit`` bytes.

    Content-Length is only a first check: the running count holds for chunked bodies and
    for a header that understates the body, so no more than ``limit`` bytes are accepted.
    """
    declared = request.headers.get("content-length")
    if too_large(declared, limit):
        raise ApiError(413, "payload_too_large", f"request body is {declared} bytes; the limit is {limit} bytes")
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "payload_too_large", f"request body exceeds the limit of {limit} bytes")
            yield chunk
    except ClientDisconnect as exc:
        raise ApiError(400, "bad_request", "the client closed the connection before the body was complete") from exc


def _json_int(literal: str) -> int | float:
    return int(literal) if len(literal) <= MAX_INT_DIGITS else float(literal)


def parse_json_body(body: bytes) -> dict:
    if not body:
        raise ApiError(400, "bad_request", 'empty body: expected JSON {"inputs": [...]}')
    try:
        doc = json.loads(body, parse_int=_json_int)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "malformed_json", f"body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ApiError(400, "malformed_json", "body is JSON nested too deeply to parse; inputs need one level per "
                       "dimension of (B, *input_shape)") from exc
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
    except (OverflowError, RecursionError) as exc:  # not reached with _json_int; kept for direct callers
        raise ApiError(422, "invalid_input", f'"inputs" holds a number beyond the float32 range: {exc}') from exc
    return validate_batch(arr, input_shape)


def _read_npy_header(fp: BinaryIO, size: int, name: str, limit: int | None) -> tuple[tuple[int, ...], bool, np.dtype]:
    """The checked header of the .npy array at ``fp`` (left just past the header): see :func:`read_npy`."""
    start = fp.tell()
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        raise ValueError(f".npy format version {version} is not supported (use numpy.save: 1.0 or 2.0)")
    if dtype.hasobject:
        raise ValueError("object arrays are refused (they would need pickle)")
    _check_npy_size(shape, dtype, size - (fp.tell() - start), name, limit)
    return shape, fortran, dtype


def _check_npy_size(shape: tuple[int, ...], dtype: np.dtype, held: int, name: str, limit: int | None) -> int:
    nbytes = math.prod(shape) * dtype.itemsize
    if limit is not None and nbytes > limit:
        raise ApiError(413, "payload_too_large", f"{name} declares an array of {nbytes} bytes; the limit is "
                       f"{limit} bytes")
    if nbytes > held:
        raise ValueError(f"the header declares {shape} {dtype} ({nbytes} bytes) but only {held} bytes of data follow")
    return nbytes


def read_npy(fp: BinaryIO, size: int, name: str = "body", limit: int | None = None) -> np.ndarray:
    """One .npy array read from ``fp``, which holds ``size`` bytes from its current position.

    The header is checked before any data is allocated: object arrays (pickles) are
    refused, the data the header declares must be present in the ``size`` bytes (400
    otherwise, so a tiny file cannot make numpy allocate gigabytes) and, with ``limit``,
    must not exceed ``limit`` bytes (413).
    """
    start = fp.tell()
    _read_npy_header(fp, size, name, limit)
    fp.seek(start)
    return np.lib.format.read_array(fp, allow_pickle=False)


# Request bodies of one client repeat the same .npy header (same shape and dtype), and numpy parses
# it with ast.literal_eval, twice per read_array: the profile (benchmarks/results/profile.md) put
# that at a quarter of the event loop's time per request. Headers that passed every check are kept
# here by their exact bytes (bounded; cleared when full), so a repeated header costs a dict lookup.
_NPY_HEADERS: dict[bytes, tuple[int, tuple[int, ...], bool, np.dtype]] = {}
_NPY_HEADERS_MAX = 256
_NPY_MAGIC = b"\x93NUMPY"


def _npy_header_end(body: bytes) -> int | None:
    """Where the data of a version 1.0 or 2.0 .npy body starts per its header length field, else None."""
    if len(body) < 12 or not body.startswith(_NPY_MAGIC):
        return None
    if body[6:8] == b"\x01\x00":
        return 10 + int.from_bytes(body[8:10], "little")
    if body[6:8] == b"\x02\x00":
        return 12 + int.from_bytes(body[8:12], "little")
    return None


def read_npy_bytes(body: bytes) -> np.ndarray:
    """:func:`read_npy` of a whole body held in memory (the same checks, errors and result: a new,
    writable array); a header seen before is not parsed again."""
    end = _npy_header_end(body)
    known = _NPY_HEADERS.get(body[:end]) if end is not None else None
    if known is None:
        fp = io.BytesIO(body)
        shape, fortran, dtype = _read_npy_header(fp, len(body), "body", None)
        known = (fp.tell(), shape, fortran, dtype)
        if end == known[0]:  # the header's own length field: the key is exactly the header
            if len(_NPY_HEADERS) >= _NPY_HEADERS_MAX:
                _NPY_HEADERS.clear()
            _NPY_HEADERS[body[:end]] = known
    offset, shape, fortran, dtype = known
    _check_npy_size(shape, dtype, len(body) - offset, "body", None)
    arr = np.frombuffer(body, dtype=dtype, count=math.prod(shape), offset=offset).copy()
    return arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)


def decode_npy(body: bytes, input_shape: tuple[int, ...]) -> np.ndarray:
    if not body:
        raise ApiError(400, "bad_request", f"empty body: expected one .npy array of shape (B, {_shape(input_shape)})")
    if body.startswith(b"PK"):
        raise ApiError(400, "malformed_npy", "expected a single .npy array, not an .npz archive")
    try:
        arr = read_npy_bytes(body)
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy raises several types for a bad header
        raise ApiError(400, "malformed_npy", f"body is not a valid .npy array (object arrays are refused): "
                       f"{exc}") from exc
    if arr.dtype.name not in FLOAT_KINDS:
        raise ApiError(422, "invalid_dtype", f"array dtype is {arr.dtype}; expected float32 (or float16/float64)")
    return validate_batch(arr, input_shape)


def validate_batch(arr: np.ndarray, input_shape: tuple[int, ...], name: str = "") -> np.ndarray:
    """``arr`` as a C-contiguous float32 batch; 422 for no samples, a wrong shape, or a value
    that is not finite once converted to float32 (the message names the first such sample)."""
    what = f"{name} " if name else ""
    expected = f"(B, {_shape(input_shape)})"
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise ApiError(422, "empty_input", f"no samples: expected {what}an array of shape {expected} with B >= 1")
    if tuple(arr.shape[1:]) != tuple(input_shape):
        raise ApiError(422, "invalid_shape", f"{what}input has shape {tuple(arr.shape)}; expected {expected}")
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.ascontiguousarray(arr, dtype=MODEL_DTYPE)
    finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
    if not finite.all():
        bad = int(np.argmin(finite))
        raise ApiError(422, "non_finite_input", f"{what}sample {bad} contains NaN, infinity or a value beyond the "
                       "float32 range (|v| > 3.4e38); every value must be finite as float32")
    return x


def _shape(input_shape: tuple[int, ...]) -> str:
    return ", ".join(str(v) for v in input_shape)

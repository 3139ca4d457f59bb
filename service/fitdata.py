"""The data of a POST /fit request, read under ``GGA_MAX_FIT_BYTES`` and validated.

- :func:`read_form`: the multipart upload, its body counted as it streams (413 as soon as
  it exceeds the limit, chunked or not, whatever Content-Length says); file parts spool
  to a temporary file, never more than the limit.
- :func:`load_npz`: the ``.npz`` archive. For an upload, every member's declared
  uncompressed size (the zip directory's ``file_size``), and their total, is checked
  against the limit before anything is decompressed, so a small compressed bomb is
  refused with 413 unexpanded (a file in ``GGA_DATA_DIR`` is the operator's own and not
  limited). Each array's .npy header is checked against its member before numpy
  allocates (:func:`service.decode.read_npy`).
- :func:`check_pair`: x (n, *input_shape) finite as float32, y (n,) integer labels.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from service.decode import body_stream, read_npy, validate_batch
from service.errors import ApiError

FitData = tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]
ARRAYS = ("x", "y", "x_cal", "y_cal")


async def read_form(request: Request, limit: int) -> FormData:
    """The multipart form of ``request``; 413 once its body exceeds ``limit`` bytes, 400 if malformed."""
    chunks = body_stream(request, limit)
    parser = MultiPartParser(request.headers, chunks, max_files=8, max_fields=64)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, "malformed_multipart", f"the multipart body cannot be parsed: {exc.message}") from exc
    finally:
        await chunks.aclose()


def load_npz(source: bytes | Path | BinaryIO, input_shape: tuple[int, ...], n_classes: int,
             limit: int | None) -> FitData:
    """x, y and the optional calibration pair (x_cal, y_cal) of a /fit archive, validated."""
    arrays = read_npz(source, limit)
    if "x" not in arrays or "y" not in arrays:
        raise ApiError(422, "invalid_input", "the .npz must hold arrays 'x' (n, *input_shape) and 'y' (n,)")
    if ("x_cal" in arrays) != ("y_cal" in arrays):
        raise ApiError(422, "invalid_input", "calibration data needs both 'x_cal' and 'y_cal'")
    x, y = check_pair(arrays["x"], arrays["y"], "x", "y", input_shape, n_classes)
    cal = None
    if "x_cal" in arrays:
        cal = check_pair(arrays["x_cal"], arrays["y_cal"], "x_cal", "y_cal", input_shape, n_classes)
    return x, y, cal


def read_npz(source: bytes | Path | BinaryIO, limit: int | None) -> dict[str, np.ndarray]:
    """The arrays x, y, x_cal, y_cal present in the archive (others are ignored, unread).

    With ``limit``: 413 if any member declares more than ``limit`` uncompressed bytes, or
    the arrays read together do. 400 for an archive that is not a valid .npz (pickles are
    refused, and so is a .npy header that declares more data than its member holds).
    """
    if isinstance(source, Path):
        try:
            fp: BinaryIO = open(source, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise ApiError(422, "invalid_input", f"cannot read {source.name!r}: {exc.strerror}") from exc
    else:
        fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with zipfile.ZipFile(fp) as zf:
            infos = zf.infolist()
            for info in infos:
                if limit is not None and info.file_size > limit:
                    raise ApiError(413, "payload_too_large", f"archive member {info.filename!r} expands to "
                                   f"{info.file_size} bytes; the limit (GGA_MAX_FIT_BYTES) is {limit} bytes")
            members = {i.filename[:-4]: i for i in infos if i.filename.endswith(".npy") and i.filename[:-4] in ARRAYS}
            total = sum(i.file_size for i in members.values())
            if limit is not None and total > limit:
                raise ApiError(413, "payload_too_large", f"the arrays {sorted(members)} expand to {total} bytes; "
                               f"the limit (GGA_MAX_FIT_BYTES) is {limit} bytes")
            arrays = {}
            for name, info in members.items():
                with zf.open(info) as member:
                    arrays[name] = read_npy(member, info.file_size, name=f"array {name!r}", limit=limit)
            return arrays
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - zipfile, zlib and numpy raise several types for a bad archive
        raise ApiError(400, "malformed_npz", f"not a valid .npz archive (pickled arrays are refused): {exc}") from exc
    finally:
        if isinstance(source, Path):
            fp.close()


def check_pair(x: np.ndarray, y: np.ndarray, xn: str, yn: str, input_shape: tuple[int, ...],
               n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if x.dtype.kind not in "f":
        raise ApiError(422, "invalid_dtype", f"{xn} has dtype {x.dtype}; expected floats (float32) scaled like the "
                       "model's input")
    x = validate_batch(x, input_shape, name=xn)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ApiError(422, "invalid_input", f"{yn} must be a 1-D integer array of labels, got {y.dtype} {y.shape}")
    if len(y) != len(x):
        raise ApiError(422, "invalid_input", f"{xn} has {len(x)} samples but {yn} has {len(y)} labels")
    if y.min() < 0 or y.max() >= n_classes:
        raise ApiError(422, "invalid_input", f"labels in {yn} must be in [0, {n_classes - 1}]")
    return x, y.astype(np.int64)

"""The binary tensor data extension of the Open Inference Protocol (KServe v2), both ways.

A request whose ``Inference-Header-Content-Length`` header is set carries its JSON
inference header in the first that many bytes of the body; the raw bytes of the inputs
whose ``parameters.binary_data_size`` is set follow it, one after the other in the order
of ``inputs``, little-endian and row-major (BOOL: one byte per element). A response with
outputs asked for with ``parameters.binary_data`` (or the request's
``parameters.binary_data_output``) is built the same way: the JSON header, then each
binary output's bytes, the header's length in ``Inference-Header-Content-Length``.

Every size is checked before anything is allocated: the header length must lie inside the
body, each input's ``binary_data_size`` must be exactly what its shape and datatype need,
and the binary sizes must add up to the bytes that follow the header, no more, no less. A
problem raises :class:`~service.errors.ApiError` with 400 (413 when a compressed body
inflates past the byte limit); nothing here reads more than the body already held.
"""

from __future__ import annotations

import zlib

import numpy as np

from service.errors import ApiError

HEADER_LENGTH = "inference-header-content-length"
# the protocol's fixed-size datatypes, little-endian (BYTES, variable-length strings, is not a tensor the model takes)
DTYPES = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON inference header and the binary data after it (empty without ``Inference-Header-Content-Length``)."""
    if header_length is None:
        return body, memoryview(b"")
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        raise ApiError(400, "bad_request", f"Inference-Header-Content-Length must be a byte count, got "
                       f"{header_length[:40]!r}")
    n = int(text)
    if n == 0:
        raise ApiError(400, "bad_request", "Inference-Header-Content-Length is 0: the JSON inference header is missing")
    if n > len(body):
        raise ApiError(400, "bad_request", f"Inference-Header-Content-Length is {n} but the body has only {len(body)} "
                       "bytes")
    view = memoryview(body)
    return bytes(view[:n]), view[n:]


class BinaryReader:
    """Hands out the binary data of the inputs in order, each checked against its declared size."""

    def __init__(self, data: memoryview) -> None:
        self.data, self.offset = data, 0

    def take(self, name: str, size: object, count: int, dtype: np.dtype) -> np.ndarray:
        """``count`` elements of ``dtype`` for input ``name`` whose ``binary_data_size`` is ``size``."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ApiError(400, "bad_request", f"input {name!r}: binary_data_size must be a byte count, got {size!r}")
        need = count * dtype.itemsize
        if size != need:
            raise ApiError(400, "bad_request", f"input {name!r}: binary_data_size is {size} bytes; its shape and "
                           f"datatype need {need}")
        left = len(self.data) - self.offset
        if size > left:
            raise ApiError(400, "bad_request", f"input {name!r}: binary_data_size is {size} bytes but only {left} "
                           "bytes of binary data follow the inference header (truncated body)")
        arr = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.offset)
        self.offset += size
        return arr

    def finish(self) -> None:
        """The binary data must all have been taken: a surplus is an error, not ignored."""
        extra = len(self.data) - self.offset
        if extra:
            raise ApiError(400, "bad_request", f"{extra} bytes of binary data follow the inputs' declared "
                           f"binary_data_size ({self.offset} bytes in all)")


def inflate(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body decoded per ``Content-Encoding`` (gzip, deflate or identity), at most ``limit`` bytes (413 past it)."""
    enc = (encoding or "identity").strip().lower()
    if enc in ("", "identity"):
        return body
    if enc not in ("gzip", "deflate"):
        raise ApiError(400, "bad_request", f"Content-Encoding {encoding[:40]!r} is not supported; send gzip, deflate "
                       "or an uncompressed body")
    # gzip: a gzip header; deflate: the zlib format (as HTTP's "deflate" means), raw deflate accepted too
    inflater = zlib.decompressobj(31 if enc == "gzip" else (15 if body[:1] == b"\x78" else -15))
    try:
        out = inflater.decompress(body, limit + 1)
        if len(out) > limit:
            raise ApiError(413, "payload_too_large", f"the request body inflates past the limit of {limit} bytes")
        if not inflater.eof or inflater.unused_data:
            raise ApiError(400, "bad_request", f"the {enc} body is truncated or has trailing bytes")
    except zlib.error as exc:
        raise ApiError(400, "bad_request", f"the body is not valid {enc} data: {exc}") from exc
    return out


def encode_response(header: dict, blobs: list[bytes], dumps) -> tuple[bytes, dict[str, str]]:
    """The body and extra headers of a response whose binary outputs are ``blobs`` (in output order)."""
    head = dumps(header)
    if not blobs:
        return head, {}
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head))}


def tensor_bytes(arr: np.ndarray, datatype: str) -> bytes:
    """``arr`` as the protocol's raw bytes: row-major, little-endian, BOOL one byte (0 or 1) each."""
    return np.ascontiguousarray(arr, dtype=DTYPES[datatype]).tobytes()

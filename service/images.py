"""Image bodies of ``POST /predict``: PNG, JPEG and WebP files into the model's input samples.

Two ways to send them: one image as the whole body (``Content-Type: image/png``,
``image/jpeg`` or ``image/webp``), or several as ``multipart/form-data`` with one ``file``
field per image (one prediction per file, in the order of the fields; other fields are
refused). Each image is decoded with Pillow and turned into one sample by the model card's
preprocessing (:mod:`service.preprocessing`). Everything stays in memory: the body is read
under ``GGA_MAX_REQUEST_BYTES`` and parsed here, never spooled to a file.

What is refused, before anything reaches the batcher (so nothing else is affected):

- bytes that are not PNG, JPEG or WebP (sniffed from their signature, whatever the label
  says), truncated or corrupt files: 400 ``malformed_image``;
- a declared type that the bytes are not (``image/png`` on JPEG bytes, or on a part of a
  multipart body): 415 ``content_type_mismatch``;
- a width or height of 0: 422 ``empty_image`` (a PNG's header is read for it; Pillow opens no
  other format with a zero side, so those are 400 as unreadable); more pixels than ``GGA_MAX_IMAGE_PIXELS``
  (width x height as the header declares them): 413 ``image_too_large``, decided from the
  header before a pixel is decoded;
- an animated or multi-frame image (APNG, animated WebP): 422 ``multi_frame``; the service
  does not pick a frame for the client, send the frame wanted as a still image (a camera's
  multi-picture JPEG, MPO, is the exception: its first image is the photo, the others are
  extra views, and the first is used);
- more files than the queue can hold (``GGA_MAX_QUEUE_ROWS``): 413 ``payload_too_large``,
  counted while parsing, before any is decoded;
- a model whose card describes no image input: 415.

Small images are decoded on the event loop (a 28x28 PNG takes tens of microseconds); a
request with more than :data:`OFFLOAD_PIXELS` pixels in all is decoded on a thread.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from service.decode import body_stream, validate_batch
from service.errors import ApiError
from service.preprocessing import ImagePreprocessing

IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
MULTIPART = "multipart/form-data"
GENERIC_TYPES = ("", "application/octet-stream")  # a multipart part with one of these: the bytes say what it is
OFFLOAD_PIXELS = 512 * 512
FILE_FIELD = "file"
_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}
# the service's own pixel limit (GGA_MAX_IMAGE_PIXELS) is checked first; Pillow's global guard would only warn
# below twice its own default, which is noise here
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def sniff(data: bytes) -> str | None:
    """The format the bytes' signature names (PNG, JPEG, WEBP), else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def open_image(data: bytes, declared: str, max_pixels: int, name: str = "body") -> Image.Image:
    """The image in ``data`` opened (its header read, no pixel decoded) and checked: format against the
    declared media type (``declared``: an image type, or "" / application/octet-stream for any), size, frames."""
    fmt = sniff(data)
    if fmt is None:
        raise ApiError(400, "malformed_image", f"{name} is not a PNG, JPEG or WebP image (its first bytes are no "
                       "image signature)" if data else f"{name} is empty: expected a PNG, JPEG or WebP image")
    want = IMAGE_TYPES.get(declared)
    if want is not None and want != fmt:
        raise ApiError(415, "content_type_mismatch", f"{name} is labelled {declared} but its bytes are {fmt}")
    if fmt == "PNG" and len(data) >= 24 and data[12:16] == b"IHDR" and (data[16:20] == bytes(4)
                                                                         or data[20:24] == bytes(4)):
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        raise ApiError(422, "empty_image", f"{name} is {w}x{h} pixels: nothing to classify")
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise ApiError(413, "image_too_large", f"{name} declares too many pixels: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ApiError(400, "malformed_image", f"{name} starts like a {fmt} image but is not a readable one (a "
                       "corrupt or truncated header)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ApiError(400, "malformed_image", f"{name} is not a readable {fmt} image: {exc}") from exc
    width, height = img.size
    if width < 1 or height < 1:
        raise ApiError(422, "empty_image", f"{name} is {width}x{height} pixels: nothing to classify")
    if width * height > max_pixels:
        raise ApiError(413, "image_too_large", f"{name} is {width}x{height} = {width * height} pixels; the limit is "
                       f"{max_pixels} (GGA_MAX_IMAGE_PIXELS)")
    frames = getattr(img, "n_frames", 1)
    if frames != 1 and img.format != "MPO":  # an MPO JPEG (some cameras) adds other views: its first is the photo
        raise ApiError(422, "multi_frame", f"{name} is an animated or multi-frame image ({frames} frames); send one "
                       "still image (the frame to classify) per prediction")
    return img


def to_sample(img: Image.Image, prep: ImagePreprocessing, name: str = "body") -> np.ndarray:
    """One opened image as a float32 sample (C, H, W) by the card's preprocessing (its steps in order)."""
    try:
        img.load()
        if prep.exif_orientation:
            img = ImageOps.exif_transpose(img)
        img = _flatten(img, prep)
    except ApiError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ApiError(400, "malformed_image", f"{name} cannot be decoded (truncated or corrupt): {exc}") from exc
    img = _resize(img, prep)
    pixels = np.asarray(img, dtype=np.float32)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    if prep.invert == "always" or (prep.invert == "auto" and _border_mean(pixels) > 127.5):
        pixels = 255.0 - pixels
    lo, hi = prep.scale
    x = lo + pixels * np.float32((hi - lo) / 255.0)
    if prep.mean is not None:
        mean = np.asarray(prep.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(prep.std, dtype=np.float32)[:, None, None]
        x = (x - mean) / std
    return np.ascontiguousarray(x, dtype=np.float32)


def _flatten(img: Image.Image, prep: ImagePreprocessing) -> Image.Image:
    """The image in the card's colour mode, transparent pixels laid on the card's background grey."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: Pillow's convert would clip, not scale
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info) \
            or (img.mode in ("L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        ground = Image.new("RGBA", rgba.size, (prep.background,) * 3 + (255,))
        img = Image.alpha_composite(ground, rgba)
    return img.convert(prep.color_mode) if img.mode != prep.color_mode else img


def _resize(img: Image.Image, prep: ImagePreprocessing) -> Image.Image:
    height, width = prep.size
    resample = _RESAMPLE[prep.interpolation]
    if prep.resize == "stretch":
        return img if img.size == (width, height) else img.resize((width, height), resample)
    w, h = img.size
    short = prep.resize
    new = (short, max(short, round(h * short / w))) if w <= h else (max(short, round(w * short / h)), short)
    if new != img.size:
        img = img.resize(new, resample)
    left, top = (new[0] - width) // 2, (new[1] - height) // 2
    return img.crop((left, top, left + width, top + height))


def _border_mean(pixels: np.ndarray) -> float:
    """Mean grey of the outer ring of pixels (C, H, W), 0-255."""
    if pixels.shape[1] <= 2 or pixels.shape[2] <= 2:
        return float(pixels.mean())
    ring = np.concatenate([pixels[:, 0, :].ravel(), pixels[:, -1, :].ravel(), pixels[:, 1:-1, 0].ravel(),
                           pixels[:, 1:-1, -1].ravel()])
    return float(ring.mean())


def decode_images(files: list[tuple[bytes, str, str]], prep: ImagePreprocessing, max_pixels: int,
                  input_shape: tuple[int, ...]) -> np.ndarray:
    """A batch (B, *input_shape) from ``(bytes, declared type, name)`` per image, in order."""
    opened = [open_image(data, declared, max_pixels, name) for data, declared, name in files]
    return _samples(opened, [name for _, _, name in files], prep, input_shape)


def _samples(opened: list[Image.Image], names: list[str], prep: ImagePreprocessing,
             input_shape: tuple[int, ...]) -> np.ndarray:
    return validate_batch(np.stack([to_sample(img, prep, name) for img, name in zip(opened, names, strict=True)]),
                          input_shape)


def parse_multipart(body: bytes, content_type: str, max_files: int) -> list[tuple[bytes, str, str]]:
    """The ``file`` parts of a multipart body, in order: ``(bytes, part content type, name)`` each, where
    name says which part it was (``file 3 ('x.png')``). 400 for a malformed body, a part other than a file
    field, or none; 413 once there are more than ``max_files`` files."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "malformed_multipart", "multipart/form-data needs a boundary parameter in Content-Type")
    parts: list[dict] = []
    state: dict = {}

    def on_part_begin() -> None:
        state.update(headers={}, field=b"", value=b"", data=[])

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["data"].append(data[start:end])

    def on_part_end() -> None:
        parts.append({"headers": state["headers"], "data": b"".join(state["data"])})
        if len(parts) > max_files:
            raise ApiError(413, "payload_too_large", f"more than {max_files} files in one request: the queue holds "
                           f"at most {max_files} rows (GGA_MAX_QUEUE_ROWS); send fewer per request")

    def on_end() -> None:
        state["complete"] = True

    parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                        "on_header_value": on_header_value, "on_header_end": on_header_end,
                                        "on_part_data": on_part_data, "on_part_end": on_part_end, "on_end": on_end})
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise ApiError(400, "malformed_multipart", f"the multipart body cannot be parsed: {exc}") from exc
    if not state.get("complete"):
        raise ApiError(400, "malformed_multipart", "the multipart body ends before its closing boundary "
                       "(truncated, or another boundary than its Content-Type names)")
    files = []
    for i, part in enumerate(parts):
        _, disp = parse_options_header(part["headers"].get(b"content-disposition"))
        field = disp.get(b"name", b"").decode("latin-1")
        if field != FILE_FIELD or (b"filename" not in disp and b"content-type" not in part["headers"]):
            raise ApiError(400, "malformed_multipart", f"part {i + 1} is field {field!r}: send each image as a file "
                           f"field named {FILE_FIELD!r} (curl -F file=@digit.png)")
        declared = part["headers"].get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if declared not in IMAGE_TYPES and declared not in GENERIC_TYPES:
            raise ApiError(415, "unsupported_media_type", f"file {i + 1} is labelled {declared!r}; send image/png, "
                           "image/jpeg or image/webp")
        filename = disp.get(b"filename", b"").decode("utf-8", "replace")[:100]
        files.append((part["data"], declared, f"file {i + 1}" + (f" ({filename!r})" if filename else "")))
    if not files:
        raise ApiError(422, "empty_input", f"no files: send one or more image files in fields named {FILE_FIELD!r}")
    return files


async def read_images(request: Request, ctype: str, card, settings, max_files: int) -> np.ndarray:
    """The batch of an image or multipart ``POST /predict`` body (see the module docstring)."""
    prep = card.preprocessing
    if prep is None:
        raise ApiError(415, "unsupported_media_type", f"model {card.name} takes no image bodies (its input_shape "
                       f"{list(card.input_shape)} is not an image): send application/json or application/x-npy")
    limit = settings.limits.max_request_bytes
    body = b"".join([chunk async for chunk in body_stream(request, limit)])
    if ctype == MULTIPART:
        files = parse_multipart(body, request.headers.get("content-type", ""), max_files)
    else:
        files = [(body, ctype, "body")]
    max_pixels = settings.limits.max_image_pixels
    opened = [open_image(data, declared, max_pixels, name) for data, declared, name in files]
    names = [name for _, _, name in files]
    if sum(img.size[0] * img.size[1] for img in opened) > OFFLOAD_PIXELS:
        return await run_in_threadpool(_samples, opened, names, prep, card.input_shape)
    return _samples(opened, names, prep, card.input_shape)

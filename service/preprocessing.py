"""The model card's ``preprocessing``: how an image file becomes one input sample.

A card may describe it as an object (every key optional)::

    "preprocessing": {
      "color_mode": "L",             # "L" (grey) or "RGB"; default: from input_shape[0] (1 -> L, 3 -> RGB)
      "resize": "stretch",           # "stretch": to input_shape's H x W as it is (aspect not kept);
                                     # an integer S: the shorter side to S pixels (aspect kept), then the
                                     # centre H x W cropped out (S >= H and S >= W)
      "interpolation": "bilinear",   # nearest | bilinear | bicubic | lanczos | box (antialiased when shrinking)
      "exif_orientation": true,      # turn the image as its EXIF Orientation tag says (phone photos)
      "background": 255,             # grey level 0-255 that transparent pixels are laid on
      "invert": "never",             # never | always | auto: auto inverts an image whose border (the outer
                                     # ring of pixels after the resize) is lighter than mid-grey, i.e. a
                                     # dark-on-light picture for a model trained on light-on-dark ones
      "scale": [0.0, 1.0],           # pixel 0 -> low, 255 -> high; default: the card's value_range, else [0, 1]
      "mean": [0.5], "std": [0.25],  # optional, per channel, applied after the scaling: (v - mean) / std
      "description": "..."          # free text, shown in /info
    }

The steps run in this order: EXIF orientation, transparency onto the background, colour
mode, resize (and crop), inversion, scaling, mean/std. A card whose ``preprocessing`` is
a string (a description only) or absent gets the defaults above, provided its input_shape
is an image, (1 or 3, H, W); other models take no image bodies.

The service checks the result against the card's ``value_range`` like any other input: a
card with mean/std normalisation should give the normalised range there, or none.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box")
INVERT = ("never", "always", "auto")
MODES = {"L": 1, "RGB": 3}
KEYS = {"color_mode", "resize", "interpolation", "exif_orientation", "background", "invert", "scale", "mean", "std",
        "description"}


class PreprocessingError(ValueError):
    """A card's preprocessing that cannot be applied (the message names the key)."""


@dataclass(frozen=True)
class ImagePreprocessing:
    color_mode: str
    size: tuple[int, int]  # (H, W) of the model's input
    resize: str | int
    interpolation: str
    exif_orientation: bool
    background: int
    invert: str
    scale: tuple[float, float]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    description: str | None

    @property
    def channels(self) -> int:
        return MODES[self.color_mode]

    def describe(self) -> dict:
        """The resolved preprocessing as /info shows it (JSON)."""
        d = asdict(self)
        d["size"], d["scale"] = list(self.size), list(self.scale)
        d["mean"] = list(self.mean) if self.mean is not None else None
        d["std"] = list(self.std) if self.std is not None else None
        return d


def parse_preprocessing(raw, input_shape: tuple[int, ...],
                        value_range: tuple[float, float] | None) -> ImagePreprocessing | None:
    """The card's preprocessing resolved against its input shape; None when the model takes no images
    (input_shape is not (1 or 3, H, W) and the card names no preprocessing object). Raises
    :class:`PreprocessingError` for a preprocessing object that cannot be applied."""
    is_image = len(input_shape) == 3 and input_shape[0] in (1, 3)
    if not isinstance(raw, dict):
        if not is_image:
            return None
        raw = {"description": raw} if isinstance(raw, str) else {}
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise PreprocessingError(f"unknown key(s) {unknown}; known: {sorted(KEYS)}")
    if not is_image:
        raise PreprocessingError(f"input_shape {list(input_shape)} is not an image (1 or 3, H, W)")
    channels, height, width = input_shape
    mode = raw.get("color_mode", "L" if channels == 1 else "RGB")
    if mode not in MODES or MODES[mode] != channels:
        raise PreprocessingError(f"color_mode {mode!r} does not give input_shape[0] = {channels} channel(s) "
                                 "(L: 1, RGB: 3)")
    resize = raw.get("resize", "stretch")
    if resize != "stretch":
        if isinstance(resize, bool) or not isinstance(resize, int) or resize < max(height, width):
            raise PreprocessingError(f"resize must be 'stretch' or an integer >= {max(height, width)} (the shorter "
                                     f"side before the centre crop to {height}x{width}), got {resize!r}")
    interpolation = raw.get("interpolation", "bilinear")
    if interpolation not in INTERPOLATIONS:
        raise PreprocessingError(f"interpolation must be one of {list(INTERPOLATIONS)}, got {interpolation!r}")
    exif = raw.get("exif_orientation", True)
    if not isinstance(exif, bool):
        raise PreprocessingError(f"exif_orientation must be true or false, got {exif!r}")
    background = raw.get("background", 255)
    if isinstance(background, bool) or not isinstance(background, int) or not 0 <= background <= 255:
        raise PreprocessingError(f"background must be a grey level 0-255, got {background!r}")
    invert = raw.get("invert", "never")
    if invert not in INVERT:
        raise PreprocessingError(f"invert must be one of {list(INVERT)}, got {invert!r}")
    scale = _pair(raw.get("scale", list(value_range) if value_range is not None else [0.0, 1.0]))
    mean, std = _per_channel(raw.get("mean"), "mean", channels), _per_channel(raw.get("std"), "std", channels)
    if (mean is None) != (std is None):
        raise PreprocessingError("mean and std go together: give both or neither")
    if std is not None and not all(s > 0 for s in std):
        raise PreprocessingError(f"std must be positive, got {list(std)}")
    description = raw.get("description")
    if description is not None and not isinstance(description, str):
        raise PreprocessingError("description must be a string")
    return ImagePreprocessing(mode, (height, width), resize, interpolation, exif, background, invert, scale, mean,
                              std, description)


def _pair(value) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise PreprocessingError(f"scale must be [low, high], got {value!r}") from exc
    if not lo < hi:
        raise PreprocessingError(f"scale needs low < high, got {value!r}")
    return lo, hi


def _per_channel(value, key: str, channels: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise PreprocessingError(f"{key} must be a list of {channels} number(s), got {value!r}") from exc
    if len(out) != channels:
        raise PreprocessingError(f"{key} must have {channels} value(s) (one per channel), got {len(out)}")
    return out

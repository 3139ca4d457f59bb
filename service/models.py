"""Loading the served classifier and its model card.

Three ways to name a model (``GGA_MODEL``):

- a built-in architecture (``mnist_cnn``, ``cifar_resnet20``, ``cifar_resnet56``) plus
  weights (``GGA_MODEL_WEIGHTS``: safetensors, or a plain state-dict checkpoint read
  with ``torch.load(weights_only=True)``; a ``module.`` prefix is stripped);
- ``torchscript:<path>``: a TorchScript archive;
- ``factory:<package.module>:<function>``: a function returning an ``nn.Module``, plus
  safetensors weights.

Whole pickled models are never loaded. Each model comes with a card: input shape and
class names at least.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from detectors.second_opinion import SECOND_OPINIONS
from detectors.zoo import ARCHITECTURES
from service.preprocessing import ImagePreprocessing, PreprocessingError, parse_preprocessing
from service.settings import DEFAULT_MODEL_DIR, Settings

# the stem and the three stages (chosen on CIFAR-10 validation data, benchmarks/results/REPORT.md)
CIFAR_RESNET_LAYERS = ["relu", "layer1", "layer2", "layer3"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

BUILTIN_CARDS = {
    "cifar_resnet20": {
        "name": "cifar_resnet20", "input_shape": [3, 32, 32], "class_names": CIFAR10_CLASSES,
        "preprocessing": {"description": "RGB pixels in [0, 1], NCHW; ImageNet mean/std normalisation happens "
                          "inside the model", "color_mode": "RGB", "resize": 32, "interpolation": "bilinear"},
        "feature_layers": CIFAR_RESNET_LAYERS, "value_range": [0.0, 1.0],
    },
    "cifar_resnet56": {
        "name": "cifar_resnet56", "input_shape": [3, 32, 32], "class_names": CIFAR10_CLASSES,
        "preprocessing": {"description": "RGB pixels in [0, 1], NCHW; ImageNet mean/std normalisation happens "
                          "inside the model", "color_mode": "RGB", "resize": 32, "interpolation": "bilinear"},
        "feature_layers": CIFAR_RESNET_LAYERS, "value_range": [0.0, 1.0],
    },
}


class ModelLoadError(RuntimeError):
    """The configured model cannot be loaded (the message says what to fix)."""


@dataclass(frozen=True)
class ModelCard:
    name: str
    input_shape: tuple[int, ...]
    class_names: list[str]
    extra: dict = field(default_factory=dict)
    feature_layers: tuple[str, ...] | None = None  # submodules the composite detector reads; None: found by probe
    value_range: tuple[float, float] | None = None  # the input values the model was trained on
    value_range_policy: str = "reject"  # reject: 422 naming the sample; warn: served with a warning
    second_opinion: str | None = None  # a robust classifier the composite consults (detectors.second_opinion)
    preprocessing: ImagePreprocessing | None = None  # image bodies -> samples (service/preprocessing.py); None: none

    def check_range(self, x) -> list[tuple[int, float, float]]:
        """Samples of x [B, ...] with values outside ``value_range``: (index, min, max) each, in order."""
        if self.value_range is None or len(x) == 0:
            return []
        lo, hi = self.value_range
        flat = x.reshape(len(x), -1)
        mins, maxs = flat.min(axis=1), flat.max(axis=1)
        bad = (mins < lo) | (maxs > hi)
        return [(int(i), float(mins[i]), float(maxs[i])) for i in bad.nonzero()[0]]

    @classmethod
    def from_dict(cls, d: dict, source: str) -> ModelCard:
        try:
            shape = tuple(int(v) for v in d["input_shape"])
            names = [str(c) for c in d["class_names"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"model card {source} needs 'input_shape' (list of ints) and "
                                 f"'class_names' (list of strings): {exc}") from exc
        if not shape or any(v < 1 for v in shape):
            raise ModelLoadError(f"model card {source}: input_shape must be positive ints, got {shape}")
        if len(names) < 3:
            raise ModelLoadError(f"model card {source}: GGA needs at least 3 classes, got {len(names)}")
        layers = d.get("feature_layers")
        if layers is not None and (not isinstance(layers, list) or not layers
                                   or not all(isinstance(n, str) and n for n in layers)):
            raise ModelLoadError(f"model card {source}: feature_layers must be a non-empty list of module names "
                                 f"(from model.named_modules()), got {layers!r}")
        value_range = d.get("value_range")
        if value_range is not None:
            try:
                lo, hi = (float(v) for v in value_range)
            except (TypeError, ValueError) as exc:
                raise ModelLoadError(f"model card {source}: value_range must be [low, high], got {value_range!r}") \
                    from exc
            if not lo < hi:
                raise ModelLoadError(f"model card {source}: value_range needs low < high, got {value_range!r}")
            value_range = (lo, hi)
        policy = d.get("value_range_policy", "reject")
        if policy not in ("reject", "warn"):
            raise ModelLoadError(f"model card {source}: value_range_policy must be 'reject' or 'warn', got {policy!r}")
        second = d.get("second_opinion")
        if second is not None and second not in SECOND_OPINIONS:
            raise ModelLoadError(f"model card {source}: second_opinion must be one of {sorted(SECOND_OPINIONS)}, "
                                 f"got {second!r}")
        if second is not None and tuple(SECOND_OPINIONS[second].input_shape) != shape:
            raise ModelLoadError(f"model card {source}: the {second} second opinion reads inputs of shape "
                                 f"{tuple(SECOND_OPINIONS[second].input_shape)}, the model's are {shape}")
        try:
            prep = parse_preprocessing(d.get("preprocessing"), shape, value_range)
        except PreprocessingError as exc:
            raise ModelLoadError(f"model card {source}: preprocessing: {exc}") from exc
        extra = {k: v for k, v in d.items() if k not in ("input_shape", "class_names", "name")}
        return cls(name=str(d.get("name", source)), input_shape=shape, class_names=names, extra=extra,
                   feature_layers=tuple(layers) if layers else None, value_range=value_range,
                   value_range_policy=policy, second_opinion=second, preprocessing=prep)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights from safetensors, or from a state-dict checkpoint (never a pickled model)."""
    if not path.exists():
        raise ModelLoadError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a plain state dict"
        raise ModelLoadError(f"{path} is neither safetensors nor a plain state-dict checkpoint "
                             f"loadable with weights_only=True: {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_card(settings: Settings, default: dict | None, weights: Path | None) -> ModelCard:
    path = settings.model.card
    if path is None and weights is not None and (weights.parent / "model_card.json").exists():
        path = weights.parent / "model_card.json"
    if path is not None:
        if not path.exists():
            raise ModelLoadError(f"model card {path} does not exist")
        return ModelCard.from_dict(json.loads(path.read_text()), str(path))
    if default is not None:
        return ModelCard.from_dict(default, default["name"])
    raise ModelLoadError("this model needs a model card: set GGA_MODEL_CARD to a JSON file with "
                         "'input_shape' and 'class_names'")


def load_model(settings: Settings, device: torch.device) -> tuple[torch.nn.Module, ModelCard]:
    """The model in eval mode on ``device``, with its card."""
    spec = settings.model.name
    weights = settings.model.weights
    if spec.startswith("torchscript:"):
        path = Path(spec.removeprefix("torchscript:"))
        if not path.exists():
            raise ModelLoadError(f"TorchScript file {path} does not exist")
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"{path} is not a TorchScript archive: {exc}") from exc
        card = _load_card(settings, None, path)
    elif spec.startswith("factory:"):
        target = spec.removeprefix("factory:")
        module_name, _, func_name = target.rpartition(":")
        if not module_name or not func_name:
            raise ModelLoadError(f"factory must look like 'factory:package.module:function', got {spec!r}")
        try:
            factory = getattr(importlib.import_module(module_name), func_name)
        except (ImportError, AttributeError) as exc:
            raise ModelLoadError(f"cannot import {target}: {exc}") from exc
        model = factory()
        if not isinstance(model, torch.nn.Module):
            raise ModelLoadError(f"{target}() returned {type(model).__name__}, not a torch.nn.Module")
        if weights is None:
            raise ModelLoadError("a factory model needs GGA_MODEL_WEIGHTS (safetensors)")
        _load_weights(model, weights)
        card = _load_card(settings, None, weights)
    else:
        name = spec.removeprefix("builtin:")
        if name not in ARCHITECTURES:
            raise ModelLoadError(f"unknown model {spec!r}: use one of {sorted(ARCHITECTURES)}, "
                                 "'torchscript:<path>' or 'factory:<package.module>:<function>'")
        if weights is None:
            if name != "mnist_cnn":
                raise ModelLoadError(f"the built-in {name} has no bundled weights: set GGA_MODEL_WEIGHTS")
            weights = DEFAULT_MODEL_DIR / "model.safetensors"
        model = ARCHITECTURES[name]()
        _load_weights(model, weights)
        card = _load_card(settings, BUILTIN_CARDS.get(name), weights)
    model.eval()
    return model.to(device), card


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    state = read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"weights {path} do not fit the model: {exc}") from exc

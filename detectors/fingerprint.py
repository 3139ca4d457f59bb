"""A fingerprint of a model's weights: sha256 over its state dict.

Each entry contributes its name, dtype, shape and raw bytes, in sorted key order, so
two models share a fingerprint exactly when their state dicts are bit-identical.
"""

from __future__ import annotations

import hashlib

import torch


def model_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()

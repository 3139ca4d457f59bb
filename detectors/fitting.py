"""What the fits of every detector share: input checks, the seeded split, batched passes with progress.

- :func:`check_xy`: labelled fit data x [n, ...] (finite), y [n] (int64);
- :func:`seeded_permutation`: the seeded shuffle every fit splits its data with
  (``torch.randperm`` under ``torch.Generator().manual_seed(seed)``);
- :func:`map_batches`: one function over x in batches of ``batch_size``, each call through
  ``run`` (:data:`BatchRunner`, e.g. the serving worker between its batches) and
  ``progress(done, total)`` after each; :func:`fit_total` and :func:`shifted_progress` count
  a fit's x and calibration set as one total.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# How a fit runs one batch's model pass: ``run(fn)`` calls ``fn()`` (somewhere: on a serving
# worker thread between its batches, say) and returns its result.
BatchRunner = Callable[[Callable[[], Any]], Any]
# ``progress(done, total)``: samples processed so far of the fit's total.
Progress = Callable[[int, int], None]


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def check_xy(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """Labelled fit data as tensors: x [n, ...] finite, y [n] int64 on the CPU; ValueError otherwise."""
    x, y = torch.as_tensor(x), torch.as_tensor(y).long().cpu()
    if x.dim() < 2 or y.dim() != 1 or len(x) != len(y):
        raise ValueError(f"x [n, ...] and y [n] must have the same length, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf")
    return x, y


def fit_total(x, calibration) -> int:
    """The samples a fit passes through the model: len(x) plus the calibration set's (``progress``'s total)."""
    return len(x) + (0 if calibration is None else len(calibration[0]))


def shifted_progress(progress: Progress | None, offset: int, total: int) -> Progress | None:
    """``progress`` for one part of a fit: ``(done, _) -> progress(offset + done, total)``."""
    return None if progress is None else (lambda done, _part_total: progress(offset + done, total))


def seeded_permutation(n: int, seed: int) -> torch.Tensor:
    """The fits' seeded shuffle of n samples (int64 [n]): the same split for the same seed."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def map_batches(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, batch_size: int, *,
                progress: Progress | None = None, run: BatchRunner | None = None, offset: int = 0,
                total: int | None = None) -> list:
    """``[fn(x[i:i + batch_size]) for each batch]``; each call through ``run`` when given, and
    ``progress(offset + done, total)`` after each batch (total: len(x) unless given)."""
    check_batch_size(batch_size)
    total = len(x) if total is None else total
    out = []
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        out.append(run(lambda xb=xb: fn(xb)) if run is not None else fn(xb))
        if progress is not None:
            progress(offset + min(start + batch_size, len(x)), total)
    return out

"""Transfer (gray-box) attack: the attacker fits its own detector and attacks that.

The attacker knows the recipe (:func:`detectors.presets.build_detector` with the served
preset and layers), the model weights and public data, but not the served detector's fitted
state. It fits its own composite with another seed on other samples, runs the white-box
attacks (``cw``, then ``orthogonal`` on the inputs still unbroken) against its own surrogate
and its own detector's verdicts, and submits, per input, the point its own detector accepted
(else its last iterate). Only then does the served detector judge: success = inside the ball,
misclassified and not flagged by the served detector.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from benchmarks.adaptive import cw, orthogonal
from benchmarks.adaptive.common import Context, Judge, Tracker
from benchmarks.adaptive.surrogate import Surrogate
from detectors.presets import build_detector

NAME = "transfer"


def fit_own(model: torch.nn.Module, x_fit: torch.Tensor, y_fit: torch.Tensor, x_cal: torch.Tensor,
            y_cal: torch.Tensor, *, preset: str, num_classes: int, layers, seed: int,
            second_opinion: str | None = None):
    """The attacker's detector: the served recipe (with the same public second opinion), another
    seed, other samples."""
    det = build_detector(preset, model, num_classes=num_classes, layers=layers, seed=seed,
                         second_opinion=second_opinion)
    return det.fit(x_fit, y_fit, batch_size=500, calibration=(x_cal, y_cal))


def attack(ctx: Context, x: torch.Tensor, y: torch.Tensor, *, own_detector) -> Tracker:
    """``ctx`` holds the served surrogate/judge (used only for the final verdict)."""
    sur = ctx.surrogate
    own = Surrogate(own_detector, temperature=sur.temperature, gga="omit")
    own_ctx = replace(ctx, surrogate=own, judge=Judge(own))
    first = cw.attack(own_ctx, x, y)
    rest = torch.nonzero(~first.found)[:, 0]
    points = first.x_point.clone()
    if len(rest):
        second = orthogonal.attack(own_ctx, x[rest], y[rest])
        points[rest] = second.x_point
    tracker = Tracker(x)
    inside = ctx.budget.inside(points, x)
    ok = ctx.judge(points, y) & inside
    tracker.record(torch.arange(len(x)), points, ok, ctx.steps)
    tracker.x_point = points
    ctx.log(f"transfer: own detector accepted {int(first.found.sum())} (cw) ; served accepts {int(ok.sum())}/{len(x)}")
    return tracker

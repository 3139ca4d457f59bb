"""What a user can act on, fitted beside any detector: conformal prediction sets and a selective gate.

:class:`Decisions` holds a :class:`detectors.conformal.PredictionSets` (which labels could this
input be: P(y ∈ set) ≥ 1 − ``set_alpha``) and a :class:`detectors.selective.SelectiveGate` (may
the prediction be acted on automatically: with probability ≥ 1 − ``delta`` over the calibration
sample, P(wrong | accepted) ≤ ``risk_target``). Both are fitted on the detector's calibration split,
from the logits and the trust of the detector's own pass, and both guarantees assume inputs
exchangeable with the calibration data, which is what the detector's flag tests.

The gate's correctness score (higher = more likely correct), one of :data:`GATE_SCORES`:

- ``msp``: the max softmax probability (float64);
- ``margin``: the float64 logit margin z_(1) − z_(2);
- ``trust``: the detector's trust (its conformal p-value);
- ``margin+trust``: margin + log(trust), the log-odds of the top class plus the log p-value.

Every one of them is gated by the trust: an input with trust < the detector's alpha (flagged) gets
the score −∞ and is never accepted, at calibration as in serving, so the bound covers the gate as
served. The default, :data:`DEFAULT_GATE_SCORE` (the trust-gated float64 margin, walk started at
``start_errors`` = 3), was chosen on evidence (``benchmarks/selective_scores.py``,
``benchmarks/results/selective_scores.md``): on MNIST validation data every trust-gated score
accepts the same share (all unflagged inputs), and on CIFAR-10 the margin's gate fits on more
splits than max softmax's and, started at 3 errors, accepts the most; the default set
score, LAC, had the smallest mean set size at valid coverage (``benchmarks/results/conformal.md``).

When no threshold meets the risk target (too few calibration samples for the bound), ``fit`` raises
:class:`detectors.selective.InsufficientCalibrationError` with ``strict=True``; with
``strict=False`` (what a detector's fit does unless the caller asked for a gate explicitly) the
sets are kept, the gate is None, ``accept`` is None and ``gate_error`` says why.

State: tensors under the prefix ``decisions.`` in the detector's safetensors (the sets' quantiles
and parameters, the gate's threshold and counts) and a ``decisions`` entry in its JSON.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Self

import torch

from detectors.conformal import PredictionSets
from detectors.conformal_scores import SCORES, check_logits
from detectors.selective import InsufficientCalibrationError, SelectiveGate, gated_by_trust, logit_margin, max_softmax

PREFIX = "decisions."
GATE_SCORES = ("msp", "margin", "trust", "margin+trust")
DEFAULT_GATE_SCORE = "margin"
DEFAULT_SET_SCORE = "lac"

__all__ = ["DEFAULT_GATE_SCORE", "DEFAULT_SET_SCORE", "GATE_SCORES", "PREFIX", "DecisionConfig", "Decisions",
           "correctness_score", "split_state"]


def _unit(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DecisionConfig:
    """``set_alpha``: miscoverage of the sets; ``set_score``: lac, aps or raps (``randomized`` for the
    last two); ``risk_target`` and ``delta``: the gate's bound; ``gate_score``: one of :data:`GATE_SCORES`;
    ``start_errors``: where the gate's fixed-sequence walk starts (:class:`SelectiveGate`)."""

    set_alpha: float = 0.1
    set_score: str = DEFAULT_SET_SCORE
    randomized: bool = False
    risk_target: float = 0.01
    delta: float = 0.05
    gate_score: str = DEFAULT_GATE_SCORE
    start_errors: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "set_alpha", _unit("set_alpha", self.set_alpha))
        object.__setattr__(self, "risk_target", _unit("risk_target", self.risk_target))
        object.__setattr__(self, "delta", _unit("delta", self.delta))
        if self.set_score not in SCORES:
            raise ValueError(f"set_score must be one of {SCORES}, got {self.set_score!r}")
        if self.gate_score not in GATE_SCORES:
            raise ValueError(f"gate_score must be one of {GATE_SCORES}, got {self.gate_score!r}")
        if isinstance(self.start_errors, bool) or not isinstance(self.start_errors, int) or self.start_errors < 0:
            raise ValueError(f"start_errors must be an integer >= 0, got {self.start_errors!r}")


def correctness_score(name: str, logits, trust, flag_alpha: float) -> torch.Tensor:
    """The gate's score ``name`` [B] (float64, higher = more likely correct), −∞ where trust < flag_alpha."""
    t = torch.as_tensor(trust).to("cpu", torch.float64).flatten()
    if name == "msp":
        s = max_softmax(logits)
    elif name == "margin":
        s = logit_margin(logits)
    elif name == "trust":
        s = t
    elif name == "margin+trust":
        s = logit_margin(logits) + torch.log(t)
    else:
        raise ValueError(f"gate_score must be one of {GATE_SCORES}, got {name!r}")
    return gated_by_trust(s, t, flag_alpha)


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the detector's own tensors, the decisions' tensors with the prefix removed)."""
    own = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    dec = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    return own, dec


class Decisions:
    """Prediction sets and the selective gate of one detector (module docstring)."""

    def __init__(self, config: DecisionConfig | None = None, **options) -> None:
        self.config = config if config is not None else DecisionConfig(**options)
        self.sets: PredictionSets | None = None
        self.gate: SelectiveGate | None = None
        self.gate_error: str | None = None
        self.samples_needed: int | None = None
        self.flag_alpha: float | None = None

    @property
    def fitted(self) -> bool:
        return self.sets is not None

    def _new_sets(self) -> PredictionSets:
        c = self.config
        return PredictionSets(c.set_score, c.set_alpha, randomized=c.randomized)

    def fit(self, logits, labels, trust, flag_alpha: float, *, strict: bool = False) -> Self:
        """Fit on calibration logits [n, C], labels [n] and the detector's trust [n] of the same samples;
        ``flag_alpha``: the detector's alpha (trust below it is flagged, never accepted)."""
        z, y = check_logits(logits, labels)
        t = torch.as_tensor(trust).to("cpu", torch.float64).flatten()
        if len(t) != len(y):
            raise ValueError(f"trust must hold one value per calibration sample ({len(y)}), got {len(t)}")
        c = self.config
        self.flag_alpha = _unit("flag_alpha", flag_alpha)
        self.sets = self._new_sets().fit(z, y)
        self.gate, self.gate_error, self.samples_needed = None, None, None
        correct = z.argmax(dim=1) == y
        try:
            self.gate = SelectiveGate(c.risk_target, c.delta, c.start_errors).fit(
                correctness_score(c.gate_score, z, t, self.flag_alpha), correct)
        except InsufficientCalibrationError as exc:
            if strict:
                raise
            self.gate_error, self.samples_needed = str(exc), exc.needed
        return self

    def apply(self, logits, trust) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prediction_set bool [B, C], accept bool [B] or None without a gate); accept is False wherever
        trust < the detector's alpha."""
        if not self.fitted:
            raise RuntimeError("the decisions are not fitted")
        z = torch.as_tensor(logits).detach().to("cpu")
        sets = self.sets.predict(z)
        if self.gate is None:
            return sets, None
        return sets, self.gate.accept(correctness_score(self.config.gate_score, z, trust, self.flag_alpha))

    def metadata(self) -> dict:
        """The JSON entry: config, the sets' and the gate's fitted values (or why there is no gate)."""
        if not self.fitted:
            raise RuntimeError("the decisions are not fitted")
        return {"config": asdict(self.config), "flag_alpha": self.flag_alpha, "sets": self.sets.metadata(),
                "gate": None if self.gate is None else self.gate.metadata(), "gate_error": self.gate_error,
                "samples_needed": self.samples_needed}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under :data:`PREFIX`: the sets' quantiles and parameters, the gate's state (when fitted)."""
        if not self.fitted:
            raise RuntimeError("the decisions are not fitted")
        state = self.sets.state_dict(PREFIX + "sets.")
        if self.gate is not None:
            state.update(self.gate.state_dict(PREFIX))
        return state

    @classmethod
    def from_state(cls, meta: dict, state: dict[str, torch.Tensor]) -> Self:
        """Rebuild from the JSON entry of :meth:`metadata` and the tensors of :meth:`state_dict` (prefix
        removed, see :func:`split_state`); ValueError on anything inconsistent."""
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise ValueError(f"the detector's 'decisions' entry must be an object with a 'config', got {meta!r}")
        try:
            dec = cls(DecisionConfig(**meta["config"]))
        except TypeError as exc:
            raise ValueError(f"the decisions config is not understood: {exc}") from exc
        dec.flag_alpha = _unit("flag_alpha", meta.get("flag_alpha"))
        dec.sets = dec._new_sets().load_state_dict(state, "sets.")
        if meta.get("gate") is not None:
            dec.gate = SelectiveGate().load_state_dict(state, "")
            c = dec.config
            if (dec.gate.risk_target, dec.gate.delta) != (c.risk_target, c.delta):
                raise ValueError(f"the gate's state is for risk_target={dec.gate.risk_target}, "
                                 f"delta={dec.gate.delta}; the config says {c.risk_target}, {c.delta}")
        elif "gate" in state:
            raise ValueError("the state holds a gate the JSON does not declare")
        dec.gate_error = meta.get("gate_error")
        dec.samples_needed = meta.get("samples_needed")
        return dec

    def info(self) -> dict:
        """What /info shows: set_alpha, set score, risk_target, delta, gate score, threshold (None without a
        gate, with the reason)."""
        c = self.config
        g = self.gate
        q = self.sets.quantiles.tolist()
        return {"set_alpha": c.set_alpha, "set_score": c.set_score, "randomized": self.sets.randomized,
                "set_quantile": None if math.isinf(q[0]) else q[0], "n_calibration": self.sets.n_calibration,
                "risk_target": c.risk_target, "delta": c.delta, "gate_score": c.gate_score,
                "gate_threshold": None if g is None else g.threshold,
                "gate_accepted_calibration": None if g is None else g.n_accepted / g.n_calibration,
                "gate_errors": None if g is None else g.errors,
                "gate_risk_bound": None if g is None else g.risk_bound,
                "gate_error": self.gate_error}

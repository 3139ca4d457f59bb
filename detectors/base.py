"""The detector contract shared by every method of the package, and the code they share.

Every detector (GGA, the composite, MSP, energy, ODIN, Mahalanobis) is a :class:`Detector`:

- ``fit(x, y, *, calibration=None, progress=None, run=None) -> Self`` on labelled
  in-distribution data x [n, *input_shape], y [n]; ``calibration``: held-out data
  ``(x_cal, y_cal)`` for the conformal calibration; ``progress(done, total)`` after each
  batch; ``run(fn)`` runs each batch's model pass (:data:`BatchRunner`);
- ``score(x, *, return_csm=False) -> Scores``: per sample the raw ``score``
  (**higher = more anomalous**), ``trust`` = the conformal p-value
  (1 + #{c_i >= score}) / (n + 1) against the n calibration scores c_i
  (:mod:`detectors.calibration`) and ``flagged = trust < alpha``;
- ``state_dict()`` / ``load_state_dict(state)``: the fitted state as tensors;
  ``metadata()``: what the JSON of a saved detector holds; ``save(directory)`` and the
  classmethod ``load(directory, model)`` (files: :mod:`detectors.storage`; any kind:
  :func:`detectors.persist.load_detector`);
- ``kind`` (the registry's name of the class), ``components`` (the names of the signals
  it combines; one name for a single-signal detector), ``alpha``, ``threshold`` (the score
  above which ``flagged``), ``top_n`` (classes in the CSM, None: all or no CSM) and
  ``strategy`` (how the CSM's gradient passes run, :mod:`detectors.csm`; None without a CSM),
  ``preset`` (the :mod:`detectors.presets` name it was built from, or None).

:class:`DetectorBase` holds what every detector shares (metadata, save, load with its
kind, version and fingerprint checks; the fits' shared steps are in :mod:`detectors.fitting`);
:class:`BaselineDetector` adds the batching and
the optional conformal calibration of the single-score baselines. Common behaviour of the
logit baselines: ``x`` is processed in batches of ``batch_size`` on the model's device and
the scores come back on the CPU; input gradients use ``torch.autograd.grad(..., inputs=x)``
(no gradient reaches the parameters, and it works under ``torch.no_grad()`` /
``inference_mode``); the model's train/eval mode is never changed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self, runtime_checkable

import torch
from torch import nn

from detectors.calibration import ConformalCalibration
from detectors.decisions import DecisionConfig, Decisions, split_state
from detectors.fingerprint import model_fingerprint
from detectors.fitting import BatchRunner, Progress, check_batch_size, map_batches
from detectors.storage import WrongDetectorKindError, detector_kind, read_meta, read_tensors, write_detector
from detectors.storage import check_fingerprint as verify_fingerprint


@dataclass
class Scores:
    """Per-sample results of ``score(x)``, CPU tensors of length B.

    ``score`` and, for a calibrated detector, ``trust`` and ``flagged`` are always there;
    the prediction fields are None for detectors that do not report it (the baselines).
    """

    label: torch.Tensor | None = None  # int64 [B], predicted class
    confidence: torch.Tensor | None = None  # float32 [B], softmax probability of the predicted class
    top_classes: torch.Tensor | None = None  # int64 [B, N], top-N classes, predicted first
    score: torch.Tensor | None = None  # float64 [B], higher = more anomalous
    trust: torch.Tensor | None = None  # float64 [B], conformal p-value in (0, 1]; None: not calibrated
    flagged: torch.Tensor | None = None  # bool [B], trust < alpha; None: not calibrated
    features: torch.Tensor | None = None  # float32 [B, d]: GGA's features, the composite's log p-values
    csm: torch.Tensor | None = None  # float32 [B, N, N] when asked for
    prediction_set: torch.Tensor | None = None  # bool [B, C]: the conformal set (None: no decisions fitted)
    accept: torch.Tensor | None = None  # bool [B]: the selective gate, False whenever flagged (None: no gate)

    @staticmethod
    def cat(parts: list[Scores]) -> Scores:
        """One result from the results of consecutive batches."""
        if len(parts) == 1:
            return parts[0]
        return Scores(**{
            f.name: (torch.cat([getattr(p, f.name) for p in parts]) if getattr(parts[0], f.name) is not None
                     else None)
            for f in fields(Scores)
        })


@runtime_checkable
class Detector(Protocol):
    """What the service, the benchmarks and :func:`detectors.persist.load_detector` rely on."""

    kind: str
    components: list[str]
    preset: str | None
    alpha: float
    threshold: float
    top_n: int | None
    strategy: Any

    def fit(self, x, y, *, calibration=None, progress: Progress | None = None,
            run: BatchRunner | None = None) -> Self: ...

    def score(self, x, *, return_csm: bool = False) -> Scores: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Self: ...

    def metadata(self) -> dict: ...

    def save(self, directory: str | Path) -> Path: ...

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module) -> Self: ...


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (else first buffer); CPU for a model with neither."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def as_inputs(x) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() < 1:
        raise ValueError(f"x must be a batch [B, *input_shape], got a scalar of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    return x


def batches(x: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size].to(device)


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    z = model(x)
    if z.dim() != 2:
        raise ValueError(f"the model must return logits [B, C], got shape {tuple(z.shape)}")
    return z


def check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0 (e.g. 1.0 or 1000.0), got {temperature!r}")
    return float(temperature)


def check_epsilon(epsilon: float) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not epsilon >= 0:
        raise ValueError(f"epsilon must be a number >= 0 (0 disables input pre-processing), got {epsilon!r}")
    return float(epsilon)


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), e.g. 0.05; got {alpha!r}")
    return float(alpha)


class DetectorBase:
    """What every detector shares: metadata, save and load (with kind, version and fingerprint checks).

    A subclass sets ``kind`` and ``format_version``, ``stats_type`` (the dataclass of its
    ``fit_stats``), keeps its frozen config dataclass in ``self.config`` (with ``alpha``;
    ``cls(model, **asdict(config))`` rebuilds it) and defines ``fitted``, ``threshold``,
    ``fit``, ``score``, ``state_dict`` and ``load_state_dict``.
    """

    kind: ClassVar[str]
    format_version: ClassVar[int]
    stats_type: ClassVar[type]
    strategy: Any = None  # how the CSM's gradient passes run; None for detectors without a CSM
    decisions: Decisions | None = None  # prediction sets and the selective gate, fitted with the detector
    decision_config: DecisionConfig | None = None  # None: DecisionConfig() (set_alpha 0.1, risk 0.01, delta 0.05)
    strict_decisions: bool = False  # True: a gate that cannot meet its bound fails the fit

    def configure_decisions(self, config: DecisionConfig | None = None, *, strict: bool = False,
                            **options) -> Self:
        """What the next ``fit`` builds beside the detector (:mod:`detectors.decisions`): a
        :class:`DecisionConfig` or its fields as keywords. ``strict``: a gate that cannot meet
        ``risk_target`` at ``delta`` fails the fit (InsufficientCalibrationError, a ValueError) instead of
        leaving ``accept`` None with the reason in ``decisions.gate_error``."""
        self.decision_config = config if config is not None else DecisionConfig(**options)
        self.strict_decisions = bool(strict)
        return self

    def fit_decisions(self, logits, labels, stat, in_calibration=True) -> None:
        """The shared fit hook: prediction sets and gate from the calibration split's logits [n, C],
        labels [n] (None: no decisions) and the detector's statistic [n] of the same samples, after
        ``self.calibration`` is fitted. ``in_calibration`` (bool or bool [n]): the samples whose statistic
        is among the calibration scores; their trust is taken leave-one-out, (1 + #{others >= s}) / n,
        so that it is distributed as a fresh input's."""
        self.decisions = None
        if labels is None:
            return
        trust = self.calibration.trust(torch.as_tensor(stat, dtype=torch.float64))
        n = len(self.calibration.scores)
        loo = (trust * (n + 1) - 1) / n
        trust = torch.where(torch.as_tensor(in_calibration), loo, trust)
        self.decisions = Decisions(self.decision_config or DecisionConfig()).fit(
            logits, labels, trust, self.alpha, strict=self.strict_decisions)

    def decide(self, scores: Scores, logits) -> Scores:
        """The shared score hook: ``scores`` with ``prediction_set`` and ``accept`` from the batch's logits."""
        if self.decisions is not None and scores.trust is not None:
            scores.prediction_set, scores.accept = self.decisions.apply(logits, scores.trust)
        return scores

    def _init_common(self, model: nn.Module) -> None:
        self.model = model
        self.fit_stats = None
        self.model_fingerprint: str | None = None
        self.preset: str | None = None  # set by detectors.presets.build_detector
        # what an evaluation measured for this fitted state (threat model and figures; see
        # benchmarks/adaptive/attach.py): kept in the saved JSON, shown by /info, dropped by a refit
        self.evaluation: dict | None = None

    @property
    def alpha(self) -> float:
        return self.config.alpha

    @property
    def top_n(self) -> int | None:
        """Classes in the CSM (None: all classes, or no CSM)."""
        return None

    @property
    def components(self) -> list[str]:
        """The names of the signals the detector combines (one for a single-signal detector)."""
        return [self.kind]

    @property
    def fitted(self) -> bool:
        raise NotImplementedError

    @property
    def threshold(self) -> float:
        """The score above which ``flagged`` (``trust < alpha``): +inf when no score can be flagged,
        NaN before the detector is calibrated. Every kind keeps its calibration in ``self.calibration``."""
        return self.calibration.threshold if self.calibration.fitted else math.nan

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("the detector is not fitted: call fit(x, y) or load a saved one with "
                               "detectors.load_detector(directory, model)")

    def _metadata_extra(self) -> dict:
        """Keys a kind adds to its saved JSON (between ``config`` and ``model_fingerprint``)."""
        return {}

    def metadata(self) -> dict:
        """The saved JSON: kind, preset, format version, config, model fingerprint, fit statistics."""
        self._check_fitted()
        return {"kind": self.kind, "preset": self.preset, "format_version": self.format_version,
                "config": asdict(self.config), **self._metadata_extra(),
                "model_fingerprint": self.model_fingerprint, "fit": asdict(self.fit_stats),
                **({"decisions": self.decisions.metadata()} if self.decisions is not None else {}),
                **({"evaluation": self.evaluation} if self.evaluation is not None else {})}

    def save(self, directory: str | Path) -> Path:
        """Write ``detector.safetensors`` and ``detector.json`` into ``directory`` (fsynced)."""
        tensors = self.state_dict()
        if self.decisions is not None:
            tensors.update(self.decisions.state_dict())
        meta = self.metadata()
        meta["threshold"] = meta["fit"]["threshold"] if math.isfinite(meta["fit"]["threshold"]) else None
        return write_detector(directory, tensors, meta)

    @classmethod
    def _from_config(cls, model: nn.Module, config: dict, **options) -> Self:
        """An unfitted detector of the saved ``config``; ``options``: what the JSON does not hold."""
        return cls(model, **config, **options)

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module, *, check_fingerprint: bool = True,
             **options) -> Self:
        """The detector saved in ``directory``, for ``model``; refuses another kind's folder, another
        format version, one fitted for other weights (:class:`detectors.storage.FingerprintMismatchError`)
        and bad state. ``options`` go to the constructor (e.g. ``strategy`` for GGA and the composite)."""
        directory = Path(directory)
        meta = read_meta(directory)
        kind = detector_kind(meta)
        if kind != cls.kind:
            raise WrongDetectorKindError(
                f"{directory}: this is a {kind} detector, not {cls.kind} ({cls.__name__}.load reads only "
                f"{cls.kind}); use detectors.load_detector(directory, model), which reads every kind")
        if meta.get("format_version") != cls.format_version:
            raise ValueError(f"{directory}: {kind} detector format version {meta.get('format_version')!r} is not "
                             f"supported (this code reads {kind} version {cls.format_version})")
        if check_fingerprint:
            verify_fingerprint(meta, model, directory)
        det = cls._from_config(model, dict(meta["config"]), **options)
        own, dec = split_state(read_tensors(directory))
        det.load_state_dict(own)
        if meta.get("decisions") is not None:
            det.decisions = Decisions.from_state(meta["decisions"], dec)
        det.model_fingerprint = meta["model_fingerprint"]
        det.fit_stats = cls.stats_type(**meta["fit"])
        det.preset = meta.get("preset")
        evaluation = meta.get("evaluation")
        det.evaluation = evaluation if isinstance(evaluation, dict) else None
        return det



@dataclass
class BaselineFitStats:
    n_samples: int
    n_calibration: int  # 0: fitted without calibration data (no trust, no flags)
    threshold: float
    seconds: float


class BaselineDetector(DetectorBase):
    """A single-score baseline: batched scoring [B] plus the optional conformal calibration.

    ``fit(x, y, calibration=x_cal or (x_cal, y_cal))`` fits the method's own state (none
    for the logit baselines), then keeps the scores of the held-out ``x_cal`` (at least
    1/alpha − 1 of them, else ValueError). ``score(x).trust`` is the conformal p-value of
    each sample and ``flagged = trust < alpha``; without calibration data both are None.
    ``anomaly_score(x)`` is the raw score [B] (float64, CPU) alone.
    """

    format_version = 1
    stats_type = BaselineFitStats

    def _init_baseline(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module (a classifier returning logits [B, C]), "
                             f"got {type(model).__name__}")
        self._init_common(model)
        self.calibration = ConformalCalibration(self.config.alpha)

    @property
    def fitted(self) -> bool:
        """Calibrated (a saved or served baseline needs its calibration)."""
        return self.calibration.fitted

    def _fit_state(self, x: torch.Tensor, y, batch_size: int, progress: Progress | None,
                   run: BatchRunner | None, total: int) -> None:
        """Fit the method's own state on (x, y); nothing for the logit baselines."""

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _state(self) -> dict[str, torch.Tensor]:
        return {}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        return None

    def fit(self, x, y=None, *, calibration=None, progress: Progress | None = None,
            run: BatchRunner | None = None, batch_size: int = 256) -> Self:
        """Fit on x (labels y where the method needs them), then calibrate on ``calibration`` when given."""
        t0 = time.perf_counter()
        check_batch_size(batch_size)
        x_cal = calibration[0] if isinstance(calibration, tuple | list) else calibration
        total = (0 if x is None else len(x)) + (0 if x_cal is None else len(x_cal))
        self._fit_state(x, y, batch_size, progress, run, total)
        self.calibration = ConformalCalibration(self.config.alpha)
        if x_cal is not None:
            done = total - len(x_cal)
            self.calibration.fit(self._raw(x_cal, batch_size, progress=progress, run=run, offset=done, total=total))
        self.model_fingerprint = model_fingerprint(self.model)
        self.evaluation = None  # a new fitted state: no evaluation measured it yet
        self.fit_stats = BaselineFitStats(
            n_samples=0 if x is None else len(x), n_calibration=0 if x_cal is None else len(x_cal),
            threshold=self.calibration.threshold if self.calibration.fitted else math.inf,
            seconds=round(time.perf_counter() - t0, 3))
        return self

    def _raw(self, x, batch_size: int, **how) -> torch.Tensor:
        x = as_inputs(x)
        device = model_device(self.model)
        out = map_batches(lambda xb: self._score_batch(xb.to(device)).detach().cpu(), x, batch_size, **how)
        return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)

    def anomaly_score(self, x, batch_size: int = 256) -> torch.Tensor:
        """The raw score [B] (float64, CPU), higher = more anomalous."""
        return self._raw(x, batch_size)

    def score(self, x, *, return_csm: bool = False, batch_size: int = 256) -> Scores:
        """``Scores`` with ``score`` [B] and, when calibrated, ``trust`` and ``flagged`` (no CSM: ``csm`` None)."""
        s = self.anomaly_score(x, batch_size)
        if not self.calibration.fitted:
            return Scores(score=s)
        trust = self.calibration.trust(s)
        return Scores(score=s, trust=trust, flagged=trust < self.alpha)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The method's state plus ``calibration_scores`` when calibrated."""
        state = self._state()
        if self.calibration.fitted:
            state.update(self.calibration.state_dict())
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Self:
        self._load_state({k: v for k, v in state.items() if k != "calibration_scores"})
        self.calibration = ConformalCalibration(self.config.alpha)
        if "calibration_scores" in state:
            self.calibration.load_state_dict(state)
        return self


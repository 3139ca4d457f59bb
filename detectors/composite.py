"""The composite detector: GGA at its core, plus the logit and layer signals of the same pass.

One forward pass (with the N gradient passes of the CSM when GGA is on) gives, per sample,
these components (each a score, higher = more anomalous):

- ``gga``: LODA over the ten standardised CSM features of the top-N classes
  (Schwinn et al. 2021);
- ``margin``: minus the float64 logit margin log(p_max / (1 − p_max)): low confidence
  (one-sided by default, the max-softmax baseline's signal, which also ranks
  misclassifications);
- ``energy``: −logsumexp(z) (Liu et al. 2020), two-sided by default: too high is as
  suspicious as too low (adversarial examples pushed deep into a class have very low
  energy);
- ``layer:<name>``: for each feature layer, the squared Mahalanobis distance of the
  layer's channel means to the closest class mean under a tied covariance (Lee et al.
  2018), fitted on correctly classified training samples; no tuning on anomalies.

fit(x, y, calibration=(x_cal, y_cal)): the correctly classified samples of x are split
(seeded) into a *fit* part (LODA, the class Gaussians) and a *reference* part; each
component's reference scores turn it into a p-value (:mod:`detectors.pvalues`, with an
exponential tail beyond the reference range). The components are combined into one
statistic (higher = more anomalous):

- ``fisher`` (default): −2 Σ_j w_j log p_j (Fisher's method; weights 1, ``margin_weight``
  for the margin). With ``truncation`` τ < 1 (default 0.1) every component other than
  the margin counts only by how far its p-value falls below τ, max(0, log(τ / p_j)), a
  soft truncated product (after Zaykin et al. 2002): on in-distribution inputs the
  distances and GGA then add little noise to the confidence ranking, and on anomalies
  their tiny p-values count in full;
- ``min``: −log of the smallest component p-value;
- ``sum``: Σ_j w_j z_j with z_j the component's score standardised by the reference
  median and IQR / 1.349 (|z_j| for two-sided components);
- ``loda``: LODA over the joint standardised vector (CSM features, margin, energy,
  log layer distances), fitted on the reference part (a density: both tails by design).

The defaults are the configuration chosen on validation data
(``benchmarks/select_composite.py``, ``benchmarks/results/REPORT.md``).

The statistic is calibrated conformally on ``x_cal`` (every sample, misclassified ones
included: the trust is a p-value for "an in-distribution input", so the flag rate on
in-distribution traffic is alpha); without ``calibration`` a seeded part of x is held
out for it. ``trust`` is therefore a valid conformal p-value whatever the dependence
between the components.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Self

import torch

from detectors.autotune import check_strategy, strategy_for
from detectors.base import DetectorBase, Scores, model_device
from detectors.calibration import ConformalCalibration
from detectors.csm import check_logits, cosine_similarity_maps
from detectors.energy import energy_score
from detectors.features import csm_features
from detectors.fingerprint import model_fingerprint
from detectors.fitting import BatchRunner, Progress, check_xy, fit_total, map_batches, seeded_permutation
from detectors.gaussian import TiedGaussian
from detectors.loda import LODA
from detectors.pvalues import ReferenceTails, combine
from detectors.second_opinion import build_second_opinion
from detectors.second_opinion import check_input_shape as check_second_input
from detectors.second_opinion import check_name as check_second_opinion
from detectors.second_opinion import state_of as second_opinion_state
from detectors.second_opinion import weights_in as second_opinion_weights
from detectors.signals import LayerTap, class_margin, default_layers, logit_margin

KIND = "composite"
FORMAT_VERSION = 1
COMBINE = ("fisher", "min", "sum", "loda")
LOGIT_COMPONENTS = ("margin", "energy")
LAYER_WEIGHTS = ("each", "shared")


@dataclass(frozen=True)
class CompositeConfig:
    top_n: int | None = 5
    alpha: float = 0.05
    combine: str = "fisher"
    use_gga: bool = True
    use_logits: bool = True
    use_layers: bool = True
    layers: tuple[str, ...] | None = None
    n_bins: int = 100
    n_projections: int = 100
    seed: int = 0
    reference_fraction: float = 0.3
    calibration_fraction: float = 0.2
    two_sided: tuple[str, ...] = ("energy",)
    layer_weight: str = "each"
    margin_weight: float = 1.0
    truncation: float = 0.1
    second_opinion: str | None = None
    guard_share: float = 0.3

    def __post_init__(self) -> None:
        check_second_opinion(self.second_opinion)
        if self.second_opinion is not None and self.combine not in ("fisher", "min"):
            raise ValueError(f"a second opinion needs the fisher or min combiner, got {self.combine!r}")
        if not 0 < self.guard_share < 1:
            raise ValueError(f"guard_share must be in (0, 1), got {self.guard_share!r}")
        object.__setattr__(self, "two_sided", tuple(self.two_sided))
        if not set(self.two_sided) <= set(LOGIT_COMPONENTS):
            raise ValueError(f"two_sided may name {LOGIT_COMPONENTS}, got {self.two_sided!r}")
        if not 0 < self.truncation <= 1:
            raise ValueError(f"truncation must be in (0, 1] (1: plain Fisher), got {self.truncation!r}")
        if not self.margin_weight > 0:
            raise ValueError(f"margin_weight must be > 0, got {self.margin_weight!r}")
        if self.layer_weight not in LAYER_WEIGHTS:
            raise ValueError(f"layer_weight must be one of {LAYER_WEIGHTS}, got {self.layer_weight!r}")
        if self.top_n is not None and (isinstance(self.top_n, bool) or not isinstance(self.top_n, int)
                                       or self.top_n < 3):
            raise ValueError(f"top_n must be None (all classes) or an integer >= 3, got {self.top_n!r}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), e.g. 0.05; got {self.alpha!r}")
        if self.combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {self.combine!r}")
        if not (self.use_gga or self.use_logits or self.use_layers):
            raise ValueError("the composite needs at least one of use_gga, use_logits, use_layers")
        for name in ("reference_fraction", "calibration_fraction"):
            v = getattr(self, name)
            if not 0 < v < 1:
                raise ValueError(f"{name} must be in (0, 1), got {v!r}")
        if self.layers is not None:
            if not all(isinstance(n, str) and n for n in self.layers) or not self.layers:
                raise ValueError(f"layers must be a non-empty list of module names, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(self.layers))
        LODA(self.n_projections, self.n_bins, self.seed)  # validates those


@dataclass
class Signals:
    """What one pass yields for a batch (CPU tensors): logits [B, C], classes [B, N] (top-N,
    predicted first), CSM features [B, 10] (None without GGA), csm [B, N, N] (when asked),
    layer channel means {name: [B, D]} (empty without layers), the second opinion's logits
    [B, C] (None without one)."""

    logits: torch.Tensor
    classes: torch.Tensor
    csm_features: torch.Tensor | None
    layers: dict[str, torch.Tensor] = field(default_factory=dict)
    csm: torch.Tensor | None = None
    second: torch.Tensor | None = None

    def rows(self, index: torch.Tensor) -> Signals:
        return Signals(self.logits[index], self.classes[index],
                       None if self.csm_features is None else self.csm_features[index],
                       {k: v[index] for k, v in self.layers.items()}, None,
                       None if self.second is None else self.second[index])

    @staticmethod
    def cat(parts: list[Signals]) -> Signals:
        first = parts[0]

        def cat(name: str) -> torch.Tensor | None:
            return None if getattr(first, name) is None else torch.cat([getattr(p, name) for p in parts])

        return Signals(cat("logits"), cat("classes"), cat("csm_features"),
                       {k: torch.cat([p.layers[k] for p in parts]) for k in first.layers}, cat("csm"),
                       cat("second"))


@dataclass
class CompositeFitStats:
    n_samples: int
    n_correct: int
    model_accuracy: float
    n_fit: int
    n_reference: int
    n_calibration: int
    threshold: float
    seconds: float


class CompositeDetector(DetectorBase):
    """GGA + logit + layer signals, combined and conformally calibrated; see the module docstring.

    ``CompositeDetector(model, top_n=5, alpha=0.05, combine="fisher", layers=None, ...)``;
    ``fit(x, y, calibration=(x_cal, y_cal)) -> self``; ``score(x) -> Scores`` with the
    combined statistic as ``score`` and the components' log p-values as ``features``.
    """

    kind = KIND
    format_version = FORMAT_VERSION
    stats_type = CompositeFitStats

    def __init__(self, model: torch.nn.Module, top_n: int | None = 5, alpha: float = 0.05, *,
                 combine: str = "fisher", use_gga: bool = True, use_logits: bool = True,
                 use_layers: bool = True, layers: list[str] | tuple[str, ...] | None = None, n_bins: int = 100,
                 n_projections: int = 100, seed: int = 0, reference_fraction: float = 0.3,
                 calibration_fraction: float = 0.2, two_sided: tuple[str, ...] = ("energy",),
                 layer_weight: str = "each", margin_weight: float = 1.0, truncation: float = 0.1,
                 second_opinion: str | None = None, guard_share: float = 0.3,
                 second_opinion_weights: str | Path | dict[str, torch.Tensor] | None = None,
                 strategy: str = "auto") -> None:
        self.strategy = check_strategy(strategy)
        self.config = CompositeConfig(top_n, alpha, combine, use_gga, use_logits, use_layers,
                                      tuple(layers) if layers is not None and use_layers else None, n_bins,
                                      n_projections, seed, reference_fraction, calibration_fraction, two_sided,
                                      layer_weight, margin_weight, truncation, second_opinion, guard_share)
        self.second = (None if second_opinion is None
                       else build_second_opinion(second_opinion, second_opinion_weights).to(model_device(model)))
        self._second_checked = False
        self.main_reference: ReferenceTails | None = None
        self._init_common(model)
        if self.config.layers:
            LayerTap(model, self.config.layers)  # fails now, not at fit time, for unknown layer names
        self._auto_layers = use_layers and layers is None
        self.gga_loda: LODA | None = None
        self.gga_mean = self.gga_std = None
        self.gaussians: dict[str, TiedGaussian] = {}
        self.reference: ReferenceTails | None = None
        self.center = self.scale = None
        self.joint_loda: LODA | None = None
        self.joint_mean = self.joint_std = None
        self.calibration = ConformalCalibration(alpha)

    # ------------------------------------------------------------------ signals

    @property
    def top_n(self) -> int | None:
        return self.config.top_n

    @property
    def fitted(self) -> bool:
        return self.calibration.fitted

    @property
    def component_names(self) -> list[str]:
        c = self.config
        names = ["gga"] if c.use_gga else []
        names += ["margin", "energy"] if c.use_logits else []
        names += [f"layer:{n}" for n in c.layers or ()]
        return names + (["disagreement"] if c.second_opinion else [])

    @property
    def components(self) -> list[str]:
        """The contract's name of :attr:`component_names`."""
        return self.component_names

    def signals(self, x: torch.Tensor, return_csm: bool = False,
                timings: dict[str, float] | None = None) -> Signals:
        """The signals of one batch x [B, *input_shape] from one pass (see :class:`Signals`)."""
        x = torch.as_tensor(x).to(model_device(self.model))
        if x.dim() < 2 or len(x) == 0:
            raise ValueError(f"x must be a non-empty batch [B, *input_shape], got shape {tuple(x.shape)}")
        if self._auto_layers:
            if self.fitted:
                raise RuntimeError("a fitted composite must know its layers")
            self.config = replace(self.config, layers=tuple(default_layers(self.model, x[:1])))
            self._auto_layers = False
        c = self.config
        tap = LayerTap(self.model, c.layers) if c.layers else None
        with tap if tap is not None else _null():
            if c.use_gga:
                top_n = None if c.top_n is None else c.top_n
                res = cosine_similarity_maps(self.model, x, top_n, strategy=strategy_for(self.strategy, len(x)),
                                             timings=timings)
                logits, classes = res.logits, res.classes
                feats = csm_features(res.csm).double().cpu()
                csm = res.csm.cpu() if return_csm else None
            else:
                t0 = time.perf_counter()
                with torch.no_grad():
                    logits = self.model(x)
                check_logits(logits)
                n = logits.shape[1] if c.top_n is None else min(c.top_n, logits.shape[1])
                classes = torch.topk(logits, n, dim=1).indices
                feats = csm = None
                if timings is not None:
                    timings["forward"] = timings.get("forward", 0.0) + time.perf_counter() - t0
        layers = tap.features(len(x)) if tap is not None else {}
        second = self._second_logits(x, timings) if self.second is not None else None
        return Signals(logits.detach().cpu(), classes.cpu(), feats, layers, csm, second)

    def _second_logits(self, x: torch.Tensor, timings: dict[str, float] | None) -> torch.Tensor:
        t0 = time.perf_counter()
        if not self._second_checked:
            check_second_input(self.config.second_opinion, x)
            self._second_checked = True
        if model_device(self.second) != x.device:
            self.second.to(x.device)
        with torch.no_grad():
            r = self.second(x).detach().cpu()
        if timings is not None:
            timings["second_opinion"] = timings.get("second_opinion", 0.0) + time.perf_counter() - t0
        return r

    def _signals_batched(self, x: torch.Tensor, batch_size: int, progress: Progress | None, offset: int,
                         total: int, run: BatchRunner | None = None) -> Signals:
        return Signals.cat(map_batches(self.signals, x, batch_size, progress=progress, run=run, offset=offset,
                                       total=total))

    # ------------------------------------------------------------------ components

    @property
    def weights(self) -> torch.Tensor:
        """Per-component weights [K] of the fisher and sum combiners: 1 each, ``margin_weight``
        for the margin, and with ``layer_weight="shared"`` the L layer distances share one weight."""
        names = self.component_names
        n_layers = sum(n.startswith("layer:") for n in names)
        shared = self.config.layer_weight == "shared" and n_layers > 0

        def weight(name: str) -> float:
            if name == "margin":
                return self.config.margin_weight
            if name == "disagreement":
                return 0.0  # thresholded on its own (the guard), never part of the product
            return 1.0 / n_layers if shared and name.startswith("layer:") else 1.0

        return torch.tensor([weight(n) for n in names], dtype=torch.float64)

    def component_scores(self, s: Signals) -> torch.Tensor:
        """Raw component scores [B, K] (float64) in the order of :attr:`component_names`."""
        c, cols = self.config, []
        if c.use_gga:
            cols.append(self.gga_loda.score((s.csm_features - self.gga_mean) / self.gga_std))
        if c.use_logits:
            cols += [-logit_margin(s.logits), energy_score(s.logits)]
        for name in c.layers or ():
            cols.append(self.gaussians[name].score(s.layers[name]))
        if c.second_opinion:
            cols.append(-class_margin(s.second, s.classes[:, 0]))
        return torch.stack(cols, dim=1)

    def _joint(self, s: Signals, comp: torch.Tensor) -> torch.Tensor:
        """The joint vector of the ``loda`` combiner: CSM features, margin, energy, log distances."""
        c, cols, k = self.config, [], 0
        if c.use_gga:
            cols.append(s.csm_features)
            k = 1
        if c.use_logits:
            cols.append(comp[:, k:k + 2])
            k += 2
        if c.layers:
            cols.append(torch.log1p(comp[:, k:].clamp(min=0)))
        return torch.cat(cols, dim=1)

    def statistic(self, s: Signals) -> tuple[torch.Tensor, torch.Tensor]:
        """Combined statistic [B] (higher = more anomalous) and the components' log p-values [B, K]."""
        comp = self.component_scores(s)
        log_p = self.reference.log_p(comp)
        main = self._main_statistic(s, comp, log_p)
        if self.config.second_opinion is None:
            return main, log_p
        return self.guarded(main, log_p[:, -1]), log_p

    def guarded(self, main: torch.Tensor, disagreement_log_p: torch.Tensor) -> torch.Tensor:
        """The statistic with the second opinion's guard: −log min(p_main / (1 − w), p_dis / w), with
        p_main the main statistic's p-value against its reference scores and w = ``guard_share``
        (the part of the flag budget the disagreement gets on its own; a weighted Bonferroni
        minimum, calibrated conformally like any statistic)."""
        w = self.config.guard_share
        main_log_p = self.main_reference.log_p(main[:, None])[:, 0]
        return torch.maximum(math.log(1.0 - w) - main_log_p, math.log(w) - disagreement_log_p)

    def _main_statistic(self, s: Signals, comp: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        """The combination of every component but the disagreement [B]."""
        how = self.config.combine
        if self.config.second_opinion is not None:
            comp, log_p = comp[:, :-1], log_p[:, :-1]
        weights = self.weights[:log_p.shape[1]]
        if how == "fisher" and self.config.truncation < 1:
            # soft truncated product (after Zaykin et al. 2002): a component other than the margin counts
            # only by how far its p-value falls below the truncation point tau: max(0, log(tau / p))
            keep = torch.tensor([n == "margin" for n in self.component_names[:log_p.shape[1]]])
            excess = torch.clamp(log_p - math.log(self.config.truncation), max=0.0)
            return combine(torch.where(keep, log_p, excess), how, weights)
        if how in ("fisher", "min"):
            return combine(log_p, how, weights)
        if how == "sum":
            z = (comp - self.center) / self.scale
            z = torch.where(self.reference.two_sided, z.abs(), z)
            return (z * self.weights).sum(dim=1)
        joint = (self._joint(s, comp) - self.joint_mean) / self.joint_std
        return self.joint_loda.score(joint)

    # ------------------------------------------------------------------ fit

    def fit(self, x: torch.Tensor, y: torch.Tensor, *, calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
            progress: Progress | None = None, run: BatchRunner | None = None, batch_size: int = 256) -> Self:
        """Fit on labelled in-distribution data x [n, *input_shape], y [n]; returns self.

        ``run(fn)``, when given, runs each batch's pass ``fn()`` (e.g. on a serving worker
        thread, between its batches) and returns its result. ``calibration=(x_cal, y_cal)``:
        held-out data (not trained on) for the conformal calibration; without it a seeded
        ``calibration_fraction`` of x is held out. Raises ValueError when too few samples are
        classified correctly, or when the calibration set is too small to ever flag at ``alpha``.
        """
        t0 = time.perf_counter()
        x, y = check_xy(x, y)
        total = fit_total(x, calibration)
        sig = self._signals_batched(x, batch_size, progress, 0, total, run)
        cal_sig = None
        if calibration is not None:
            xc, _ = check_xy(*calibration)
            cal_sig = self._signals_batched(xc, batch_size, progress, len(x), total, run)
        return self.fit_signals(sig, y, cal_sig, None if calibration is None else calibration[1], started=t0)

    def fit_signals(self, sig: Signals, y: torch.Tensor, cal_sig: Signals | None = None,
                    cal_y: torch.Tensor | None = None, *, started: float | None = None) -> Self:
        """:meth:`fit` from precomputed signals (of x, and of the calibration data when given; its labels
        only count towards the reported accuracy: every calibration sample is used)."""
        t0 = time.perf_counter() if started is None else started
        c = self.config
        y = torch.as_tensor(y).long().cpu()
        n = len(y)
        perm = seeded_permutation(n, c.seed)
        separate = cal_sig is not None
        if cal_sig is None:
            n_cal = round(n * c.calibration_fraction)
            cal_sig, perm = sig.rows(perm[:n_cal]), perm[n_cal:]
        correct = perm[(sig.classes[perm, 0] == y[perm])]
        n_ref = round(len(correct) * c.reference_fraction)
        fit_idx, ref_idx = correct[n_ref:], correct[:n_ref]
        if len(fit_idx) < 20 or n_ref < 20:
            raise ValueError(f"only {len(correct)} correctly classified samples to fit the composite "
                             f"({len(fit_idx)} to fit, {n_ref} for reference); pass at least 100 more")
        fit_sig, ref_sig = sig.rows(fit_idx), sig.rows(ref_idx)
        if c.use_gga:
            f = fit_sig.csm_features
            self.gga_mean, self.gga_std = f.mean(dim=0), _nonzero(f.std(dim=0))
            self.gga_loda = LODA(c.n_projections, c.n_bins, c.seed).fit((f - self.gga_mean) / self.gga_std)
        self.gaussians = {name: TiedGaussian.fit(fit_sig.layers[name], y[fit_idx]) for name in c.layers or ()}
        ref = self.component_scores(ref_sig)
        names = self.component_names
        self.reference = ReferenceTails(ref, torch.tensor([name in c.two_sided for name in names]))
        q = torch.quantile(ref, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), dim=0)
        self.center, self.scale = q[1], _nonzero((q[2] - q[0]) / 1.349)
        if c.combine == "loda":
            joint = self._joint(ref_sig, ref)
            self.joint_mean, self.joint_std = joint.mean(dim=0), _nonzero(joint.std(dim=0))
            self.joint_loda = LODA(c.n_projections, c.n_bins, c.seed).fit((joint - self.joint_mean) / self.joint_std)
        if c.second_opinion is not None:
            ref_main = self._main_statistic(ref_sig, ref, self.reference.log_p(ref))
            self.main_reference = ReferenceTails(ref_main[:, None], torch.tensor([False]))
        cal_stat, _ = self.statistic(cal_sig)
        self.calibration = ConformalCalibration(c.alpha).fit(cal_stat)
        self.fit_decisions(cal_sig.logits, cal_y if separate else y[seeded_permutation(n, c.seed)[:len(cal_stat)]],
                           cal_stat)  # prediction sets and the selective gate (detectors.decisions)
        self.model_fingerprint = model_fingerprint(self.model)
        n_right = int((sig.classes[:, 0] == y).sum())
        if separate and cal_y is not None:
            n_right += int((cal_sig.classes[:, 0] == torch.as_tensor(cal_y).long().cpu()).sum())
        n_all = n + (len(cal_stat) if separate else 0)
        self.evaluation = None  # a new fitted state: no evaluation measured it yet
        self.fit_stats = CompositeFitStats(
            n_samples=n_all, n_correct=n_right, model_accuracy=n_right / n_all, n_fit=len(fit_idx),
            n_reference=n_ref, n_calibration=len(cal_stat), threshold=self.threshold,
            seconds=round(time.perf_counter() - t0, 3))
        return self

    # ------------------------------------------------------------------ score

    def score(self, x: torch.Tensor, *, return_csm: bool = False, batch_size: int | None = None,
              timings: dict[str, float] | None = None) -> Scores:
        """Score a batch x [B, *input_shape]; see :class:`detectors.base.Scores`."""
        self._check_fitted()
        x = torch.as_tensor(x)
        step = batch_size or max(len(x), 1)
        return Scores.cat([self.score_signals(self.signals(x[start:start + step], return_csm, timings), timings)
                              for start in range(0, len(x), step)])

    def score_signals(self, s: Signals, timings: dict[str, float] | None = None) -> Scores:
        """:meth:`score` from precomputed signals."""
        t0 = time.perf_counter()
        stat, log_p = self.statistic(s)
        trust = self.calibration.trust(stat)
        if timings is not None:
            timings["score"] = timings.get("score", 0.0) + time.perf_counter() - t0
        probs = torch.softmax(s.logits.float(), dim=1)
        return self.decide(Scores(label=s.classes[:, 0], confidence=probs.gather(1, s.classes[:, :1])[:, 0],
                                  top_classes=s.classes, score=stat, trust=trust, flagged=trust < self.alpha,
                                  features=log_p.float(), csm=s.csm), s.logits)

    # ------------------------------------------------------------------ persistence

    def _metadata_extra(self) -> dict:
        return {"components": self.component_names}

    def state_dict(self) -> dict[str, torch.Tensor]:
        c, state = self.config, {}
        if c.use_gga:
            state.update({f"gga.loda.{k}": v for k, v in self.gga_loda.state_dict().items()})
            state.update({"gga.mean": self.gga_mean, "gga.std": self.gga_std})
        for name, g in self.gaussians.items():
            state.update(g.state_dict(f"layer.{name}."))
        state.update(self.reference.state_dict("reference."))
        state.update({"reference.center": self.center, "reference.scale": self.scale})
        if c.combine == "loda":
            state.update({f"joint.loda.{k}": v for k, v in self.joint_loda.state_dict().items()})
            state.update({"joint.mean": self.joint_mean, "joint.std": self.joint_std})
        if c.second_opinion is not None:
            state.update(self.main_reference.state_dict("guard.reference."))
            state.update(second_opinion_state(self.second))
        state.update(self.calibration.state_dict())
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Self:
        """Restore fitted state; every tensor is checked (present, shaped, finite) first."""
        c = self.config
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()
               and not k.endswith("log_density")]
        if bad:
            raise ValueError(f"detector state has NaN or inf in {bad}")
        try:
            if c.use_gga:
                self.gga_loda = LODA(c.n_projections, c.n_bins, c.seed).load_state_dict(_sub(state, "gga.loda."))
                self.gga_mean, self.gga_std = state["gga.mean"].double(), state["gga.std"].double()
            self.gaussians = {n: TiedGaussian.from_state_dict(state, f"layer.{n}.") for n in c.layers or ()}
            self.reference = ReferenceTails.from_state_dict(state, "reference.")
            self.center, self.scale = state["reference.center"].double(), state["reference.scale"].double()
            if c.combine == "loda":
                self.joint_loda = LODA(c.n_projections, c.n_bins, c.seed).load_state_dict(_sub(state, "joint.loda."))
                self.joint_mean, self.joint_std = state["joint.mean"].double(), state["joint.std"].double()
            if c.second_opinion is not None:
                self.main_reference = ReferenceTails.from_state_dict(state, "guard.reference.")
                weights = second_opinion_weights(state)
                if not weights:
                    raise ValueError(f"detector state is missing the {c.second_opinion} second opinion's weights")
                try:  # into the module the constructor built: the saved weights win over the packaged ones
                    self.second.load_state_dict(weights)
                except RuntimeError as exc:
                    raise ValueError(f"the saved weights do not fit the {c.second_opinion} second opinion: {exc}") \
                        from exc
        except KeyError as exc:
            raise ValueError(f"detector state is missing {exc}") from exc
        k = len(self.component_names)
        if self.reference.sorted.shape[1] != k or self.center.shape != (k,) or self.scale.shape != (k,):
            raise ValueError(f"detector state has {self.reference.sorted.shape[1]} components, the config "
                             f"declares {k}")
        self.calibration = ConformalCalibration(c.alpha).load_state_dict(state)
        return self


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def _nonzero(std: torch.Tensor) -> torch.Tensor:
    return torch.where(std > 0, std, torch.ones_like(std))


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

"""The GGA detector: CSM features → LODA → conformal trust (Schwinn et al., UAI 2021).

fit: CSM features of the correctly classified samples only; a seeded split into a LODA
part and a calibration part; features are standardised with the LODA part's mean and
std (LODA mixes features in its projections, so their scales matter).
score: per sample the predicted class, its softmax confidence, the top-N classes, the
raw LODA score (higher = more anomalous), trust = conformal p-value against the
calibration scores, and ``flagged = trust < alpha``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Self

import torch

from detectors.autotune import check_strategy, strategy_for
from detectors.base import DetectorBase, Scores, model_device
from detectors.calibration import ConformalCalibration, min_calibration_size
from detectors.csm import CHANNEL_REDUCTIONS, cosine_similarity_maps
from detectors.features import feature_names, gga_features
from detectors.fingerprint import model_fingerprint
from detectors.fitting import (
    BatchRunner,
    Progress,
    check_xy,
    fit_total,
    map_batches,
    seeded_permutation,
    shifted_progress,
)
from detectors.loda import LODA
from detectors.storage import FingerprintMismatchError

KIND = "gga"
FORMAT_VERSION = 2  # 2: cancellation-free cotangents (features differ from version 1)
GGAScores = Scores  # the name the GGA results had before every detector shared them
__all__ = ["FingerprintMismatchError", "FitStats", "GGAConfig", "GGADetector", "GGAScores"]


@dataclass(frozen=True)
class GGAConfig:
    top_n: int | None = None
    alpha: float = 0.05
    n_bins: int = 100
    n_projections: int = 100
    seed: int = 0
    channel_reduce: str | None = None
    rescale_logits: bool = False
    include_softmax: bool = False
    calibration_fraction: float = 0.3
    standardize: bool = True
    floor_count: float = 0.01

    def __post_init__(self) -> None:
        if self.top_n is not None and (not isinstance(self.top_n, int) or self.top_n < 3):
            raise ValueError(f"top_n must be None (all classes) or an integer >= 3, got {self.top_n!r}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), e.g. 0.05; got {self.alpha!r}")
        if not 0 < self.calibration_fraction < 1:
            raise ValueError(
                f"calibration_fraction must be in (0, 1), e.g. 0.3; got {self.calibration_fraction!r}"
            )
        if self.channel_reduce not in CHANNEL_REDUCTIONS:
            raise ValueError(f"channel_reduce must be one of {CHANNEL_REDUCTIONS}, got {self.channel_reduce!r}")
        LODA(self.n_projections, self.n_bins, self.seed, self.floor_count)  # validates those


@dataclass
class FitStats:
    n_samples: int
    n_correct: int
    model_accuracy: float
    n_fit: int
    n_calibration: int
    threshold: float
    seconds: float


class GGADetector(DetectorBase):
    """Geometric Gradient Analysis detector for a fixed classifier.

    ``GGADetector(model, top_n=None, alpha=0.05, n_bins=100, n_projections=100, seed=0,
    channel_reduce=None, rescale_logits=False, include_softmax=False,
    calibration_fraction=0.3, standardize=True, strategy="auto")``
    """

    kind = KIND
    format_version = FORMAT_VERSION
    stats_type = FitStats

    def __init__(self, model: torch.nn.Module, top_n: int | None = None, alpha: float = 0.05,
                 n_bins: int = 100, n_projections: int = 100, seed: int = 0, *,
                 channel_reduce: str | None = None, rescale_logits: bool = False,
                 include_softmax: bool = False, calibration_fraction: float = 0.3,
                 standardize: bool = True, floor_count: float = 0.01, strategy: str = "auto") -> None:
        self.strategy = check_strategy(strategy)
        self.config = GGAConfig(top_n, alpha, n_bins, n_projections, seed, channel_reduce,
                                rescale_logits, include_softmax, calibration_fraction, standardize,
                                floor_count)
        self._init_common(model)
        self.loda: LODA | None = None
        self.feature_mean: torch.Tensor | None = None
        self.feature_std: torch.Tensor | None = None
        self.calibration = ConformalCalibration(alpha)

    @property
    def fitted(self) -> bool:
        return self.loda is not None

    @property
    def top_n(self) -> int | None:
        return self.config.top_n

    @property
    def components(self) -> list[str]:
        return ["gga" + ("+softmax" if self.config.include_softmax else "")]

    @property
    def calibration_scores(self) -> torch.Tensor | None:
        """The sorted LODA scores of the calibration part (float64 [n]); None before fit."""
        return self.calibration.scores

    def csm(self, x: torch.Tensor, timings: dict[str, float] | None = None):
        c = self.config
        return cosine_similarity_maps(self.model, x.to(model_device(self.model)), c.top_n,
                                      channel_reduce=c.channel_reduce, rescale_logits=c.rescale_logits,
                                      strategy=strategy_for(self.strategy, len(x)), timings=timings)

    def features(self, x: torch.Tensor, batch_size: int = 256, progress: Progress | None = None,
                 run: BatchRunner | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """GGA features [B, d] and predicted labels [B] for x, computed in batches (CPU tensors).

        ``run(fn)``, when given, runs each batch's pass ``fn()`` (e.g. on a serving worker
        thread, between its batches) and returns its result.
        """

        feats, pred, _ = self._features_logits(x, batch_size, progress, run)
        return feats, pred

    def _features_logits(self, x, batch_size: int = 256, progress: Progress | None = None,
                         run: BatchRunner | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`features` plus the logits [B, C] of the same pass."""

        def one(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            res = self.csm(xb)
            return (gga_features(res, self.config.include_softmax).cpu(), res.classes[:, 0].cpu(),
                    res.logits.detach().cpu())

        parts = map_batches(one, x, batch_size, progress=progress, run=run)
        return tuple(torch.cat([p[i] for p in parts]) for i in range(3))

    def fit(self, x: torch.Tensor, y: torch.Tensor, *, calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
            progress: Progress | None = None, run: BatchRunner | None = None, batch_size: int = 256) -> Self:
        """Fit on labelled in-distribution data x [n, *input_shape], y [n]; returns self.

        ``run``: how each batch's model pass is run (see :meth:`features`). Only correctly
        classified samples are used. Without ``calibration`` they are split
        (seeded) into a LODA part and a calibration part of ``calibration_fraction``. With
        ``calibration=(x_cal, y_cal)``, LODA is fitted on all of x and the calibration
        scores come from x_cal: pass data the model was not trained on there, so that
        the calibration scores are exchangeable with those of fresh inputs (a model is
        more confident on its own training data). ``progress(done, total)`` is called
        after each batch. Raises ValueError when fewer than 20 samples are correctly
        classified or either part would be too small.
        """
        t0 = time.perf_counter()
        total = fit_total(x, calibration)
        good, n_samples, _ = self._correct_features(x, y, batch_size, shifted_progress(progress, 0, total), run)
        cal_all = None  # (features, logits, labels, correct) of every calibration sample, for the decisions
        n_correct = len(good)
        if calibration is None:
            perm = seeded_permutation(n_correct, self.config.seed)
            n_cal = max(1, round(n_correct * self.config.calibration_fraction))
            n_fit = n_correct - n_cal
            fit_part, cal_part = good[perm[:n_fit]], good[perm[n_fit:]]
        else:
            cal_part, n_cal_samples, cal_all = self._correct_features(
                *calibration, batch_size, shifted_progress(progress, len(x), total), run)
            fit_part, n_fit, n_cal = good, n_correct, len(cal_part)
            n_samples += n_cal_samples
            n_correct += n_cal
        if n_fit < 10:
            raise ValueError(f"only {n_fit} samples left to fit LODA; pass more data")
        need = min_calibration_size(self.config.alpha)
        if n_cal < need:
            raise ValueError(f"{n_cal} calibration samples can never flag at alpha={self.config.alpha}: "
                             f"pass at least {need} correctly classified held-out samples")
        if self.config.standardize:
            mean, std = fit_part.mean(dim=0), fit_part.std(dim=0)
            std = torch.where(std > 0, std, torch.ones_like(std))
        else:
            mean = torch.zeros(good.shape[1], dtype=torch.float64)
            std = torch.ones(good.shape[1], dtype=torch.float64)
        c = self.config
        loda = LODA(c.n_projections, c.n_bins, c.seed, c.floor_count).fit((fit_part - mean) / std)
        self.loda, self.feature_mean, self.feature_std = loda, mean, std
        self.calibration = ConformalCalibration(c.alpha).fit(loda.score((cal_part - mean) / std))
        # prediction sets and the gate need every calibration sample, misclassified ones included: only with
        # separate calibration data (the split of x holds correctly classified samples alone)
        self.decisions = None
        if cal_all is not None:
            feats, logits, y_cal, correct = cal_all
            self.fit_decisions(logits, y_cal, loda.score((feats - mean) / std), correct)
        self.model_fingerprint = model_fingerprint(self.model)
        self.evaluation = None  # a new fitted state: no evaluation measured it yet
        self.fit_stats = FitStats(
            n_samples=n_samples, n_correct=n_correct, model_accuracy=n_correct / n_samples, n_fit=n_fit,
            n_calibration=n_cal, threshold=self.threshold, seconds=round(time.perf_counter() - t0, 3),
        )
        return self

    def _correct_features(self, x, y, batch_size, progress, run=None) -> tuple[torch.Tensor, int, tuple]:
        """Features (float64) of the correctly classified samples of (x, y), len(x), and (features, logits,
        labels, correct) of every sample."""
        x, y = check_xy(x, y)
        feats, pred, logits = self._features_logits(x, batch_size, progress, run=run)
        correct = pred == y
        n_correct = int(correct.sum())
        if n_correct < 20:
            raise ValueError(f"only {n_correct} of {len(y)} samples are classified correctly; "
                             "GGA needs at least 20 correctly classified samples to fit")
        return feats[correct].double(), len(y), (feats.double(), logits, y, correct)

    def score_features(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LODA score and trust for precomputed features [B, d] (float64 CPU tensors)."""
        self._check_fitted()
        z = (feats.double().cpu() - self.feature_mean) / self.feature_std
        s = self.loda.score(z)
        return s, self.calibration.trust(s)

    def score(self, x: torch.Tensor, *, return_csm: bool = False, batch_size: int | None = None,
              timings: dict[str, float] | None = None) -> Scores:
        """Score a batch x [B, *input_shape]; see :class:`detectors.base.Scores`.

        ``timings``, when given, accumulates seconds per stage: forward, gradients,
        features, score.
        """
        self._check_fitted()
        x = torch.as_tensor(x)
        parts = []
        step = batch_size or max(len(x), 1)
        for start in range(0, len(x), step):
            res = self.csm(x[start:start + step], timings)
            t0 = time.perf_counter()
            feats = gga_features(res, self.config.include_softmax).cpu()
            t1 = time.perf_counter()
            s, trust = self.score_features(feats)
            if timings is not None:
                timings["features"] = timings.get("features", 0.0) + t1 - t0
                timings["score"] = timings.get("score", 0.0) + time.perf_counter() - t1
            probs = torch.softmax(res.logits.float(), dim=1).cpu()
            classes = res.classes.cpu()
            parts.append(self.decide(Scores(
                label=classes[:, 0], confidence=probs.gather(1, classes[:, :1])[:, 0], top_classes=classes,
                score=s, trust=trust, flagged=trust < self.config.alpha, features=feats,
                csm=res.csm.cpu() if return_csm else None,
            ), res.logits))
        return Scores.cat(parts)

    # persistence -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fitted state: LODA (``loda.*``), feature standardisation and calibration scores."""
        self._check_fitted()
        tensors = {f"loda.{k}": v for k, v in self.loda.state_dict().items()}
        tensors.update(feature_mean=self.feature_mean, feature_std=self.feature_std,
                       calibration_scores=self.calibration.scores)
        return tensors

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Self:
        """Restore :meth:`state_dict`; checks shapes against the config and finiteness."""
        c = self.config
        try:
            loda = LODA(c.n_projections, c.n_bins, c.seed, c.floor_count).load_state_dict(
                {k[5:]: v for k, v in state.items() if k.startswith("loda.")})
            mean, std = state["feature_mean"].double(), state["feature_std"].double()
            cal = state["calibration_scores"].double()
        except KeyError as exc:
            raise ValueError(f"GGA state is missing {exc}") from exc
        d = len(feature_names(c.include_softmax))
        if mean.shape != (d,) or std.shape != (d,) or loda.projections.shape[1] != d:
            raise ValueError(f"GGA state does not hold {d} features (mean {tuple(mean.shape)}, "
                             f"projections {tuple(loda.projections.shape)})")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("GGA state has NaN, inf or a zero scale")
        calibration = ConformalCalibration(c.alpha).fit(cal)  # refuses NaN and a set too small to flag
        self.loda, self.feature_mean, self.feature_std = loda, mean, std
        self.calibration = calibration
        return self

    def _metadata_extra(self) -> dict:
        return {"loda": self.loda.config(), "feature_names": list(feature_names(self.config.include_softmax))}

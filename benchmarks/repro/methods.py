"""Methods of the reproduction: the baselines (MSP, ODIN, energy, Mahalanobis), GGA
variants fitted from cached CSMs (the real ``GGADetector.fit``), and the pre-declared
test variants with their descriptions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from benchmarks.repro.csms import CSMStore
from benchmarks.repro.setup import Log, Setup, Split
from detectors.baselines import MSP, ODIN, Energy, Mahalanobis
from detectors.gga import GGADetector

BASELINE_TEXT = {
    "msp": "max softmax probability (Hendrycks & Gimpel 2017), the paper's 'Baseline'",
    "odin": "ODIN T=1000, eps=0.0014 in [0,1] pixel units, clipped to [0,1] (Liang et al. 2018)",
    "energy": "energy score, T=1 (Liu et al. 2020)",
    "mahalanobis": "Mahalanobis on penultimate features, class means + tied covariance fitted on the fit "
                   "set, single layer, no input pre-processing, no adversarial tuning (the paper's 'Maha' "
                   "uses Lee et al.'s tuned version)",
    "neg_s1_mean": "-mean(S1) of the plain all-class CSM as the score, no fitting (paper Figure 2 feature)",
}


@dataclass(frozen=True)
class GGAVariant:
    """A GGADetector configuration on cached CSMs (family = how the gradients were taken)."""

    family: str = "plain"
    top_n: int | None = None
    channel: str | None = None
    softmax: bool = False
    margin: bool = False  # experimental: logit margin log(p/(1-p)) as a feature (not a GGADetector option)
    bins: int = 100
    standardize: bool = True
    # "train": the fit subset of the model's training data; "heldout": held-out images (MNIST: the model's
    # validation part); "train_matched": the first len(heldout) training fit images (same size as heldout)
    fit_on: str = "train"
    calibration_fraction: float = 0.3

    def label(self) -> str:
        parts = [self.family, f"top{self.top_n or 'C'}", f"bins{self.bins}"]
        if self.channel:
            parts.append("chmax")
        if self.softmax:
            parts.append("softmax")
        if self.margin:
            parts.append("margin")
        if not self.standardize:
            parts.append("nostd")
        parts.append(f"fit-{self.fit_on}")
        if self.calibration_fraction != 0.3:
            parts.append(f"cal{self.calibration_fraction}")
        return "/".join(parts)

    def detector_kwargs(self) -> dict:
        return dict(top_n=self.top_n, n_bins=self.bins, channel_reduce=self.channel,
                    rescale_logits=self.family == "rescale", include_softmax=self.softmax,
                    calibration_fraction=self.calibration_fraction, standardize=self.standardize)

    def as_dict(self) -> dict:
        return {"family": self.family, "top_n": self.top_n, "channel_reduce": self.channel,
                "include_softmax": self.softmax, "include_margin": self.margin, "n_bins": self.bins,
                "standardize": self.standardize,
                "fit_on": self.fit_on, "calibration_fraction": self.calibration_fraction,
                "rescale_logits": self.family == "rescale",
                "cotangents": self.family if self.family in ("naive", "precise") else "library"}


class _CachedGGA(GGADetector):
    """The real ``GGADetector.fit`` (correct samples only, seeded fit/calibration split,
    standardisation, LODA, conformal calibration) on precomputed features."""

    def __init__(self, model: nn.Module, feats: torch.Tensor, pred: torch.Tensor, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self._cached = (feats.float(), pred)

    def _features_logits(self, x, batch_size=256, progress=None, run=None):  # noqa: ARG002 - the parent's signature
        feats, pred = self._cached
        # no logits are cached: fit uses them only for the decisions of a separate calibration set, never given here
        return feats, pred, torch.empty(len(pred), 0)


class GGABank:
    def __init__(self, setup: Setup, store: CSMStore, seed: int) -> None:
        self.setup, self.store, self.seed = setup, store, seed
        self._dets: dict[GGAVariant, GGADetector] = {}

    def detector(self, v: GGAVariant) -> GGADetector:
        if v not in self._dets:
            key = "heldout" if v.fit_on == "heldout" else "fit"
            y = self.setup.heldout_y if v.fit_on == "heldout" else self.setup.fit_y
            feats = self.store.features(v.family, key, v.top_n, v.channel, v.softmax, v.margin)
            pred = self.store.pred(v.family, key)
            if v.fit_on == "train_matched":
                n = len(self.setup.heldout_y)
                feats, pred, y = feats[:n], pred[:n], y[:n]
            det = _CachedGGA(self.setup.model, feats, pred, seed=self.seed, **v.detector_kwargs())
            det.fit(torch.zeros(len(y), 1), y)
            self._dets[v] = det
        return self._dets[v]

    def scores(self, v: GGAVariant, split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        det = self.detector(v)
        f = self.store.features(v.family, f"{split}/{name}", v.top_n, v.channel, v.softmax, v.margin)
        if len(f) == 0:
            return np.empty(0), np.empty(0)
        s, trust = det.score_features(f)
        return s.numpy(), trust.numpy()



def fit_baselines(setup: Setup) -> dict:
    model = setup.model
    maha = Mahalanobis(model, lambda m, x: m.penultimate(x)).fit(setup.fit_x, setup.fit_y)
    return {
        "msp": MSP(model),
        "odin": ODIN(model, temperature=1000.0, epsilon=0.0014, clip=(0.0, 1.0)),
        "energy": Energy(model),
        "mahalanobis": maha,
    }


def score_baselines(baselines: dict, splits: dict[str, Split], log: Log) -> dict:
    """{method: {split: {set: scores}}}."""
    scores: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for mname, det in baselines.items():
        scores[mname] = {}
        for sp in splits.values():
            scores[mname][sp.name] = {k: (det.anomaly_score(v).numpy() if len(v) else np.empty(0))
                                      for k, v in sp.sets.items()}
        log.info(f"{mname} scored")
    return scores


def declared_variants(setup: Setup, paper_variant: GGAVariant, selected: GGAVariant, top_ns: list,
                      other_bins: int, has_heldout: bool) -> dict[str, tuple[GGAVariant, str]]:
    """The pre-declared GGA variants of the test tables (name -> (variant, description))."""
    variants: dict[str, tuple[GGAVariant, str]] = {
        "gga": (paper_variant, "paper configuration: all classes, 10 features, LODA 100 projections x "
                               f"{setup.paper_bins} bins, standardised, fit on training data"),
    }
    if "rescale" in setup.families:
        variants["gga_rescale"] = (GGAVariant(**{**paper_variant.__dict__, "family": "rescale"}),
                                   "logits rescaled to max |z| = 10 (official code default)")
    if setup.channel_variants:
        variants["gga_chmax"] = (GGAVariant(**{**paper_variant.__dict__, "channel": "max"}),
                                 "channel max of the sign maps (official code)")
        if "rescale" in setup.families:
            variants["gga_official"] = (GGAVariant(**{**paper_variant.__dict__, "family": "rescale", "channel": "max"}),
                                        "rescale + channel max: the official code's defaults")
    variants["gga_softmax"] = (GGAVariant(**{**paper_variant.__dict__, "softmax": True}),
                               "11th feature: max softmax probability")
    variants["gga_margin"] = (GGAVariant(**{**paper_variant.__dict__, "margin": True}),
                              "experimental 11th feature: logit margin log(p_max/(1-p_max)) in float64")
    variants[f"gga_bins{other_bins}"] = (GGAVariant(**{**paper_variant.__dict__, "bins": other_bins}),
                                         f"LODA with {other_bins} bins")
    variants["gga_nostd"] = (GGAVariant(**{**paper_variant.__dict__, "standardize": False}),
                             "features not standardised before LODA")
    if has_heldout:
        variants["gga_heldout"] = (GGAVariant(**{**paper_variant.__dict__, "fit_on": "heldout"}),
                                   f"fitted on {len(setup.heldout_x)} held-out (validation-part) images, not "
                                   "training images")
        variants["gga_train_matched"] = (GGAVariant(**{**paper_variant.__dict__, "fit_on": "train_matched"}),
                                         f"fitted on {len(setup.heldout_x)} training images (the size of the "
                                         "held-out fit set)")
    for tn in top_ns[1:]:
        variants[f"gga_top{tn}"] = (GGAVariant(**{**paper_variant.__dict__, "top_n": tn}), f"partial CSM, top-{tn}")
    if "naive" in setup.families:
        variants["gga_naive"] = (GGAVariant(**{**paper_variant.__dict__, "family": "naive"}),
                                 "float32 cotangents as in the official code / the library before the fix")
    if "precise" in setup.families:
        variants["gga_precise"] = (GGAVariant(**{**paper_variant.__dict__, "family": "precise"}),
                                   "cancellation-free cotangents (cotangents='exact')")
    variants["gga_selected"] = (selected, f"chosen on validation: {selected.label()}")
    return variants

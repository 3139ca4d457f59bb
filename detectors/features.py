"""The ten GGA features of a CSM (Schwinn et al. 2021, section 4.2.3).

With the predicted class at index 0 of the CSM, S = {c_ab : a < b} splits into
S1 (pairs not touching the predicted class) and S2 (pairs (0, b)). For each of S1 and
S2, in this order: mean, max, min, standard deviation (population, ddof = 0) and
energy, defined here as the mean of squares, (1/|S|) Σ c², so that it stays
comparable across N. Optionally the max softmax probability is an 11th feature.
"""

from __future__ import annotations

import torch

from detectors.csm import CSMResult

FEATURE_NAMES = tuple(
    f"{s}_{stat}" for s in ("s1", "s2") for stat in ("mean", "max", "min", "std", "energy")
)


def _stats(values: torch.Tensor) -> torch.Tensor:
    """values [B, K] → [B, 5]: mean, max, min, std (ddof 0), mean of squares."""
    mean = values.mean(dim=1)
    return torch.stack(
        [
            mean,
            values.amax(dim=1),
            values.amin(dim=1),
            (values - mean[:, None]).pow(2).mean(dim=1).sqrt(),
            values.pow(2).mean(dim=1),
        ],
        dim=1,
    )


def csm_features(csm: torch.Tensor) -> torch.Tensor:
    """``csm`` [B, N, N] (predicted class first, N >= 3) → features [B, 10]."""
    n = csm.shape[-1]
    if n < 3:
        raise ValueError(f"the CSM must be at least 3x3 (S1 would be empty), got {n}x{n}")
    rows, cols = torch.triu_indices(n, n, offset=1, device=csm.device)
    s1 = rows > 0
    upper = csm[:, rows, cols]
    return torch.cat([_stats(upper[:, s1]), _stats(upper[:, ~s1])], dim=1)


def gga_features(result: CSMResult, include_softmax: bool = False) -> torch.Tensor:
    """Features of a :class:`CSMResult`: [B, 10], or [B, 11] with the max softmax last."""
    feats = csm_features(result.csm)
    if include_softmax:
        msp = torch.softmax(result.logits.float(), dim=1).amax(dim=1)
        feats = torch.cat([feats, msp[:, None].to(feats.device)], dim=1)
    return feats


def feature_names(include_softmax: bool = False) -> tuple[str, ...]:
    return FEATURE_NAMES + (("softmax_max",) if include_softmax else ())

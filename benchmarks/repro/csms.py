"""CSMs of the reproduction: every (gradient family, set) computed once, all through
``detectors.csm.cosine_similarity_maps`` (public options only).

A *family* is how the gradients are taken (:data:`FAMILY_TEXT`). For each family the
all-class CSM of every input is kept (and, for RGB inputs, the channel-max CSM of the same
sign maps); every top-N view, feature set and detector variant is derived from them (the
leading N×N block of the all-class CSM is the top-N CSM exactly).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from benchmarks.repro.setup import Log, _chunks
from detectors.csm import cosine_similarity_maps
from detectors.features import csm_features
from detectors.signals import logit_margin

FAMILY_TEXT = {
    "plain": "library default (detectors.csm cosine_similarity_maps, no rescaling)",
    "rescale": "logits rescaled to max |z| = 10 before the loss, differentiably (rescale_logits=True, the "
               "official code's default)",
    "naive": "float32 cotangents p − e_i computed naively (cosine_similarity_maps(cotangents='naive')), as the "
             "official code (F.cross_entropy backward) and this library before its cancellation fix: p_k − 1 "
             "rounds to 0 once softmax saturates",
    "precise": "cancellation-free float64 cotangents (cotangents='exact'; the same as plain when the library "
               "default is the exact variant)",
}


def library_cotangents_precise() -> bool:
    """Whether the library's default CSM keeps the −(1 − p_k̂) term when the float32 softmax saturates.

    On z = x with x = (40, 0, −5) (p_0 == 1.0 in float32) the exact predicted-class saliency is
    (−1, 1, 1) and the naive one (0, 1, 1): c_01 is −1/3 with the fix and exactly 0 without it.
    """
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    res = cosine_similarity_maps(model, torch.tensor([[40.0, 0.0, -5.0]]), strategy="loop")
    return bool(res.csm[0, 0, 1] != 0)


def default_families() -> tuple[str, ...]:
    """plain + rescale, and the other side of the cotangent fix (naive if the library has it, else precise)."""
    return ("plain", "rescale", "naive" if library_cotangents_precise() else "precise")


def family_csms(model: nn.Module, x: torch.Tensor, family: str, channel_variants: bool) -> dict[str, torch.Tensor]:
    """Full (all-class) CSMs of one gradient family from ONE set of backward passes.

    family: "plain" (the library default), "rescale" (``rescale_logits=True``), "naive"
    (``cotangents="naive"``), "precise" (``cotangents="exact"``), all through
    ``cosine_similarity_maps(model, x, None, strategy="loop", ...)``; with
    ``channel_variants`` the channel-max CSM of the same sign maps too
    (``return_channel_max=True``). Returns {"csm", "csm_chmax" (optional), "classes", "logits"}.
    """
    if family not in FAMILY_TEXT:
        raise ValueError(f"family must be one of {tuple(FAMILY_TEXT)}, got {family!r}")
    res = cosine_similarity_maps(model, x, None, rescale_logits=family == "rescale",
                                 cotangents="naive" if family == "naive" else "exact", strategy="loop",
                                 return_channel_max=channel_variants)
    out = {"csm": res.csm, "classes": res.classes, "logits": res.logits}
    if channel_variants:
        out["csm_chmax"] = res.csm_channel_max
    return out


class CSMStore:
    """CSMs of every (family, set), computed once; features for any (top-N, channel, softmax) view."""

    def __init__(self, model: nn.Module, channel_variants: bool, batch: int, log: Log) -> None:
        self.model, self.channel_variants, self.batch, self.log = model, channel_variants, batch, log
        self.data: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self.seconds: dict[str, float] = {}

    def compute(self, family: str, key: str, x: torch.Tensor) -> None:
        if (family, key) in self.data:
            return
        t0 = time.perf_counter()
        parts = []
        for s in _chunks(len(x), self.batch):
            parts.append(family_csms(self.model, x[s], family, self.channel_variants))
            self.log.bar(f"CSM {family} {key}", s.stop, len(x))
        if parts:
            self.data[(family, key)] = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        else:
            c = 10
            self.data[(family, key)] = {"csm": torch.empty(0, c, c), "csm_chmax": torch.empty(0, c, c),
                                        "classes": torch.empty(0, c, dtype=torch.long), "logits": torch.empty(0, c)}
        self.seconds[family] = self.seconds.get(family, 0.0) + time.perf_counter() - t0

    def features(self, family: str, key: str, top_n: int | None = None, channel: str | None = None,
                 softmax: bool = False, margin: bool = False) -> torch.Tensor:
        d = self.data[(family, key)]
        csm = d["csm_chmax"] if channel == "max" else d["csm"]
        n = csm.shape[1] if top_n is None else top_n
        f = csm_features(csm[:, :n, :n]) if len(csm) else torch.empty(0, 10)
        if softmax:
            f = torch.cat([f, torch.softmax(d["logits"].float(), dim=1).amax(dim=1, keepdim=True)], dim=1)
        if margin:
            f = torch.cat([f, logit_margin(d["logits"])[:, None].to(f.dtype)], dim=1)
        return f.double()

    def pred(self, family: str, key: str) -> torch.Tensor:
        return self.data[(family, key)]["classes"][:, 0]


"""A differentiable copy of a composite detector's statistic (the white-box attacker's view).

Every read of detector state in the attack suite happens in this file (the detector's public
attributes: ``model``, ``config``, ``component_names``, ``weights``, ``reference``,
``scale``, ``gaussians``, ``gga_loda``, ``gga_mean``/``gga_std``, ``calibration``,
``threshold``, ``alpha``, and its ``signals``/``component_scores``/``score`` methods).

The served statistic (:mod:`detectors.composite`) for an input x with logits z:

1. component scores s_k(x): ``margin`` = −(z_top − logsumexp_{j≠top} z_j); ``energy`` =
   −logsumexp z; ``layer:<l>`` = min_c (f_l − μ_c)ᵀ P (f_l − μ_c) over the layer's channel
   means f_l; ``gga`` = LODA over the standardised CSM features;
2. a log p-value per component against the m sorted reference scores r_1..r_m:
   p_up(s) = (1 + #{r_i ≥ s}) / (m + 1) up to r_(m), beyond it exp(−(s − r_(m))/β_up)/(m + 1);
   p_down mirrors it; two-sided components take min(1, 2 min(p_up, p_down));
3. the truncated Fisher statistic S = −2 Σ_k w_k ℓ_k with ℓ_margin = log p_margin and
   ℓ_k = min(0, log p_k − log τ) for the others (``combine="min"``: S = −min_k log p_k);
4. trust = (1 + #{calibration scores ≥ S}) / (n + 1); flagged when trust < alpha, i.e. S > threshold.

Here step 2's counts are smoothed: #{r_i ≥ s} becomes Σ_i σ((r_i − s)/T_k) and
#{r_i ≤ s} becomes Σ_i σ((s − r_i)/T_k) (plus half the number of exact ties r_i = s, which the
sigmoid counts as 1/2 and the served counts as 1: the limit T → 0 is then the served value),
with T_k = ``temperature`` × the component's reference IQR/1.349 (the detector's ``scale``); the
exponential tails are already smooth.
``temperature=0`` uses the exact counts (the served value, no gradient through the counts).
Everything else is the served arithmetic, in float64.

GGA's CSM features come from gradient signs (piecewise constant in x). ``gga``:

- ``"omit"``: the GGA component is left out of the statistic (its log p taken as 0, so under
  the truncated product it adds nothing); with the truncated Fisher combiner the surrogate
  statistic is then a lower bound of the served one, and the real detector judges;
- ``"exact"``: its served value, no gradient (for checking the surrogate against the detector);
- ``"bpda"``: the served value forward, and backward a smooth stand-in (straight-through,
  Athalye et al. 2018): the saliencies of a copy of the model with every ReLU a
  Softplus(β) (``smooth_beta``), sign(g) replaced by g itself (``sign="identity"``) or by
  tanh(g / (``sign_temperature`` · mean|g|)) (``sign="tanh"``), their CSM and ten features,
  and LODA's histogram log densities linearly interpolated between bin centres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from benchmarks.attacks import softplus_copy
from detectors.composite import CompositeDetector
from detectors.csm import _cotangents
from detectors.energy import energy_score
from detectors.features import csm_features
from detectors.signals import class_margin, logit_margin

GGA_MODES = ("omit", "exact", "bpda")
SIGNS = ("tanh", "identity")


@dataclass
class SurrogateOutput:
    """One pass: ``logits`` [B, C] (float32, with graph), ``layers`` {name: [B, D] float64 channel
    means, with graph}, ``components`` [B, K] scores, ``log_p`` [B, K] (smoothed), ``statistic`` [B]
    (smoothed, differentiable) and ``hard_statistic`` [B] (exact counts, no graph)."""

    logits: torch.Tensor
    layers: dict[str, torch.Tensor]
    components: torch.Tensor
    log_p: torch.Tensor
    statistic: torch.Tensor
    hard_statistic: torch.Tensor


class Surrogate:
    """``Surrogate(detector, temperature=0.05, gga="omit")``; ``surrogate(x) -> SurrogateOutput``."""

    def __init__(self, detector: CompositeDetector, *, temperature: float = 0.05, gga: str = "omit",
                 sign: str = "tanh", sign_temperature: float = 0.1, smooth_beta: float = 10.0) -> None:
        if not isinstance(detector, CompositeDetector):
            raise ValueError(f"the surrogate copies a CompositeDetector, got {type(detector).__name__}")
        if not detector.fitted:
            raise ValueError("the detector is not fitted")
        cfg = detector.config
        if cfg.combine not in ("fisher", "min"):
            raise ValueError(f"the surrogate supports the fisher and min combiners, the detector uses {cfg.combine!r}")
        if gga not in GGA_MODES:
            raise ValueError(f"gga must be one of {GGA_MODES}, got {gga!r}")
        if sign not in SIGNS:
            raise ValueError(f"sign must be one of {SIGNS}, got {sign!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        self.detector = detector
        self.model = detector.model
        self.names = list(detector.component_names)
        self.layer_names = list(cfg.layers or ())
        self.temperature = float(temperature)
        self.gga = gga if cfg.use_gga else "omit"
        self.sign, self.sign_temperature = sign, float(sign_temperature)
        self.weights = detector.weights
        ref = detector.reference
        self.ref = ref.sorted  # [m, K]
        self.beta_up, self.beta_down, self.two_sided = ref.beta_up, ref.beta_down, ref.two_sided
        self.spread = detector.scale  # [K] reference IQR / 1.349
        self.combine, self.truncation = cfg.combine, cfg.truncation
        self.keep = torch.tensor([n == "margin" for n in self.names])
        # the second opinion's guard (detectors.composite.CompositeDetector.guarded): the disagreement
        # (last component) is thresholded on its own beside the main statistic's reference p-value
        self.second = detector.second if cfg.second_opinion else None
        self.main = torch.tensor([n != "disagreement" for n in self.names])
        if self.second is not None:
            mref = detector.main_reference
            q = torch.quantile(mref.sorted[:, 0], torch.tensor([0.25, 0.75], dtype=torch.float64))
            iqr = (q[1] - q[0]) / 1.349
            self.main_tails = (mref.sorted, mref.beta_up, mref.beta_down, mref.two_sided,
                               torch.where(iqr > 0, iqr, torch.ones_like(iqr)).reshape(1))
            self.guard_share = cfg.guard_share
        self.gaussians = {name: detector.gaussians[name] for name in self.layer_names}
        self.calibration_scores = detector.calibration.scores
        self.threshold = float(detector.threshold)
        self.alpha = float(detector.alpha)
        self.top_n = cfg.top_n
        self._modules = dict(self.model.named_modules())
        self._smooth = softplus_copy(self.model, smooth_beta) if self.gga == "bpda" else None

    # --------------------------------------------------------------------------- pieces

    def flagged(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The served detector's verdict on x [B, ...]: (predicted labels [B], flagged [B] bool)."""
        with torch.no_grad():
            res = self.detector.score(x.detach())
        return res.label, res.flagged

    def served_statistic(self, x: torch.Tensor) -> torch.Tensor:
        """The detector's own statistic [B] (float64) for x."""
        with torch.no_grad():
            return self.detector.score(x.detach()).score

    def trust(self, statistic: torch.Tensor) -> torch.Tensor:
        """Conformal trust (1 + #{c_i >= S}) / (n + 1) of statistics [B] (exact, no gradient)."""
        return self.detector.calibration.trust(statistic.detach())

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out: dict[str, torch.Tensor] = {}
        handles = []
        for name in self.layer_names:
            def record(_m, _i, o, name=name):
                o = o[0] if isinstance(o, tuple | list) else o
                out[name] = (o.flatten(2).mean(dim=2) if o.dim() > 2 else o).double()
            handles.append(self._modules[name].register_forward_hook(record))
        try:
            z = self.model(x)
        finally:
            for h in handles:
                h.remove()
        return z, out

    def _gga_exact(self, x: torch.Tensor) -> torch.Tensor:
        sig = self.detector.signals(x.detach())
        return self.detector.component_scores(sig)[:, self.names.index("gga")]

    def _gga_smooth(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Smooth stand-in of the GGA score [B] (differentiable in x; needs x.requires_grad)."""
        n = z.shape[1] if self.top_n is None else min(self.top_n, z.shape[1])
        classes = torch.topk(z.detach(), n, dim=1).indices
        zs = self._smooth(x)
        cot = _cotangents(z.detach(), classes).to(zs.dtype)  # [N, B, C], as served
        grads = [torch.autograd.grad(zs, x, grad_outputs=cot[j], create_graph=True)[0] for j in range(n)]
        g = torch.stack(grads, dim=1).flatten(2)  # [B, N, D]
        if self.sign == "tanh":
            g = torch.tanh(g / (self.sign_temperature * g.abs().mean(dim=2, keepdim=True).clamp(min=1e-30)))
        csm = _cosine(g)
        feats = (csm_features(csm).double() - self.detector.gga_mean) / self.detector.gga_std
        return _loda_smooth(self.detector.gga_loda, feats)

    def components(self, x: torch.Tensor, target: torch.Tensor | None = None, exclude: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """logits [B, C], layer channel means, and component scores [B, K] (float64) of x.

        ``target`` [B] (optional): the margin component is taken for that class,
        −(z_t − logsumexp_{j≠t} z_j), instead of the predicted one (equal where t is predicted):
        the attacker's view of the margin the input will have once class t wins. ``exclude`` [B]:
        t is the most likely class other than exclude (e.g. the true label) at x."""
        z, layers = self._forward(x)
        if exclude is not None:
            target = z.detach().scatter(1, exclude[:, None], -torch.inf).argmax(dim=1)
        cols = []
        for name in self.names:
            if name == "disagreement":
                label = z.detach().argmax(dim=1) if target is None else target
                cols.append(-class_margin(self.second(x), label))
            elif name == "gga":
                if self.gga == "omit":
                    cols.append(torch.zeros(len(x), dtype=torch.float64))
                elif self.gga == "exact":
                    cols.append(self._gga_exact(x))
                else:
                    smooth = self._gga_smooth(x, z)
                    cols.append(self._gga_exact(x) + (smooth - smooth.detach()))  # exactly the served value forward
            elif name == "margin":
                cols.append(-logit_margin(z) if target is None else -class_margin(z, target))
            elif name == "energy":
                cols.append(energy_score(z))
            else:
                layer = name.split(":", 1)[1]
                cols.append(self.gaussians[layer].score(layers[layer]))
        return z, layers, torch.stack(cols, dim=1)

    def log_p(self, comp: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """Smoothed log p-values [B, K] of component scores [B, K] (see the module docstring)."""
        t = self.temperature if temperature is None else temperature
        out = _smooth_log_p(comp, (self.ref, self.beta_up, self.beta_down, self.two_sided, self.spread), t)
        if self.gga == "omit" and "gga" in self.names:
            out = out.clone()
            out[:, self.names.index("gga")] = 0.0
        return out

    def combine_log_p(self, log_p: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """The served combiner of log p-values [B, K] -> statistic [B] (with the second opinion's guard
        where the detector has one; ``temperature`` smooths the main statistic's p-value there)."""
        main_log_p = log_p[:, self.main]
        if self.combine == "min":
            main = -main_log_p.amin(dim=1)
        else:
            if self.truncation < 1:
                main_log_p = torch.where(self.keep[self.main], main_log_p,
                                         torch.clamp(main_log_p - math.log(self.truncation), max=0.0))
            main = -2.0 * (main_log_p * self.weights[self.main]).sum(dim=1)
        if self.second is None:
            return main
        t = self.temperature if temperature is None else temperature
        lp_main = _smooth_log_p(main[:, None], self.main_tails, t)[:, 0]
        w = self.guard_share
        return torch.maximum(math.log(1.0 - w) - lp_main, math.log(w) - log_p[:, -1])

    def __call__(self, x: torch.Tensor, temperature: float | None = None, *, target: torch.Tensor | None = None,
                 exclude: torch.Tensor | None = None) -> SurrogateOutput:
        """The surrogate on x [B, ...]. ``target`` [B]: score the margin (and the second opinion's
        disagreement) for that class (see :meth:`components`); ``exclude`` [B] (e.g. the true labels):
        target the most likely class other than it at x. ``hard_statistic`` is always the served
        statistic (predicted class)."""
        z, layers, comp = self.components(x, target, exclude)
        log_p = self.log_p(comp, temperature)
        with torch.no_grad():
            served = comp.detach().clone()
            if target is not None or exclude is not None:
                label = z.detach().argmax(dim=1)
                if "margin" in self.names:
                    served[:, self.names.index("margin")] = -logit_margin(z.detach())
                if self.second is not None:
                    served[:, -1] = -class_margin(self.second(x.detach()), label)
            hard = self.combine_log_p(self.log_p(served, 0.0), 0.0)
        return SurrogateOutput(z, layers, comp, log_p, self.combine_log_p(log_p, temperature), hard)


def _smooth_log_p(comp: torch.Tensor, tails: tuple, t: float) -> torch.Tensor:
    """Smoothed log p-values [B, K] of scores [B, K] against ``tails`` = (sorted reference [m, K],
    beta_up [K], beta_down [K], two_sided [K], spread [K]) at temperature t (0: exact counts)."""
    ref, beta_up, beta_down, two_sided, spread = tails
    m = ref.shape[0]
    log_norm = math.log(m + 1.0)
    if t == 0:
        ref_t, s_t = ref.T.contiguous(), comp.detach().T.contiguous()
        n_up = (m - torch.searchsorted(ref_t, s_t, right=False).T).double()  # #{r >= s}
        n_down = torch.searchsorted(ref_t, s_t, right=True).T.double()  # #{r <= s}
    else:
        # float32 inside the sigmoid (cheaper, and the sums of 0s and 1s stay exact); a tie r_i = s
        # gets σ(0) = 1/2 from each side and the served count takes it on both: add the other half
        ref_t, s_t = ref.T.contiguous(), comp.detach().T.contiguous()
        ties = (torch.searchsorted(ref_t, s_t, right=True) - torch.searchsorted(ref_t, s_t, right=False)).T
        tk = (t * spread)[None, :, None]  # [1, K, 1]
        diff = ((ref.T[None, :, :] - comp[:, :, None]) / tk).float()  # [B, K, m]
        up = torch.sigmoid(diff).sum(dim=2).double()
        n_up = up + 0.5 * ties
        n_down = (m - up) + 0.5 * ties
    hi, lo = ref[-1], ref[0]
    log_up = torch.where(comp > hi, -(comp - hi) / beta_up - log_norm, torch.log1p(n_up) - log_norm)
    log_down = torch.where(comp < lo, -(lo - comp) / beta_down - log_norm, torch.log1p(n_down) - log_norm)
    two = torch.clamp(math.log(2.0) + torch.minimum(log_up, log_down), max=0.0)
    return torch.where(two_sided, two, log_up)


def _cosine(g: torch.Tensor) -> torch.Tensor:
    """Differentiable pairwise cosine [B, N, N] of g [B, N, D] (0 where a vector is 0, as served)."""
    gram = torch.bmm(g, g.transpose(1, 2)).double()
    sq = torch.diagonal(gram, dim1=1, dim2=2)
    denom = torch.sqrt((sq[:, :, None] * sq[:, None, :]).clamp(min=1e-300))
    return torch.where(denom > 1e-150, gram / denom, torch.zeros_like(gram))


def _loda_smooth(loda, feats: torch.Tensor) -> torch.Tensor:
    """LODA's score with each projection's log density linearly interpolated between bin centres
    (empty bins and the outside of the fitted range at the floor density): [B]."""
    w = loda.projections  # [k, d]
    z = feats @ w.T  # [B, k]
    n_bins = loda.log_density.shape[1]
    dens = torch.maximum(loda.log_density, loda.floor_log_density[:, None])  # [k, bins]
    u = (z - loda.mins) / loda.widths - 0.5  # position in bin-centre units
    u = u.clamp(0.0, n_bins - 1.0)
    left = torch.floor(u.detach()).clamp(max=n_bins - 2).long()
    frac = u - left
    d_left = torch.gather(dens.expand(len(z), -1, -1), 2, left[:, :, None])[:, :, 0]
    d_right = torch.gather(dens.expand(len(z), -1, -1), 2, (left + 1)[:, :, None])[:, :, 0]
    interp = d_left + frac * (d_right - d_left)
    inside = (z >= loda.mins) & (z <= loda.maxs)
    floor = loda.floor_log_density.expand_as(interp)
    return -torch.where(inside, interp, floor).mean(dim=1)



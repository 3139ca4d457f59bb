"""Per-class saliency maps and their cosine similarity matrix (the CSM of GGA).

For an input x with logits z = F(x) over C classes, the saliency of class i is

    s_i = sign(∇x CE(F(x), i)) = sign(Jᵀ (p − e_i)),   J = ∂z/∂x,  p = softmax(z)

and the CSM holds c_ab = ⟨s_a, s_b⟩ / (|s_a| |s_b|) for the top-N classes by logit,
predicted class first (Schwinn et al., UAI 2021, section 3; partial CSM: section 5.5).
A zero saliency (a saturated softmax gives one) has cosine 0 with everything,
including itself.

The gradients are vector-Jacobian products with the cotangents (p − e_i), so the
cross-entropy itself is never evaluated; three strategies compute them:

- ``"loop"``: one forward pass, N backward passes over the retained graph.
- ``"vmap"``: one forward pass, one batched backward (``is_grads_batched``).
- ``"replicate"``: the batch repeated N times, one forward and one backward.

All three give the same maps. ``"auto"`` picks ``"loop"`` on CPU (fastest there, see
``benchmarks/bench_gga.py``) and ``"vmap"`` on accelerators.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

STRATEGIES = ("auto", "loop", "vmap", "replicate")
CHANNEL_REDUCTIONS = (None, "max")
COTANGENTS = ("exact", "naive")
RESCALE_TARGET = 10.0


class NonFiniteLogitsError(ValueError):
    """The model returned NaN or inf logits for some samples (``rows``: their indices in the batch)."""

    def __init__(self, rows: list[int]) -> None:
        self.rows = rows
        shown = ", ".join(str(r) for r in rows[:10]) + (" …" if len(rows) > 10 else "")
        super().__init__(f"the model's outputs are not finite for sample(s) {shown}: the input values are out of "
                         "the range the model can take")


def check_logits(z: torch.Tensor) -> None:
    """Raise ValueError unless z is logits [B, C]; :class:`NonFiniteLogitsError` for NaN/inf rows."""
    if z.dim() != 2:
        raise ValueError(f"the model must return logits [B, C], got shape {tuple(z.shape)}")
    finite = torch.isfinite(z).all(dim=1)
    if not bool(finite.all()):
        raise NonFiniteLogitsError(torch.nonzero(~finite)[:, 0].tolist())


@dataclass(frozen=True)
class CSMResult:
    """``csm`` [B, N, N]; ``classes`` [B, N] (top-N by logit, predicted first); ``logits`` [B, C];
    ``csm_channel_max`` [B, N, N]: the CSM of the channel-max sign maps from the same
    gradients (only when asked with ``return_channel_max=True``, else None)."""

    csm: torch.Tensor
    classes: torch.Tensor
    logits: torch.Tensor
    csm_channel_max: torch.Tensor | None = None

    @property
    def top_n(self) -> int:
        return self.classes.shape[1]


def cosine_similarity_matrix(s: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of N vectors per sample.

    ``s``: [B, N, *] (trailing dims are flattened). Returns [B, N, N] float32 with
    c_ab = ⟨s_a, s_b⟩ / sqrt(⟨s_a, s_a⟩ ⟨s_b, s_b⟩), and 0 wherever either vector is
    zero. For sign vectors the Gram matrix is an exact integer count (float32 holds
    integers up to 2^24 exactly) and the division is done in float64, so the diagonal
    is exactly 1 for every non-zero saliency.
    """
    flat = s.flatten(2)
    if not flat.is_floating_point():
        flat = flat.float()
    gram = torch.bmm(flat, flat.transpose(1, 2)).double()
    sq = torch.diagonal(gram, dim1=1, dim2=2)
    denom = torch.sqrt(sq[:, :, None] * sq[:, None, :])
    out = torch.where(denom > 0, gram / torch.where(denom > 0, denom, 1.0), 0.0)
    return out.float()


def resolve_strategy(strategy: str, device: torch.device) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "auto":
        return "loop" if device.type == "cpu" else "vmap"
    return strategy


def _rescale(z: torch.Tensor) -> torch.Tensor:
    """Scale each sample's logits so that max |z| = 10 (an option of the official code)."""
    peak = z.abs().amax(dim=1, keepdim=True)
    return z * (RESCALE_TARGET / torch.where(peak > 0, peak, 1.0))


def _cotangents(z: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(p − e_i) for each analysed class, [N, B, C], free of cancellation.

    Computed naively in float32, p_k − 1 rounds to exactly 0 once the softmax saturates
    (a logit margin above ~17, most confident correct predictions), which silently drops
    the −(1 − p_k)∇z_k term from the predicted class's gradient and points its saliency
    the wrong way. Here p is float64 and the i-th entry is −Σ_{j≠i} p_j (a sum of small
    positive numbers). sign(Jᵀc) does not depend on the scale of c, so each cotangent is
    divided by its largest |entry| before the cast to the model's dtype, which keeps tiny
    probabilities from underflowing in the backward pass. A cotangent that is zero even
    in float64 (a margin of ~700 or more) gives a zero saliency.
    """
    p = torch.softmax(z.detach().double(), dim=1).unsqueeze(0)  # [1, B, C]
    target = torch.nn.functional.one_hot(classes.T, z.shape[1]).bool()  # [N, B, C]
    rest = torch.where(target, 0.0, p)
    cot = torch.where(target, -rest.sum(dim=2, keepdim=True), rest)
    peak = cot.abs().amax(dim=2, keepdim=True)
    return (cot / torch.where(peak > 0, peak, 1.0)).to(z.dtype)


def _naive_cotangents(z: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(p − e_i) for each analysed class, [N, B, C], computed naively in the model's dtype.

    As the official code (the backward of ``F.cross_entropy``) and this library before its
    cancellation fix: p_k − 1 rounds to exactly 0 in float32 once the softmax saturates.
    For reproduction and ablation only.
    """
    p = torch.softmax(z.detach(), dim=1).unsqueeze(0)  # [1, B, C]
    target = torch.nn.functional.one_hot(classes.T, z.shape[1]).to(p.dtype)  # [N, B, C]
    return p - target


def _cotangent_fn(cotangents: str):
    if cotangents not in COTANGENTS:
        raise ValueError(f"cotangents must be one of {COTANGENTS}, got {cotangents!r}")
    return _cotangents if cotangents == "exact" else _naive_cotangents


def _reduce_channels(sign: torch.Tensor, channel_reduce: str | None) -> torch.Tensor:
    """``sign``: [N, B, *input_shape]. Max over the channel axis (dim 2) when asked."""
    if channel_reduce is None:
        return sign
    return sign.amax(dim=2)


def cosine_similarity_maps(
    model: torch.nn.Module,
    x: torch.Tensor,
    top_n: int | None = None,
    *,
    channel_reduce: str | None = None,
    rescale_logits: bool = False,
    strategy: str = "auto",
    cotangents: str = "exact",
    return_channel_max: bool = False,
    timings: dict[str, float] | None = None,
) -> CSMResult:
    """The CSM of each sample in ``x`` for its top-N classes.

    ``x``: [B, *input_shape] on the model's device (images B×C×H×W, series B×C×T or
    vectors B×D). ``top_n=None`` analyses all C classes; ``top_n < 3`` is rejected
    (S1 would be empty). ``channel_reduce="max"`` takes the max of the sign maps over
    the channel axis (dim 1 of the input) before the cosine; ``rescale_logits`` scales
    logits to max |z| = 10 before the loss. Both are options of the official code and
    off by default.

    ``cotangents``: ``"exact"`` (default) computes the cotangents p − e_i without
    cancellation (float64, see ``_cotangents``); ``"naive"`` computes them in the model's
    dtype as the official code does, where p_k − 1 rounds to 0 for a saturated softmax
    and the predicted class's saliency loses its main term. ``"naive"`` exists to
    reproduce and measure that defect, not for use.

    ``return_channel_max=True`` also returns, in ``csm_channel_max``, the CSM of the
    channel-max sign maps from the same backward passes (inputs with a channel axis only),
    so both views cost one set of gradients.

    No gradient reaches the model's parameters (``.grad`` is left untouched), no graph
    outlives the call and the model's train/eval mode is not changed; put the model in
    eval mode yourself (batch-norm statistics in train mode couple the samples).

    ``timings``, when given, receives the seconds spent in ``"forward"`` and in
    ``"gradients"`` (backward passes, signs and cosines).
    """
    if top_n is not None and (not isinstance(top_n, int) or top_n < 3):
        raise ValueError(
            f"top_n must be an integer >= 3 (S1 needs two non-predicted classes) or None for all "
            f"classes, got {top_n!r}"
        )
    if channel_reduce not in CHANNEL_REDUCTIONS:
        raise ValueError(f"channel_reduce must be one of {CHANNEL_REDUCTIONS}, got {channel_reduce!r}")
    if channel_reduce is not None and x.dim() < 3:
        raise ValueError(
            f"channel_reduce={channel_reduce!r} needs inputs with a channel axis (B, C, ...), "
            f"got shape {tuple(x.shape)}"
        )
    if return_channel_max and x.dim() < 3:
        raise ValueError(
            f"return_channel_max=True needs inputs with a channel axis (B, C, ...), got shape {tuple(x.shape)}"
        )
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch [B, *input_shape], got shape {tuple(x.shape)}")
    mode = resolve_strategy(strategy, x.device)
    cot_fn = _cotangent_fn(cotangents)

    clock = _Stopwatch(timings, x.device)
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach()
        x = (x.clone() if x.is_inference() else x).requires_grad_(True)
        if mode == "replicate":
            return _replicate(model, x, top_n, channel_reduce, rescale_logits, clock, cot_fn, return_channel_max)
        z = model(x)
        clock.lap("forward")
        check_logits(z)
        n = _check_top_n(top_n, z.shape[1])
        logits = z.detach()
        classes = torch.topk(logits, n, dim=1).indices
        if rescale_logits:
            z = _rescale(z)
        cot = cot_fn(z, classes)
        if mode == "vmap":
            (grads,) = torch.autograd.grad(z, x, grad_outputs=cot, is_grads_batched=True)
            signs = torch.sign(grads)
        else:
            signs = torch.empty((n, *x.shape), dtype=x.dtype, device=x.device)
            for j in range(n):
                (g,) = torch.autograd.grad(z, x, grad_outputs=cot[j], retain_graph=j < n - 1)
                torch.sign(g, out=signs[j])
    return _finish(signs, classes, logits, channel_reduce, return_channel_max, clock)


def _finish(signs, classes, logits, channel_reduce, return_channel_max, clock) -> CSMResult:
    """signs [N, B, *input_shape] -> CSMResult (and the channel-max CSM of the same signs when asked)."""
    chmax = cosine_similarity_matrix(signs.amax(dim=2).transpose(0, 1)) if return_channel_max else None
    csm = cosine_similarity_matrix(_reduce_channels(signs, channel_reduce).transpose(0, 1))
    clock.lap("gradients")
    return CSMResult(csm, classes, logits, chmax)


class _Stopwatch:
    """Adds elapsed seconds per stage into ``sink`` (no-op when sink is None)."""

    def __init__(self, sink: dict[str, float] | None, device: torch.device) -> None:
        self.sink, self.cuda = sink, device.type == "cuda"
        self.t = time.perf_counter() if sink is not None else 0.0

    def lap(self, stage: str) -> None:
        if self.sink is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.sink[stage] = self.sink.get(stage, 0.0) + now - self.t
        self.t = now


def _check_top_n(top_n: int | None, num_classes: int) -> int:
    if top_n is None:
        if num_classes < 3:
            raise ValueError(f"GGA needs at least 3 classes, the model has {num_classes}")
        return num_classes
    if top_n > num_classes:
        raise ValueError(f"top_n={top_n} exceeds the model's {num_classes} classes")
    return top_n


def _replicate(model, x, top_n, channel_reduce, rescale_logits, clock, cot_fn, return_channel_max) -> CSMResult:
    with torch.no_grad():
        z0 = model(x[:1].detach())
    if z0.dim() != 2:
        raise ValueError(f"the model must return logits [B, C], got shape {tuple(z0.shape)}")
    n = _check_top_n(top_n, z0.shape[1])
    b = x.shape[0]
    xr = x.detach().repeat(n, *([1] * (x.dim() - 1))).requires_grad_(True)
    z = model(xr)
    clock.lap("forward")
    check_logits(z[:b])
    logits = z[:b].detach()
    classes = torch.topk(logits, n, dim=1).indices
    if rescale_logits:
        z = _rescale(z)
    cot = cot_fn(z[:b], classes).reshape(n * b, -1)
    (g,) = torch.autograd.grad(z, xr, grad_outputs=cot)
    signs = torch.sign(g).reshape(n, *x.shape)
    return _finish(signs, classes, logits, channel_reduce, return_channel_max, clock)

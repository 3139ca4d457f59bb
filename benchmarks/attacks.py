"""The perturbations and attacks of the paper's evaluation (Schwinn et al., UAI 2021, 4.2.4 and 5.3).

Every function takes and returns float32 tensors in the model's input space, batched
[B, *input_shape], on the input's device, with pixels in the clip range (default
[0, 1]; the CIFAR ResNets of ``detectors.zoo`` normalise inside the model). The model
must already be on that device. No function changes the model's train/eval mode (put
it in eval mode yourself: batch-norm statistics in train mode couple the samples) and
none leaves anything in the parameters' ``.grad``: gradients are taken with
``torch.autograd.grad`` with respect to the input only.

Threat model of the paper (section 4.2.4): ||δ||∞ <= ε with ε = 0.3 (MNIST), 8/255
(CIFAR); ε is multiplied by 10 for the ℓ2 attacks. Only attacks that change the
prediction count as untrustworthy inputs: filter with :func:`successful`.

- :func:`uniform_noise`, :func:`rotate`: the non-gradient perturbations.
- :func:`pgd`: Madry et al. PGD, untargeted (70 steps, α = ε/4) or targeted
  (T-SCE / T-MSE of section 4.2.4, 100 steps).
- :func:`csa`: the adaptive cosine similarity attack of section 4.2.4 / 5.3 (equation 5),
  second-order gradients through a Softplus copy of the model (:func:`softplus_copy`).
- :func:`brendel_bethge`: Brendel & Bethge (2019), from foolbox (an optional extra).
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

Clip = tuple[float, float] | None
NORMS = ("linf", "l2")
PGD_LOSSES = ("ce", "mse")
TARGET_MODES = ("most_likely", "random")
CSA_SURROGATES = ("tanh", "raw")
_TINY = 1e-12

__all__ = [
    "brendel_bethge",
    "csa",
    "csa_objective",
    "default_targets",
    "pgd",
    "rotate",
    "softplus_copy",
    "successful",
    "uniform_noise",
]


# ---------------------------------------------------------------------------- helpers


def _as_input(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a non-empty batch [B, *input_shape], got {shape}")
    return x.detach().to(torch.float32)


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _check_eps(eps: float) -> float:
    try:
        value = float(eps)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return value


def _clip(x: torch.Tensor, clip: Clip) -> torch.Tensor:
    if clip is None:
        return x
    lo, hi = clip
    if not lo < hi:
        raise ValueError(f"clip must be (low, high) with low < high, got {clip!r}")
    return x.clamp(lo, hi)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
          normal: bool = False) -> torch.Tensor:
    """U[0, 1) (or N(0, 1)) float32 noise drawn on the generator's device, moved to ``device``."""
    src = generator.device if generator is not None else device
    fn = torch.randn if normal else torch.rand
    return fn(shape, generator=generator, device=src, dtype=torch.float32).to(device)


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """ℓ2 norm of each sample, shaped [B, 1, ..., 1] for broadcasting."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str, clip: Clip) -> torch.Tensor:
    """Project onto {x' : ||x' − x||_p <= eps} ∩ clip range (per sample).

    ℓ∞: δ ← clamp(δ, −ε, ε); ℓ2: δ ← δ · min(1, ε / ||δ||₂). Clipping x + δ to the
    range afterwards only shrinks each |δ_j| when x itself is inside the range, so the
    result stays in the ball.
    """
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        n = _per_sample_norm(delta)
        delta = delta * torch.clamp(eps / torch.clamp(n, min=_TINY), max=1.0)
    return _clip(x + delta, clip)


def _ascent_step(x_adv: torch.Tensor, grad: torch.Tensor, alpha: float, norm: str) -> torch.Tensor:
    """ℓ∞: x + α·sign(g); ℓ2: x + α·g / ||g||₂ (a zero gradient gives a zero step)."""
    if norm == "linf":
        return x_adv + alpha * grad.sign()
    return x_adv + alpha * grad / torch.clamp(_per_sample_norm(grad), min=_TINY)


def _grad_context():
    """Autograd on, even when the caller runs under no_grad or inference_mode."""
    return torch.inference_mode(False), torch.enable_grad()


# ------------------------------------------------------------- non-gradient perturbations


def uniform_noise(x: torch.Tensor, eps: float, *, generator: torch.Generator | None = None,
                  clip: Clip = (0.0, 1.0)) -> torch.Tensor:
    """Uniform noise in the ℓ∞ ε-ball: x' = clip(x + u), u_j ~ U(−ε, ε) i.i.d. per pixel.

    The paper's "uniform noise attack in the ε-ball" (section 4.2.4), with the ℓ∞
    budgets ε = 0.3 (MNIST), 8/255 (CIFAR). ``clip=None`` skips the clipping.
    ``generator`` (on any device) makes it reproducible.
    """
    x = _as_input(x)
    eps = _check_eps(eps)
    u = _rand(tuple(x.shape), generator, x.device)
    return _clip(x + (2.0 * u - 1.0) * eps, clip)


def rotate(x: torch.Tensor, max_degrees: float = 45.0, *, generator: torch.Generator | None = None,
           angles: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate each image [B, C, H, W] about its centre by an angle θ ~ U(−max_degrees, max_degrees).

    The paper's random rotations between −45° and 45° (section 4.2.4). Implemented with
    ``affine_grid`` + ``grid_sample`` (bilinear, zeros padding, ``align_corners=False``):
    output pixel p samples the input at p rotated by −θ about the image centre, in pixel
    units (the normalised coordinates are corrected for H != W). Positive angles turn the
    image counter-clockwise as displayed (row 0 at the top): 90° equals
    ``torch.rot90(x, 1, dims=(2, 3))`` up to interpolation rounding. Uncovered corners
    become 0. ``angles`` [B] (degrees) fixes the angles instead of drawing them.
    Bilinear weights are convex, so the output stays within [min(x, 0), max(x, 0)].
    """
    x = _as_input(x)
    if x.dim() != 4:
        raise ValueError(f"rotate needs images [B, C, H, W], got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    if angles is None:
        if not math.isfinite(max_degrees) or max_degrees < 0:
            raise ValueError(f"max_degrees must be a finite number >= 0, got {max_degrees!r}")
        angles = (2.0 * _rand((b,), generator, x.device) - 1.0) * max_degrees
    angles = torch.as_tensor(angles, dtype=torch.float64, device=x.device).reshape(-1)
    if angles.shape[0] != b:
        raise ValueError(f"angles must hold one angle per image ({b}), got {angles.shape[0]}")
    rad = torch.deg2rad(angles)
    cos, sin = torch.cos(rad), torch.sin(rad)
    theta = torch.zeros((b, 2, 3), dtype=torch.float64, device=x.device)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * (h / w)
    theta[:, 1, 0] = sin * (w / h)
    theta[:, 1, 1] = cos
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    return out.clamp(lo, hi)


# ------------------------------------------------------------------------------------ PGD


def default_targets(logits: torch.Tensor, y: torch.Tensor, *, mode: str = "most_likely",
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Target classes for a targeted attack, never equal to ``y``: int64 [B].

    ``mode="most_likely"`` (default, deterministic): argmax over c != y of the logits,
    the easiest wrong class. ``mode="random"``: uniform over the C − 1 classes != y,
    the paper's choice ("a random target class which is not the ground truth",
    section 4.2.4); pass ``generator`` to make it reproducible.
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be [B, C] with C >= 2, got shape {tuple(logits.shape)}")
    y = y.to(logits.device).long()
    if mode == "most_likely":
        masked = logits.detach().clone()
        masked[torch.arange(len(y), device=logits.device), y] = -math.inf
        return masked.argmax(dim=1)
    if mode == "random":
        c = logits.shape[1]
        r = (_rand((len(y),), generator, logits.device) * (c - 1)).long().clamp_(max=c - 2)
        return r + (r >= y).long()
    raise ValueError(f"mode must be one of {TARGET_MODES}, got {mode!r}")


def _pgd_loss(z: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample loss [B]: CE(z, label) or mean_c (softmax(z)_c − onehot(label)_c)²."""
    if loss == "ce":
        return F.cross_entropy(z, labels, reduction="none")
    onehot = F.one_hot(labels, z.shape[1]).to(z.dtype)
    return (torch.softmax(z, dim=1) - onehot).pow(2).mean(dim=1)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf", steps: int = 70,
        step_size: float | None = None, targeted: bool = False, target: torch.Tensor | None = None,
        loss: str = "ce", random_start: bool = False, generator: torch.Generator | None = None,
        clip: Clip = (0.0, 1.0)) -> torch.Tensor:
    """Projected gradient descent (Madry et al., ICLR 2018), ℓ∞ or ℓ2, untargeted or targeted.

    With L(x') the per-sample loss (``loss="ce"``: cross-entropy CE(F(x'), ℓ);
    ``loss="mse"``: (1/C) Σ_c (softmax(F(x'))_c − onehot(ℓ)_c)²) and g = ∇x' L:

    - untargeted (ℓ = y): x' ← Π(x' + α·d(g)), maximising the loss of the true class;
    - targeted (ℓ = ``target``): x' ← Π(x' − α·d(g)), minimising the loss towards the
      target: T-SCE with ``loss="ce"``, T-MSE with ``loss="mse"`` (section 4.2.4).
      ``target=None`` uses :func:`default_targets` (most likely wrong class of F(x));

    d(g) = sign(g) for ``norm="linf"``, g / ||g||₂ per sample for ``norm="l2"``; Π projects
    onto the ε-ball around x (ℓ∞: clamp; ℓ2: rescale per sample) and then clips to
    ``clip`` (``None``: no clipping). x must lie in the clip range.

    Defaults follow the paper: α = ``step_size`` = ε/4, 70 steps for untargeted PGD (use
    ``steps=100`` for the targeted attacks). ``random_start`` starts from a uniform
    point of the ball (ℓ∞: U(−ε, ε) per pixel; ℓ2: uniform in the ℓ2 ball) drawn with
    ``generator``. The attack runs the fixed budget and returns the LAST iterate (not
    the first successful one); check with :func:`successful`.

    T-MSE is the weaker targeted attack (its softmax saturates): on the reference MNIST
    model (64 test images, ε = 0.3, 100 steps, random targets) T-SCE misclassified 100%,
    T-MSE 83% (61% reached the target); untargeted ℓ∞ and ℓ2 PGD 100%.
    """
    x = _as_input(x)
    eps = _check_eps(eps)
    _check_norm(norm)
    if loss not in PGD_LOSSES:
        raise ValueError(f"loss must be one of {PGD_LOSSES}, got {loss!r}")
    if target is not None and not targeted:
        raise ValueError("target was given but targeted=False; pass targeted=True for a targeted attack")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    alpha = eps / 4.0 if step_size is None else float(step_size)
    y = y.to(x.device).long()
    if targeted:
        if target is None:
            with torch.no_grad():
                target = default_targets(model(x), y)
        labels, direction = target.to(x.device).long(), -1.0
    else:
        labels, direction = y, 1.0
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must be [B] = [{x.shape[0]}], got shape {tuple(labels.shape)}")

    x_adv = x.clone()
    if random_start and eps > 0:
        if norm == "linf":
            delta = (2.0 * _rand(tuple(x.shape), generator, x.device) - 1.0) * eps
        else:
            d = x[0].numel()
            direction_ = _rand(tuple(x.shape), generator, x.device, normal=True)
            radius = _rand((x.shape[0],), generator, x.device).pow(1.0 / d) * eps
            delta = direction_ / torch.clamp(_per_sample_norm(direction_), min=_TINY)
            delta = delta * radius.view(-1, *([1] * (x.dim() - 1)))
        x_adv = _project(x + delta, x, eps, norm, clip)

    ctx_inf, ctx_grad = _grad_context()
    with ctx_inf, ctx_grad:
        labels = labels.clone()  # a normal tensor even if made under the caller's inference_mode
        for _ in range(steps):
            xa = x_adv.detach().clone().requires_grad_(True)
            obj = _pgd_loss(model(xa), labels, loss).sum()
            (g,) = torch.autograd.grad(obj, xa)
            x_adv = _project(_ascent_step(x_adv, direction * g, alpha, norm), x, eps, norm, clip).detach()
    return x_adv


# ------------------------------------------------------------------------------ success


@torch.no_grad()
def successful(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Bool [B]: argmax F(x_adv) != y, the paper's criterion for a successful attack (4.2.4).

    Evaluated in chunks of ``batch_size`` without autograd; on x_adv's device.
    """
    x_adv = _as_input(x_adv)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    preds = torch.cat([model(x_adv[i:i + batch_size]).argmax(dim=1) for i in range(0, len(x_adv), batch_size)])
    return preds != y.to(preds.device).long()


# ------------------------------------------------------------------------------------ CSA


def softplus_copy(model: nn.Module, beta: float = 10.0) -> nn.Module:
    """A deep copy of ``model`` with every ``nn.ReLU`` module replaced by ``nn.Softplus(beta)``.

    Softplus_β(t) = (1/β) log(1 + exp(βt)) → ReLU as β → ∞; its second derivative is
    non-zero, which the cosine similarity attack needs (the paper, section 4.2.4,
    following Dombrowski et al., NeurIPS 2019). The copy is in eval mode with
    ``requires_grad=False`` on every parameter; the original is untouched. Functional
    ``F.relu`` / ``torch.relu`` calls inside ``forward`` cannot be swapped:
    :func:`csa` checks for them and refuses such a model (``detectors.zoo`` models use
    ``nn.ReLU`` modules).
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    with torch.inference_mode(False):  # copies made under inference_mode would be unusable in autograd
        smooth = copy.deepcopy(model)
    _swap_relus(smooth, float(beta))
    smooth.eval()
    for p in smooth.parameters():
        p.requires_grad_(False)
        p.grad = None
    return smooth


def _swap_relus(module: nn.Module, beta: float) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.Softplus(beta=beta))
        else:
            _swap_relus(child, beta)


class _FunctionalReluProbe(TorchFunctionMode):
    """Records any relu that a forward pass calls through the torch function API."""

    RELUS = (torch.relu, torch.relu_, F.relu, F.relu_, torch.Tensor.relu, torch.Tensor.relu_)

    def __init__(self) -> None:
        super().__init__()
        self.hits = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.RELUS:
            self.hits += 1
        return func(*args, **(kwargs or {}))


def _check_smooth(smooth: nn.Module, x: torch.Tensor) -> None:
    probe = _FunctionalReluProbe()
    with torch.no_grad(), probe:
        smooth(x[:1])
    if probe.hits:
        raise ValueError(
            f"the model calls relu functionally ({probe.hits} call(s) in one forward pass, e.g. F.relu or "
            "torch.relu), which softplus_copy cannot replace; use nn.ReLU modules (as detectors.zoo does) "
            "or pass a smooth_model whose forward has no ReLU"
        )


def _surrogate(g: torch.Tensor, surrogate: str, sharpness: float) -> torch.Tensor:
    """g [B, N, D] → saliency surrogate: tanh(k · g / mean|g|) or g itself."""
    if surrogate == "raw":
        return g
    scale = g.detach().abs().mean(dim=2, keepdim=True)
    return torch.tanh(sharpness * g / torch.clamp(scale, min=_TINY))


def csa_objective(smooth: nn.Module, x: torch.Tensor, y: torch.Tensor, *, weights: tuple[float, float] = (0.8, 0.2),
                  top_n: int | None = None, surrogate: str = "tanh", sharpness: float = 3.0,
                  create_graph: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The CSA objective per sample and its cosine part: (J [B], S̃1 [B]).

    On the smooth model F̃ (``smooth``, e.g. :func:`softplus_copy`) at x with its top-N
    classes c_0 = k̂ (predicted), c_1..c_{N-1} (``top_n=None``: all C classes):

        g_j = ∇x CE(F̃(x), c_j)                        (first-order, kept in the graph)
        s_j = tanh(k · g_j / mean|g_j|)  (``surrogate="tanh"``, a smooth sign; k = ``sharpness``)
              or g_j                     (``surrogate="raw"``)
        S̃1 = (1/|S1|) Σ_{1 <= a < b < N} ⟨s_a, s_b⟩ / (|s_a| |s_b|)    (equation 5 on s)
        J   = w_cs · S̃1 + w_ce · CE(F̃(x), y),  (w_cs, w_ce) = ``weights``

    to be MAXIMISED (cosines among non-predicted classes up, loss of y up). The N maps
    come from one forward/backward of the batch replicated N times (samples must be
    independent: eval mode). mean|g_j| is detached (a scale, not a direction); a zero
    map gives cosine 0. x must require grad for ``create_graph``.
    """
    if surrogate not in CSA_SURROGATES:
        raise ValueError(f"surrogate must be one of {CSA_SURROGATES}, got {surrogate!r}")
    b = x.shape[0]
    with torch.no_grad():
        z0 = smooth(x)
    c = z0.shape[1]
    n = c if top_n is None else top_n
    if not isinstance(n, int) or n < 3 or n > c:
        raise ValueError(f"top_n must be an integer in [3, {c}] (S1 needs two non-predicted classes) or None, "
                         f"got {top_n!r}")
    classes = torch.topk(z0, n, dim=1).indices  # [B, N], predicted first
    xr = x.unsqueeze(0).expand(n, *x.shape).reshape(n * b, *x.shape[1:])
    z = smooth(xr)  # replica j of sample i: class classes[i, j]
    ce_all = F.cross_entropy(z, classes.t().reshape(-1), reduction="sum")
    (g,) = torch.autograd.grad(ce_all, xr, create_graph=create_graph)
    s = _surrogate(g.reshape(n, b, -1).transpose(0, 1), surrogate, sharpness)  # [B, N, D]
    s = s / torch.sqrt(s.pow(2).sum(dim=2, keepdim=True) + _TINY)
    cos = torch.bmm(s, s.transpose(1, 2))
    rows, cols = torch.triu_indices(n, n, offset=1, device=x.device)
    keep = rows > 0
    s1 = cos[:, rows[keep], cols[keep]].mean(dim=1)
    ce_y = F.cross_entropy(z[:b], y, reduction="none")
    w_cs, w_ce = weights
    return w_cs * s1 + w_ce * ce_y, s1


def csa(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100,
        step_size: float | None = None, weights: tuple[float, float] = (0.8, 0.2), beta: float = 10.0,
        norm: str = "linf", top_n: int | None = None, clip: Clip = (0.0, 1.0), surrogate: str = "tanh",
        sharpness: float = 3.0, smooth_model: nn.Module | None = None) -> torch.Tensor:
    """The paper's cosine similarity attack (CSA, sections 4.2.4 and 5.3), ℓ∞ or ℓ2.

    PGD ascent on J = 0.8 · S̃1 + 0.2 · CE(F̃(x'), y) (see :func:`csa_objective`). S̃1 is
    equation 5, L^CSA = (1/|S1|) Σ_{c_ij ∈ S1} c_ij, the mean cosine similarity among the
    saliency maps of the non-predicted classes, evaluated on a differentiable surrogate
    of the sign maps: tanh(k · g / mean|g|) with k = ``sharpness`` = 3 by default, or the
    raw gradients g (``surrogate="raw"``). Raising it makes the CSM look like a clean
    one; the cross-entropy term pushes away from y. F̃ = :func:`softplus_copy` (ReLU →
    Softplus(β = 10)), so that the second-order gradient ∇x S̃1 exists
    (``create_graph=True`` through the input gradients). Steps: x' ← Π(x' + α·sign(∇J))
    (ℓ∞) or x' ← Π(x' + α·∇J/||∇J||₂) (ℓ2), Π as in :func:`pgd`; α = ε/4 and 100 steps
    as in the paper (the PGD step size, the targeted attacks' iterations). Returns the
    LAST iterate.

    Choice of the surrogate, measured on the reference MNIST model (64 test images,
    ε = 0.3, 30 steps; S1 mean of the true sign CSM of the ORIGINAL model, clean 0.541):
    tanh k = 3 → 0.687 with 9.4% misclassified; k = 10 → 0.695 / 9.4%; k = 1 → 0.653 /
    20%; raw gradients → 0.585 / 30%; untargeted PGD (70 steps) → 0.539 / 100%.

    The paper reports few misclassifications (561 of 10,000 on MNIST): only the
    successful ones (:func:`successful` on the ORIGINAL model) count downstream.
    ``smooth_model`` reuses a smooth copy across chunks (then ``beta`` is unused).
    Memory and time: the batch is replicated N times with a second-order graph (about
    3 s per step for 64 MNIST images on a CPU); chunk large inputs.
    """
    x = _as_input(x)
    eps = _check_eps(eps)
    _check_norm(norm)
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    alpha = eps / 4.0 if step_size is None else float(step_size)
    y = y.to(x.device).long()
    smooth = softplus_copy(model, beta) if smooth_model is None else smooth_model
    _check_smooth(smooth, x)
    x_adv = x.clone()
    ctx_inf, ctx_grad = _grad_context()
    with ctx_inf, ctx_grad:
        y = y.clone()  # a normal tensor even if made under the caller's inference_mode
        for _ in range(steps):
            xa = x_adv.detach().clone().requires_grad_(True)
            obj, _ = csa_objective(smooth, xa, y, weights=weights, top_n=top_n, surrogate=surrogate,
                                   sharpness=sharpness)
            (g,) = torch.autograd.grad(obj.sum(), xa)
            x_adv = _project(_ascent_step(x_adv, g, alpha, norm), x, eps, norm, clip).detach()
    return x_adv


# ---------------------------------------------------------------------- Brendel & Bethge


class _FrozenParams(nn.Module):
    """Calls ``model`` with detached parameters, so a library's ``loss.backward()`` fills no ``.grad``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.training = model.training  # set the flag only: .train()/.eval() would recurse into model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = {name: p.detach() for name, p in self.model.named_parameters()}
        return torch.func.functional_call(self.model, params, (x,))


_FOOLBOX_HINT = (
    "brendel_bethge needs the optional attack library foolbox 3 (with eagerpy and numba): "
    "pip install 'gga-trust[eval]', or pip install foolbox numba"
)


def brendel_bethge(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str = "linf",
                   eps: float | None = None, steps: int = 100, lr: float = 0.001,
                   starting_points: torch.Tensor | None = None, binary_search_steps: int = 10,
                   clip: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Brendel & Bethge attack (NeurIPS 2019), ℓ∞ or ℓ2, via foolbox 3 (optional dependency).

    A minimum-norm boundary attack: from an adversarial starting point it walks along
    the decision boundary towards x, solving per step the trust-region problem
    min ||x' − x||_p s.t. the linearised logit difference z_y − max_{c≠y} z_c <= 0 and
    x' in the ``clip`` range (default [0, 1]). The result sits at the boundary: low-confidence
    misclassifications (the paper, section 4.2.4: lr 0.001, 100 steps; ε = 0.3 / 8/255
    for ℓ∞ and 10× that for ℓ2). foolbox: ``LinfinityBrendelBethgeAttack`` /
    ``L2BrendelBethgeAttack``.

    Starting points: ``starting_points`` (e.g. successful PGD points) or, by default,
    foolbox's ``LinearSearchBlendedUniformNoiseAttack``. Samples already misclassified
    at x are returned unchanged (zero perturbation); samples without an adversarial
    starting point are returned unchanged too (unsuccessful). With ``eps`` the result
    is projected onto the ε-ball (as foolbox's "clipped" output): a boundary point
    farther than ε then usually stops being adversarial and is filtered out by
    :func:`successful`; ``eps=None`` returns the unbounded minimum-norm points.

    Raises ImportError when foolbox (or numba) is missing. The first call in a process
    compiles foolbox's numba solver (≈ 20 s).
    """
    _check_norm(norm)
    x = _as_input(x)
    if eps is not None:
        eps = _check_eps(eps)
    try:
        import foolbox as fb
    except ImportError as e:
        raise ImportError(_FOOLBOX_HINT) from e
    y = y.to(x.device).long()
    out = x.clone()
    fmodel = fb.PyTorchModel(_FrozenParams(model), bounds=tuple(clip), device=x.device)
    todo = ~successful(model, x, y)
    if starting_points is not None:
        start = _as_input(starting_points).to(x.device)
        if start.shape != x.shape:
            raise ValueError(f"starting_points must have the shape of x {tuple(x.shape)}, got {tuple(start.shape)}")
    elif todo.any():
        start = x.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start[todo] = fb.attacks.LinearSearchBlendedUniformNoiseAttack().run(
                fmodel, x[todo], fb.criteria.Misclassification(y[todo]))
    if not todo.any():
        return out
    todo &= successful(model, start, y)
    if not todo.any():
        return out
    kind = fb.attacks.LinfinityBrendelBethgeAttack if norm == "linf" else fb.attacks.L2BrendelBethgeAttack
    try:
        attack = kind(steps=steps, lr=lr, binary_search_steps=binary_search_steps)
    except ImportError as e:  # foolbox raises numba's import error here
        raise ImportError(_FOOLBOX_HINT) from e
    ctx_inf, ctx_grad = _grad_context()
    with ctx_inf, ctx_grad, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*optimizer needs to be compiled.*")
        adv = attack.run(fmodel, x[todo], fb.criteria.Misclassification(y[todo]), starting_points=start[todo])
    adv = torch.as_tensor(adv, dtype=torch.float32, device=x.device)
    if eps is not None:
        adv = _project(adv, x[todo], eps, norm, clip)
    out[todo] = adv
    return out

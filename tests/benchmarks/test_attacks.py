"""The attacks of benchmarks/attacks.py on tiny models whose behaviour we can reason about."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.attacks import (
    brendel_bethge,
    csa,
    csa_objective,
    default_targets,
    pgd,
    rotate,
    softplus_copy,
    successful,
    uniform_noise,
)
from detectors import cosine_similarity_maps, csm_features
from detectors.zoo import MnistCNN, resnet20
from tests.support.threads import one_thread  # noqa: F401 (autouse fixture)


class TinyCNN(nn.Module):
    """1×8×8 → conv(4) → ReLU → maxpool → linear(10): a model with ReLU modules only."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.act(self.conv(x))))


class FunctionalRelu(TinyCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(F.relu(self.conv(x))))


def tiny(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN().eval()




PROTOTYPES = torch.rand((10, 1, 8, 8), generator=torch.Generator().manual_seed(0))


def prototype_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten classes: a random 8×8 prototype each, plus N(0, 0.25²) noise, clipped to [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return (PROTOTYPES[y] + 0.25 * torch.randn((n, 1, 8, 8), generator=g)).clamp(0, 1), y


@pytest.fixture(scope="module")
def trained() -> TinyCNN:
    """TinyCNN trained for 150 Adam steps on the prototype data (< 1 s): 100% accurate on fresh samples."""
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(150):
        x, y = prototype_data(128, seed=100 + step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def test_trained_fixture_is_a_real_classifier(trained):
    x, y = prototype_data(256, seed=1)
    with torch.no_grad():
        assert (trained(x).argmax(1) == y).float().mean() >= 0.98


def linear2(seed: int = 0) -> nn.Module:
    """A 2-class linear model: ∇x CE(z, y) = p_other (w_other − w_y), a constant direction."""
    torch.manual_seed(seed)
    lin = nn.Linear(64, 2)
    with torch.no_grad():
        lin.weight.mul_(0.2)
    return nn.Sequential(nn.Flatten(), lin).eval()


def batch(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.rand((n, 1, 8, 8), generator=torch.Generator().manual_seed(seed))


def no_param_grads(model: nn.Module) -> bool:
    return all(p.grad is None for p in model.parameters())


def ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


# ----------------------------------------------------------------- uniform noise, rotation


def test_uniform_noise_stays_in_the_ball_and_the_range():
    x = batch(32)
    x[:, :, 0, :] = 1.0
    x[:, :, 1, :] = 0.0
    out = uniform_noise(x, 0.1, generator=torch.Generator().manual_seed(3))
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert (out - x).abs().max() <= 0.1 + 1e-6
    assert out.min() >= 0.0 and out.max() <= 1.0
    # edge pixels: about half of the noise is clipped away, the clipped ones sit exactly on the bound
    assert 0.4 < (out[:, :, 0, :] == 1.0).float().mean() < 0.6
    assert 0.4 < (out[:, :, 1, :] == 0.0).float().mean() < 0.6
    # interior: U(−ε, ε) has mean |u| = ε/2 and std ε/√3
    interior = (out - x)[:, :, 3:, :]
    assert interior.abs().mean().item() == pytest.approx(0.05, abs=0.003)
    assert interior.std().item() == pytest.approx(0.1 / math.sqrt(3), abs=0.003)
    again = uniform_noise(x, 0.1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    assert torch.equal(uniform_noise(x, 0.0), x)


def test_rotation_by_zero_is_the_identity_and_90_degrees_is_rot90():
    x = batch(4)
    assert torch.allclose(rotate(x, 0.0), x, atol=1e-6)
    assert torch.allclose(rotate(x, angles=torch.zeros(4)), x, atol=1e-6)
    assert torch.allclose(rotate(x, angles=torch.full((4,), 90.0)), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5)
    assert torch.allclose(rotate(x, angles=torch.full((4,), -90.0)), torch.rot90(x, -1, dims=(2, 3)), atol=1e-5)
    wide = torch.rand(2, 3, 6, 10)
    assert torch.allclose(rotate(wide, angles=torch.tensor([180.0, -180.0])), wide.flip(2, 3), atol=1e-5)
    # non-square: a pixel 8 px right of the centre goes 8 px up at +90° (counter-clockwise)
    dot = torch.zeros(1, 1, 21, 41)
    dot[0, 0, 10, 28] = 1.0
    assert (rotate(dot, angles=torch.tensor([90.0]))[0, 0] > 0.5).nonzero().tolist() == [[2, 20]]


def test_random_rotation_keeps_shape_and_range_and_is_reproducible():
    x = batch(16)
    a = rotate(x, 45.0, generator=torch.Generator().manual_seed(0))
    b = rotate(x, 45.0, generator=torch.Generator().manual_seed(0))
    c = rotate(x, 45.0, generator=torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the centre 2×2 block of an 8×8 image never leaves the image, the corners get zeros for |θ| > ~0
    ones = torch.ones(16, 1, 8, 8)
    r = rotate(ones, 45.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(r[:, :, 3:5, 3:5], torch.ones(16, 1, 2, 2), atol=1e-6)
    assert (r[:, 0, 0, 0] < 0.5).float().mean() > 0.5


# -------------------------------------------------------------------------------------- PGD


def test_pgd_on_a_two_class_linear_model_reaches_the_exact_corner():
    model, x = linear2(), batch(16)
    y = model(x).argmax(1)
    w = model[1].weight.detach()
    other = 1 - y
    direction = (w[other] - w[y]).view(-1, 1, 8, 8)
    adv = pgd(model, x, y, eps=0.2, steps=6)  # α = ε/4: four steps reach the corner, two more stay there
    assert torch.allclose(adv, (x + 0.2 * direction.sign()).clamp(0, 1), atol=1e-6)
    # targeted towards the other class (T-SCE and T-MSE) moves the same way
    for loss in ("ce", "mse"):
        t = pgd(model, x, y, eps=0.2, steps=6, targeted=True, target=other, loss=loss)
        assert torch.allclose(t, adv, atol=1e-6)
    # ℓ2 without clipping: x + ε · d/||d||
    l2 = pgd(model, x, y, eps=1.5, norm="l2", steps=6, clip=None)
    unit = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(l2, x + 1.5 * unit, atol=1e-5)


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_linf_stays_in_the_ball_and_misclassifies(trained, random_start):
    model, x = trained, prototype_data(64, seed=1)[0]
    model.train()  # mode must not change (the model has no mode-dependent layer)
    y = model(x).argmax(1)
    with torch.no_grad():  # the attack turns autograd on itself
        adv = pgd(model, x, y, eps=0.3, steps=20, random_start=random_start,
                  generator=torch.Generator().manual_seed(0))
    assert model.training and no_param_grads(model)
    model.eval()
    assert adv.dtype == torch.float32 and adv.shape == x.shape
    assert (adv - x).abs().max() <= 0.3 + 1e-6
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert (ce(model, adv, y) > ce(model, x, y)).all()
    assert successful(model, adv, y).float().mean() >= 0.9


def test_pgd_l2_stays_in_the_ball_and_misclassifies(trained):
    model, x = trained, prototype_data(64, seed=1)[0]
    y = model(x).argmax(1)
    adv = pgd(model, x, y, eps=3.0, norm="l2", steps=20, random_start=True, generator=torch.Generator().manual_seed(0))
    norms = (adv - x).flatten(1).norm(dim=1)
    assert norms.max() <= 3.0 + 1e-5
    assert norms.median() > 2.0  # it uses the budget
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert (ce(model, adv, y) > ce(model, x, y)).all()
    assert successful(model, adv, y).float().mean() >= 0.9
    assert no_param_grads(model)


@pytest.mark.parametrize(("loss", "eps", "steps"), [("ce", 0.3, 30), ("mse", 0.5, 100)])
def test_targeted_pgd_reaches_the_target(trained, loss, eps, steps):
    # T-MSE is the weaker attack (as in the paper): at ε = 0.3 it reaches ~70% here, so it gets ε = 0.5
    model, x = trained, prototype_data(64, seed=1)[0]
    y = model(x).argmax(1)
    target = default_targets(model(x), y, mode="random", generator=torch.Generator().manual_seed(0))
    adv = pgd(model, x, y, eps=eps, steps=steps, targeted=True, target=target, loss=loss)
    assert (adv - x).abs().max() <= eps + 1e-6
    with torch.no_grad():
        assert (model(adv).argmax(1) == target).float().mean() >= 0.9
    # target=None: the most likely wrong class of the clean logits
    adv2 = pgd(model, x, y, eps=eps, steps=steps, targeted=True, loss=loss)
    with torch.no_grad():
        assert (model(adv2).argmax(1) == default_targets(model(x), y)).float().mean() >= 0.9
    assert no_param_grads(model)


def test_attacks_work_under_inference_mode(trained):
    x = prototype_data(8, seed=1)[0]
    y = trained(x).argmax(1)
    ref = pgd(trained, x, y, eps=0.3, steps=5), csa(trained, x, y, eps=0.3, steps=2)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        got = pgd(trained, xi, yi, eps=0.3, steps=5), csa(trained, xi, yi, eps=0.3, steps=2)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert not torch.equal(ref[0], x) and no_param_grads(trained)


def test_pgd_rejects_a_target_without_targeted():
    model, x = tiny(), batch(4)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="targeted=True"):
        pgd(model, x, y, eps=0.1, target=y)
    with pytest.raises(ValueError, match="norm"):
        pgd(model, x, y, eps=0.1, norm="l1")


def test_default_targets_exact_values():
    logits = torch.tensor([[5.0, 4.0, 1.0], [0.0, 1.0, 2.0], [3.0, 0.0, 3.5]])
    y = torch.tensor([0, 2, 0])
    assert default_targets(logits, y).tolist() == [1, 1, 2]
    many = torch.zeros(3000, 4)
    yy = torch.arange(3000) % 4
    r = default_targets(many, yy, mode="random", generator=torch.Generator().manual_seed(0))
    assert (r != yy).all() and r.min() == 0 and r.max() == 3
    for c in range(4):  # uniform over the 3 other classes
        counts = torch.bincount(r[yy == c], minlength=4).float() / 750
        assert counts[c] == 0 and ((counts - 1 / 3).abs()[torch.arange(4) != c] < 0.06).all()


def test_successful_matches_argmax_in_chunks(trained):
    model, x = trained, prototype_data(40, seed=1)[0]
    y = model(x).argmax(1)
    adv = x.clone()
    adv[::2] = pgd(model, x[::2], y[::2], eps=0.3, steps=20)
    flags = successful(model, adv, y, batch_size=7)
    with torch.no_grad():
        truth = model(adv).argmax(1) != y
    assert flags.dtype == torch.bool and torch.equal(flags, truth)
    assert not flags[1::2].any() and flags[::2].sum() >= 18


# ------------------------------------------------------------------------ softplus and CSA


@pytest.mark.parametrize("factory", [TinyCNN, MnistCNN, lambda: resnet20()])
def test_softplus_copy_swaps_every_relu_and_leaves_the_original(factory):
    torch.manual_seed(0)
    model = factory()
    model.train()
    relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    smooth = softplus_copy(model, beta=10.0)
    assert relus > 0
    assert not any(isinstance(m, nn.ReLU) for m in smooth.modules())
    softplus = [m for m in smooth.modules() if isinstance(m, nn.Softplus)]
    assert len(softplus) == relus and all(m.beta == 10.0 for m in softplus)
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == relus and model.training
    assert all(p.requires_grad for p in model.parameters())
    assert not smooth.training and not any(p.requires_grad for p in smooth.parameters())
    a, b = model.state_dict(), smooth.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_softplus_copy_approaches_relu_for_large_beta():
    model = tiny()
    x = batch(8)
    with torch.no_grad():
        ref = model(x)
        gap = [(softplus_copy(model, beta)(x) - ref).abs().max().item() for beta in (10.0, 1000.0)]
    assert gap[1] < 1e-2 < gap[0]


def s1_mean(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return csm_features(cosine_similarity_maps(model, x).csm)[:, 0]


def test_csa_raises_the_s1_mean_of_the_original_model_and_stays_in_the_ball(trained):
    model, x = trained, prototype_data(32, seed=1)[0]
    y = model(x).argmax(1)
    adv = csa(model, x, y, eps=0.3, steps=10)
    assert no_param_grads(model) and not model.training
    assert (adv - x).abs().max() <= 0.3 + 1e-6
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    before, after = s1_mean(model, x), s1_mean(model, adv)
    # measured: +0.076 on average, 30 of 32 samples up (untargeted PGD: −0.04)
    assert after.mean() > before.mean() + 0.05
    assert (after > before).float().mean() >= 0.8
    # the rise comes from the cosine term: with the cross-entropy term alone S1 falls
    ce_only = csa(model, x, y, eps=0.3, steps=10, weights=(0.0, 1.0))
    assert s1_mean(model, ce_only).mean() < before.mean() < after.mean()
    assert successful(model, ce_only, y).all()
    # the differentiable surrogate it optimises rises too
    smooth = softplus_copy(model)
    with torch.enable_grad():
        _, sur_before = csa_objective(smooth, x.clone().requires_grad_(True), y, create_graph=False)
        _, sur_after = csa_objective(smooth, adv.clone().requires_grad_(True), y, create_graph=False)
    assert sur_after.mean() > sur_before.mean() + 0.05  # measured 0.393 → 0.475


def test_csa_l2_and_top_n(trained):
    model, x = trained, prototype_data(8, seed=1)[0]
    y = model(x).argmax(1)
    adv = csa(model, x, y, eps=1.0, norm="l2", steps=3, top_n=4)
    assert (adv - x).flatten(1).norm(dim=1).max() <= 1.0 + 1e-5
    assert not torch.equal(adv, x)
    with pytest.raises(ValueError, match="top_n"):
        csa(model, x, y, eps=0.1, steps=1, top_n=2)


def test_csa_refuses_a_model_with_functional_relu():
    torch.manual_seed(0)
    model = FunctionalRelu().eval()
    x = batch(2)
    with pytest.raises(ValueError, match="functionally"):
        csa(model, x, torch.zeros(2, dtype=torch.long), eps=0.1, steps=1)


# ---------------------------------------------------------------------- Brendel & Bethge


@pytest.mark.slow  # foolbox compiles its numba solver on first use (~20 s)
def test_brendel_bethge_linf_finds_small_boundary_points(trained):
    pytest.importorskip("foolbox")
    pytest.importorskip("numba")
    model, x = trained, prototype_data(8, seed=1)[0]
    y = model(x).argmax(1)
    start = pgd(model, x, y, eps=0.3, steps=20)
    assert successful(model, start, y).all()
    adv = brendel_bethge(model, x, y, norm="linf", steps=20, starting_points=start)
    assert no_param_grads(model)
    assert successful(model, adv, y).all()
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    dist = (adv - x).flatten(1).abs().amax(1)
    assert (dist <= 0.3 + 1e-6).all() and dist.mean() < 0.2  # closer to x than the PGD start (ε = 0.3)
    # with ε: projected into the ball; a boundary point needing more than ε stops being adversarial
    tight = float(dist.median())
    bounded = brendel_bethge(model, x, y, norm="linf", steps=20, starting_points=start, eps=tight)
    assert (bounded - x).abs().max() <= tight + 1e-6
    flags = successful(model, bounded, y)
    assert flags[dist <= tight - 1e-4].all()
    # foolbox's own starting points (blended uniform noise); a sample already misclassified is returned as is
    wrong = y.clone()
    wrong[0] = (y[0] + 1) % 10
    with torch.no_grad():  # the attack turns autograd on itself
        own = brendel_bethge(model, x, wrong, norm="linf", steps=10)
    assert torch.equal(own[0], x[0])
    assert successful(model, own[1:], wrong[1:]).all() and no_param_grads(model)


def test_brendel_bethge_without_foolbox_raises_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "foolbox", None)  # makes `import foolbox` fail
    model, x = tiny(), batch(2)
    with pytest.raises(ImportError, match=r"pip install 'gga-trust\[eval\]'"):
        brendel_bethge(model, x, torch.zeros(2, dtype=torch.long))

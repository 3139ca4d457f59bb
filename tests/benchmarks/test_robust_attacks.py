"""The robust-evaluation attacks on linear models, where the true answer is computable exactly.

For f(x) = W x + b and the box B(x) = [max(0, x - eps), min(1, x + eps)]:
- max over B of z_t - z_y = sum_i max(c_i lo_i, c_i hi_i) + (b_t - b_y), c = w_t - w_y,
  so a digit is truly breakable iff that maximum is > 0 for some t != y;
- "all models say t somewhere in B" is the linear programme max s subject to
  (w^k_t - w^k_j) x + b^k_t - b^k_j >= s for every model k and j != t, x in B: feasible
  with s > 0 iff such a point exists (scipy's linprog gives the reference).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from benchmarks.robust_attacks import (
    attack_broken,
    joint_held,
    multitargeted_broken,
    pgd_search,
    step_sizes,
)
from tests.support.threads import one_thread  # noqa: F401 (autouse fixture)

D, C = 16, 4




def linear(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(D, C)).double()
    return m.eval().requires_grad_(False)


def data(n: int = 60, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=g, dtype=torch.float64)
    return x, torch.randint(0, C, (n,), generator=g)


def exact_breakable(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    W, b = model[1].weight, model[1].bias
    xf = x.flatten(1)
    lo, hi = (xf - eps).clamp(min=0), (xf + eps).clamp(max=1)
    out = torch.zeros(len(x), dtype=torch.bool)
    for t in range(C):
        c = W[t][None] - W[y]
        best = torch.maximum(c * lo, c * hi).sum(1) + b[t] - b[y]
        out |= (y != t) & (best > 0)
    return out


def lp_agree_value(models, x: torch.Tensor, t: int, eps: float) -> float:
    """max s such that every model's logit t beats every other logit by s somewhere in B(x)."""
    xf = x.flatten().numpy()
    a_ub, b_ub = [], []
    for m in models:
        W, b = m[1].weight.numpy(), m[1].bias.numpy()
        for j in range(C):
            if j != t:  # s - (w_t - w_j) x <= b_t - b_j
                a_ub.append(np.concatenate([-(W[t] - W[j]), [1.0]]))
                b_ub.append(b[t] - b[j])
    bounds = [(max(0.0, v - eps), min(1.0, v + eps)) for v in xf] + [(None, None)]
    res = linprog(np.r_[np.zeros(D), -1.0], A_ub=np.array(a_ub), b_ub=np.array(b_ub), bounds=bounds)
    assert res.status == 0
    return -res.fun


def test_step_schedule():
    assert step_sizes(0.3, 3, 0.1) == [0.1, 0.1, 0.1]
    s = step_sizes(0.4, 4, None)
    assert s == pytest.approx([0.1, 0.1 * (1 + 2 ** -0.5) / 2, 0.05, 0.1 * (1 - 2 ** -0.5) / 2])


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.1, 0.2, 0.5, 1.0])
def test_multitargeted_finds_exactly_the_breakable_digits(eps):
    model, (x, y) = linear(0), data()
    got = multitargeted_broken(model, x, y, eps=eps, steps=30, num_classes=C)
    assert torch.equal(got, exact_breakable(model, x, y, eps))


def test_success_rises_with_eps_and_reaches_every_digit():
    model, (x, y) = linear(0), data()
    counts = [int(multitargeted_broken(model, x, y, eps=e, steps=30, num_classes=C).sum())
              for e in (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)]
    clean_errors = int((model(x).argmax(1) != y).sum())
    assert counts[0] == clean_errors and counts == sorted(counts) and counts[-1] == len(x)
    assert counts[1] < counts[-1]


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_untargeted_attacks_never_claim_a_false_break(loss):
    model, (x, y) = linear(1), data()
    truth = exact_breakable(model, x, y, 0.1)
    got = attack_broken(model, x, y, loss=loss, eps=0.1, steps=30, restarts=2,
                        generator=torch.Generator().manual_seed(0))
    assert not (got & ~truth).any()
    assert got.sum() >= 0.8 * truth.sum()


def test_pgd_search_returns_the_successful_point_inside_the_ball():
    model, (x, y) = linear(2), data()
    eps = 0.15

    def objective(xa, idx):
        z = model(xa)
        return nn.functional.cross_entropy(z, y[idx], reduction="none"), z.argmax(1) != y[idx]

    x_found, found = pgd_search(objective, x, eps=eps, steps=20, random_start=True,
                                generator=torch.Generator().manual_seed(0))
    assert found.any() and (~found).any()
    assert (x_found - x).abs().max().item() <= eps + 1e-12
    assert x_found.min().item() >= 0 and x_found.max().item() <= 1
    assert torch.equal(model(x_found).argmax(1) != y, found)
    assert torch.equal(x_found[~found], x[~found])


@pytest.fixture(scope="module")
def lp_case():
    models, (x, y) = [linear(3), linear(4)], data(40, seed=1)
    values = torch.tensor([[lp_agree_value(models, x[i], t, 0.15) if t != y[i] else -np.inf for t in range(C)]
                           for i in range(len(x))]).max(1).values
    clear = values > 0.02  # clearly reachable agreement on a wrong class
    assert int(clear.sum()) == 12 and int((values <= 0).sum()) == 27
    return models, x, y, values, clear


@pytest.mark.parametrize(("loss", "min_found"), [("softmin", 12), ("min", 10), ("sum", 10)])
def test_joint_attack_against_the_linear_programme(lp_case, loss, min_found):
    models, x, y, values, clear = lp_case
    held = joint_held(models, x, y, eps=0.15, steps=100, losses=[loss], num_classes=C)
    assert not (~held & (values <= 0)).any()  # never a break the LP says is impossible
    assert int((~held[clear]).sum()) >= min_found


def test_joint_with_one_model_is_multitargeted_on_wrong_classes():
    model, (x, y) = linear(0), data()
    held = joint_held([model], x, y, eps=0.1, steps=30, losses=["min"], num_classes=C)
    assert torch.equal(~held, exact_breakable(model, x, y, 0.1))


def test_bad_input_is_refused():
    model, (x, y) = linear(0), data()
    with pytest.raises(ValueError, match="loss must be"):
        attack_broken(model, x, y, loss="mse", eps=0.1, steps=1)
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        multitargeted_broken(model, x + 1, y, eps=0.1, steps=1)
    with pytest.raises(ValueError, match="restarts"):
        attack_broken(model, x, y, loss="cw", eps=0.1, steps=1, restarts=0)

import math

import pytest
import torch

from detectors.pvalues import ReferenceTails, combine


def _ref(two_sided: bool):
    return ReferenceTails(torch.arange(1.0, 10.0)[:, None], torch.tensor([two_sided]))


def test_empirical_p_values_inside_the_reference_range():
    ref = _ref(False)
    s = torch.tensor([[5.0], [9.0], [0.0], [5.5]])
    p = ref.log_p(s).exp()[:, 0]
    # (1 + #{r >= s}) / (m + 1) with r = 1..9
    torch.testing.assert_close(p, torch.tensor([0.6, 0.2, 1.0, 0.5], dtype=torch.float64))


def test_exponential_tail_beyond_the_largest_reference_score():
    ref = _ref(False)
    # k = 5 top scores 5..9, excesses over the 6th largest (4): 1..5, mean beta = 3
    assert ref.beta_up.item() == 3.0
    lp = ref.log_p(torch.tensor([[10.0], [19.0]]))[:, 0]
    assert lp[0].item() == pytest.approx(-1.0 / 3.0 - math.log(10.0), abs=1e-12)
    assert lp[1].item() == pytest.approx(-10.0 / 3.0 - math.log(10.0), abs=1e-12)
    # far out: no underflow to -inf
    assert math.isfinite(ref.log_p(torch.tensor([[1e6]])).item())


def test_two_sided_p_values_use_both_tails():
    ref = _ref(True)
    p = ref.log_p(torch.tensor([[5.0], [1.0], [9.0], [0.0]])).exp()[:, 0]
    # 2 min(p_up, p_down), capped at 1: s=5: 2*0.6 -> 1; s=1: 2*0.2; s=9: 2*0.2; s=0 below the range
    assert p[0].item() == 1.0
    assert p[1].item() == pytest.approx(0.2 * 2, abs=1e-12)
    assert p[2].item() == pytest.approx(0.2 * 2, abs=1e-12)
    assert p[3].item() == pytest.approx(2 * math.exp(-1.0 / 3.0) / 10.0, abs=1e-12)


def test_combiners():
    lp = torch.log(torch.tensor([[0.5, 0.1], [1.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(combine(lp, "fisher"), torch.tensor([-2 * math.log(0.05), 0.0], dtype=torch.float64))
    torch.testing.assert_close(combine(lp, "min"), torch.tensor([-math.log(0.1), 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="combine"):
        combine(lp, "max")


def test_reference_validation():
    with pytest.raises(ValueError, match="NaN"):
        ReferenceTails(torch.tensor([[1.0], [float("nan")]]), torch.tensor([False]))
    with pytest.raises(ValueError, match="one flag per component"):
        ReferenceTails(torch.zeros(4, 2), torch.tensor([False]))

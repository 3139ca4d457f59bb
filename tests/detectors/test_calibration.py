import math

import torch

from detectors import conformal_p_values, conformal_threshold


def test_exact_p_values():
    cal = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    s = torch.tensor([0.0, 2.0, 2.5, 4.0, 5.0])
    # (1 + #{c >= s}) / (n + 1)
    assert conformal_p_values(s, cal).tolist() == [1.0, 4 / 5, 3 / 5, 2 / 5, 1 / 5]


def test_threshold_agrees_with_p_values():
    g = torch.Generator().manual_seed(0)
    for n, alpha in ((19, 0.05), (100, 0.05), (999, 0.05), (50, 0.1), (7, 0.2)):
        cal = torch.sort(torch.randn(n, generator=g, dtype=torch.float64)).values
        thr = conformal_threshold(cal, alpha)
        probe = torch.cat([cal, cal + 1e-9, cal - 1e-9, torch.tensor([100.0, -100.0], dtype=torch.float64)])
        flagged = conformal_p_values(probe, cal) < alpha
        assert torch.equal(flagged, probe > thr), (n, alpha)
    # with 9 calibration scores, alpha = 0.05 can never be reached: (1 + 0) / 10 = 0.1
    assert conformal_threshold(torch.arange(9.0), 0.05) == math.inf


def test_flag_rate_matches_alpha_on_exchangeable_scores():
    g = torch.Generator().manual_seed(1)
    cal = torch.sort(torch.randn(1000, generator=g, dtype=torch.float64)).values
    fresh = torch.randn(5000, generator=g, dtype=torch.float64)
    rate = (conformal_p_values(fresh, cal) < 0.05).double().mean().item()
    assert abs(rate - 0.05) <= 0.02


def test_min_calibration_size_is_the_first_n_that_can_flag():
    import pytest

    from detectors.calibration import min_calibration_size

    assert [min_calibration_size(a) for a in (0.05, 0.01, 0.3, 0.1)] == [20, 100, 3, 10]
    for alpha in (0.05, 0.01, 0.3, 0.1, 0.07):
        n = min_calibration_size(alpha)
        assert conformal_threshold(torch.arange(float(n)), alpha) < math.inf
        assert conformal_threshold(torch.arange(float(n - 1)), alpha) == math.inf
    with pytest.raises(ValueError):
        min_calibration_size(1.0)


def test_conformal_calibration_wrapper():
    import pytest

    from detectors.calibration import ConformalCalibration

    cal = ConformalCalibration(0.05).fit(torch.tensor([3.0, 1.0, 2.0] + [0.0] * 17))
    assert cal.scores.tolist() == [0.0] * 17 + [1.0, 2.0, 3.0]
    assert cal.trust(torch.tensor([3.5, 3.0])).tolist() == [1 / 21, 2 / 21]
    assert cal.flagged(torch.tensor([3.5, 3.0])).tolist() == [True, False]
    assert cal.threshold == 3.0
    again = ConformalCalibration(0.05).load_state_dict(cal.state_dict())
    assert torch.equal(again.scores, cal.scores)
    with pytest.raises(ValueError, match="at least 20"):
        ConformalCalibration(0.05).fit(torch.zeros(19))
    with pytest.raises(ValueError, match="NaN"):
        ConformalCalibration(0.05).fit(torch.tensor([float("nan")] * 30))
    with pytest.raises(RuntimeError, match="not fitted"):
        ConformalCalibration(0.05).trust(torch.zeros(1))

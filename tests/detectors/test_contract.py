"""Every detector follows the one contract of detectors.base."""

import pytest
import torch
from torch import nn

from detectors.base import Calibrated, Detector
from detectors.composite import CompositeDetector
from detectors.energy import Energy
from detectors.gga import GGADetector
from detectors.mahalanobis import Mahalanobis
from detectors.msp import MSP, msp_score
from detectors.odin import ODIN


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def test_every_detector_implements_the_protocol():
    m = _model()
    for det in (MSP(m), Energy(m), ODIN(m), Mahalanobis(m, lambda mm, x: mm[1](mm[0](x))), GGADetector(m),
                CompositeDetector(m, layers=["1"])):
        assert isinstance(det, Detector), type(det).__name__


def test_calibrated_wrapper_turns_scores_into_trust():
    m = _model()
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    cal = torch.randn(99, 4, generator=torch.Generator().manual_seed(1))
    det = Calibrated(MSP(m), alpha=0.1).fit(x, calibration=cal)
    q = torch.randn(10, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        s = msp_score(m(q))
        c = msp_score(m(cal))
    expected = (1 + (c[None, :] >= s[:, None]).sum(1)).double() / 100
    torch.testing.assert_close(det.trust(q), expected)
    assert torch.equal(det.flagged(q), expected < 0.1)
    again = Calibrated(MSP(m), alpha=0.1).load_state_dict(det.state_dict())
    torch.testing.assert_close(again.trust(q), expected)
    with pytest.raises(ValueError, match="at least 10"):
        Calibrated(MSP(m), alpha=0.1).fit(x, calibration=cal[:8])


def test_mahalanobis_state_round_trip():
    m = _model()
    feat = lambda mm, x: mm[1](mm[0](x))  # noqa: E731
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = m(x).argmax(1)
    a = Mahalanobis(m, feat).fit(x, y)
    b = Mahalanobis(m, feat).load_state_dict(a.state_dict())
    torch.testing.assert_close(a.score(x[:20]), b.score(x[:20]))
    with pytest.raises(ValueError, match="missing"):
        Mahalanobis(m, feat).load_state_dict({})


def test_gga_state_round_trip_checks_shapes():
    m = _model()
    x = torch.randn(400, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = m(x).argmax(1)
    a = GGADetector(m).fit(x, y)
    b = GGADetector(m).load_state_dict(a.state_dict())
    assert torch.equal(a.score(x[:30]).trust, b.score(x[:30]).trust)
    bad = a.state_dict()
    bad["feature_mean"] = bad["feature_mean"][:3]
    with pytest.raises(ValueError, match="features"):
        GGADetector(m).load_state_dict(bad)

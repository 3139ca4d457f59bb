import pytest
import torch

from detectors import CSMResult, csm_features, gga_features
from detectors.features import feature_names


def test_exact_features_of_a_4x4_csm():
    csm = torch.tensor([[
        [1.0, -0.5, -0.3, -0.1],
        [-0.5, 1.0, 0.8, 0.6],
        [-0.3, 0.8, 1.0, 0.4],
        [-0.1, 0.6, 0.4, 1.0],
    ]])
    f = csm_features(csm)[0]
    # S1 = {0.8, 0.6, 0.4}, S2 = {-0.5, -0.3, -0.1}
    s1_std = (((0.8 - 0.6) ** 2 + 0 + (0.4 - 0.6) ** 2) / 3) ** 0.5
    s1_energy = (0.64 + 0.36 + 0.16) / 3
    s2_energy = (0.25 + 0.09 + 0.01) / 3
    expected = torch.tensor([0.6, 0.8, 0.4, s1_std, s1_energy, -0.3, -0.1, -0.5, s1_std, s2_energy])
    torch.testing.assert_close(f, expected, atol=1e-6, rtol=0)
    assert feature_names() == ("s1_mean", "s1_max", "s1_min", "s1_std", "s1_energy",
                               "s2_mean", "s2_max", "s2_min", "s2_std", "s2_energy")


def test_n3_and_softmax_feature():
    csm = torch.tensor([[[1.0, 0.2, -0.4], [0.2, 1.0, 0.7], [-0.4, 0.7, 1.0]]])
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    res = CSMResult(csm=csm, classes=torch.tensor([[0, 1, 2]]), logits=logits)
    f = gga_features(res, include_softmax=True)[0]
    p = torch.exp(torch.tensor(2.0)) / (torch.exp(torch.tensor(2.0)) + 2)
    expected = torch.tensor([0.7, 0.7, 0.7, 0.0, 0.49, -0.1, 0.2, -0.4, 0.3, 0.1, p.item()])
    torch.testing.assert_close(f, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="at least 3x3"):
        csm_features(torch.eye(2)[None])

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from detectors import LODA


def _bruteforce_scores(loda: LODA, X_fit: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Independent reference: explicit bin edges and a linear scan for every value."""
    W = loda.projections.numpy()
    n = len(X_fit)
    zf, z = X_fit @ W.T, X @ W.T
    out = np.zeros(len(X))
    for j in range(W.shape[0]):
        lo, hi = zf[:, j].min(), zf[:, j].max()
        width = (hi - lo) / loda.n_bins
        edges = [lo + b * width for b in range(loda.n_bins + 1)]

        def bin_of(v, lo=lo, hi=hi, edges=edges):
            if v < lo or v > hi:
                return None
            for b in range(loda.n_bins):
                if edges[b] <= v < edges[b + 1]:
                    return b
            return loda.n_bins - 1  # v == hi (or rounding at the top edge)

        counts = np.zeros(loda.n_bins)
        for v in zf[:, j]:
            counts[bin_of(v)] += 1
        floor = loda.floor_count / (n * width)
        for i, v in enumerate(z[:, j]):
            b = bin_of(v)
            density = counts[b] / (n * width) if b is not None and counts[b] > 0 else floor
            out[i] += -math.log(max(density, floor))
    return out / W.shape[0]


def test_matches_bruteforce_reference():
    rng = np.random.default_rng(0)
    X_fit = rng.normal(size=(300, 7))
    X = np.concatenate([rng.normal(size=(100, 7)), 4 * rng.normal(size=(20, 7)), X_fit[:10]])
    loda = LODA(n_projections=20, n_bins=15, seed=3).fit(torch.from_numpy(X_fit))
    np.testing.assert_allclose(loda.score(torch.from_numpy(X)).numpy(), _bruteforce_scores(loda, X_fit, X),
                               rtol=1e-12, atol=1e-12)


def test_sparse_projections():
    loda = LODA(n_projections=50, n_bins=10, seed=1).fit(torch.randn(100, 10))
    nnz = (loda.projections != 0).sum(dim=1)
    assert nnz.tolist() == [math.ceil(math.sqrt(10))] * 50  # 4 non-zeros each
    same = LODA(n_projections=50, n_bins=10, seed=1).fit(torch.randn(100, 10))
    assert torch.equal(same.projections, loda.projections)


def test_exact_bin_lookup_no_off_by_one():
    # 1-D data: 9 points at 0 and 1 point at 1, two bins. Bin 0 = [0, 0.5) holds 9, bin 1 holds 1.
    X = torch.tensor([[0.0]] * 9 + [[1.0]], dtype=torch.float64)
    loda = LODA(n_projections=5, n_bins=2, seed=0).fit(X)
    w = loda.projections[:, 0].abs()  # projection j maps x to w_j x; width = |w_j| / 2
    expected_zero = (-torch.log(9 / (10 * w / 2))).mean().item()
    expected_one = (-torch.log(1 / (10 * w / 2))).mean().item()
    s = loda.score(torch.tensor([[0.0], [1.0], [0.2], [0.8]], dtype=torch.float64))
    assert s[0].item() == pytest.approx(expected_zero, rel=1e-12)
    assert s[1].item() == pytest.approx(expected_one, rel=1e-12)
    # whatever the sign of w, 0.2 projects into the half holding the 9 zeros and 0.8 into the other
    dens_02 = 9 / (10 * w / 2)
    assert s[2].item() == pytest.approx((-torch.log(dens_02)).mean().item(), rel=1e-12)
    dens_08 = 1 / (10 * w / 2)
    assert s[3].item() == pytest.approx((-torch.log(dens_08)).mean().item(), rel=1e-12)


def test_out_of_range_is_more_anomalous_than_edge():
    rng = np.random.default_rng(2)
    X = torch.from_numpy(rng.uniform(-1, 1, size=(500, 4)))
    loda = LODA(n_projections=30, n_bins=20, seed=0).fit(X)
    edge = X[X.norm(dim=1).argmax()][None]
    far = 100 * edge
    s_edge, s_far = loda.score(edge).item(), loda.score(far).item()
    assert s_far > s_edge
    # every projection of the far point is outside the fit range: exactly the floor density
    assert s_far == pytest.approx(-loda.floor_log_density.mean().item(), rel=1e-12)


def test_separates_shifted_gaussians():
    g = torch.Generator().manual_seed(0)
    fit = torch.randn(2000, 10, generator=g)
    clean = torch.randn(1000, 10, generator=g)
    shifted = torch.randn(1000, 10, generator=g) + 2.0
    loda = LODA(seed=0).fit(fit)
    s_in, s_out = loda.score(clean).numpy(), loda.score(shifted).numpy()
    auroc = roc_auc_score(np.r_[np.zeros(1000), np.ones(1000)], np.r_[s_in, s_out])
    assert auroc >= 0.99


def test_state_dict_round_trip_and_validation():
    X = torch.randn(200, 6)
    loda = LODA(n_projections=12, n_bins=9, seed=5).fit(X)
    other = LODA(n_projections=12, n_bins=9, seed=99).load_state_dict(loda.state_dict())
    q = torch.randn(50, 6) * 2
    assert torch.equal(other.score(q), loda.score(q))
    with pytest.raises(ValueError, match="configured for 12 x 10"):
        LODA(n_projections=12, n_bins=10).load_state_dict(loda.state_dict())
    with pytest.raises(ValueError, match="fitted on 6"):
        loda.score(torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="not fitted"):
        LODA().score(X)
    with pytest.raises(ValueError, match="NaN or inf"):
        LODA().fit(torch.tensor([[0.0, float("nan")], [1.0, 1.0]]))
    for kwargs, msg in (({"n_projections": 0}, "n_projections"), ({"n_bins": 0}, "n_bins"),
                        ({"floor_count": 0}, "floor_count")):
        with pytest.raises(ValueError, match=msg):
            LODA(**kwargs)

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from detectors.metrics import (
    aupr_in,
    aupr_out,
    auroc,
    detection_rate_at_tpr,
    summarize,
    tnr_at_tpr,
)

TPRS = (0.5, 0.8, 0.9, 0.95, 0.99, 1.0)


def _random_pairs():
    """(scores_in, scores_out) pairs: continuous, heavily tied, unbalanced, shifted."""
    rng = np.random.default_rng(0)
    yield rng.normal(0, 1, 200), rng.normal(1, 1, 150)
    yield rng.integers(0, 6, 300).astype(float), rng.integers(2, 8, 100).astype(float)
    yield rng.integers(0, 3, 37).astype(float), rng.integers(0, 3, 41).astype(float)
    yield rng.normal(0, 1, 5), rng.normal(0.3, 1, 400)
    yield np.round(rng.normal(0, 1, 500), 1), np.round(rng.normal(-0.5, 2, 120), 1)


def _labels(s_in, s_out):
    """1 = OOD, 0 = in-distribution, matching np.concatenate([s_in, s_out])."""
    return np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]


@pytest.mark.parametrize("pair", list(_random_pairs()))
def test_auroc_and_aupr_match_sklearn(pair):
    s_in, s_out = pair
    y_out = _labels(s_in, s_out)
    s = np.r_[s_in, s_out]
    assert auroc(s_in, s_out) == pytest.approx(roc_auc_score(y_out, s), abs=1e-12)
    assert aupr_out(s_in, s_out) == pytest.approx(average_precision_score(y_out, s), abs=1e-12)
    assert aupr_in(s_in, s_out) == pytest.approx(average_precision_score(1 - y_out, -s), abs=1e-12)


@pytest.mark.parametrize("pair", list(_random_pairs()))
@pytest.mark.parametrize("tpr", TPRS)
def test_tnr_at_tpr_matches_sklearn_roc_curve(pair, tpr):
    s_in, s_out = pair
    # in-distribution positive, ranked by -score: the curve's tpr is #{s_in <= t} / n_in and
    # its fpr is #{s_out <= t} / n_out; the first point reaching the target gives 1 - fpr
    fpr_c, tpr_c, _ = roc_curve(1 - _labels(s_in, s_out), -np.r_[s_in, s_out], drop_intermediate=False)
    first = np.flatnonzero(tpr_c >= tpr - 1e-12)[0]
    assert tnr_at_tpr(s_in, s_out, tpr) == pytest.approx(1.0 - fpr_c[first], abs=1e-12)


@pytest.mark.parametrize("pair", list(_random_pairs()))
@pytest.mark.parametrize("tpr", TPRS)
def test_tnr_at_tpr_matches_bruteforce_threshold_search(pair, tpr):
    s_in, s_out = pair
    target = Fraction(str(tpr))
    t = min(c for c in np.unique(s_in) if Fraction(int((s_in <= c).sum()), len(s_in)) >= target)
    expected = (s_out > t).sum() / len(s_out)
    assert tnr_at_tpr(s_in, s_out, tpr) == expected


def test_perfect_separation():
    s_in, s_out = [0.1, 0.2, 0.3], [0.7, 0.8]
    assert auroc(s_in, s_out) == 1.0
    assert aupr_in(s_in, s_out) == 1.0
    assert aupr_out(s_in, s_out) == 1.0
    assert tnr_at_tpr(s_in, s_out) == 1.0


def test_reversed_separation():
    s_in, s_out = [0.7, 0.8], [0.1, 0.2, 0.3]
    assert auroc(s_in, s_out) == 0.0
    assert tnr_at_tpr(s_in, s_out) == 0.0
    # OOD ranked last: precision (1/3, 2/4, 3/5) at recall steps of 1/3
    assert aupr_out(s_in, s_out) == pytest.approx((1 / 3 + 2 / 4 + 3 / 5) / 3, abs=1e-15)
    # in-distribution ranked last under -score: precision (1/4, 2/5) at recall steps of 1/2
    assert aupr_in(s_in, s_out) == pytest.approx((1 / 4 + 2 / 5) / 2, abs=1e-15)


def test_all_tied_scores():
    s_in, s_out = [2.0] * 4, [2.0] * 6
    assert auroc(s_in, s_out) == 0.5
    assert aupr_out(s_in, s_out) == 0.6  # one threshold: precision = 6/10 at recall 1
    assert aupr_in(s_in, s_out) == 0.4
    assert tnr_at_tpr(s_in, s_out) == 0.0  # ties with the threshold are accepted


def test_hand_computed_three_vs_two_with_a_tie():
    s_in, s_out = [0.0, 1.0, 2.0], [2.0, 3.0]
    # pairs: 3 beats all three (3), 2 beats 0 and 1 (2) and ties 2 (1/2): 5.5 / 6
    assert auroc(s_in, s_out) == 11 / 12
    # OOD positive: t=3 -> P=1, R=1/2; t=2 -> tp=2, fp=1, P=2/3, R=1
    assert aupr_out(s_in, s_out) == pytest.approx(1 / 2 + 1 / 2 * 2 / 3, abs=1e-15)
    # in positive on -score: -0 (P=1, R=1/3), -1 (P=1, R=2/3), -2 with the tied OOD (P=3/4, R=1)
    assert aupr_in(s_in, s_out) == pytest.approx(1 / 3 + 1 / 3 + 1 / 3 * 3 / 4, abs=1e-15)


def test_tnr_at_tpr_four_vs_four_by_hand():
    s_in = [0.1, 0.4, 0.35, 0.8]  # sorted: 0.1, 0.35, 0.4, 0.8
    s_out = [0.9, 0.5, 0.8, 0.3]
    # tpr 0.25 -> k=1, t=0.1: all four OOD scores are above
    assert tnr_at_tpr(s_in, s_out, 0.25) == 1.0
    # tpr 0.5 -> k=2, t=0.35: 0.9, 0.5, 0.8 above, 0.3 accepted
    assert tnr_at_tpr(s_in, s_out, 0.5) == 0.75
    # tpr 0.75 -> k=3, t=0.4: same three
    assert tnr_at_tpr(s_in, s_out, 0.75) == 0.75
    # tpr 0.95 -> k=ceil(3.8)=4, t=0.8: only 0.9; the OOD 0.8 ties t and is accepted
    assert tnr_at_tpr(s_in, s_out, 0.95) == 0.25
    assert detection_rate_at_tpr(s_in, s_out, 0.95) == 0.25
    # 16 pairs: 0.9 beats 4, 0.5 beats 3, 0.8 beats 3 and ties 1, 0.3 beats 1 -> 11.5 / 16
    assert auroc(s_in, s_out) == 11.5 / 16


def test_tnr_threshold_ties_inside_the_in_scores():
    # k = ceil(0.5 * 4) = 2 -> t = 1; every tied in-sample is accepted, OOD at 1 too
    assert tnr_at_tpr([1.0, 1.0, 1.0, 3.0], [1.0, 1.0, 2.0, 2.0], 0.5) == 0.5


def test_tnr_at_tpr_is_not_fooled_by_float_rounding_of_tpr_times_n():
    assert 0.07 * 100 > 7  # 7.000000000000001: a bare ceil would demand 8 samples
    s_in = np.arange(100.0)
    s_out = np.arange(100.0) + 0.5
    # k = 7 -> t = 6: OOD scores 6.5 .. 99.5 are above
    assert tnr_at_tpr(s_in, s_out, 0.07) == 0.94


def test_inputs_are_independent_of_container_and_order():
    rng = np.random.default_rng(3)
    s_in, s_out = rng.integers(0, 5, 50).astype(float), rng.integers(1, 6, 30).astype(float)
    ref = summarize(s_in, s_out)
    as_tensors = summarize(torch.tensor(s_in, dtype=torch.float32, requires_grad=True), torch.tensor(s_out))
    shuffled = summarize(rng.permutation(s_in), list(rng.permutation(s_out)))
    assert as_tensors == ref
    assert shuffled == ref


def test_summarize_keys_and_values():
    s_in, s_out = [0.1, 0.4, 0.35, 0.8], [0.9, 0.5, 0.8, 0.3]
    out = summarize(s_in, s_out)
    assert out == {
        "auroc": auroc(s_in, s_out),
        "aupr_in": aupr_in(s_in, s_out),
        "aupr_out": aupr_out(s_in, s_out),
        "tnr_at_95_tpr": 0.25,
    }
    assert all(type(v) is float for v in out.values())


def test_infinite_scores_are_ordered():
    assert auroc([-math.inf, 0.0], [math.inf, 0.0]) == 0.875
    assert tnr_at_tpr([-math.inf, 0.0], [math.inf, 0.0], 1.0) == 0.5


@pytest.mark.parametrize("fn", [auroc, aupr_in, aupr_out, tnr_at_tpr, summarize])
def test_empty_nan_and_shape_are_rejected(fn):
    with pytest.raises(ValueError, match="scores_in is empty"):
        fn([], [1.0])
    with pytest.raises(ValueError, match="scores_out is empty"):
        fn([1.0], np.array([]))
    with pytest.raises(ValueError, match=r"scores_out contains 1 NaN"):
        fn([1.0, 2.0], [0.5, float("nan")])
    with pytest.raises(ValueError, match=r"scores_in contains 2 NaN"):
        fn(torch.tensor([float("nan"), float("nan")]), [0.5])
    with pytest.raises(ValueError, match=r"1-D array of scores \[n\], got shape \(2, 2\)"):
        fn(np.zeros((2, 2)), [0.5])


@pytest.mark.parametrize("tpr", [0.0, -0.1, 1.01, float("nan"), True, "0.95"])
def test_tnr_rejects_bad_tpr(tpr):
    with pytest.raises(ValueError, match=r"tpr must be a number in \(0, 1\]"):
        tnr_at_tpr([0.0, 1.0], [2.0], tpr)


def test_risk_coverage_metrics_exact():
    import pytest

    from detectors.metrics import aurc, risk_at_coverage

    right, wrong = [0.1, 0.2, 0.3], [0.4]
    # perfect ranking: the first 3 accepted are right
    assert risk_at_coverage(right, wrong, 0.75) == 0.0
    assert risk_at_coverage(right, wrong, 1.0) == 0.25
    assert aurc(right, wrong) == pytest.approx((0 + 0 + 0 + 1 / 4) / 4)
    # worst ranking: the wrong one is trusted most
    assert aurc([0.5, 0.6, 0.7], [0.0]) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    # a tie between one right and one wrong sample shares the error: risk at k=1 is 0.5
    assert aurc([1.0], [1.0]) == pytest.approx((0.5 + 0.5) / 2)
    # coverage 0.5 of 4 samples = 2 accepted; 0.6 interpolates between k = 2 and k = 3
    assert risk_at_coverage([0.0, 1.0], [0.5, 2.0], 0.5) == 0.5
    assert risk_at_coverage([0.0, 1.0], [0.5, 2.0], 0.6) == pytest.approx(1.0 / 2.4)

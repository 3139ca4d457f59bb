import math

import numpy as np
import pytest
import torch
from torch import nn

from detectors.baselines import MSP, ODIN, Energy, Mahalanobis, energy_score, msp_score

# logits z = x for the identity model; softmax rows: (1/3,1/3,1/3), (1/2,1/4,1/4), (6/10,3/10,1/10)
LOGITS = [[0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0], [math.log(6), math.log(3), 0.0]]

W = np.array([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0], [-1.5, 0.5, 2.0]])
B = np.array([0.1, -0.2, 0.3])


def _linear(weight, bias, dtype=torch.float64) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0]).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight))
        layer.bias.copy_(torch.as_tensor(bias))
    return layer


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _assert_untouched(model: nn.Module, training: bool) -> None:
    assert model.training is training
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- MSP / energy


def test_msp_exact_values():
    model = _linear(np.eye(3), np.zeros(3))
    scores = MSP(model).fit(None).anomaly_score(torch.tensor(LOGITS, dtype=torch.float64))
    assert scores.dtype == torch.float64 and scores.device.type == "cpu"
    torch.testing.assert_close(scores, torch.tensor([-1 / 3, -1 / 2, -6 / 10], dtype=torch.float64))


def test_energy_exact_values():
    model = _linear(np.eye(3), np.zeros(3))
    x = torch.tensor(LOGITS, dtype=torch.float64)
    # -logsumexp: sums of exp are 3, 4, 10
    expected_t1 = torch.tensor([-math.log(3), -math.log(4), -math.log(10)], dtype=torch.float64)
    torch.testing.assert_close(Energy(model).anomaly_score(x), expected_t1)
    # T = 2: -2 log sum exp(z / 2) = -2 log(3), -2 log(sqrt2 + 2), -2 log(sqrt6 + sqrt3 + 1)
    expected_t2 = -2 * torch.tensor(
        [math.log(3), math.log(math.sqrt(2) + 2), math.log(math.sqrt(6) + math.sqrt(3) + 1)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(Energy(model, temperature=2.0).anomaly_score(x), expected_t2)


def test_energy_and_msp_are_stable_for_huge_logits():
    z = torch.tensor([[1000.0, 0.0, 0.0], [-1000.0, -1000.0, -1000.0]], dtype=torch.float64)
    torch.testing.assert_close(
        energy_score(z), torch.tensor([-1000.0, 1000.0 - math.log(3)], dtype=torch.float64)
    )
    torch.testing.assert_close(msp_score(z), torch.tensor([-1.0, -1 / 3], dtype=torch.float64))


def test_scores_are_batch_size_independent_and_float32_models_work():
    model = _linear(W, B, dtype=torch.float32)
    x = torch.randn(37, 3, generator=torch.Generator().manual_seed(0))
    for detector in (MSP(model), Energy(model, 3.0), ODIN(model, 10.0, 0.05)):
        torch.testing.assert_close(detector.anomaly_score(x, batch_size=5), detector.anomaly_score(x, batch_size=256))
    assert MSP(model).anomaly_score(x[:0]).shape == (0,)


# ---------------------------------------------------------------- ODIN


def _odin_reference(x, temperature, epsilon, clip=None):
    """Closed form for z = Wx + b: ∇x log S_ŷ(x; T) = (1/T) Wᵀ (e_ŷ − p), p = softmax(z / T)."""
    z = x @ W.T + B
    p = _softmax(z / temperature)
    e = np.eye(3)[z.argmax(axis=1)]
    grad = (e - p) @ W / temperature
    x_tilde = x - epsilon * np.sign(-grad)
    if clip is not None:
        x_tilde = np.clip(x_tilde, *clip)
    score = -_softmax((x_tilde @ W.T + B) / temperature).max(axis=1)
    return x_tilde, grad, score


X_ODIN = np.array([[0.2, -0.4, 0.9], [1.0, 0.3, -0.5], [-0.7, 0.8, 0.1], [0.05, 0.6, 0.45]])


@pytest.mark.parametrize("temperature", [1.0, 1000.0])
def test_odin_perturbation_matches_closed_form_gradient(temperature):
    model = _linear(W, B)
    odin = ODIN(model, temperature=temperature, epsilon=0.01)
    x_tilde_ref, grad, score_ref = _odin_reference(X_ODIN, temperature, 0.01)
    assert (np.abs(grad) > 1e-6).all()  # every sign is determined
    assert (np.sign(grad) > 0).any() and (np.sign(grad) < 0).any()
    x_tilde = odin.perturb(torch.tensor(X_ODIN))
    np.testing.assert_allclose(x_tilde.numpy(), x_tilde_ref, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(np.sign(x_tilde.numpy() - X_ODIN), np.sign(grad))
    np.testing.assert_allclose(odin.anomaly_score(torch.tensor(X_ODIN)).numpy(), score_ref, rtol=0, atol=1e-12)


def test_odin_step_raises_the_top_softmax_and_first_row_by_hand():
    model = _linear(W, B)
    x = torch.tensor(X_ODIN)
    plain = ODIN(model, temperature=1.0, epsilon=0.0).anomaly_score(x)
    stepped = ODIN(model, temperature=1.0, epsilon=0.01).anomaly_score(x)
    assert (stepped < plain).all()  # more confident after the step: lower (less anomalous) score
    # row 0 by hand: z = Wx + b = (1.55, −1.5, 1.6), ŷ = 2, p = softmax(z) ≈ (0.4765, 0.0226, 0.5009);
    # Wᵀ(e_2 − p) = −0.4765·W[0] − 0.0226·W[1] + 0.4991·W[2] ≈ (−1.225, 1.180, 0.783),
    # so x̃ = x + 0.01 · (−1, +1, +1)
    x_tilde = ODIN(model, temperature=1.0, epsilon=0.01).perturb(x[:1])
    torch.testing.assert_close(x_tilde, torch.tensor([[0.19, -0.39, 0.91]], dtype=torch.float64))


def test_odin_without_epsilon_and_t1_is_msp():
    model = _linear(W, B)
    x = torch.tensor(X_ODIN)
    torch.testing.assert_close(ODIN(model, temperature=1.0, epsilon=0.0).anomaly_score(x), MSP(model).anomaly_score(x))


def test_odin_clip():
    model = _linear(W, B)
    x = torch.tensor(X_ODIN).clamp(0, 1)
    x_tilde_ref, _, score_ref = _odin_reference(x.numpy(), 1000.0, 0.2, clip=(0.0, 1.0))
    odin = ODIN(model, temperature=1000.0, epsilon=0.2, clip=(0.0, 1.0))
    x_tilde = odin.perturb(x)
    assert x_tilde.min() == 0.0 and x_tilde.max() == 1.0
    np.testing.assert_allclose(x_tilde.numpy(), x_tilde_ref, rtol=0, atol=1e-15)
    np.testing.assert_allclose(odin.anomaly_score(x).numpy(), score_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
def test_no_parameter_gradients_and_mode_unchanged(training):
    model = _linear(W, B).train(training)
    x = torch.tensor(X_ODIN)
    feature = Mahalanobis(model, lambda m, v: m(v), epsilon=0.01).fit(x, torch.tensor([0, 1, 1, 0]))
    for detector in (MSP(model), Energy(model), ODIN(model, 1000.0, 0.01), feature):
        detector.anomaly_score(x, batch_size=3)
        _assert_untouched(model, training)
    assert torch.is_grad_enabled()


def test_input_gradients_work_under_no_grad_and_inference_mode():
    model = _linear(W, B)
    x = torch.tensor(X_ODIN)
    _, _, score_ref = _odin_reference(X_ODIN, 1000.0, 0.01)
    odin = ODIN(model, 1000.0, 0.01)
    with torch.no_grad():
        np.testing.assert_allclose(odin.anomaly_score(x).numpy(), score_ref, rtol=0, atol=1e-12)
    with torch.inference_mode():
        np.testing.assert_allclose(odin.anomaly_score(x).numpy(), score_ref, rtol=0, atol=1e-12)
    _assert_untouched(model, True)


# ---------------------------------------------------------------- Mahalanobis

MEANS = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
COV = np.array([[1.0, 0.5], [0.5, 2.0]])


def _gaussian_data(n_per_class=60, seed=0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.multivariate_normal(m, COV, n_per_class) for m in MEANS])
    y = np.repeat(np.arange(3), n_per_class)
    return x, y


def _mahalanobis_reference(x_fit, y_fit, x):
    means = np.stack([x_fit[y_fit == c].mean(axis=0) for c in range(3)])
    centered = x_fit - means[y_fit]
    precision = np.linalg.inv(centered.T @ centered / len(x_fit))
    diff = x[:, None, :] - means[None]
    d = np.einsum("bkd,de,bke->bk", diff, precision, diff)
    return means, precision, d


def _identity_features(model, x):
    return model(x)


X_TEST = np.array([[0.0, 0.0], [1.5, 1.5], [3.0, 0.2], [-4.0, 5.0], [10.0, -10.0]])


def test_mahalanobis_matches_numpy_reference():
    x_fit, y_fit = _gaussian_data()
    maha = Mahalanobis(nn.Identity(), _identity_features).fit(torch.tensor(x_fit), torch.tensor(y_fit), batch_size=7)
    means, precision, d = _mahalanobis_reference(x_fit, y_fit, X_TEST)
    np.testing.assert_allclose(maha.means.numpy(), means, rtol=0, atol=1e-12)
    np.testing.assert_allclose(maha.precision.numpy(), precision, rtol=1e-9, atol=1e-9)
    scores = maha.anomaly_score(torch.tensor(X_TEST), batch_size=2)
    assert scores.dtype == torch.float64
    np.testing.assert_allclose(scores.numpy(), d.min(axis=1), rtol=0, atol=1e-6)
    # the far point is far: it scores above every fit sample
    assert scores[-1] > maha.anomaly_score(torch.tensor(x_fit)).max()
    torch.testing.assert_close(maha.classes, torch.tensor([0, 1, 2]))


def test_mahalanobis_float32_inputs_and_sparse_labels():
    x_fit, y_fit = _gaussian_data(seed=1)
    labels = np.array([3, 7, 11])[y_fit]  # labels need not be 0..K-1
    maha = Mahalanobis(nn.Identity(), _identity_features).fit(
        torch.tensor(x_fit, dtype=torch.float32), labels.tolist()
    )
    x32 = x_fit.astype(np.float32).astype(np.float64)
    _, _, d = _mahalanobis_reference(x32, y_fit, X_TEST.astype(np.float32).astype(np.float64))
    scores = maha.anomaly_score(torch.tensor(X_TEST, dtype=torch.float32))
    np.testing.assert_allclose(scores.numpy(), d.min(axis=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(maha.classes, torch.tensor([3, 7, 11]))


def test_mahalanobis_rank_deficient_features_give_the_full_rank_distances():
    # features (x1, x2, x1 + x2, 0) = A x with A of full column rank: the pseudo-inverse
    # distance equals the 2-D distance, where a plain inverse would fail
    def redundant(model, x):
        return torch.cat([x, x.sum(dim=1, keepdim=True), torch.zeros_like(x[:, :1])], dim=1)

    x_fit, y_fit = _gaussian_data()
    maha = Mahalanobis(nn.Identity(), redundant).fit(torch.tensor(x_fit), torch.tensor(y_fit))
    assert torch.linalg.matrix_rank(torch.linalg.pinv(maha.precision)) == 2
    _, _, d = _mahalanobis_reference(x_fit, y_fit, X_TEST)
    scores = maha.anomaly_score(torch.tensor(X_TEST))
    assert torch.isfinite(scores).all()
    np.testing.assert_allclose(scores.numpy(), d.min(axis=1), rtol=1e-8, atol=1e-8)


def test_mahalanobis_input_preprocessing_matches_closed_form():
    # identity features: ∇x (x − μ_ĉ)ᵀ P (x − μ_ĉ) = 2 P (x − μ_ĉ); x̃ = x − ε sign(P (x − μ_ĉ))
    x_fit, y_fit = _gaussian_data()
    eps = 0.05
    plain = Mahalanobis(nn.Identity(), _identity_features).fit(torch.tensor(x_fit), torch.tensor(y_fit))
    maha = Mahalanobis(nn.Identity(), _identity_features, epsilon=eps).fit(
        torch.tensor(x_fit), torch.tensor(y_fit)
    )
    means, precision, d = _mahalanobis_reference(x_fit, y_fit, X_TEST)
    closest = d.argmin(axis=1)
    grad = np.einsum("de,be->bd", precision, X_TEST - means[closest])
    x_tilde_ref = X_TEST - eps * np.sign(grad)
    np.testing.assert_allclose(maha.perturb(torch.tensor(X_TEST)).numpy(), x_tilde_ref, rtol=0, atol=1e-15)
    _, _, d_tilde = _mahalanobis_reference(x_fit, y_fit, x_tilde_ref)
    scores = maha.anomaly_score(torch.tensor(X_TEST), batch_size=3)
    np.testing.assert_allclose(scores.numpy(), d_tilde.min(axis=1), rtol=0, atol=1e-6)
    assert (scores < plain.anomaly_score(torch.tensor(X_TEST))).all()  # the step moves towards a class mean


def test_mahalanobis_errors():
    maha = Mahalanobis(nn.Identity(), _identity_features)
    with pytest.raises(RuntimeError, match=r"not fitted: call fit\(x, y\)"):
        maha.anomaly_score(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="needs the class labels"):
        maha.fit(torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"y must be labels \[n\] for the 4 samples"):
        maha.fit(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class labels"):
        maha.fit(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        maha.fit(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"feature_fn must return features \[B, D\]"):
        Mahalanobis(nn.Identity(), lambda m, x: x[:, 0]).fit(torch.zeros(4, 2), torch.tensor([0, 0, 1, 1]))
    maha.fit(torch.randn(4, 2), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="returned 3 features, Mahalanobis was fitted on 2"):
        maha.anomaly_score(torch.zeros(2, 3))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda m: Energy(m, temperature=0.0), r"temperature must be a number > 0"),
        (lambda m: ODIN(m, temperature=-1.0), r"temperature must be a number > 0"),
        (lambda m: ODIN(m, epsilon=-0.1), r"epsilon must be a number >= 0"),
        (lambda m: ODIN(m, clip=(1.0, 0.0)), r"clip must be None or a pair \(lo, hi\) with lo < hi"),
        (lambda m: ODIN(m, clip=(0.0,)), r"clip must be None or a pair"),
        (lambda m: Mahalanobis(m, None), r"feature_fn must be a callable feature_fn\(model, x\)"),
        (lambda m: Mahalanobis(m, _identity_features, epsilon=float("nan")), "epsilon must be a number >= 0"),
        (lambda m: MSP("not a model"), "model must be a torch.nn.Module"),
        (lambda m: MSP(m).anomaly_score(torch.zeros(2, 3), batch_size=0), "batch_size must be a positive integer"),
    ],
)
def test_constructor_and_argument_validation(make, message):
    with pytest.raises(ValueError, match=message):
        make(_linear(W, B))

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectors import cosine_similarity_maps, cosine_similarity_matrix
from detectors.zoo import MnistCNN


def _linear(d=6, c=5, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d, c)


def _reference_csm(model, x, classes, rescale=False, channel_max=False):
    """Brute force: autograd of the explicit cross-entropy, one sample and class at a time."""
    out = np.zeros((len(x), classes.shape[1], classes.shape[1]))
    for b in range(len(x)):
        maps = []
        for c in classes[b].tolist():
            xb = x[b:b + 1].clone().requires_grad_(True)
            z = model(xb)
            if rescale:
                z = z * (10.0 / z.abs().max())
            (g,) = torch.autograd.grad(F.cross_entropy(z, torch.tensor([c])), xb)
            s = torch.sign(g)[0]
            if channel_max:
                s = s.amax(dim=0)
            maps.append(s.flatten().double().numpy())
        m = np.stack(maps)
        gram = m @ m.T
        norms = np.sqrt(np.diag(gram))
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = gram / np.outer(norms, norms)
        out[b] = np.nan_to_num(cos, nan=0.0)
    return out


def test_linear_softmax_regression_matches_closed_form():
    model = _linear(d=6, c=5)
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(1))
    res = cosine_similarity_maps(model, x)
    W = model.weight.detach().double().numpy()
    z = x.double().numpy() @ W.T + model.bias.detach().double().numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    order = np.argsort(-z, axis=1)
    assert res.classes.tolist() == order.tolist()
    for b in range(7):
        # ∇x CE(i) = Wᵀ (p − e_i)
        s = np.stack([np.sign(W.T @ (p[b] - np.eye(5)[i])) for i in order[b]])
        norms = np.sqrt((s * s).sum(1))
        expected = (s @ s.T) / np.outer(norms, norms)
        np.testing.assert_allclose(res.csm[b].numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(res.logits.numpy(), z, atol=1e-5)


@pytest.mark.parametrize("strategy", ["loop", "vmap", "replicate"])
def test_cnn_matches_bruteforce_cross_entropy(strategy):
    torch.manual_seed(0)
    model = MnistCNN().eval()
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    res = cosine_similarity_maps(model, x, strategy=strategy)
    ref = _reference_csm(model, x, res.classes)
    np.testing.assert_allclose(res.csm.numpy(), ref, atol=1e-6)


def test_symmetric_unit_diagonal_and_topn_subblock():
    torch.manual_seed(0)
    model = MnistCNN().eval()
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    full = cosine_similarity_maps(model, x)
    assert full.csm.shape == (4, 10, 10)
    assert torch.equal(full.csm, full.csm.transpose(1, 2))
    assert torch.equal(torch.diagonal(full.csm, dim1=1, dim2=2), torch.ones(4, 10))
    assert torch.equal(full.classes[:, 0], full.logits.argmax(1))
    for n in (3, 5):
        part = cosine_similarity_maps(model, x, top_n=n)
        assert torch.equal(part.classes, full.classes[:, :n])
        torch.testing.assert_close(part.csm, full.csm[:, :n, :n], atol=1e-6, rtol=0)


def test_strategies_agree():
    torch.manual_seed(0)
    model = MnistCNN().eval()
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    ref = cosine_similarity_maps(model, x, top_n=6, strategy="loop")
    for s in ("vmap", "replicate", "auto"):
        other = cosine_similarity_maps(model, x, top_n=6, strategy=s)
        assert torch.equal(other.classes, ref.classes)
        assert (other.csm - ref.csm).abs().max().item() <= 1e-6


def test_saturated_logits_give_zero_not_nan():
    model = nn.Linear(4, 5)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([1000.0, 0.0, 0.0, 0.0, 0.0]))
        model.weight[:, 0] = torch.tensor([0.0, 1.0, -1.0, 2.0, -2.0])
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    res = cosine_similarity_maps(model, x)
    assert not torch.isnan(res.csm).any()
    # p = e_0 exactly in float32: the predicted class has a zero saliency
    assert torch.equal(res.csm[:, 0, :], torch.zeros(2, 5))
    assert torch.equal(res.csm[:, :, 0], torch.zeros(2, 5))
    # every other saliency is −sign(w_i − w_0) on feature 0 only: cosines are ±1
    w = torch.tensor([0.0, 1.0, -1.0, 2.0, -2.0])
    for b in range(2):
        s = -torch.sign(w[res.classes[b, 1:]] - 0.0)
        assert torch.equal(res.csm[b, 1:, 1:], torch.outer(s, s))


def test_no_parameter_grads_no_graph_mode_unchanged():
    torch.manual_seed(0)
    model = MnistCNN()
    for training in (True, False):
        model.train(training)
        x = torch.rand(2, 1, 28, 28)
        for s in ("loop", "vmap", "replicate"):
            res = cosine_similarity_maps(model, x, top_n=4, strategy=s)
            assert model.training is training
            assert all(p.grad is None for p in model.parameters())
            assert all(p.requires_grad for p in model.parameters())
            for t in (res.csm, res.classes, res.logits):
                assert t.grad_fn is None and not t.requires_grad


def test_works_under_inference_mode_and_no_grad():
    model = _linear()
    x = torch.randn(3, 6)
    ref = cosine_similarity_maps(model, x)
    with torch.inference_mode():
        a = cosine_similarity_maps(model, x)
    with torch.no_grad():
        b = cosine_similarity_maps(model, x)
    assert torch.equal(a.csm, ref.csm) and torch.equal(b.csm, ref.csm)


def test_time_series_and_channel_max():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 4, 5), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 6)).eval()
    x = torch.randn(3, 3, 20)
    res = cosine_similarity_maps(model, x)
    np.testing.assert_allclose(res.csm.numpy(), _reference_csm(model, x, res.classes), atol=1e-6)
    red = cosine_similarity_maps(model, x, channel_reduce="max")
    np.testing.assert_allclose(
        red.csm.numpy(), _reference_csm(model, x, red.classes, channel_max=True), atol=1e-6
    )


def test_rescale_logits_matches_bruteforce():
    model = _linear(d=6, c=5, seed=3)
    x = 5 * torch.randn(4, 6)
    res = cosine_similarity_maps(model, x, rescale_logits=True)
    np.testing.assert_allclose(res.csm.numpy(), _reference_csm(model, x, res.classes, rescale=True),
                               atol=1e-6)
    # logits are returned unscaled
    torch.testing.assert_close(res.logits, model(x).detach())


def test_invalid_arguments():
    model = _linear()
    x = torch.randn(2, 6)
    for bad in (0, 2, -1, 2.5):
        with pytest.raises(ValueError, match="top_n must be an integer >= 3"):
            cosine_similarity_maps(model, x, top_n=bad)
    with pytest.raises(ValueError, match="exceeds the model's 5 classes"):
        cosine_similarity_maps(model, x, top_n=6)
    with pytest.raises(ValueError, match="channel axis"):
        cosine_similarity_maps(model, x, channel_reduce="max")
    with pytest.raises(ValueError, match="strategy must be one of"):
        cosine_similarity_maps(model, x, strategy="fast")
    with pytest.raises(ValueError, match="non-empty batch"):
        cosine_similarity_maps(model, torch.randn(0, 6))


def test_cosine_similarity_matrix_exact_values():
    s = torch.tensor([[[1.0, 1.0, 0.0], [1.0, -1.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 0.0]]])
    out = cosine_similarity_matrix(s)[0]
    expected = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0],
                             [1.0, 0.0, 0.0, 1.0]])
    assert torch.equal(out, expected)
    v = torch.tensor([[[3.0, 4.0], [4.0, 3.0]]])
    assert math.isclose(cosine_similarity_matrix(v)[0, 0, 1].item(), 24 / 25, rel_tol=1e-7)


def test_confident_predictions_keep_the_predicted_class_direction():
    # margins of ~30: float32 softmax gives p_k == 1 exactly, yet the true gradient of the
    # predicted class, Σ_{j≠k} p_j (w_j − w_k), is far from zero and has a definite sign
    torch.manual_seed(4)
    model = nn.Linear(12, 4).double()
    with torch.no_grad():
        model.bias.copy_(torch.tensor([30.0, 0.0, -2.0, 1.0], dtype=torch.float64))
    x = 0.1 * torch.randn(3, 12, dtype=torch.float64)
    z = model(x).float()
    assert torch.equal(torch.softmax(z, 1).amax(1), torch.ones(3))  # saturated in float32
    res = cosine_similarity_maps(model.float(), x.float())
    W = model.weight.detach().double().numpy()
    zd = x.numpy() @ W.T + model.bias.detach().numpy()
    for b in range(3):
        p = np.exp(zd[b] - zd[b].max())
        p /= p.sum()
        order = res.classes[b].tolist()
        k = order[0]
        g = [sum(p[j] * (W[j] - W[k]) for j in range(4) if j != k)]  # predicted class
        g += [W.T @ (p - np.eye(4)[i]) for i in order[1:]]
        s = np.sign(np.stack(g))
        norms = np.sqrt((s * s).sum(1))
        np.testing.assert_allclose(res.csm[b].numpy(), (s @ s.T) / np.outer(norms, norms), atol=1e-6)
        assert res.csm[b, 0, 0] == 1.0  # not a zero saliency


def _saturated_identity():
    """z = x on 3 classes; x = (40, 0, -5) saturates the float32 softmax (p_0 == 1.0 exactly)."""
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    x = torch.tensor([[40.0, 0.0, -5.0]])
    assert torch.softmax(x, 1)[0, 0].item() == 1.0
    return model, x


@pytest.mark.parametrize("strategy", ["loop", "vmap", "replicate"])
def test_naive_cotangents_drop_the_predicted_class_term(strategy):
    # with J = I the saliencies are the signs of the cotangents themselves:
    # exact  s_0 = sign(-(p_1 + p_2), p_1, p_2) = (-1, 1, 1)
    # naive  s_0 = sign(p_0 - 1, p_1, p_2) = (0, 1, 1)   (p_0 - 1 rounds to 0 in float32)
    # both   s_1 = (1, -1, 1), s_2 = (1, 1, -1)
    model, x = _saturated_identity()
    third = 1.0 / 3.0
    exact = cosine_similarity_maps(model, x, strategy=strategy)
    expected = torch.tensor([[1.0, -third, -third], [-third, 1.0, -third], [-third, -third, 1.0]])
    assert exact.classes.tolist() == [[0, 1, 2]]
    torch.testing.assert_close(exact.csm[0], expected, atol=1e-7, rtol=0)
    naive = cosine_similarity_maps(model, x, strategy=strategy, cotangents="naive")
    expected[0, 1:] = expected[1:, 0] = 0.0
    torch.testing.assert_close(naive.csm[0], expected, atol=1e-7, rtol=0)
    # the default is the exact variant
    assert torch.equal(cosine_similarity_maps(model, x, strategy=strategy, cotangents="exact").csm, exact.csm)


def test_naive_cotangents_match_the_cross_entropy_backward_of_the_official_code():
    # F.cross_entropy's backward is the naive float32 p - e_i: the brute-force reference has the defect too
    model, x = _saturated_identity()
    x = torch.cat([x, torch.tensor([[0.3, -0.2, 0.1]])])
    naive = cosine_similarity_maps(model, x, cotangents="naive")
    np.testing.assert_allclose(naive.csm.numpy(), _reference_csm(model, x, naive.classes), atol=1e-6)
    # on the unsaturated sample both variants agree
    exact = cosine_similarity_maps(model, x)
    assert torch.equal(exact.csm[1], naive.csm[1]) and not torch.equal(exact.csm[0], naive.csm[0])


@pytest.mark.parametrize("strategy", ["loop", "vmap", "replicate"])
def test_channel_max_from_the_same_gradients(strategy):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 6)).eval()
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    both = cosine_similarity_maps(model, x, strategy=strategy, return_channel_max=True)
    plain = cosine_similarity_maps(model, x, strategy=strategy)
    red = cosine_similarity_maps(model, x, strategy=strategy, channel_reduce="max")
    assert torch.equal(both.csm, plain.csm) and torch.equal(both.classes, plain.classes)
    assert torch.equal(both.csm_channel_max, red.csm)
    assert plain.csm_channel_max is None
    np.testing.assert_allclose(both.csm_channel_max.numpy(), _reference_csm(model, x, both.classes,
                                                                            channel_max=True), atol=1e-6)
    # with the naive cotangents and rescaled logits too
    b2 = cosine_similarity_maps(model, x, 3, strategy=strategy, return_channel_max=True, cotangents="naive",
                                rescale_logits=True)
    r2 = cosine_similarity_maps(model, x, 3, strategy=strategy, channel_reduce="max", cotangents="naive",
                                rescale_logits=True)
    assert torch.equal(b2.csm_channel_max, r2.csm)


def test_invalid_cotangent_and_channel_max_options():
    model = _linear()
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="cotangents must be one of"):
        cosine_similarity_maps(model, x, cotangents="float32")
    with pytest.raises(ValueError, match="return_channel_max=True needs inputs with a channel axis"):
        cosine_similarity_maps(model, x, return_channel_max=True)

"""The composite's robust second opinion: the disagreement component and its guard, on tiny models."""

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from benchmarks.adaptive.surrogate import Surrogate
from detectors.composite import CompositeDetector
from detectors.persist import load_detector
from detectors.second_opinion import SECOND_OPINIONS, SecondOpinionSpec, check_input_shape
from detectors.signals import class_margin
from service.models import ModelCard, ModelLoadError
from tests.support.threads import one_thread  # noqa: F401 (autouse fixture)

LAYERS = ["0", "2"]


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5)).eval()
    with torch.no_grad():  # inputs in [0, 1]^8: centre the first layer on 0.5 and sharpen it
        model[0].weight.mul_(4.0)
        model[0].bias.copy_(-0.5 * model[0].weight.sum(dim=1))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _second(served: nn.Module) -> nn.Module:
    """A 'second opinion' that mostly agrees with the served model: its logits plus a small random net's."""

    class Second(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = _mlp(0)
            self.b = _mlp(7)

        def forward(self, x):
            return self.a(x) + 0.3 * self.b(x)

    return Second().eval()


def _data(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tiny_spec(tmp_path, monkeypatch):
    weights = tmp_path / "second.safetensors"
    save_file({k: v.contiguous() for k, v in _second(_mlp(0)).state_dict().items()}, str(weights))
    spec = SecondOpinionSpec(lambda: _second(_mlp(0)), (8,), weights, "tiny test second opinion")
    monkeypatch.setitem(SECOND_OPINIONS, "tiny", spec)
    return spec


@pytest.fixture
def fitted(tiny_spec):
    model = _mlp(0)
    x, xc = _data(2000, 1), _data(1000, 2)
    with torch.no_grad():
        y, yc = model(x).argmax(1), model(xc).argmax(1)
    det = CompositeDetector(model, top_n=4, layers=LAYERS, second_opinion="tiny", guard_share=0.3)
    return det.fit(x, y, calibration=(xc, yc))


def test_the_disagreement_is_the_second_opinions_margin_for_the_served_label(fitted):
    det = fitted
    x = _data(64, 3)
    assert det.components[-1] == "disagreement" and det.weights[-1].item() == 0.0
    sig = det.signals(x)
    with torch.no_grad():
        r = det.second(x)
    expected = -class_margin(r, det.model(x).argmax(1))
    assert torch.allclose(det.component_scores(sig)[:, -1], expected, rtol=0, atol=1e-12)


def test_the_statistic_is_the_guarded_minimum(fitted):
    det = fitted
    x = _data(64, 4)
    res = det.score(x)
    log_p = res.features.double()
    w = 0.3
    # the main statistic: the composite's truncated Fisher product without the disagreement
    comp = det.component_scores(det.signals(x))
    log_p_exact = det.reference.log_p(comp)
    keep = torch.tensor([n == "margin" for n in det.components[:-1]])
    trunc = torch.where(keep, log_p_exact[:, :-1], torch.clamp(log_p_exact[:, :-1] - math.log(0.1), max=0.0))
    main = -2.0 * trunc.sum(dim=1)
    lp_main = det.main_reference.log_p(main[:, None])[:, 0]
    expected = torch.maximum(math.log(1 - w) - lp_main, math.log(w) - log_p_exact[:, -1])
    assert torch.allclose(res.score, expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(log_p, log_p_exact, atol=1e-6)
    assert torch.equal(res.flagged, det.calibration.trust(res.score) < det.alpha)


def test_clean_flag_rate_stays_at_alpha_on_fresh_samples(fitted):
    det = fitted
    x = _data(4000, 5)
    flagged = det.score(x).flagged.double().mean().item()
    assert abs(flagged - 0.05) <= 0.02, flagged


def test_a_strong_disagreement_is_flagged_on_its_own(fitted):
    det = fitted
    x = _data(400, 6)
    res = det.score(x)
    main_only = CompositeDetector.guarded(det, res.score * 0 - 1e9, res.features.double()[:, -1])
    # with the main statistic out of the way, the guard alone still flags the largest disagreements
    dis = -res.features.double()[:, -1]
    top = dis.argmax()
    assert det.calibration.trust(main_only[top:top + 1]).item() < det.alpha
    assert bool(res.flagged[top])


def test_save_load_keeps_the_second_opinion_weights(fitted, tiny_spec, tmp_path, monkeypatch):
    det = fitted
    x = _data(32, 8)
    before = det.score(x)
    det.save(tmp_path / "det")
    # the packaged weights change after the fit: the saved detector still judges with its own
    other = tmp_path / "other.safetensors"
    save_file({k: torch.zeros_like(v).contiguous() for k, v in _second(_mlp(0)).state_dict().items()}, str(other))
    monkeypatch.setitem(SECOND_OPINIONS, "tiny", SecondOpinionSpec(tiny_spec.build, (8,), other, "changed"))
    loaded = load_detector(tmp_path / "det", det.model)
    after = loaded.score(x)
    assert torch.equal(before.score, after.score) and torch.equal(before.flagged, after.flagged)
    state = {k: v for k, v in det.state_dict().items() if not k.startswith("second_opinion.model.")}
    with pytest.raises(ValueError, match="missing the tiny second opinion's weights"):
        fresh = CompositeDetector(det.model, top_n=4, layers=list(det.config.layers), second_opinion="tiny")
        fresh.load_state_dict(state)


def test_bad_second_opinions_are_refused(tiny_spec):
    with pytest.raises(ValueError, match="second_opinion must be None or one of"):
        CompositeDetector(_mlp(0), second_opinion="nope")
    with pytest.raises(ValueError, match="needs the fisher or min combiner"):
        CompositeDetector(_mlp(0), second_opinion="tiny", combine="sum")
    with pytest.raises(ValueError, match="guard_share must be in"):
        CompositeDetector(_mlp(0), second_opinion="tiny", guard_share=1.0)
    with pytest.raises(ValueError, match=r"reads inputs of shape \(8,\), the served model's are \(1, 8\)"):
        check_input_shape("tiny", torch.rand(4, 1, 8))


def test_the_model_card_names_a_known_second_opinion_of_the_right_shape():
    base = {"input_shape": [1, 28, 28], "class_names": [str(i) for i in range(10)]}
    assert ModelCard.from_dict({**base, "second_opinion": "robust_mnist_cnn"}, "c").second_opinion == "robust_mnist_cnn"
    with pytest.raises(ModelLoadError, match="second_opinion must be one of"):
        ModelCard.from_dict({**base, "second_opinion": "resnet"}, "c")
    with pytest.raises(ModelLoadError, match=r"reads inputs of shape \(1, 28, 28\)"):
        ModelCard.from_dict({**base, "input_shape": [3, 32, 32], "second_opinion": "robust_mnist_cnn"}, "c")


def test_the_surrogate_copies_the_guarded_statistic(fitted):
    det = fitted
    x = _data(32, 9)
    served = det.score(x)
    sur = Surrogate(det, gga="exact")
    for t in (0.0, 1e-9):
        out = sur(x, temperature=t)
        assert (out.statistic.detach() - served.score).abs().max().item() <= 1e-6, t
        assert torch.equal(out.hard_statistic, served.score)
    # the gradient reaches the input through the second opinion (omit GGA: smooth parts only)
    xr = x.clone().requires_grad_(True)
    with torch.enable_grad():
        out = Surrogate(det, gga="omit")(xr, target=torch.zeros(len(x), dtype=torch.long))
        (g,) = torch.autograd.grad(out.statistic.sum(), xr)
    assert torch.isfinite(g).all() and g.abs().sum().item() > 0


def test_the_joint_attack_breaks_more_as_the_budget_grows(fitted):
    from benchmarks.adaptive import joint
    from benchmarks.adaptive.common import Budget, Context, Judge

    det = fitted
    x = _data(24, 12)
    with torch.no_grad():
        y = det.model(x).argmax(1)
    counts = []
    for eps in (0.02, 0.1, 0.5):
        sur = Surrogate(det)
        ctx = Context(sur, Judge(sur), Budget("linf", eps), steps=20, judge_every=1)
        tr = joint.attack(ctx, x, y)
        ok = tr.found
        assert bool(ctx.budget.inside(tr.x_point, x).all())
        if ok.any():  # every counted point is misclassified and unflagged by the served detector
            res = det.score(tr.x_point[ok])
            assert bool((res.label != y[ok]).all()) and not bool(res.flagged.any())
        counts.append(int(ok.sum()))
    assert counts == sorted(counts) and counts[-1] - counts[0] >= 5, counts

import json
import math

import pytest
import torch
from torch import nn

from detectors import FingerprintMismatchError
from detectors.composite import CompositeDetector
from detectors.gaussian import TiedGaussian
from detectors.gga import GGADetector
from detectors.persist import load_detector

LAYERS = ["0", "1"]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5)).eval()


def _data(model, n, seed, scale=1.0):
    x = scale * torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


@pytest.fixture(scope="module")
def fitted():
    model = _model()
    x, y = _data(model, 1500, 1)
    xc, yc = _data(model, 500, 2)
    return model, CompositeDetector(model, top_n=4, layers=LAYERS).fit(x, y, calibration=(xc, yc))


def test_components_and_fit_stats(fitted):
    _, det = fitted
    assert det.component_names == ["gga", "margin", "energy", "layer:0", "layer:1"]
    st = det.fit_stats
    # every label is the model's own prediction: all 2000 correct; 30% of the 1500 fit samples for reference
    assert (st.n_samples, st.n_correct, st.n_reference, st.n_fit, st.n_calibration) == (2000, 2000, 450, 1050, 500)
    assert st.model_accuracy == 1.0


def test_conformal_flag_rate_on_5000_fresh_samples(fitted):
    model, det = fitted
    fresh, _ = _data(model, 5000, 3)
    out = det.score(fresh)
    assert abs(out.flagged.double().mean().item() - 0.05) <= 0.02
    assert torch.equal(out.flagged, out.trust < 0.05)
    assert torch.equal(out.flagged, out.score > det.threshold)


def test_far_inputs_are_flagged(fitted):
    model, det = fitted
    far, _ = _data(model, 200, 4, scale=25.0)
    assert det.score(far).flagged.double().mean().item() > 0.9


def test_layer_distance_component_is_the_tied_gaussian_distance(fitted):
    model, det = fitted
    x, _ = _data(model, 7, 5)
    s = det.signals(x)
    with torch.no_grad():
        h0 = model[0](x).double()
    torch.testing.assert_close(s.layers["0"], h0)
    comp = det.component_scores(s)
    g = det.gaussians["0"]
    d = ((h0[:, None, :] - g.means[None]) @ g.precision * (h0[:, None, :] - g.means[None])).sum(-1).amin(1)
    torch.testing.assert_close(comp[:, 3], d)


def test_too_confident_is_suspicious_too():
    """Two-sided signals: far more confident than every reference sample gets a small p-value too."""
    model = _model()
    x, y = _data(model, 1500, 1)
    det = CompositeDetector(model, top_n=4, use_gga=False, use_layers=False,
                            two_sided=("margin", "energy")).fit(x, y)
    s = det.signals(x[:1])
    s.logits = torch.tensor([[60.0, 0.0, 0.0, 0.0, 0.0]])
    log_p = det.statistic(s)[1]
    assert log_p[0, 0].item() < -5 and log_p[0, 1].item() < -5  # margin, energy
    s.logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0]])  # too unsure
    assert det.statistic(s)[1][0, 0].item() < -5
    # the default: the margin is one-sided (low confidence only), the energy two-sided
    det = CompositeDetector(model, top_n=4, use_gga=False, use_layers=False).fit(x, y)
    s.logits = torch.tensor([[60.0, 0.0, 0.0, 0.0, 0.0]])
    log_p = det.statistic(s)[1]
    assert log_p[0, 0].item() == 0.0 and log_p[0, 1].item() < -5


def test_truncated_fisher_closed_form():
    model = _model()
    x, y = _data(model, 1500, 1)
    det = CompositeDetector(model, top_n=4, layers=LAYERS).fit(x, y)
    assert (det.config.combine, det.config.truncation, det.config.two_sided) == ("fisher", 0.1, ("energy",))
    s = det.signals(_data(model, 50, 9, scale=3.0)[0])
    stat, log_p = det.statistic(s)
    # margin (column 1) in full, the others only below tau = 0.1
    expected = -2 * (log_p[:, 1] + torch.clamp(log_p[:, [0, 2, 3, 4]] - math.log(0.1), max=0).sum(dim=1))
    torch.testing.assert_close(stat, expected)
    plain = CompositeDetector(model, top_n=4, layers=LAYERS, truncation=1.0).fit(x, y)
    stat1, log_p1 = plain.statistic(s)
    torch.testing.assert_close(stat1, -2 * log_p1.sum(dim=1))


def test_save_load_round_trip(fitted, tmp_path):
    model, det = fitted
    det.save(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "detector.json").read_text())
    assert meta["kind"] == "composite" and meta["components"] == det.component_names
    again = load_detector(tmp_path / "d", model)
    assert isinstance(again, CompositeDetector)
    q, _ = _data(model, 64, 6, scale=2.0)
    a, b = det.score(q), again.score(q)
    assert torch.equal(a.trust, b.trust) and torch.equal(a.score, b.score)


def test_load_refuses_other_weights_and_bad_state(fitted, tmp_path):
    model, det = fitted
    det.save(tmp_path / "d")
    other = _model()
    with torch.no_grad():
        other[0].weight.add_(0.1)
    with pytest.raises(FingerprintMismatchError):
        load_detector(tmp_path / "d", other)
    state = det.state_dict()
    state["reference.center"] = state["reference.center"][:2]
    with pytest.raises(ValueError, match="components"):
        CompositeDetector(model, top_n=4, layers=LAYERS).load_state_dict(state)
    state = det.state_dict()
    state["calibration_scores"] = state["calibration_scores"][:10]
    with pytest.raises(ValueError, match="at least 20"):
        CompositeDetector(model, top_n=4, layers=LAYERS).load_state_dict(state)
    state = det.state_dict()
    state["layer.0.means"] = torch.full_like(state["layer.0.means"], float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        CompositeDetector(model, top_n=4, layers=LAYERS).load_state_dict(state)


def test_fit_refuses_a_calibration_set_too_small_to_flag():
    model = _model()
    x, y = _data(model, 600, 1)
    with pytest.raises(ValueError, match="at least 20"):
        CompositeDetector(model, top_n=4, layers=LAYERS).fit(x, y, calibration=_data(model, 15, 2))
    with pytest.raises(ValueError, match="at least 20"):
        GGADetector(model, top_n=4).fit(x, y, calibration=_data(model, 15, 2))


def test_one_forward_pass_per_batch():
    model = _model()
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append(1))
    x, y = _data(model, 400, 1)
    calls.clear()
    det = CompositeDetector(model, top_n=4, layers=LAYERS, strategy="loop")
    det.signals(x[:10])
    assert len(calls) == 1


def test_default_layers_are_found_at_fit_time():
    model = _model()
    x, y = _data(model, 600, 1)
    det = CompositeDetector(model, top_n=4).fit(x, y)
    assert det.config.layers == ("0", "1")


def test_combiners_and_ablations_fit():
    model = _model()
    x, y = _data(model, 900, 1)
    far, _ = _data(model, 100, 7, scale=25.0)
    for kw in ({"combine": "min"}, {"combine": "sum"}, {"combine": "loda"}, {"use_gga": False},
               {"use_logits": False}, {"use_layers": False}):
        det = CompositeDetector(model, top_n=4, layers=LAYERS, **kw).fit(x, y)
        assert det.score(far).flagged.double().mean().item() > 0.5, kw
    with pytest.raises(ValueError, match="at least one"):
        CompositeDetector(model, use_gga=False, use_logits=False, use_layers=False)
    with pytest.raises(ValueError, match="combine"):
        CompositeDetector(model, combine="mean")


def test_tied_gaussian_closed_form():
    f = torch.tensor([[1.0, 0.0], [3.0, 0.0], [-1.0, 2.0], [-3.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    g = TiedGaussian.fit(f, y)
    assert g.means.tolist() == [[2.0, 0.0], [-2.0, 2.0]]
    # within-class deviations (±1, 0): covariance diag(1, 0), pseudo-inverse diag(1, 0)
    torch.testing.assert_close(g.precision, torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    assert g.score(torch.tensor([[4.0, 9.0], [0.0, 0.0]])).tolist() == [4.0, 4.0]

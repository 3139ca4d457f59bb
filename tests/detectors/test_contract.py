"""Every detector follows the one contract of detectors.base, and the registry loads each kind back."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from detectors import (
    DETECTORS,
    MSP,
    ODIN,
    CompositeDetector,
    Detector,
    Energy,
    GGADetector,
    Mahalanobis,
    WrongDetectorKindError,
    build_detector,
    describe,
    detector_class,
    load_detector,
    msp_score,
)
from detectors.zoo import MnistCNN
from service.settings import DEFAULT_MODEL_DIR

BUNDLED = DEFAULT_MODEL_DIR / "detector"


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def _hidden(m, x):
    return m[1](m[0](x))


def _data(model, n, seed):
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, model(x).argmax(1)  # every sample classified correctly


# kind -> (factory, options load_detector needs)
MAKERS = {
    "msp": (lambda m: MSP(m, alpha=0.1), {}),
    "energy": (lambda m: Energy(m, 2.0, alpha=0.1), {}),
    "odin": (lambda m: ODIN(m, 10.0, 0.01, clip=(-3.0, 3.0), alpha=0.1), {}),
    "mahalanobis": (lambda m: Mahalanobis(m, _hidden, 0.01, alpha=0.1), {"feature_fn": _hidden}),
    "gga": (lambda m: GGADetector(m, top_n=3, alpha=0.1, n_bins=20, seed=3), {}),
    "composite": (lambda m: CompositeDetector(m, top_n=3, alpha=0.1, layers=["1"], seed=3), {}),
}


def test_the_registry_holds_every_kind():
    assert sorted(DETECTORS) == sorted(MAKERS)
    for kind, cls in DETECTORS.items():
        assert cls.kind == kind
        assert detector_class(kind) is cls


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_fit_save_load_detector_gives_identical_scores(kind, tmp_path):
    m = _model()
    make, options = MAKERS[kind]
    x, y = _data(m, 600, 0)
    cal = _data(m, 200, 1)
    seen = []
    det = make(m).fit(x, y, calibration=cal, progress=lambda done, total: seen.append((done, total)),
                      run=lambda fn: fn())
    assert isinstance(det, Detector)
    assert det.kind == kind and type(det) is DETECTORS[kind]
    assert det.alpha == 0.1
    assert seen[-1] == (800, 800)  # the fit's progress covers x and the calibration set
    q = torch.randn(50, 4, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.5, 4, 50)[:, None]
    out = det.score(q)
    # trust < alpha exactly where the score is above the threshold
    assert torch.equal(out.flagged, out.score > det.threshold)
    assert torch.equal(out.flagged, out.trust < 0.1)
    det.save(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "detector.json").read_text())
    assert meta["kind"] == kind and meta["config"]["alpha"] == 0.1
    again = load_detector(tmp_path / "d", m, **options)
    assert type(again) is type(det)
    assert again.components == det.components and again.threshold == det.threshold
    back = again.score(q)
    for field in ("score", "trust", "flagged"):
        assert torch.equal(getattr(back, field), getattr(out, field)), field
    assert describe(again) == {"kind": kind, "preset": None, "components": det.components}


def test_components_name_the_signals():
    m = _model()
    assert MSP(m).components == ["msp"]
    assert GGADetector(m).components == ["gga"]
    assert GGADetector(m, include_softmax=True).components == ["gga+softmax"]
    comp = CompositeDetector(m, top_n=3, layers=["1"])
    assert comp.components == comp.component_names == ["gga", "margin", "energy", "layer:1"]
    assert CompositeDetector(m, top_n=3, use_gga=False, use_layers=False).components == ["margin", "energy"]
    assert (GGADetector(m, top_n=4).top_n, CompositeDetector(m, top_n=3).top_n, MSP(m).top_n) == (4, 3, None)
    assert (GGADetector(m, strategy="loop").strategy, MSP(m).strategy) == ("loop", None)


def test_baseline_trust_is_the_conformal_p_value():
    m = _model()
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    cal = torch.randn(99, 4, generator=torch.Generator().manual_seed(1))
    det = MSP(m, alpha=0.1).fit(x, calibration=cal)
    q = torch.randn(10, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        s, c = msp_score(m(q)), msp_score(m(cal))
    expected = (1 + (c[None, :] >= s[:, None]).sum(1)).double() / 100
    out = det.score(q)
    torch.testing.assert_close(out.trust, expected)
    assert torch.equal(out.flagged, expected < 0.1)
    assert torch.equal(out.score, det.anomaly_score(q))
    again = MSP(m, alpha=0.1).load_state_dict(det.state_dict())
    torch.testing.assert_close(again.score(q).trust, expected)
    with pytest.raises(ValueError, match="at least 10"):
        MSP(m, alpha=0.1).fit(x, calibration=cal[:8])


def test_an_uncalibrated_baseline_scores_but_neither_flags_nor_saves(tmp_path):
    m = _model()
    det = Energy(m).fit(torch.randn(10, 4))
    out = det.score(torch.randn(5, 4))
    assert out.score.shape == (5,) and out.trust is None and out.flagged is None
    assert math.isnan(det.threshold)
    with pytest.raises(RuntimeError, match="not fitted"):
        det.save(tmp_path)


def test_unknown_kind_names_the_known_kinds(tmp_path):
    m = _model()
    MSP(m).fit(None, calibration=torch.randn(30, 4)).save(tmp_path)
    meta = json.loads((tmp_path / "detector.json").read_text())
    meta["kind"] = "nope"
    (tmp_path / "detector.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"unknown detector kind 'nope' \(known kinds: composite, energy, gga, "
                                         r"mahalanobis, msp, odin\)"):
        load_detector(tmp_path, m)
    with pytest.raises(ValueError, match="unknown detector kind 'x'"):
        detector_class("x")


def test_a_kind_specific_load_names_load_detector(tmp_path):
    m = _model()
    MSP(m).fit(None, calibration=torch.randn(30, 4)).save(tmp_path)
    with pytest.raises(WrongDetectorKindError, match=r"this is a msp detector, not odin .*use detectors.load_detector"):
        ODIN.load(tmp_path, m)
    with pytest.raises(ValueError, match="needs its feature function"):
        x, y = _data(m, 50, 0)
        Mahalanobis(m, _hidden).fit(x, y, calibration=x).save(tmp_path / "maha")
        load_detector(tmp_path / "maha", m)


def test_gga_load_on_the_bundled_default_says_it_is_a_composite():
    model = MnistCNN()
    model.load_state_dict(load_file(str(DEFAULT_MODEL_DIR / "model.safetensors")))
    with pytest.raises(WrongDetectorKindError,
                       match=r"this is a composite detector, not gga \(GGADetector.load reads only gga\); "
                             r"use detectors.load_detector\(directory, model\)"):
        GGADetector.load(BUNDLED, model.eval())
    det = load_detector(BUNDLED, model)
    assert isinstance(det, CompositeDetector) and isinstance(det, Detector)
    assert describe(det) == {"kind": "composite", "preset": "composite",
                             "components": ["gga", "margin", "energy", "layer:features.1", "layer:features.3",
                                            "layer:features.6", "layer:features.8", "layer:act", "disagreement"]}


def test_presets_build_contract_detectors():
    m = _model()
    for preset in ("paper", "gga", "composite", "fast"):
        det = build_detector(preset, m, num_classes=3, second_opinion=None)
        assert isinstance(det, Detector) and det.preset == preset
        assert det.kind == ("composite" if preset in ("composite", "fast") else "gga")
    # fast: the composite without GGA (no gradient passes), the same logit and layer components
    fast, full = build_detector("fast", m, num_classes=3), build_detector("composite", m, num_classes=3)
    assert (fast.config.use_gga, full.config.use_gga) == (False, True)
    assert full.components[:3] == ["gga", "margin", "energy"] and fast.components[:2] == ["margin", "energy"]


def test_mahalanobis_state_round_trip():
    m = _model()
    x, y = _data(m, 300, 0)
    a = Mahalanobis(m, _hidden).fit(x, y)
    b = Mahalanobis(m, _hidden).load_state_dict(a.state_dict())
    torch.testing.assert_close(a.anomaly_score(x[:20]), b.anomaly_score(x[:20]))
    with pytest.raises(ValueError, match="missing"):
        Mahalanobis(m, _hidden).load_state_dict({})


def test_gga_state_round_trip_checks_shapes():
    m = _model()
    x, y = _data(m, 400, 0)
    a = GGADetector(m).fit(x, y)
    b = GGADetector(m).load_state_dict(a.state_dict())
    assert torch.equal(a.score(x[:30]).trust, b.score(x[:30]).trust)
    bad = a.state_dict()
    bad["feature_mean"] = bad["feature_mean"][:3]
    with pytest.raises(ValueError, match="features"):
        GGADetector(m).load_state_dict(bad)

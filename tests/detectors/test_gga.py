import json

import pytest
import torch
from torch import nn

from detectors import FingerprintMismatchError, GGADetector, model_fingerprint


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5)).eval()


def _data(model, n, seed):
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


def test_fit_uses_only_correct_samples_and_reports_stats():
    model = _model()
    x, y = _data(model, 1000, 1)
    y_noisy = y.clone()
    y_noisy[:100] = (y[:100] + 1) % 5  # 100 deliberately wrong labels
    seen = []
    det = GGADetector(model, top_n=4, calibration_fraction=0.25).fit(
        x, y_noisy, batch_size=300, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(300, 1000), (600, 1000), (900, 1000), (1000, 1000)]
    st = det.fit_stats
    assert (st.n_samples, st.n_correct, st.n_calibration, st.n_fit) == (1000, 900, 225, 675)
    assert st.model_accuracy == 0.9
    assert det.calibration_scores.shape == (225,)
    assert torch.equal(det.calibration_scores, torch.sort(det.calibration_scores).values)
    assert det.model_fingerprint == model_fingerprint(model)


def test_conformal_flag_rate_on_fresh_in_distribution_samples():
    model = _model()
    x, y = _data(model, 3000, 2)
    det = GGADetector(model, alpha=0.05, calibration_fraction=0.3).fit(x, y)
    fresh, _ = _data(model, 5000, 3)
    out = det.score(fresh)
    rate = out.flagged.double().mean().item()
    assert abs(rate - 0.05) <= 0.02
    assert torch.equal(out.flagged, out.trust < 0.05)
    assert torch.equal(out.flagged, out.score > det.threshold)


def test_score_fields_and_batching_invariance():
    model = _model()
    x, y = _data(model, 600, 4)
    det = GGADetector(model, top_n=3).fit(x, y)
    q = torch.randn(37, 8) * 3
    full = det.score(q, return_csm=True)
    parts = det.score(q, return_csm=True, batch_size=10)
    for f in ("label", "top_classes", "flagged"):
        assert torch.equal(getattr(full, f), getattr(parts, f))
    torch.testing.assert_close(full.score, parts.score, atol=1e-9, rtol=0)
    with torch.no_grad():
        logits = model(q)
    assert torch.equal(full.label, logits.argmax(1))
    torch.testing.assert_close(full.confidence, torch.softmax(logits, 1).amax(1))
    assert full.top_classes.shape == (37, 3) and full.csm.shape == (37, 3, 3)
    assert full.features.shape == (37, 10)
    assert ((full.trust > 0) & (full.trust <= 1)).all()
    assert det.score(q).csm is None


def test_save_load_round_trip_is_bit_identical(tmp_path):
    model = _model()
    x, y = _data(model, 500, 5)
    det = GGADetector(model, top_n=4, include_softmax=True, n_bins=30, seed=7).fit(x, y)
    det.save(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "detector.json").read_text())
    assert meta["format_version"] == 2
    assert meta["config"]["top_n"] == 4 and meta["config"]["include_softmax"] is True
    assert meta["fit"]["n_samples"] == 500 and meta["model_fingerprint"] == model_fingerprint(model)
    assert len(meta["feature_names"]) == 11
    loaded = GGADetector.load(tmp_path / "d", model)
    q = torch.randn(50, 8) * 2
    a, b = det.score(q), loaded.score(q)
    assert torch.equal(a.score, b.score) and torch.equal(a.trust, b.trust)
    assert loaded.threshold == det.threshold


def test_load_refuses_another_model(tmp_path):
    model = _model()
    x, y = _data(model, 300, 6)
    GGADetector(model).fit(x, y).save(tmp_path)
    other = _model()
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-3
    with pytest.raises(FingerprintMismatchError, match="fitted for another model"):
        GGADetector.load(tmp_path, other)
    with pytest.raises(FileNotFoundError, match="no saved detector"):
        GGADetector.load(tmp_path / "missing", model)


def test_validation_errors():
    model = _model()
    for kwargs, msg in (({"alpha": 0}, "alpha"), ({"top_n": 2}, "top_n"),
                        ({"calibration_fraction": 1.0}, "calibration_fraction"),
                        ({"channel_reduce": "mean"}, "channel_reduce"), ({"strategy": "x"}, "strategy")):
        with pytest.raises(ValueError, match=msg):
            GGADetector(model, **kwargs)
    with pytest.raises(RuntimeError, match="not fitted"):
        GGADetector(model).score(torch.randn(2, 8))
    x, y = _data(model, 100, 7)
    with pytest.raises(ValueError, match="at least 20 correctly classified"):
        GGADetector(model).fit(x, (y + 1) % 5)
    with pytest.raises(ValueError, match="same length"):
        GGADetector(model).fit(x, y[:50])


def test_load_refuses_other_format_versions(tmp_path):
    model = _model()
    x, y = _data(model, 300, 8)
    GGADetector(model).fit(x, y).save(tmp_path)
    meta_path = tmp_path / "detector.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format version 1 is not supported"):
        GGADetector.load(tmp_path, model)


def test_separate_calibration_data():
    model = _model()
    x, y = _data(model, 500, 9)
    xc, yc = _data(model, 200, 10)
    yc[:10] = (yc[:10] + 1) % 5  # 10 calibration samples the model gets wrong
    seen = []
    det = GGADetector(model).fit(x, y, batch_size=250, calibration=(xc, yc), progress=lambda d, t: seen.append((d, t)))
    assert seen == [(250, 700), (500, 700), (700, 700)]
    st = det.fit_stats
    assert (st.n_fit, st.n_calibration, st.n_samples, st.n_correct) == (500, 190, 700, 690)
    feats, _ = det.features(xc[10:])
    expected = det.loda.score((feats.double() - det.feature_mean) / det.feature_std)
    assert torch.equal(det.calibration_scores, torch.sort(expected).values)

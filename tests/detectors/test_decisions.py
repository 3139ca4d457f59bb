"""Prediction sets and the accept gate fitted beside a detector (detectors/decisions.py): exact sets and
decisions on hand-made logits, the refusal message, and the bundled detector's saved decisions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from detectors import DecisionConfig, Decisions, load_detector
from detectors.selective import InsufficientCalibrationError
from tests.support.threads import one_thread  # noqa: F401 - autouse fixture


def _logits(probs) -> torch.Tensor:
    return torch.log(torch.tensor(probs, dtype=torch.float64))


def _calibration():
    """19 samples of class 0 with p_0 = 0.05, 0.10, ..., 0.95 (the rest split evenly): LAC scores
    1 - p_0 = 0.95 .. 0.05; at alpha 0.1 q-hat is the ceil(20 * 0.9) = 18th smallest, 0.90."""
    p = [[0.05 * i, (1 - 0.05 * i) / 2, (1 - 0.05 * i) / 2] for i in range(1, 20)]
    return _logits(p), torch.zeros(19, dtype=torch.long)


def test_lac_set_on_hand_made_logits():
    z, y = _calibration()
    dec = Decisions(set_alpha=0.1).fit(z, y, torch.ones(19), 0.05)
    assert dec.sets.quantiles.tolist() == pytest.approx([0.90], abs=1e-12)
    sets, accept = dec.apply(_logits([[0.6, 0.32, 0.08], [0.05, 0.05, 0.9], [0.34, 0.33, 0.33]]), torch.ones(3))
    assert sets.tolist() == [[True, True, False], [False, False, True], [True, True, True]]
    assert accept is None  # 19 samples cannot support a 1% gate
    assert dec.gate is None and dec.samples_needed == 773 - 19
    assert "no threshold meets risk_target=0.01 at delta=0.05 with 19 calibration samples" in dec.gate_error
    assert dec.info()["gate_threshold"] is None and dec.info()["set_quantile"] == pytest.approx(0.9, abs=1e-12)


def test_strict_gate_refuses_and_says_how_many_samples_are_missing():
    z = _logits([[0.98, 0.01, 0.01]] * 100)
    with pytest.raises(InsufficientCalibrationError) as exc:
        Decisions().fit(z, torch.zeros(100, dtype=torch.long), torch.ones(100), 0.05, strict=True)
    assert exc.value.needed == 673  # the walk starts at 773 accepted samples (3 errors still pass there)
    assert "(673 more samples than given if all were accepted" in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_accept_is_false_whenever_flagged():
    rng = np.random.default_rng(0)
    n = 1000
    margins = torch.from_numpy(rng.uniform(5, 20, n))
    z = torch.stack([margins, torch.zeros(n), torch.zeros(n)], dim=1)
    trust = torch.from_numpy(rng.uniform(0, 1, n))
    dec = Decisions().fit(z, torch.zeros(n, dtype=torch.long), trust, 0.05)
    g = dec.gate
    # every sample is correct: the walk accepts every unflagged one
    assert (g.errors, g.n_accepted) == (0, int((trust >= 0.05).sum()))
    test = torch.tensor([[50.0, 0, 0], [50.0, 0, 0], [50.0, 0, 0]], dtype=torch.float64)
    _, accept = dec.apply(test, torch.tensor([0.01, 0.0499, 0.9]))
    assert accept.tolist() == [False, False, True]


def test_config_is_validated():
    with pytest.raises(ValueError, match="set_alpha must be a number in"):
        DecisionConfig(set_alpha=1.5)
    with pytest.raises(ValueError, match="gate_score must be one of"):
        DecisionConfig(gate_score="nope")


@pytest.fixture(scope="module")
def bundled():
    from detectors.zoo import MnistCNN
    from service.settings import DEFAULT_MODEL_DIR

    model = MnistCNN()
    model.load_state_dict(load_file(str(DEFAULT_MODEL_DIR / "model.safetensors")))
    model.eval()
    return model, DEFAULT_MODEL_DIR / "detector"


def test_bundled_detector_carries_sets_and_gate_and_they_roundtrip(tmp_path, bundled, mnist_test):
    model, directory = bundled
    det = load_detector(directory, model)
    info = det.decisions.info()
    assert (info["set_alpha"], info["set_score"], info["risk_target"], info["delta"]) == (0.1, "lac", 0.01, 0.05)
    assert info["gate_score"] == "margin" and info["n_calibration"] == 4000 and info["gate_error"] is None
    keys = set(load_file(str(directory / "detector.safetensors")))
    assert {"decisions.sets.quantiles", "decisions.sets.params", "decisions.gate"} <= keys
    det.save(tmp_path / "copy")
    again = load_detector(tmp_path / "copy", model)
    assert again.decisions.info() == info
    x = torch.from_numpy(mnist_test[0][:20])
    a, b = det.score(x), again.score(x)
    assert torch.equal(a.prediction_set, b.prediction_set) and torch.equal(a.accept, b.accept)
    assert a.prediction_set.shape == (20, 10) and a.accept.dtype == torch.bool


def test_accept_false_for_every_flagged_input_of_the_bundled_detector(bundled, mnist_test):
    model, directory = bundled
    det = load_detector(directory, model)
    noise = torch.from_numpy(np.random.default_rng(1).uniform(0, 1, (20, 1, 28, 28)).astype(np.float32))
    out = det.score(torch.cat([torch.from_numpy(mnist_test[0][:20]), noise]))
    assert int(out.flagged[20:].sum()) == 20  # uniform noise: every one flagged
    assert not bool((out.accept & out.flagged).any())
    assert out.accept[20:].tolist() == [False] * 20


def test_detector_saved_without_decisions_loads_and_has_none(tmp_path, bundled, mnist_test):
    model, directory = bundled
    det = load_detector(directory, model)
    det.decisions = None
    det.save(tmp_path / "plain")
    meta = json.loads((tmp_path / "plain" / "detector.json").read_text())
    assert "decisions" not in meta
    out = load_detector(tmp_path / "plain", model).score(torch.from_numpy(mnist_test[0][:2]))
    assert out.prediction_set is None and out.accept is None


def test_decisions_entry_without_its_tensors_is_refused(tmp_path, bundled):
    model, directory = bundled
    det = load_detector(directory, model)
    meta = det.decisions.metadata()
    with pytest.raises(ValueError, match="gate state is missing"):
        Decisions.from_state(meta, {k: v for k, v in det.decisions.sets.state_dict("sets.").items()})
    assert math.isfinite(meta["gate"]["threshold"])

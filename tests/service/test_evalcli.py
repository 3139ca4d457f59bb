"""``gga-eval``: a report whose numbers are the detector's own, the same through a served detector; exit 2
for bad arguments and files, 1 for failures."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import struct
import subprocess
import sys
import tomllib
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from benchmarks.serverproc import free_port, start_server
from detectors.conformal import PredictionSets
from detectors.datasets import load_idx_split
from detectors.metrics import aupr_in, aupr_out, aurc, auroc, risk_at_coverage, tnr_at_tpr
from detectors.persist import load_detector
from detectors.zoo import MnistCNN
from service.evalcli import main
from service.evaluation.conformal_curves import (
    ALPHAS,
    LOGITS_NOTE,
    gate_scores,
    operating_point,
    risk_coverage,
    split_halves,
    thin,
)
from service.evaluation.data import DataSet
from service.evaluation.figures import MATPLOTLIB_HINT, draw_figures, roc_points
from service.evaluation.scoring import SetScores
from service.settings import DEFAULT_MODEL_DIR

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
BUNDLED = DEFAULT_MODEL_DIR / "detector"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SETS = ("fashion", "noise")
FIGURES = ("roc.png", "trust_fashion.png", "trust_noise.png", "csm_clean.png", "csm_fashion.png", "csm_noise.png")
CURVE_FIGURES = ("sets_vs_alpha.png", "risk_coverage.png")  # with --detector and labels
# (coverage, mean set size) of the bundled default's LAC sets at alpha 0.01, 0.05, 0.1, 0.2 on the test half
EXPECTED_SET_CURVE = [(1.0, 1.05), (0.94, 0.94), (0.91, 0.91), (0.79, 0.79)]


@pytest.fixture(scope="module", autouse=True)
def _clean_env():
    """The command reads GGA_* like the server: start from none of them (module-wide: before the shared run)."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("GGA_"):
                mp.delenv(key)
        mp.setenv("GGA_DEVICE", "cpu")
        yield


def _run(argv) -> tuple[int, str]:
    """``main(argv)`` in-process: exit status and what it wrote on stderr (nothing goes to stdout)."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    assert out.getvalue() == ""
    return code, err.getvalue()


@pytest.fixture(scope="module")
def model():
    m = MnistCNN()
    m.load_state_dict(load_file(str(DEFAULT_MODEL_DIR / "model.safetensors")))
    return m.eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory, model) -> dict:
    """200 MNIST test digits with labels (the first 195 and the first 5 misclassified after them), 200
    Fashion-MNIST test images and 200 uniform-noise images, as .npz files."""
    d = tmp_path_factory.mktemp("evaldata")
    x, y = load_idx_split(DATA / "mnist", "t10k")
    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(x[i:i + 2000])).argmax(1) for i in range(0, 4000, 2000)]).numpy()
    wrong = np.flatnonzero(pred != y[:4000])
    idx = np.r_[np.arange(195), wrong[wrong >= 195][:5]]
    fx, _ = load_idx_split(DATA / "fashion_mnist", "t10k")
    arrays = {
        "clean": {"x": x[idx], "y": y[idx]},
        "fashion": {"x": fx[:200]},
        "noise": {"x": np.random.default_rng(0).uniform(0, 1, (200, 1, 28, 28)).astype(np.float32)},
    }
    paths = {}
    for name, a in arrays.items():
        paths[name] = d / f"{name}.npz"
        np.savez(paths[name], **a)
    return {"dir": d, "paths": paths, "arrays": arrays, "n_right": int((pred[idx] == y[idx]).sum())}


def _argv(data: dict, out: Path, *extra) -> list:
    return ["--in", data["paths"]["clean"], *[a for s in SETS for a in ("--ood", f"{s}={data['paths'][s]}")],
            "--out", out, *extra]


@pytest.fixture(scope="module")
def local_run(data) -> dict:
    """One run with the bundled model and detector, progress bars on."""
    out = data["dir"] / "report_local"
    code, err = _run(_argv(data, out, "--detector", BUNDLED, "--device", "cpu", "--explain"))
    return {"code": code, "err": err, "out": out}


@pytest.fixture(scope="module")
def reference(model, data) -> dict:
    """The detector's own scores for each set, in the command's batch size (64)."""
    det = load_detector(BUNDLED, model)
    ref = {}
    for name, a in data["arrays"].items():
        out = det.score(torch.from_numpy(a["x"]), batch_size=64)
        ref[name] = {"score": out.score.numpy(), "trust": out.trust.numpy(), "flagged": out.flagged.numpy(),
                     "label": out.label.numpy(), "p_values": np.exp(out.features.double().numpy())}
    return ref


def _report(out: Path) -> tuple[dict, str]:
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def _png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == PNG_MAGIC, path
    assert raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


@pytest.mark.slow
def test_report_numbers_are_the_detectors_own(local_run, reference, data):
    assert local_run["code"] == 0, local_run["err"]
    doc, md = _report(local_run["out"])
    ref = reference
    right = ref["clean"]["label"] == data["arrays"]["clean"]["y"]
    assert int(right.sum()) == data["n_right"] == 195  # the 5 chosen misclassified digits
    s_in = ref["clean"]["score"][right]
    s_wrong = ref["clean"]["score"][~right]

    # the detector: kind, preset, version, alpha as the server would serve the bundled one
    det = doc["detector"]
    assert (det["kind"], det["preset"], det["version"], det["alpha"]) == ("composite", "composite", "v0", 0.05)
    assert det["path"] == str(BUNDLED.resolve()) and doc["mode"] == "detector" and doc["model"] == "mnist_cnn"

    # clean set: labels, accuracy, flag rate, misclassification metrics, exactly
    c = doc["clean"]
    assert c["labels"] is True and c["positives"] == "correctly classified clean samples"
    assert (c["n"], c["n_positives"]) == (200, 195)
    assert c["accuracy"] == 195 / 200
    assert c["flag_rate"] == float(np.mean(ref["clean"]["flagged"]))
    assert c["flag_rate_right"] == float(np.mean(ref["clean"]["flagged"][right]))
    assert c["flag_rate_wrong"] == float(np.mean(ref["clean"]["flagged"][~right]))
    m = c["misclassification"]
    assert m["auroc"] == auroc(s_in, s_wrong)
    assert m["aurc"] == aurc(s_in, s_wrong)
    assert m["risk_at_95_coverage"] == risk_at_coverage(s_in, s_wrong, 0.95)
    assert (m["n_right"], m["n_wrong"]) == (195, 5)

    # every OOD set: the four detection metrics against the correctly classified clean digits, exactly
    assert list(doc["sets"]) == list(SETS)
    for name in SETS:
        r, s_out = doc["sets"][name], ref[name]["score"]
        assert r["n"] == 200
        assert r["auroc"] == auroc(s_in, s_out)
        assert r["aupr_in"] == aupr_in(s_in, s_out)
        assert r["aupr_out"] == aupr_out(s_in, s_out)
        assert r["tnr_at_95_tpr"] == tnr_at_tpr(s_in, s_out, 0.95)
        assert r["flag_rate"] == float(np.mean(ref[name]["flagged"]))
        assert r["auroc"] > 0.95  # fashion and noise are far from digits for this detector

    # the per-sample scores written beside the report are the detector's, bit for bit
    with np.load(local_run["out"] / "scores.npz") as z:
        for name in ("clean", *SETS):
            for f in ("score", "trust", "flagged", "label"):
                np.testing.assert_array_equal(z[f"{name}.{f}"], ref[name][f])
        np.testing.assert_array_equal(z["clean.y"], data["arrays"]["clean"]["y"])

    # report.md: the command, the date, the detector, one row per set, the figures
    assert doc["command"].startswith("gga-eval --in ") and f"`{doc['command']}`" in md
    datetime.fromisoformat(doc["date"])
    assert f"- date: {doc['date']}" in md
    assert "kind composite, preset composite, version v0, alpha 0.05" in md
    assert "correctly classified samples of the clean set" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "`" in line]
    assert [r.split(" | ")[0] for r in rows] == ["| clean (in-distribution)", "| fashion", "| noise"]
    assert f"| {c['flag_rate']:.4f} |" in rows[0] and "200 (195 right)" in rows[0]
    fr = doc["sets"]["fashion"]
    assert rows[1].endswith(f"| {fr['auroc']:.4f} | {fr['aupr_in']:.4f} | {fr['aupr_out']:.4f} | "
                            f"{fr['tnr_at_95_tpr']:.4f} | {fr['flag_rate']:.4f} |")
    assert "## Misclassification" in md and f"| 0.9750 | {m['auroc']:.4f} |" in md
    for f in FIGURES:
        assert f"]({f})" in md


@pytest.mark.slow
def test_explain_gives_each_components_p_values(local_run, reference, model):
    doc, _ = _report(local_run["out"])
    names = list(load_detector(BUNDLED, model).components)
    assert doc["explain"]["components"] == names and doc["explain"]["alpha"] == 0.05
    with np.load(local_run["out"] / "scores.npz") as z:
        for name in ("clean", *SETS):
            np.testing.assert_allclose(z[f"{name}.p_values"], reference[name]["p_values"], rtol=1e-6)
            below = (reference[name]["p_values"] < 0.05).mean(axis=0)
            assert [doc["explain"]["sets"][name][c]["below_alpha"] for c in names] == pytest.approx(below.tolist())


def test_figures_are_valid_pngs(local_run):
    assert local_run["code"] == 0, local_run["err"]
    doc, _ = _report(local_run["out"])
    assert sorted(doc["figures"]) == sorted(FIGURES + CURVE_FIGURES)
    for f in FIGURES + CURVE_FIGURES:
        path = local_run["out"] / f
        w, h = _png_size(path)
        assert 300 <= w <= 2000 and 300 <= h <= 2000, (f, w, h)
        assert 5_000 < path.stat().st_size < 2_000_000, f
    assert doc["notes"] == []


def test_report_gives_set_coverage_size_and_accept(local_run, model, data):
    assert local_run["code"] == 0, local_run["err"]
    doc, md = _report(local_run["out"])
    a = data["arrays"]["clean"]
    out = load_detector(BUNDLED, model).score(torch.from_numpy(a["x"]), batch_size=64)
    y = torch.from_numpy(a["y"]).long()
    covered = out.prediction_set.gather(1, y[:, None])[:, 0]
    accept = out.accept & ~out.flagged
    wrong = out.label != y
    dec = doc["clean"]["decisions"]
    assert dec["set_coverage"] == float(covered.double().mean())
    assert dec["mean_set_size"] == float(out.prediction_set.sum(1).double().mean())
    assert dec["accept_rate"] == float(accept.double().mean())
    assert dec["accepted_errors"] == int((accept & wrong).sum())
    # the bundled default on these 200 digits (195, then 5 the model gets wrong): exact values
    assert (dec["set_coverage"], dec["accept_rate"], dec["accepted_errors"]) == (0.87, 0.94, 0)
    assert "## Prediction sets and the accept gate (clean set)" in md and "| 0.8700 | 0.8700 |" in md
    assert "prediction sets on the clean set: coverage 0.8700, mean size 0.8700; accept rate 0.9400" \
        in local_run["err"]


def _logits(model, x: np.ndarray) -> torch.Tensor:
    """The model's logits in the command's batches of 64 (the detector's pass gives the same, bit for bit)."""
    with torch.no_grad():
        return torch.cat([model(torch.from_numpy(x[i:i + 64])) for i in range(0, len(x), 64)])


def test_report_gives_coverage_and_set_size_vs_alpha(local_run, model, data):
    assert local_run["code"] == 0, local_run["err"]
    doc, md = _report(local_run["out"])
    a = data["arrays"]["clean"]
    z, y = _logits(model, a["x"]), torch.from_numpy(a["y"]).long()
    with np.load(local_run["out"] / "scores.npz") as npz:
        np.testing.assert_array_equal(npz["clean.logits"], z.numpy())  # the logits the decisions saw
    sets = doc["decision_curves"]["sets"]
    assert (sets["score"], sets["served_alpha"], sets["split_seed"]) == ("lac", 0.1, 0)
    assert sets["alpha"] == list(ALPHAS) and ALPHAS[0] == 0.01 and ALPHAS[-1] == 0.2 and len(ALPHAS) == 20
    assert (sets["n_calibration"], sets["n_test"]) == (100, 100)
    cal, test = split_halves(200)
    assert sorted(np.r_[cal, test].tolist()) == list(range(200))
    np.testing.assert_array_equal(cal, np.random.default_rng(0).permutation(200)[:100])
    # every alpha: the set module fitted on the calibration half, measured on the test half, exactly
    for k, alpha in enumerate(sets["alpha"]):
        mask = PredictionSets("lac", alpha).fit(z[cal], y[cal]).predict(z[test])
        assert sets["coverage"][k] == float(mask[torch.arange(100), y[test]].double().mean()), alpha
        assert sets["mean_size"][k] == float(mask.sum(1).double().mean()), alpha
    # the bundled default on these 200 digits: exact values at 0.01, 0.05, the served 0.1 and 0.2
    at = {alpha: (sets["coverage"][k], sets["mean_size"][k]) for k, alpha in enumerate(sets["alpha"])}
    assert [at[v] for v in (0.01, 0.05, 0.1, 0.2)] == EXPECTED_SET_CURVE
    # LAC sets are nested in alpha: coverage and mean size never grow with alpha
    assert np.all(np.diff(sets["mean_size"]) <= 0) and np.all(np.diff(sets["coverage"]) <= 0)
    # printed and in report.md
    head = "set curves (lac; calibrated on 100 clean samples, measured on the other 100, split seed 0):"
    row = "  coverage   1.0000  0.9700  0.9400  0.9100  0.8200  0.7900"  # alpha 0.01 0.02 0.05 0.1 0.15 0.2
    assert f"gga-eval: {head}" in local_run["err"] and f"gga-eval: {row}" in local_run["err"]
    assert "## Decision curves (clean set)" in md and head in md and row in md
    assert "![coverage and mean set size vs alpha](sets_vs_alpha.png)" in md


def test_operating_point_lies_on_the_risk_coverage_curve(local_run, model, data):
    assert local_run["code"] == 0, local_run["err"]
    doc, md = _report(local_run["out"])
    a = data["arrays"]["clean"]
    det = load_detector(BUNDLED, model)
    gate = det.decisions.gate
    curves = doc["decision_curves"]
    g, op, msp = curves["gate"], curves["operating_point"], curves["max_softmax"]
    dec = doc["clean"]["decisions"]
    # the served point: the accept rows of the report, at the detector's own threshold
    assert (g["score"], g["threshold"], g["risk_target"]) == ("margin", gate.threshold, 0.01)
    assert op["coverage"] == dec["accept_rate"] == 0.94 and op["errors"] == dec["accepted_errors"] == 0
    assert op["accepted"] == 188 and op["risk"] == dec["selective_risk"] == 0.0
    i = g["operating_index"]
    c = g["curve"]
    assert (c["coverage"][i], c["risk"][i], c["accepted"][i], c["errors"][i]) == (0.94, 0.0, 188, 0)
    assert c["threshold"][i] >= gate.threshold > (c["threshold"][i + 1] if i + 1 < len(c["threshold"]) else -1)
    # the curve of the gate's score, rebuilt from the detector's own functions: every stored point on it
    out = det.score(torch.from_numpy(a["x"]), batch_size=64)
    right = (out.label.numpy() == a["y"])
    full = risk_coverage(gate_scores(det.decisions, _logits(model, a["x"]), out.trust, 0.05), right)
    assert g["points"] == len(full["coverage"]) <= 200
    for k, n_acc in enumerate(c["accepted"]):
        j = int(np.flatnonzero(full["accepted"] == n_acc)[0])
        assert (c["threshold"][k], c["risk"][k]) == (full["threshold"][j], full["risk"][j])
    # it ends at the unflagged share (flagged inputs are never accepted); max softmax reaches every input
    unflagged = int((out.trust >= 0.05).sum())
    assert unflagged == 188 and c["accepted"][-1] == unflagged and c["coverage"][-1] == unflagged / 200
    m = msp["curve"]
    assert msp["source"] == "logits" and (m["accepted"][-1], m["errors"][-1], m["risk"][-1]) == (200, 5, 5 / 200)
    line = (f"risk-coverage: gate (margin, threshold {gate.threshold:.6g}) accepts 0.9400 at risk 0.0000; max "
            f"softmax at that coverage: risk {op['max_softmax_risk_at_coverage']:.4f}")
    assert f"gga-eval: {line}" in local_run["err"] and line in md
    assert "![risk-coverage curves and the served operating point](risk_coverage.png)" in md


def test_risk_coverage_points_with_ties_and_never_accepted():
    curve = risk_coverage(np.array([1.0, 3.0, -np.inf, 2.0, 3.0]), np.array([False, True, True, True, False]))
    assert curve["threshold"].tolist() == [3.0, 2.0, 1.0]  # one point per distinct score; -inf on none
    assert curve["accepted"].tolist() == [2, 3, 4] and curve["errors"].tolist() == [1, 1, 2]
    assert curve["coverage"].tolist() == [0.4, 0.6, 0.8] and curve["risk"].tolist() == [0.5, 1 / 3, 0.5]
    assert operating_point(np.array([True, True, False, True, True]), np.array([True, True, True, True, False])) \
        == {"coverage": 0.8, "risk": 0.25, "accepted": 4, "errors": 1}
    big = risk_coverage(np.arange(1000.0), np.ones(1000, bool))
    kept = thin(big, keep=500)
    assert len(kept["accepted"]) == 201 and 501 in kept["accepted"] and kept["accepted"][-1] == 1000
    cal, test = split_halves(7, seed=3)
    assert (len(cal), len(test)) == (3, 4) and sorted(np.r_[cal, test].tolist()) == list(range(7))


@pytest.mark.slow
def test_progress_bars_on_stderr(local_run):
    err = local_run["err"]
    for name in ("clean", *SETS):
        assert f"scoring {name} [##############################] 200/200 100%" in err
    assert "samples/s" in err and "ETA 00:00" in err
    assert err.rstrip().endswith(f"report written to {local_run['out'] / 'report.md'}")


@pytest.mark.slow
def test_url_mode_gives_the_same_numbers(local_run, data, tmp_path):
    assert local_run["code"] == 0, local_run["err"]
    env = dict(GGA_ARTIFACT_DIR=str(tmp_path / "artifacts"), GGA_STRATEGY="device", GGA_DEVICE="cpu",
               GGA_LOG_LEVEL="warning")
    proc, base = start_server(env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = tmp_path / "report_url"
        code, err = _run(_argv(data, out, "--url", base, "--no-progress", "--explain"))
        # pixels in 0..255: the service answers 422 (the card's range), the command exits 2 naming the set
        u8 = _write(tmp_path / "u8.npz", x=np.full((4, 1, 28, 28), 255, np.uint8))
        bad_code, bad_err = _run(["--in", data["paths"]["clean"], "--ood", f"bytes={u8}", "--url", base,
                                  "--out", tmp_path / "bad", "--no-progress", "--max-samples", "4"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert code == 0, err
    assert bad_code == 2 and f"the service refused samples of bytes ({u8}): 422" in bad_err, bad_err
    assert "scoring" not in err  # --no-progress
    doc, md = _report(out)
    ref, _ = _report(local_run["out"])
    det = doc["detector"]
    assert (det["kind"], det["preset"], det["version"], det["alpha"]) == ("composite", "composite", "v0", 0.05)
    assert det["url"] == base and doc["mode"] == "url" and doc["model"] == "mnist_cnn"
    assert det["model_fingerprint"] == ref["detector"]["model_fingerprint"]
    for key in ("auroc", "aupr_in", "aupr_out", "tnr_at_95_tpr", "flag_rate"):
        for name in SETS:
            assert doc["sets"][name][key] == ref["sets"][name][key], (name, key)
    for key in ("accuracy", "flag_rate", "flag_rate_right", "flag_rate_wrong", "n_positives"):
        assert doc["clean"][key] == ref["clean"][key], key
    assert doc["clean"]["decisions"] == ref["clean"]["decisions"]  # sets and accept through /predict
    for key in ("auroc", "aurc", "risk_at_95_coverage"):
        assert doc["clean"]["misclassification"][key] == pytest.approx(ref["clean"]["misclassification"][key],
                                                                       abs=1e-12)
    with np.load(out / "scores.npz") as z, np.load(local_run["out"] / "scores.npz") as zl:
        for name in ("clean", *SETS):
            np.testing.assert_allclose(z[f"{name}.trust"], zl[f"{name}.trust"], rtol=0, atol=1e-12)
            np.testing.assert_allclose(z[f"{name}.score"], zl[f"{name}.score"], rtol=0, atol=1e-9)
            np.testing.assert_array_equal(z[f"{name}.flagged"], zl[f"{name}.flagged"])
            np.testing.assert_array_equal(z[f"{name}.label"], zl[f"{name}.label"])
            np.testing.assert_allclose(z[f"{name}.p_values"], zl[f"{name}.p_values"], rtol=1e-9, atol=0)
    assert doc["explain"]["components"] == ref["explain"]["components"]
    for name, comps in ref["explain"]["sets"].items():
        for c, v in comps.items():
            assert doc["explain"]["sets"][name][c]["below_alpha"] == v["below_alpha"]
            assert doc["explain"]["sets"][name][c]["median_p"] == pytest.approx(v["median_p"], rel=1e-9)
    assert f"by the service at {base}" in md
    for f in FIGURES:  # the service returns CSMs too
        assert _png_size(out / f)
    # the curves need logits, which /predict does not return: the served point and max softmax only
    curves, ref_curves = doc["decision_curves"], ref["decision_curves"]
    assert curves["sets"] is None and curves["gate"] is None and LOGITS_NOTE in doc["notes"]
    keys = ("coverage", "risk", "accepted", "errors")
    assert [curves["operating_point"][k] for k in keys] == [ref_curves["operating_point"][k] for k in keys]
    m = curves["max_softmax"]
    assert m["source"] == "confidence" and (m["curve"]["accepted"][-1], m["curve"]["errors"][-1]) == (200, 5)
    assert "risk_coverage.png" in doc["figures"] and "sets_vs_alpha.png" not in doc["figures"]
    assert "risk-coverage: served gate accepts 0.9400 at risk 0.0000" in err


@pytest.mark.slow
def test_unlabelled_clean_set_and_max_samples(data, tmp_path, model):
    np.savez(tmp_path / "clean_nolabels.npz", x=data["arrays"]["clean"]["x"])
    out = tmp_path / "r"
    code, err = _run(["--in", tmp_path / "clean_nolabels.npz", "--ood", f"noise={data['paths']['noise']}",
                      "--detector", BUNDLED, "--out", out, "--max-samples", "24", "--batch-size", "10",
                      "--no-progress"])
    assert code == 0, err
    doc, md = _report(out)
    c = doc["clean"]
    assert c["labels"] is False and c["positives"] == "all clean samples" and c["n"] == c["n_positives"] == 24
    assert "misclassification" not in c and "## Misclassification" not in md
    assert "every sample of the clean set" in md
    assert doc["sets"]["noise"]["n"] == 24 and doc["sets"]["noise"]["n_file"] == 200 and doc["batch_size"] == 10
    assert "noise: the first 24 of 200 samples (--max-samples)" in doc["notes"]
    assert doc["decision_curves"] is None
    assert "no decision curves: they need labels y in the clean set (--in)" in doc["notes"]
    det = load_detector(BUNDLED, model)
    s_in = det.score(torch.from_numpy(data["arrays"]["clean"]["x"][:24])).score.numpy()
    s_out = det.score(torch.from_numpy(data["arrays"]["noise"]["x"][:24])).score.numpy()
    assert doc["sets"]["noise"]["auroc"] == auroc(s_in, s_out)
    assert doc["sets"]["noise"]["tnr_at_95_tpr"] == tnr_at_tpr(s_in, s_out, 0.95)


# --------------------------------------------------------------------------- bad arguments, failures


def _write(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.fixture
def small(tmp_path) -> dict:
    """Tiny valid files (8 samples each) and the usual arguments around them."""
    rng = np.random.default_rng(1)
    clean = _write(tmp_path / "c.npz", x=rng.uniform(0, 1, (8, 1, 28, 28)).astype(np.float32),
                   y=np.arange(8) % 10)
    ood = _write(tmp_path / "o.npz", x=rng.uniform(0, 1, (8, 1, 28, 28)).astype(np.float32))
    return {"dir": tmp_path, "clean": clean, "ood": ood,
            "args": ["--in", clean, "--ood", f"o={ood}", "--detector", BUNDLED, "--out", tmp_path / "out"]}


def _replace(args: list, flag: str, value) -> list:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def _bad_cases(s: dict) -> list[tuple[list, str]]:
    d, a = s["dir"], s["args"]
    x = np.zeros((8, 1, 28, 28), np.float32)
    (d / "folder").mkdir()
    (d / "garbage.npz").write_bytes(b"not a zip file")
    (d / "afile").write_text("x")
    return [
        (["--ood", f"o={s['ood']}", "--detector", BUNDLED, "--out", d / "r"],
         "the following arguments are required: --in"),
        (a[:4] + ["--out", d / "r"], "one of the arguments --detector --url is required"),
        (a + ["--url", "http://127.0.0.1:1"], "not allowed with argument"),
        (_replace(a, "--ood", str(s["ood"])), "expected NAME=PATH.npz"),
        (_replace(a, "--ood", f"clean={s['ood']}"), "the name 'clean' is the in-distribution set"),
        (_replace(a, "--ood", f"a b={s['ood']}"), "set name 'a b'"),
        (a + ["--ood", f"o={s['ood']}"], "--ood names must be unique; repeated: o"),
        (_replace(a, "--in", d / "missing.npz"), "missing.npz: no such file"),
        (_replace(a, "--ood", f"o={d / 'missing.npz'}"), "missing.npz: no such file"),
        (a + ["--max-samples", "0"], "expected a positive integer"),
        (a + ["--batch-size", "x"], "expected a positive integer"),
        (_replace(a, "--out", d / "afile"), "exists and is not a folder"),
        (_replace(a, "--in", _write(d / "noy.npz", z=x)), "no array 'x' in the .npz"),
        (_replace(a, "--in", d / "garbage.npz"), "cannot read it as an .npz"),
        (_replace(a, "--in", _write(d / "shape.npz", x=x[:, 0])), "x has shape (8, 28, 28); expected (n, 1, 28, 28)"),
        (_replace(a, "--ood", f"o={_write(d / 'str.npz', x=np.array(['a', 'b']))}"), "x has dtype <U1"),
        (_replace(a, "--in", _write(d / "ylen.npz", x=x, y=np.zeros(7, np.int64))), "y has shape (7,); expected (8,)"),
        (_replace(a, "--in", _write(d / "yrange.npz", x=x, y=np.full(8, 10))), "y[0] = 10 is not a class"),
        (_replace(a, "--in", _write(d / "yfloat.npz", x=x, y=np.full(8, 0.5))), "y must hold integer class indices"),
        (_replace(a, "--in", _write(d / "nan.npz", x=np.where(np.arange(8)[:, None, None, None] == 3, np.nan, x))),
         "x[3] holds NaN or infinite values"),
        (_replace(a, "--ood", f"o={_write(d / 'u8.npz', x=np.full((8, 1, 28, 28), 200, np.uint8))}"),
         "outside the model card's value range [0, 1], the first x[0] with values in [200, 200]"),
        (_replace(a, "--detector", d / "nodir"), "no such folder"),
        (_replace(a, "--detector", d / "folder"), "holds no saved detector"),
        (a + ["--model", "cifar_resnet20", "--model-weights", DATA / "cifar10_resnet" / "resnet20-12fca82f.th"],
         "was fitted for another model"),
        (a + ["--model", "nonsense_arch"], "cannot load the model (nonsense_arch)"),
        (a[:4] + ["--url", "http://127.0.0.1:1", "--model-card", "m.json", "--out", d / "r"],
         "--model-card names the model of --detector"),
        (a[:4] + ["--url", "localhost:8000", "--out", d / "r"], "expected http://host:port"),
        (a + ["--read-token", "t"], "--read-token is the token of the service of --url"),
    ]


def test_bad_arguments_and_files_exit_2(small):
    for argv, message in _bad_cases(small):
        code, err = _run(argv)
        assert code == 2, (argv, err)
        assert message in err, (message, err)
        assert not (small["dir"] / "out" / "report.md").exists()


def test_unreachable_service_exits_1(small, tmp_path):
    a = small["args"]
    code, err = _run(a[:4] + ["--url", f"http://127.0.0.1:{free_port()}", "--out", tmp_path / "r"])
    assert code == 1
    assert "gga-eval: evaluation failed: cannot reach the service" in err
    assert not (tmp_path / "r").exists()


def test_missing_matplotlib_names_the_extra(small, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    code, err = _run(small["args"])
    assert code == 2
    assert MATPLOTLIB_HINT in err and "pip install 'gga-trust[eval]'" in err
    assert not (small["dir"] / "out").exists()  # checked before any scoring or writing


def test_help_and_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "service.evalcli", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--detector DIR" in r.stdout and "--max-samples N" in r.stdout
    r = subprocess.run([sys.executable, "-m", "service.evalcli", "--in", "x.npz"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "gga-eval: error" in r.stderr


def test_pyproject_declares_the_command_and_keeps_matplotlib_optional():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["gga-eval"] == "service.evalcli:main"
    assert not any(d.startswith("matplotlib") for d in project["dependencies"])
    assert any(d.startswith("matplotlib") for d in project["optional-dependencies"]["eval"])


# --------------------------------------------------------------------------- pieces


def test_roc_points_area_is_the_auroc():
    rng = np.random.default_rng(3)
    s_in = np.round(rng.normal(0, 1, 300), 1)  # ties, inside and across the sets
    s_out = np.round(rng.normal(1, 1, 200), 1)
    fpr, tpr = roc_points(s_in, s_out)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) == pytest.approx(auroc(s_in, s_out), abs=1e-12)


def test_a_detector_without_csm_gets_a_note(tmp_path):
    rng = np.random.default_rng(0)

    def scores(shift: float, csm: bool) -> SetScores:
        s = rng.normal(shift, 1, 50)
        trust = 1 / (1 + np.exp(s))
        return SetScores(label=np.zeros(50, np.int64), score=s, trust=trust, flagged=trust < 0.05,
                         csm=np.eye(3) if csm else None, csm_classes=[2, 0, 1] if csm else [])

    clean = scores(0, False)
    sets = [(DataSet("far", Path("far.npz"), np.zeros((50, 1))), scores(3, False)),
            (DataSet("near", Path("near.npz"), np.zeros((50, 1))), scores(0.5, True))]
    results = {"sets": {"far": {"auroc": 0.98}, "near": {"auroc": 0.6}}}
    files, notes = draw_figures(tmp_path, clean.score, clean, sets, results, 0.05, ["a", "b", "c"], "composite v1")
    assert files == ["roc.png", "trust_far.png", "trust_near.png", "csm_near.png"]
    assert [n.split(":")[0] for n in notes] == ["no CSM example for clean", "no CSM example for far"]
    for f in files:
        assert (tmp_path / f).read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_readme_mnist_example(tmp_path):
    """The README's MNIST example, run as written (``gga-eval`` as ``python -m service.evalcli`` when the
    console script of this environment predates the command), gives the table the README shows."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Evaluating a detector: `gga-eval`"):readme.index("\n## Settings")]
    start = section.index("```bash", section.index("**Example: the bundled MNIST"))
    script = section[start + len("```bash\n"):section.index("\n```", start)]
    assert script.startswith("M=$(mktemp -d)\n")
    script = f"M={tmp_path}\n" + script.split("\n", 1)[1]
    script = script.replace("gga-eval ", f"{sys.executable} -m service.evalcli ")
    r = subprocess.run(["bash", "-euc", script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "GGA_DEVICE": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    md = (tmp_path / "report" / "report.md").read_text()
    table = section[section.index("| set | file |"):]
    table = table[:table.index("```")].strip().splitlines()
    shown = [line for line in table if line.startswith("| ")]
    got = [re.sub(r"`[^`]*/([^/`]+\.npz)`", r"`.../\1`", line) for line in md.splitlines() if line.startswith("| ")]
    for line in shown:
        assert line in got, (line, got)

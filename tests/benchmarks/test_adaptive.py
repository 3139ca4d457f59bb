"""The adaptive attack suite on a tiny model and a tiny composite fitted here."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.adaptive import cw, feature_match, guided, joint, multitarget, orthogonal, transfer
from benchmarks.adaptive.common import Budget, Context, Judge
from benchmarks.adaptive.metrics import robust_detection, summary, union
from benchmarks.adaptive.surrogate import Surrogate
from detectors.composite import CompositeDetector

LAYERS = ["0", "2"]
EPS = (0.05, 0.15, 0.4)


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5)).eval()
    with torch.no_grad():  # inputs live in [0, 1]^8: centre the first layer on 0.5 and sharpen it
        model[0].weight.mul_(4.0)
        model[0].bias.copy_(-0.5 * model[0].weight.sum(dim=1))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _data(model, n, seed):
    x = torch.rand(n, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


@pytest.fixture(scope="module")
def setup():
    model = _model()
    x, y = _data(model, 1500, 1)
    xc, yc = _data(model, 500, 2)
    det = CompositeDetector(model, top_n=4, layers=LAYERS).fit(x, y, calibration=(xc, yc))
    xa, ya = _data(model, 16, 3)
    return model, det, xa, ya


def test_surrogate_matches_the_served_statistic_as_the_temperature_goes_to_zero(setup):
    _, det, x, _ = setup
    served = det.score(x)
    for gga in ("exact", "bpda"):
        sur = Surrogate(det, gga=gga)
        for t in (0.0, 1e-9):
            xr = x.clone().requires_grad_(gga == "bpda")
            with torch.enable_grad():
                out = sur(xr, temperature=t)
            assert (out.statistic.detach() - served.score).abs().max().item() <= 1e-6, (gga, t)
            assert torch.equal(sur.trust(out.statistic), served.trust)
            assert torch.equal(out.hard_statistic, served.score)
    # a coarser smoothing moves the statistic: the comparison above is not vacuous
    assert (Surrogate(det, gga="exact")(x, temperature=0.5).statistic - served.score).abs().max().item() > 1e-3


def test_without_gga_the_surrogate_is_a_lower_bound_and_targeting_the_winner_changes_nothing(setup):
    _, det, x, y = setup
    sur = Surrogate(det, gga="omit")
    out = sur(x, temperature=0.0)
    served = det.score(x).score
    assert bool((out.hard_statistic <= served + 1e-12).all())
    assert bool((out.hard_statistic < served - 1e-6).any())  # GGA adds something somewhere
    same = sur(x, temperature=0.0, target=det.score(x).label)
    torch.testing.assert_close(same.statistic, out.statistic, rtol=0, atol=1e-12)


@pytest.mark.parametrize("gga", ["omit", "bpda"])
@pytest.mark.parametrize("sign", ["tanh", "identity"])
def test_surrogate_gradient_is_finite_and_not_zero(setup, gga, sign):
    _, det, x, y = setup
    sur = Surrogate(det, gga=gga, sign=sign, temperature=0.05)
    xr = (x + 0.3).clamp(0, 1).requires_grad_(True)  # off the data: most components count
    with torch.enable_grad():
        out = sur(xr, exclude=y)
        (g,) = torch.autograd.grad(out.statistic.sum(), xr)
    assert bool(torch.isfinite(g).all())
    assert g.abs().sum().item() > 0


def test_bpda_gradient_reaches_the_gga_component(setup):
    _, det, x, _ = setup
    xr = x.clone().requires_grad_(True)
    with torch.enable_grad():
        comp = Surrogate(det, gga="bpda").components(xr)[2]
        (g,) = torch.autograd.grad(comp[:, 0].sum(), xr)
    assert torch.isfinite(g).all() and g.abs().sum().item() > 0


def _context(det, eps, norm="linf", steps=20, restarts=1):
    sur = Surrogate(det)
    return Context(sur, Judge(sur), Budget(norm, eps), steps=steps, restarts=restarts, judge_every=1)


def _counts(run, det, x, y, norm="linf", eps=EPS):
    out = []
    for e in eps:
        ctx = _context(det, e, norm)
        tr = run(ctx, x, y)
        assert bool(ctx.budget.inside(tr.x_point, x).all())
        ok = tr.found
        if ok.any():  # every counted point is misclassified and unflagged by the served detector
            res = det.score(tr.x_point[ok])
            assert bool((res.label != y[ok]).all()) and not bool(res.flagged.any())
        out.append(int(ok.sum()))
    return out


def _rises(counts: list[int], top: int) -> None:
    """Success never falls as the budget grows, rises by at least 5 of the 16 inputs, and reaches
    ``top`` - 2 at the largest budget. (The exact counts move by one or two between CPUs: the
    attack's float trajectories do, and an input near the threshold flips.)"""
    assert counts == sorted(counts), counts
    assert counts[-1] - counts[0] >= 5 and counts[-1] >= top - 2, counts


def test_cw_success_rises_with_the_budget(setup):
    _, det, x, y = setup
    _rises(_counts(cw.attack, det, x, y), 14)
    _rises(_counts(cw.attack, det, x, y, "l2", (0.1, 0.3, 1.0)), 14)


def test_orthogonal_success_rises_with_the_budget(setup):
    _, det, x, y = setup
    _rises(_counts(orthogonal.attack, det, x, y), 10)


def test_multitarget_success_rises_with_the_budget(setup):
    _, det, x, y = setup
    counts = _counts(multitarget.attack, det, x, y)
    _rises(counts, 15)
    # without a second opinion the joint attack's objective is the multi-targeted one
    assert _counts(joint.attack, det, x, y) == counts


def test_feature_match_success_rises_with_the_budget(setup):
    model, det, x, y = setup
    px, py = _guides(model, det)
    run = lambda ctx, xa, ya: feature_match.attack(ctx, xa, ya, pool_x=px, pool_y=py)  # noqa: E731
    _rises(_counts(run, det, x, y), 13)


def _guides(model, det):
    """Guide images well inside the accepted region (trust >= 0.1, twice alpha), so that no guide
    flips to flagged when scored in another batch (float results differ between batch splits).
    The tiny model predicts three of its five classes: every one of them has guides."""
    px, py = _data(model, 200, 5)
    keep = det.score(px).trust >= 0.1
    assert sorted(set(py[keep].tolist())) == [1, 3, 4]
    return px[keep], py[keep]


def test_guided_success_rises_with_the_budget_and_reaches_every_input_unbounded(setup):
    model, det, x, y = setup
    px, py = _guides(model, det)
    run = lambda ctx, xa, ya: guided.attack(ctx, xa, ya, pool_x=px, pool_y=py)  # noqa: E731
    counts = _counts(run, det, x, y, eps=(0.05, 0.15, 0.4, 1.0))
    _rises(counts, 16)
    # unbounded, the start is the guide itself (classified as its class, not flagged): all 16 at step 0
    ctx = _context(det, 1.0, steps=1)
    tr = guided.attack(ctx, x, y, pool_x=px, pool_y=py)
    assert int(tr.found.sum()) == 16 and bool((tr.step_found == 0).all())
    # only the nearest guide's class: the same at the start unbounded, never more inside a small ball
    tr = guided.attack(_context(det, 1.0, steps=1), x, y, pool_x=px, pool_y=py, classes_per_input=1)
    assert int(tr.found.sum()) == 16
    one = guided.attack(_context(det, 0.15), x, y, pool_x=px, pool_y=py, classes_per_input=1)
    assert int(one.found.sum()) <= counts[1]
    with pytest.raises(ValueError, match="classes_per_input"):
        guided.attack(_context(det, 0.15), x, y, pool_x=px, pool_y=py, classes_per_input=0)


def test_guides_are_the_pool_images_the_projection_changes_least():
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([0, 1])
    pool_x = torch.tensor([[0.2, 0.0], [0.9, 0.0], [0.1, 0.1], [1.0, 0.9], [0.0, 0.5]])
    pool_y = torch.tensor([1, 1, 2, 2, 0])
    cost = guided.projection_loss(x, pool_x, Budget("linf", 0.15))
    # input 0: (0.2, 0) loses 0.05, (0.1, 0.1) nothing; input 1: (1.0, 0.9) nothing, (0, 0.5) loses ~1.08
    assert cost[0, 0].item() == pytest.approx(0.05, abs=1e-5) and cost[0, 2].item() < 1e-5
    classes, ranked = guided.guides(cost, y, pool_y, 3, depth=2)
    assert classes.tolist() == [[2, 1], [2, 0]]
    assert ranked[0].tolist() == [[2, 0], [3, 4]]
    assert ranked[1].tolist() == [[3, 1], [2, 4]]  # the second nearest of each class (class 0 has one)


def test_transfer_success_rises_with_the_budget(setup):
    model, det, x, y = setup
    xf, yf = _data(model, 600, 6)
    xc, yc = _data(model, 300, 7)
    own = transfer.fit_own(model, xf, yf, xc, yc, preset="composite", num_classes=5, layers=LAYERS, seed=1)
    run = lambda ctx, xa, ya: transfer.attack(ctx, xa, ya, own_detector=own)  # noqa: E731
    _rises(_counts(run, det, x, y), 14)


def test_budget_projection():
    b = Budget("l2", 1.0)
    x = torch.full((2, 4), 0.5)
    out = b.project(x + torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0]]) / 10, x)
    torch.testing.assert_close(out, torch.tensor([[0.8, 0.9, 0.5, 0.5], [0.51, 0.5, 0.5, 0.5]]))
    linf = Budget("linf", 0.1)
    torch.testing.assert_close(linf.project(torch.tensor([[0.9, 0.0]]), torch.tensor([[0.5, 0.05]])),
                               torch.tensor([[0.6, 0.0]]))
    assert linf.inside(torch.tensor([[0.6, 0.0]]), torch.tensor([[0.5, 0.05]])).tolist() == [True]
    assert linf.inside(torch.tensor([[0.7, 0.0]]), torch.tensor([[0.5, 0.05]])).tolist() == [False]
    with pytest.raises(ValueError, match="norm must be one of"):
        Budget("l1", 1.0)


def test_robust_detection_arithmetic():
    correct = torch.tensor([True, True, True, True, False])
    a = torch.tensor([True, False, False, False, True])  # the misclassified input does not count
    b = torch.tensor([False, True, False, False, False])
    assert robust_detection(correct, a) == 0.75
    assert robust_detection(correct, b) == 0.75
    assert union({"a": a, "b": b}).tolist() == [True, True, False, False, True]
    s = summary(correct, torch.tensor([False, True, False, False, False]), {"a": a, "b": b})
    assert s["attacks"]["best_of_all"] == {"broken": 2, "robust_detection": 0.5}
    assert s["attacks"]["a"]["broken"] == 1
    assert (s["n"], s["n_correct"], s["clean_flag_rate"]) == (5, 4, 0.2)
    with pytest.raises(ValueError, match="no input is classified correctly"):
        robust_detection(torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool))
    assert math.isclose(robust_detection(correct, torch.zeros(5, dtype=torch.bool)), 1.0)


def test_attach_writes_the_evaluation_into_the_saved_json_and_load_keeps_it(setup, tmp_path):
    from benchmarks.adaptive import attach
    from detectors.persist import load_detector

    model, det, _, _ = setup
    det.save(tmp_path / "det")
    tensors_before = (tmp_path / "det" / "detector.safetensors").read_bytes()
    attacks = {"cw": {"broken": 10, "robust_detection": 188 / 198},
               "best_of_all": {"broken": 12, "robust_detection": 186 / 198}}
    run = {"n": 200, "n_correct": 198, "clean_flag_rate": 0.045, "attacks": attacks}
    result = {"settings": {"data": "mnist", "split": "test", "steps_for": "cw=100x2", "gga": "omit"},
              "runs": {"linf:0.3": run},
              "detector": {"components": det.components, "threshold": det.threshold}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    attach.main(["--detector", str(tmp_path / "det"), "--result", str(path)])
    loaded = load_detector(tmp_path / "det", model)
    ev = loaded.evaluation
    assert ev["budgets"]["linf:0.3"]["robust_detection"] == {"cw": 0.9495, "best_of_all": 0.9394}
    assert ev["split"] == "test" and ev["report"] == str(tmp_path / "r.md")
    assert loaded.metadata()["evaluation"] == ev
    assert (tmp_path / "det" / "detector.safetensors").read_bytes() == tensors_before
    # a second budget's run is merged in; the sanity checks per attack, with a note where CW fell short
    # (runs of other attacks on the same budget merge too: test_ablation_table_... checks the union)
    def checks(unbounded):
        return {"eps_sweep": {"0.3": {"success": 0.0}}, "steps_sweep": {},
                "unbounded": {"success": unbounded, "misclassified": 1.0}}
    l2 = {"settings": {**result["settings"], "steps_for": "guided=50x2"},
          "runs": {"l2:2.0": {**run, "attacks": {"guided": {"broken": 60, "robust_detection": 138 / 198}},
                              "broken_index": {"guided": list(range(60))}}},
          "detector": result["detector"],
          "sanity": {"attacks": {"cw": checks(0.1), "guided": checks(1.0)}}}
    path2 = tmp_path / "r2.json"
    path2.write_text(json.dumps(l2))
    attach.main(["--detector", str(tmp_path / "det"), "--result", str(path), str(path2)])
    ev = load_detector(tmp_path / "det", model).evaluation
    assert sorted(ev["budgets"]) == ["l2:2.0", "linf:0.3"]
    # the best of all is the union of the inputs broken (recomputed from the indices where a run lists them)
    assert ev["budgets"]["l2:2.0"]["robust_detection"] == {"guided": 0.697, "best_of_all": 0.697}
    assert ev["steps_for"] == "cw=100x2; guided=50x2"
    assert ev["report"] == [str(tmp_path / "r.md"), str(tmp_path / "r2.md")]
    assert ev["sanity"]["unbounded_success"] == 1.0 and "caveat" not in ev["sanity"]
    assert ev["sanity"]["attacks"]["cw"]["unbounded_success"] == 0.1 and "cw" in ev["sanity"]["note"]
    # a result measured on another fitted state is refused; a refit drops the evaluation
    result["detector"]["threshold"] = det.threshold + 1.0
    path.write_text(json.dumps(result))
    with pytest.raises(SystemExit, match="measured on another fitted state"):
        attach.main(["--detector", str(tmp_path / "det"), "--result", str(path)])
    x = torch.rand(300, 8, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        y = model(x).argmax(1)
    assert loaded.fit(x[:200], y[:200], calibration=(x[200:], y[200:])).evaluation is None


def test_ablation_table_counts_an_input_broken_by_any_white_box_attack(tmp_path):
    from benchmarks.adaptive import ablation

    run = {"n": 10, "n_correct": 8, "clean_flag_rate": 0.1,
           "attacks": {"cw": {"broken": 2, "robust_detection": 0.75},
                       "multitarget": {"broken": 2, "robust_detection": 0.75},
                       "transfer": {"broken": 3, "robust_detection": 0.625},
                       "best_of_all": {"broken": 5, "robust_detection": 0.375}},
           "broken_index": {"cw": [1, 2], "multitarget": [2, 5], "transfer": [0, 3, 4]}}
    result = {"settings": {"split": "val", "steps_for": "cw=10x1", "gga": "omit"}, "runs": {"linf:0.3": run},
              "detector": {"components": ["margin", "disagreement"]}}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(result))
    notes = tmp_path / "notes.md"
    notes.write_text("Reading the table: input 2 fell to two attacks.\n")
    rows = ablation.main(["--out", str(tmp_path / "abl"), "--notes", str(notes), f"with guard={path}"])
    # white-box: inputs 1, 2, 5 broken (transfer is another threat model and stays out of it)
    assert rows[0]["white_box_best_of_all"] == 1 - 3 / 8
    text = (tmp_path / "abl.md").read_text()
    assert "| with guard | val (8) | linf:0.3 | 10.0% | 75.0% | 75.0% |  |  |  |  | **62.5%** | 62.5% |" in text
    assert text.endswith("\nReading the table: input 2 fell to two attacks.\n")
    # runs of other attacks on the same inputs merge: the guided attack adds input 7
    run2 = {**run, "attacks": {"guided": {"broken": 2, "robust_detection": 0.75}}, "broken_index": {"guided": [1, 7]}}
    path2 = tmp_path / "b.json"
    path2.write_text(json.dumps({**result, "settings": {**result["settings"], "steps_for": "guided=5x1"},
                                 "runs": {"linf:0.3": run2}}))
    rows = ablation.main(["--out", str(tmp_path / "abl"), f"merged={path}+{path2}"])
    assert rows[0]["white_box_best_of_all"] == 1 - 4 / 8
    assert rows[0]["robust_detection"]["guided"] == 0.75 and rows[0]["steps_for"] == "cw=10x1; guided=5x1"
    path2.write_text(json.dumps({**result, "settings": {**result["settings"], "split": "test"}}))
    with pytest.raises(ValueError, match="must share"):
        ablation.main(["--out", str(tmp_path / "abl"), f"merged={path}+{path2}"])


def test_the_suite_runs_on_any_saved_detector_from_npz_files(tmp_path, monkeypatch):
    """``--data npz``: real MNIST digits in .npz files, a fast composite fitted here, the model named
    once by a folder and once as the server names it (GGA_MODEL); unbounded, the guided attack breaks
    every correctly classified input at its first step, and the transfer attacker fits on the rest."""
    import numpy as np
    from safetensors.torch import load_file

    from benchmarks.adaptive import run
    from detectors.datasets import load_idx_split
    from detectors.presets import build_detector
    from detectors.zoo import MnistCNN
    from tests.support.service import MNIST

    model_dir = Path(__file__).resolve().parents[2] / "service" / "default_model"
    model = MnistCNN()
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    model.eval()
    xt, yt = load_idx_split(MNIST, "t10k")
    det = build_detector("fast", model, num_classes=10, layers=["features.1", "act"])
    det.fit(torch.from_numpy(xt[:600]), torch.from_numpy(yt[:600]), calibration=(torch.from_numpy(xt[600:1000]),
                                                                                 torch.from_numpy(yt[600:1000])))
    det.save(tmp_path / "det")
    np.savez(tmp_path / "inputs.npz", x=xt[1000:1012], y=yt[1000:1012])
    np.savez(tmp_path / "public.npz", x=xt[2000:2400], y=yt[2000:2400])
    common = ["--data", "npz", "--detector", str(tmp_path / "det"), "--inputs", str(tmp_path / "inputs.npz"),
              "--public", str(tmp_path / "public.npz"), "--split", "test", "--n", "12", "--pool", "200",
              "--transfer-fit", "100", "--sanity-n", "0"]
    out = run.main(common + ["--model", str(model_dir), "--attacks", "guided,transfer", "--steps-for",
                             "guided=2x1,transfer=2x1", "--budgets", "linf:1.0", "--out", str(tmp_path / "a")])
    r = out["runs"]["linf:1.0"]
    n_correct = int((det.score(torch.from_numpy(xt[1000:1012])).label == torch.from_numpy(yt[1000:1012])).sum())
    assert (r["n"], r["n_correct"]) == (12, n_correct) and n_correct >= 10
    assert r["attacks"]["guided"]["broken"] == n_correct and r["attacks"]["guided"]["robust_detection"] == 0.0
    assert "transfer" in r["attacks"] and out["settings"]["data"] == "npz"
    # the same inputs with the model named as for the server: the same clean outcome
    monkeypatch.setenv("GGA_MODEL", "mnist_cnn")
    out = run.main(common + ["--attacks", "guided", "--steps-for", "guided=2x1", "--budgets", "linf:1.0",
                             "--out", str(tmp_path / "b")])
    assert out["runs"]["linf:1.0"]["n_correct"] == n_correct
    assert out["runs"]["linf:1.0"]["attacks"]["guided"]["broken"] == n_correct
    with pytest.raises(SystemExit):
        run.main(["--data", "npz", "--detector", str(tmp_path / "det"), "--out", str(tmp_path / "c")])


def test_cifar_setup_writes_a_fitted_composite_and_the_suites_npz_files(tmp_path):
    import numpy as np

    from benchmarks.adaptive import cifar_setup
    from tests.support.service import MNIST

    data = MNIST.parent
    if not (data / "cifar10_resnet" / "resnet56-4bfd9763.th").exists():
        pytest.skip("the shared CIFAR-10 weights are not beside the checkout")
    info = cifar_setup.main(["--data-dir", str(data), "--out", str(tmp_path), "--n-fit", "200", "--n-cal", "30",
                             "--n-inputs", "5", "--preset", "fast"])
    assert info["components"] == ["margin", "energy", "layer:relu", "layer:layer1", "layer:layer2", "layer:layer3"]
    assert (info["n_fit"], info["n_cal"], info["n_public"], info["n_inputs"]) == (200, 30, 10000 - 230, 5)
    with np.load(tmp_path / "inputs.npz") as f:
        assert f["x"].shape == (5, 3, 32, 32) and f["x"].dtype == np.float32 and 0 <= f["x"].min() <= f["x"].max() <= 1
        assert f["y"].shape == (5,)
    meta = json.loads((tmp_path / "detector" / "detector.json").read_text())
    assert meta["fit"]["threshold"] == info["threshold"] and meta["fit"]["n_calibration"] == 30

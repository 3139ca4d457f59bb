"""The reproduction pipeline: CSM bookkeeping (exact) and the quick MNIST run end to end."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks import reproduce
from detectors.csm import cosine_similarity_maps, cosine_similarity_matrix

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _tiny_rgb_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 6)).eval()


def _naive_reference(model: nn.Module, x: torch.Tensor, channel_max: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The official code's CSM, written out: float32 p − e_i cotangents, one backward per class."""
    xr = x.clone().requires_grad_(True)
    z = model(xr)
    classes = torch.topk(z.detach(), z.shape[1], dim=1).indices
    p = torch.softmax(z.detach(), dim=1)
    signs = []
    for j in range(z.shape[1]):
        cot = p.clone()
        cot[torch.arange(len(x)), classes[:, j]] -= 1.0
        (g,) = torch.autograd.grad(z, xr, grad_outputs=cot, retain_graph=True)
        signs.append(torch.sign(g).amax(dim=1) if channel_max else torch.sign(g))
    return cosine_similarity_matrix(torch.stack(signs, dim=1)), classes


@pytest.mark.parametrize("family,rescale", [("plain", False), ("rescale", True)])
def test_family_csms_equal_the_library_for_every_view(family, rescale):
    model = _tiny_rgb_model()
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = reproduce.family_csms(model, x, family, channel_variants=True)
    # the family is the library's default call (no cotangent option) with its rescaling
    lib = cosine_similarity_maps(model, x, None, rescale_logits=rescale, strategy="loop")
    assert torch.equal(out["csm"], lib.csm)
    assert torch.equal(out["classes"], lib.classes)
    assert torch.equal(out["logits"], lib.logits)
    # the channel-max view of the same backward passes equals a separate channel-max call
    lib_max = cosine_similarity_maps(model, x, None, rescale_logits=rescale, channel_reduce="max", strategy="loop")
    assert torch.equal(out["csm_chmax"], lib_max.csm)
    # the top-N CSM is the leading N x N block of the all-class CSM (classes sorted by logit)
    for n in (3, 5):
        lib_n = cosine_similarity_maps(model, x, n, rescale_logits=rescale, strategy="loop")
        assert torch.equal(out["csm"][:, :n, :n], lib_n.csm)
    assert "csm_chmax" not in reproduce.family_csms(model, x, family, channel_variants=False)


def test_naive_family_is_the_official_codes_float32_cotangent():
    model = _tiny_rgb_model()
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = reproduce.family_csms(model, x, "naive", channel_variants=True)
    ref, classes = _naive_reference(model, x)
    assert torch.equal(out["classes"], classes)
    assert torch.equal(out["csm"], ref)
    assert torch.equal(out["csm_chmax"], _naive_reference(model, x, channel_max=True)[0])


def test_naive_family_loses_the_predicted_class_term_when_softmax_saturates():
    # z = x on 3 classes; x = (40, 0, -5): float32 softmax gives p_0 == 1.0 exactly. With J = I the saliencies
    # are the cotangents' signs: exact s_0 = (-1, 1, 1), naive s_0 = (0, 1, 1); s_1 = (1, -1, 1) for both
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    x = torch.tensor([[40.0, 0.0, -5.0]])
    plain = reproduce.family_csms(model, x, "plain", channel_variants=False)["csm"]
    naive = reproduce.family_csms(model, x, "naive", channel_variants=False)["csm"]
    assert plain[0, 0, 1].item() == pytest.approx(-1 / 3, abs=1e-7)
    assert naive[0, 0, 1].item() == 0.0
    assert plain[0, 1, 2].item() == naive[0, 1, 2].item() == pytest.approx(-1 / 3, abs=1e-7)
    assert reproduce.library_cotangents_precise()  # the library default keeps that term
    with pytest.raises(ValueError, match="family must be one of"):
        reproduce.family_csms(model, x, "fp16", channel_variants=False)


def test_misclassification_metrics_exact():
    right, wrong = np.array([0.1, 0.2, 0.3, 0.9]), np.array([0.8, 0.25])
    m = reproduce.misclassification(right, wrong)
    # pairs (wrong > right): 0.8 beats 3 of 4, 0.25 beats 2 of 4 -> 5 / 8
    assert m["auroc"] == pytest.approx(5 / 8)
    # accepted in score order 0.1 0.2 0.25(w) 0.3 0.8(w) 0.9: errors among the k first 0 0 1 1 2 2
    assert m["aurc"] == pytest.approx(np.mean([0, 0, 1 / 3, 1 / 4, 2 / 5, 2 / 6]))
    # 95% of 6 = 5.7 samples: 2 errors among the first 5, + 0.7 of the 6th (right) -> 2 / 5.7
    assert m["risk_at_95_coverage"] == pytest.approx(2 / 5.7)
    assert m["aurc_optimal"] == pytest.approx(np.mean([0, 0, 0, 0, 1 / 5, 2 / 6]))
    assert (m["n_right"], m["n_wrong"], m["error_rate"]) == (4, 2, pytest.approx(2 / 6))
    assert reproduce.misclassification(right, np.empty(0)) is None


def test_evaluate_keeps_misclassified_out_of_the_types_and_the_pool():
    clean = np.array([0.0, 0.1, 0.2, 0.3])
    scores = {"clean": clean, "pgd": np.array([0.5, 0.6]), "uniform": np.array([0.4]),
              "misclassified": np.array([-1.0, -2.0])}
    ev = reproduce.evaluate(scores, ("uniform",))
    assert "misclassified" not in ev["per_type"]
    assert ev["table1"]["n_pooled"] == 3 and ev["table1"]["auroc"] == 1.0
    assert ev["misclassification"]["auroc"] == 0.0 and ev["misclassification"]["n_wrong"] == 2


def test_split_cache_round_trip_and_key(tmp_path):
    sp = reproduce.Split("test")
    sp.sets = {"clean": torch.rand(3, 1, 2, 2), "pgd": torch.rand(2, 1, 2, 2), "misclassified": torch.rand(1, 1, 2, 2)}
    sp.clean_y = torch.tensor([1, 2, 3])
    sp.attacks = {"pgd": {"tried": 3, "successful": 2}}
    sp.counts = {"clean_total": 4, "clean_correct": 3, "clean": 3, "pgd": 2, "misclassified": 1}
    key = {"dataset": "mnist", "split": "test", "seed": 0}
    reproduce.save_split(sp, tmp_path, "mnist", key)
    back = reproduce.load_split(tmp_path, "mnist", "test", key)
    assert set(back.sets) == {"clean", "pgd"}  # "misclassified" is derived, never cached
    assert torch.equal(back.sets["pgd"], sp.sets["pgd"]) and torch.equal(back.clean_y, sp.clean_y)
    assert back.attacks == sp.attacks and "misclassified" not in back.counts
    assert reproduce.load_split(tmp_path, "mnist", "test", {**key, "seed": 1}) is None
    assert reproduce.load_split(tmp_path, "mnist", "val", key) is None


def test_logit_margin_is_exact_where_float32_softmax_saturates():
    z = torch.tensor([[40.0, 0.0, -5.0], [1.0, 3.0, 2.0]])
    m = reproduce.logit_margin(z)
    expected = torch.tensor([40.0 - math.log(1 + math.exp(-5.0)), 3.0 - math.log(math.exp(1.0) + math.exp(2.0))],
                            dtype=torch.float64)
    torch.testing.assert_close(m, expected)


def test_default_families_cover_both_sides_of_the_cotangent_fix():
    fams = reproduce.default_families()
    assert fams[:2] == ("plain", "rescale")
    assert fams[2] == ("naive" if reproduce.library_cotangents_precise() else "precise")


@pytest.mark.slow
@pytest.mark.skipif(not (DATA_DIR / "mnist").exists(), reason="needs ../shared/data (MNIST, Fashion-MNIST)")
def test_quick_mnist_run_end_to_end(tmp_path):
    threads = torch.get_num_threads()
    try:  # one thread: on a busy 2-core machine, 2 OpenMP threads per process slow everything down
        out = reproduce.main(["--dataset", "mnist", "--data-dir", str(DATA_DIR), "--quick", "--threads", "1",
                              "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache")])
    finally:
        torch.set_num_threads(threads)
    r = json.loads((tmp_path / "mnist.json").read_text())
    assert r == json.loads(json.dumps(reproduce._clean_json(out)))
    for key in ("command", "seed", "runtime_s", "machine", "torch_version", "samples", "attacks", "methods",
                "tables", "timing_ms_per_sample", "validation", "diagnostics"):
        assert key in r, key
    assert r["seed"] == 0 and r["quick"] is True and r["runtime_s"] > 0
    assert "--quick" in r["command"]

    other_side = "gga_naive" if r["library_cotangents_precise"] else "gga_precise"
    composites = {"composite", "composite_no_gga", "gga_in_composite", "composite_no_logits", "composite_no_layers",
                  "layers_sum"}
    methods = {"msp", "odin", "energy", "mahalanobis", "neg_s1_mean", "gga", "gga_rescale", other_side,
               "gga_softmax", "gga_margin", "gga_bins500", "gga_nostd", "gga_heldout", "gga_train_matched", "gga_top5",
               "gga_top3", "gga_selected"} | composites
    assert methods <= set(r["tables"]["table1"])
    for m in methods:
        row = r["tables"]["table1"][m]
        assert set(row) >= {"noise", "pgd", "rotation", "bb", "bb_l2", "ood", "auroc", "aupr_in", "aupr_out"}
        for k in ("auroc", "aupr_in", "aupr_out", "ood", "pgd"):
            assert 0.0 <= row[k] <= 1.0, (m, k, row[k])
        assert set(r["tables"]["table2"][m]) == {"t_sce", "t_mse", "csa"}
        for t, met in r["methods"][m]["per_type"].items():
            if met is not None:
                assert 0.0 <= met["auroc"] <= 1.0 and met["n"] > 0, (m, t)
    assert set(r["tables"]["table3"]) == {"top-C (all)", "top-5", "top-3"}

    for split in ("val", "test"):
        counts, attacks = r["samples"][split], r["attacks"][split]
        for k in ("clean", "fashion", "uniform", "gaussian", "pgd"):
            assert counts[k] > 0, (split, k)
        assert counts["clean"] == counts["clean_correct"] <= counts["clean_total"]
        for name, a in attacks.items():
            assert 0 <= a["successful"] <= a["tried"], name
            assert counts[name] == a["successful"], name
        assert attacks["pgd"]["tried"] == min(r["sizes"]["n_attack" if split == "test" else "n_val_attack"],
                                              counts["clean"])
        assert attacks["pgd"]["successful"] >= 0.8 * attacks["pgd"]["tried"]  # PGD at eps = 0.3 rarely fails
    assert r["attacks"]["test"]["bb"]["not_run"]  # B&B is skipped in quick mode, and says so

    # uniform noise is easy: at least one method separates it from MNIST
    assert max(r["methods"][m]["per_type"]["uniform"]["auroc"] for m in methods) > 0.9

    v = r["validation"]
    # families x top-N x softmax x margin x bins x std x fit data
    assert len(v["factorial"]) == 3 * 3 * 2 * 2 * 2 * 2 * 3
    assert v["selected"]["label"] == v["factorial"][0]["label"]
    assert r["methods"]["gga_selected"]["config"] == v["selected"]["config"]
    for m in ("msp", "odin", "gga", "gga_top3"):
        assert r["timing_ms_per_sample"][m] > 0

    # misclassified clean test images: a set of their own, out of the types and the pooled AUROC
    n_wrong = r["samples"]["test"]["misclassified"]
    assert n_wrong == r["samples"]["test"]["clean_total"] - r["samples"]["test"]["clean_correct"] > 0
    for m in methods:
        mis = r["tables"]["misclassification"][m]
        assert mis == r["methods"][m]["misclassification"] and mis["n_wrong"] == n_wrong, m
        for k in ("auroc", "aurc", "risk_at_95_coverage", "aurc_optimal"):
            assert 0.0 <= mis[k] <= 1.0, (m, k, mis[k])
        assert mis["aurc"] >= mis["aurc_optimal"] - 1e-12, m
        assert "misclassified" not in r["methods"][m]["per_type"], m

    # the composite and its ablations: fitted from signals computed once, the served preset's defaults
    c = r["composite"]
    assert c["variants"] == ["composite", "composite_no_gga", "gga_in_composite", "composite_no_logits",
                             "composite_no_layers", "layers_sum"]
    assert c["ablations"] == ["composite_no_gga", "composite_no_logits", "composite_no_layers", "gga_in_composite"]
    assert c["matches_served_preset"] is True
    assert c["layers"] == ["features.1", "features.3", "features.6", "features.8", "act"]
    assert c["signals_check"]["max_abs_diff_statistic"] <= 1e-9 and c["signals_check"]["same_flags"]
    assert r["methods"]["composite"]["components"][:3] == ["gga", "margin", "energy"]
    assert "gga" not in r["methods"]["composite_no_gga"]["components"]
    assert r["methods"]["gga_in_composite"]["components"] == ["gga"]
    assert r["methods"]["layers_sum"]["config"]["combine"] == "sum"
    assert r["methods"]["composite"]["fit"]["n_calibration"] == r["samples"]["heldout_fit"]
    for m in composites:
        rate = c["clean_test_flag_rate_all"][m]
        assert rate == r["methods"][m]["clean_all_flag_rate_at_alpha_0.05"]["test"] and 0.0 <= rate <= 1.0
        assert r["methods"][m]["description"]
    assert c["clean_test_images"] == r["samples"]["test"]["clean_total"]
    ms = c["timing"]["ms_per_sample"]
    assert ms["composite"] > 0 and ms["gga_preset"] > 0
    assert c["timing"]["ratio_composite_to_gga_preset"] == pytest.approx(ms["composite"] / ms["gga_preset"], rel=1e-4)
    ab = r["tables"]["ablation"]
    assert list(ab["rows"]) == ["composite", "composite_no_gga", "composite_no_logits", "composite_no_layers",
                                "gga_in_composite", "layers_sum", "gga", "gga_selected"]
    assert ab["rows"]["composite"]["pooled_auroc"] == r["tables"]["table1"]["composite"]["auroc"]
    assert ab["gga_adds"]["pooled_auroc"] == pytest.approx(
        ab["rows"]["composite"]["pooled_auroc"] - ab["rows"]["composite_no_gga"]["pooled_auroc"], abs=1e-5)
    assert ab["best_baseline"]["pooled_auroc"]["method"] in {"msp", "odin", "energy", "mahalanobis", "layers_sum",
                                                             "neg_s1_mean"}

    # the splits were saved to the cache; read back, they hold the same sets (and the derived misclassified ones)
    assert r["splits_cache"]["val"] == r["splits_cache"]["test"] == "built and saved"
    args = reproduce.parse_args(["--dataset", "mnist", "--data-dir", str(DATA_DIR), "--quick"])
    sizes = reproduce.resolve_sizes(args)
    setup = reproduce.load_mnist(args, sizes)
    back = reproduce.get_split(setup, "test", sizes, args, reproduce.Log(), tmp_path / "cache")
    assert back.cache == "read"
    assert {k: len(v) for k, v in back.sets.items()} == {k: r["samples"]["test"][k] for k in back.sets}
    assert torch.equal(back.misclassified_y != setup.model(back.sets["misclassified"]).argmax(1),
                       torch.ones(n_wrong, dtype=torch.bool))

    report = (tmp_path / "REPORT.md").read_text()
    assert "### Composite detector and ablations" in report and "**composite**" in report
    assert "### Misclassification (wrong vs right, clean test)" in report and "perfect ranking" in report
    assert "ratio composite / gga preset" in report
    assert "### Table 1" in report and "Ours (paper)" in report and "**gga** (ours)" in report
    assert (tmp_path / "mnist_arrays.npz").exists()

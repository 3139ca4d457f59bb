"""The reproduction pipeline: CSM bookkeeping (exact) and the quick MNIST run end to end."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import reproduce
from detectors.csm import cosine_similarity_maps

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _tiny_rgb_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 6)).eval()


@pytest.mark.parametrize("family,rescale", [("plain", False), ("rescale", True)])
def test_family_csms_equal_the_library_for_every_view(family, rescale):
    model = _tiny_rgb_model()
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = reproduce.family_csms(model, x, family, channel_variants=True)
    lib = cosine_similarity_maps(model, x, None, rescale_logits=rescale, strategy="loop")
    assert torch.equal(out["csm"], lib.csm)
    assert torch.equal(out["classes"], lib.classes)
    lib_max = cosine_similarity_maps(model, x, None, rescale_logits=rescale, channel_reduce="max", strategy="loop")
    assert torch.equal(out["csm_chmax"], lib_max.csm)
    # the top-N CSM is the leading N x N block of the all-class CSM (classes sorted by logit)
    for n in (3, 5):
        lib_n = cosine_similarity_maps(model, x, n, rescale_logits=rescale, strategy="loop")
        assert torch.equal(out["csm"][:, :n, :n], lib_n.csm)


def test_precise_cotangents_keep_the_predicted_class_term_when_softmax_saturates():
    z = torch.tensor([[40.0, 0.0, -5.0]])  # fp32 softmax saturates: p_0 == 1.0 exactly
    assert torch.softmax(z, 1)[0, 0].item() == 1.0
    classes = torch.tensor([[0, 1, 2]])
    cot = reproduce._precise_cotangents(z, classes)
    # predicted class: (p - e_0) ∝ (-(p_1 + p_2), p_1, p_2); scaled to max |entry| = 1
    p = torch.softmax(z.double(), 1)[0]
    expected = torch.stack([-(p[1] + p[2]), p[1], p[2]]) / (p[1] + p[2])
    torch.testing.assert_close(cot[0, 0].double(), expected, rtol=1e-6, atol=0)
    assert cot[0, 0, 0].item() == -1.0
    # a non-predicted class: (p - e_1) = (p_0, p_1 - 1, p_2), max |entry| = p_0 ≈ 1
    torch.testing.assert_close(cot[1, 0], torch.tensor([1.0, -1.0, 0.0]), atol=1e-6, rtol=0)
    # the naive float32 cotangent (official code, library before its fix) loses the predicted-class term
    naive = reproduce._naive_cotangents(z, classes)
    assert naive[0, 0, 0].item() == 0.0 and naive[0, 0, 1].item() > 0


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
                              "--out", str(tmp_path)])
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
    methods = {"msp", "odin", "energy", "mahalanobis", "neg_s1_mean", "gga", "gga_rescale", other_side,
               "gga_softmax", "gga_margin", "gga_bins500", "gga_nostd", "gga_heldout", "gga_train_matched", "gga_top5",
               "gga_top3", "gga_selected"}
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

    report = (tmp_path / "REPORT.md").read_text()
    assert "### Table 1" in report and "Ours (paper)" in report and "**gga** (ours)" in report
    assert (tmp_path / "mnist_arrays.npz").exists()

import torch

from benchmarks.bench_gga import format_table, official_code_csm, official_csm, run
from detectors import cosine_similarity_maps
from detectors.zoo import MnistCNN


def test_official_baselines_compute_the_same_matrices():
    torch.manual_seed(0)
    model = MnistCNN().eval()
    x = torch.rand(4, 1, 28, 28)
    full, blocks = official_csm(model, x, (5, 3))
    ours = cosine_similarity_maps(model, x)
    order = ours.classes
    # the official matrix is indexed by class; ours is ordered by logit
    assert torch.equal(full[torch.arange(4)[:, None, None], order[:, :, None], order[:, None, :]], ours.csm)
    for n in (5, 3):
        assert torch.equal(blocks[n], cosine_similarity_maps(model, x, top_n=n).csm)
    # the public code's defaults: rescaled logits (channel max is a no-op for one channel)
    code = official_code_csm(model, x)
    resc = cosine_similarity_maps(model, x, rescale_logits=True)
    assert (code[torch.arange(4)[:, None, None], resc.classes[:, :, None], resc.classes[:, None, :]]
            - resc.csm).abs().max() < 1e-6
    assert all(p.grad is None for p in model.parameters())


def test_quick_run_reports_ratios():
    rows = run(["mnist"], [2], 1, "cpu", 0, budget_s=5, max_expanded_gb=4)
    (row,) = rows
    assert [r["n"] for r in row["ratios"]] == [10, 5, 3]
    for r in row["ratios"]:
        assert r["speedup_vs_official"] > 0 and r["speedup_vs_official_code"] > 0 and r["ours_over_bare"] > 0
    table = format_table(rows)
    assert table.count("| mnist | 2 |") == 3

"""PGD adversarial training: the training attack's ball, the eps ramp, exact resumption."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from detectors.zoo.robust_train import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    PROGRESS_FILE,
    TrainConfig,
    eps_at,
    lr_at,
    pgd_linf,
    train,
)
from tests.support.threads import one_thread  # noqa: F401 (autouse fixture)

CFG = TrainConfig(epochs=2, eps=0.3, pgd_steps=2, ramp_epochs=1.0, lr=1e-2, batch_size=8, seed=3, val_attack_n=8)




def tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 4, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 7 * 7, 10))


def tiny_data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(44, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (44,), generator=g)
    return x[:36], y[:36], x[36:], y[36:]  # 36 training images: 5 batches of 8 (the last has 4)


def run(tmp, **kw):
    model = tiny_model(kw.pop("init_seed", 0))
    progress = train(model, *tiny_data(), kw.pop("cfg", CFG), tmp, log=lambda s: None, **kw)
    return model, progress


def test_pgd_stays_in_ball_and_pixel_range():
    torch.manual_seed(0)
    model = tiny_model(1)
    x = torch.rand(16, 1, 28, 28)
    x[:4] = 0.0  # corners of the pixel range, where the ball is cut by [0, 1]
    x[4:8] = 1.0
    y = torch.randint(0, 10, (16,))
    xa = pgd_linf(model, x, y, eps=0.3, steps=5, step_size=0.2, generator=torch.Generator().manual_seed(0))
    assert (xa - x).abs().max().item() <= 0.3 + 1e-6
    assert xa.min().item() >= 0.0 and xa.max().item() <= 1.0
    assert (xa - x).abs().max().item() > 0.29  # step 0.2 x 5 reaches the boundary somewhere
    assert model[0].weight.grad is None  # parameter gradients untouched


def test_pgd_raises_the_loss():
    model = tiny_model(2)
    x, y = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 10
    xa = pgd_linf(model, x, y, eps=0.3, steps=10, step_size=0.075, generator=None, random_start=False)
    ce = nn.functional.cross_entropy
    assert ce(model(xa), y).item() > ce(model(x), y).item() + 0.1


def test_eps_ramp_and_lr_schedule():
    cfg = dataclasses.replace(CFG, ramp_epochs=2.0)
    assert eps_at(0, 10, cfg) == pytest.approx(0.3 / 20)
    assert eps_at(9, 10, cfg) == pytest.approx(0.15)
    assert eps_at(19, 10, cfg) == pytest.approx(0.3) and eps_at(500, 10, cfg) == 0.3
    assert eps_at(0, 10, dataclasses.replace(CFG, ramp_epochs=0.0)) == 0.3
    assert [lr_at(s, 100, CFG) for s in (0, 69, 70, 89, 90)] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3, 1e-4])


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    full, p_full = run(tmp_path / "full")
    # interrupted mid-epoch 1 (step 3 of 5) and again mid-epoch 2; resumed from another init each time
    run(tmp_path / "cut", stop_at_step=3)
    run(tmp_path / "cut", stop_at_step=7, resume=True, init_seed=5)
    resumed, p_res = run(tmp_path / "cut", resume=True, init_seed=6)
    assert p_full["step"] == p_res["step"] == 10
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    strip = [{k: v for k, v in h.items() if k != "elapsed_s"} for h in p_full["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "elapsed_s"} for h in p_res["history"]]
    assert [h["epoch"] for h in p_full["history"]] == [1, 2]
    saved = json.loads((tmp_path / "cut" / PROGRESS_FILE).read_text())
    assert saved["epoch"] == 2 and saved["step"] == 10


def test_resume_refuses_another_configuration_and_mixed_checkpoints(tmp_path):
    run(tmp_path, stop_at_step=2)
    with pytest.raises(ValueError, match="another configuration"):
        run(tmp_path, resume=True, cfg=dataclasses.replace(CFG, eps=0.2))
    (tmp_path / "keep").mkdir()
    (tmp_path / OPTIMIZER_FILE).rename(tmp_path / "keep" / OPTIMIZER_FILE)
    with pytest.raises(FileNotFoundError, match=OPTIMIZER_FILE):
        run(tmp_path, resume=True)
    (tmp_path / "keep" / OPTIMIZER_FILE).rename(tmp_path / OPTIMIZER_FILE)
    other = tmp_path / "other"
    run(other, stop_at_step=3)
    (other / MODEL_FILE).replace(tmp_path / MODEL_FILE)  # weights of step 3 beside a step-2 optimizer
    with pytest.raises(ValueError, match="different steps"):
        run(tmp_path, resume=True)


def test_config_validation():
    with pytest.raises(ValueError, match="eps must be in"):
        TrainConfig(eps=0.0)
    with pytest.raises(ValueError, match="must be >= 1"):
        TrainConfig(pgd_steps=0)

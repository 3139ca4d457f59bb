import json

import pytest
import torch
from torch import nn

from detectors.autotune import BUDGET, StrategyCache, StrategyTable, measure_strategies, strategy_for
from detectors.composite import CompositeDetector
from detectors.gga import GGADetector

TICK = 1 / 1024  # a binary fraction of a second: the fake clock's sums and medians are exact


def ms(ticks: int) -> float:
    return ticks * TICK * 1000.0


class FakeCSM:
    """Stands in for cosine_similarity_maps and drives a fake clock: each call advances it by
    the next cost (in ticks) listed for (strategy, batch size), or raises the exception listed."""

    def __init__(self, costs: dict[tuple[str, int], list[int] | int | Exception]) -> None:
        self.costs = {k: (list(v) if isinstance(v, list) else v) for k, v in costs.items()}
        self.t = 0.0
        self.calls: list[tuple[str, int]] = []

    def timer(self) -> float:
        return self.t

    def __call__(self, model, x, top_n, *, strategy):
        self.calls.append((strategy, len(x)))
        c = self.costs[(strategy, len(x))]
        if isinstance(c, Exception):
            raise c
        self.t += (c.pop(0) if isinstance(c, list) else c) * TICK


def _linear():
    torch.manual_seed(0)
    return nn.Linear(8, 5).eval()


def _measure(fake, batch_sizes, **kw):
    kw.setdefault("budget_s", 1000.0)
    return measure_strategies(_linear(), (8,), 3, "cpu", batch_sizes, timer=fake.timer, csm=fake, **kw)


# ------------------------------------------------------------------ StrategyTable


def test_pick_largest_measured_batch_not_above_the_request():
    t = StrategyTable({1: "replicate", 8: "vmap", 64: "loop"})
    assert [t.pick(b) for b in (1, 7, 8, 63, 64, 1000)] == ["replicate", "replicate", "vmap", "vmap", "loop", "loop"]
    t2 = StrategyTable({4: "vmap", 16: "loop"})
    assert [t2.pick(b) for b in (1, 3, 4, 15, 16)] == ["vmap", "vmap", "vmap", "vmap", "loop"]  # below all: smallest
    with pytest.raises(ValueError, match="batch must be >= 1"):
        t.pick(0)
    with pytest.raises(ValueError, match="no strategy was measured"):
        StrategyTable({}).pick(1)
    with pytest.raises(ValueError, match="must be one of"):
        StrategyTable({1: "auto"})
    with pytest.raises(ValueError, match="integers >= 1"):
        StrategyTable({0: "loop"})


def test_table_round_trips_through_json():
    t = StrategyTable({1: "replicate", 64: "loop"}, {1: {"loop": 3.5, "replicate": 1.25}, 64: {"loop": 40.0}},
                      {1: {"vmap": "RuntimeError at batch 1: no"}, 64: {"vmap": "RuntimeError at batch 1: no",
                                                                         "replicate": BUDGET}},
                      top_n=5, device="cpu", seconds=2.5)
    d = json.loads(json.dumps(t.to_dict()))
    assert d == {"table": {"1": "replicate", "64": "loop"},
                 "timings_ms": {"1": {"loop": 3.5, "replicate": 1.25}, "64": {"loop": 40.0}},
                 "skipped": {"1": {"vmap": "RuntimeError at batch 1: no"},
                             "64": {"vmap": "RuntimeError at batch 1: no", "replicate": "budget"}},
                 "top_n": 5, "device": "cpu", "seconds": 2.5}
    assert StrategyTable.from_dict(d) == t


def test_strategy_for_a_name_or_a_table():
    t = StrategyTable({1: "replicate", 8: "loop"})
    assert strategy_for("vmap", 100) == "vmap"
    assert strategy_for("auto", 1) == "auto"
    assert (strategy_for(t, 1), strategy_for(t, 7), strategy_for(t, 8)) == ("replicate", "replicate", "loop")
    with pytest.raises(TypeError, match="StrategyTable"):
        strategy_for(3, 1)


# ------------------------------------------------------------------ measure_strategies, fake clock


def test_measure_picks_the_fastest_per_batch_size_with_exact_medians():
    fake = FakeCSM({
        ("loop", 1): 3, ("vmap", 1): 2, ("replicate", 1): 1,
        ("loop", 8): 10, ("vmap", 8): 5, ("replicate", 8): 20,
        # warm-up 100 (not timed), then 9, 1, 2: median 2 beats vmap's 3 (the mean, 4, would not)
        ("loop", 64): [100, 9, 1, 2], ("vmap", 64): 3, ("replicate", 64): 7,
    })
    table = _measure(fake, (64, 1, 8))
    assert table.best == {1: "replicate", 8: "vmap", 64: "loop"}
    assert table.timings_ms == {1: {"loop": ms(3), "vmap": ms(2), "replicate": ms(1)},
                                8: {"loop": ms(10), "vmap": ms(5), "replicate": ms(20)},
                                64: {"loop": ms(2), "vmap": ms(3), "replicate": ms(7)}}
    assert table.skipped == {}
    # smallest batch first; per batch the CPU default (loop) first; one warm-up + 3 timed calls each
    assert fake.calls == [(s, b) for b in (1, 8, 64) for s in ("loop", "vmap", "replicate") for _ in range(4)]
    assert table.seconds == (4 * (3 + 2 + 1 + 10 + 5 + 20 + 3 + 7) + 100 + 9 + 1 + 2) * TICK
    assert (table.top_n, table.device) == (3, "cpu")


def test_ties_go_to_the_device_default_which_is_measured_first():
    fake = FakeCSM({(s, 1): 4 for s in ("loop", "vmap", "replicate")})
    table = _measure(fake, (1,), strategies=("replicate", "vmap", "loop"), repeats=1)
    assert table.best == {1: "loop"}
    assert fake.calls == [("loop", 1), ("loop", 1), ("replicate", 1), ("replicate", 1), ("vmap", 1), ("vmap", 1)]


def test_a_strategy_that_raises_is_recorded_and_not_tried_again():
    fake = FakeCSM({("loop", 1): 3, ("vmap", 1): RuntimeError("Batching rule not implemented for aten::foo"),
                    ("replicate", 1): 2, ("loop", 8): 4, ("replicate", 8): 6})
    table = _measure(fake, (1, 8))
    assert table.best == {1: "replicate", 8: "loop"}
    why = "RuntimeError at batch 1: Batching rule not implemented for aten::foo"
    assert table.skipped == {1: {"vmap": why}, 8: {"vmap": why}}
    assert table.timings_ms == {1: {"loop": ms(3), "replicate": ms(2)}, 8: {"loop": ms(4), "replicate": ms(6)}}
    assert fake.calls.count(("vmap", 1)) == 1 and ("vmap", 8) not in fake.calls


def test_nothing_measurable_gives_an_empty_table():
    fake = FakeCSM({(s, b): ValueError("bad model") for s in ("loop", "vmap", "replicate") for b in (1, 8)})
    table = _measure(fake, (1, 8))
    assert table.best == {} and table.timings_ms == {}
    assert table.skipped[8] == {s: "ValueError at batch 1: bad model" for s in ("loop", "vmap", "replicate")}
    assert len(fake.calls) == 3
    with pytest.raises(ValueError, match="no strategy was measured"):
        strategy_for(table, 1)


def test_budget_stops_the_measurement():
    # 1 tick per call, budget 10 ticks: loop 4 calls (t=4), vmap 4 (t=8), replicate warm-up + one timed call
    # (t=10: budget spent, no more repeats); batch 8 is not started
    fake = FakeCSM({(s, b): 1 for s in ("loop", "vmap", "replicate") for b in (1, 8)})
    table = _measure(fake, (1, 8), budget_s=10 * TICK)
    assert table.best == {1: "loop", 8: "loop"}  # 8: not measured, the device default
    assert table.timings_ms == {1: {"loop": ms(1), "vmap": ms(1), "replicate": ms(1)}}
    assert table.skipped == {8: {"loop": BUDGET, "vmap": BUDGET, "replicate": BUDGET}}
    assert fake.calls.count(("replicate", 1)) == 2 and not [c for c in fake.calls if c[1] == 8]


def test_a_size_that_would_overrun_the_budget_is_not_started_and_gets_the_device_default():
    # batch 1: 4 calls each of 2, 2, 1 ticks; batch 1024 extrapolated: >= 2 calls x 1024 ticks = 2 s > the 1 s budget
    fake = FakeCSM({("loop", 1): 2, ("vmap", 1): 2, ("replicate", 1): 1})
    table = _measure(fake, (1, 1024), budget_s=1.0)
    # replicate wins at 1 row; 1024 rows were not measured: loop (CPU default), not replicate (N x 1024 rows)
    assert table.best == {1: "replicate", 1024: "loop"} and 1024 not in table.timings_ms
    assert table.skipped == {1024: {"loop": BUDGET, "vmap": BUDGET, "replicate": BUDGET}}
    assert (table.pick(1023), table.pick(5000)) == ("replicate", "loop")
    assert len(fake.calls) == 12
    assert "batch 1024: loop, unmeasured: device default" in table.summary()


def test_estimated_memory_skips_the_expanding_strategies():
    fake = FakeCSM({("loop", 4): 2})
    # Linear(8, 5): 5 floats of activation per sample, N=3: replicate 3*4*20 bytes, vmap 4*20 + 4*3*4*20
    table = _measure(fake, (4,), max_expanded_bytes=100)
    assert table.best == {4: "loop"}
    assert set(table.skipped[4]) == {"vmap", "replicate"}
    assert table.skipped[4]["replicate"].startswith("memory: est.")


def test_measure_validates_its_arguments():
    fake = FakeCSM({})
    for kw, msg in [({"batch_sizes": ()}, "batch_sizes"), ({"batch_sizes": (0,)}, "batch_sizes"),
                    ({"repeats": 0}, "repeats"), ({"budget_s": 0}, "budget_s"),
                    ({"strategies": ("auto",)}, "strategies")]:
        args = {"batch_sizes": (1,), **kw}
        with pytest.raises(ValueError, match=msg):
            _measure(fake, args.pop("batch_sizes"), **args)
    with pytest.raises(ValueError, match="top_n"):
        measure_strategies(_linear(), (8,), 2, "cpu", (1,))


def test_cache_measures_once_per_key():
    fake = FakeCSM({(s, 1): 1 for s in ("loop", "vmap", "replicate")})
    cache, model = StrategyCache(), _linear()
    kw = {"timer": fake.timer, "csm": fake, "budget_s": 1000.0}
    t1, fresh1 = cache.get(model, "fp", (8,), 3, "cpu", (1,), **kw)
    t2, fresh2 = cache.get(model, "fp", (8,), 3, "cpu", [1, 1], **kw)
    t3, fresh3 = cache.get(model, "fp", (8,), 4, "cpu", (1,), csm=fake, timer=fake.timer)  # another N
    assert (fresh1, fresh2, fresh3) == (True, False, True) and t2 is t1 and t3 is not t1
    assert cache.measurements == 2 and len(fake.calls) == 24


# ------------------------------------------------------------------ real models


class _NoBatchingRule(torch.autograd.Function):
    """Identity whose backward branches on the data: vmap (is_grads_batched) cannot batch it."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * 0 if g.abs().sum() > 1e9 else g


class _Unvmappable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5))

    def forward(self, x):
        return self.net(_NoBatchingRule.apply(x))


def test_real_measurement_skips_an_unsupported_strategy():
    table = measure_strategies(_Unvmappable().eval(), (8,), 3, "cpu", (1, 8), repeats=2, budget_s=120.0)
    assert table.skipped[1]["vmap"].startswith("RuntimeError at batch 1: Batching rule not implemented")
    assert table.skipped[8]["vmap"] == table.skipped[1]["vmap"]
    assert {b: set(t) for b, t in table.timings_ms.items()} == {1: {"loop", "replicate"}, 8: {"loop", "replicate"}}
    assert set(table.best) == {1, 8} and set(table.best.values()) <= {"loop", "replicate"}
    assert all(v > 0 for t in table.timings_ms.values() for v in t.values())


# ------------------------------------------------------------------ detectors take a table


class _Recording(nn.Module):
    """A tiny classifier that records the batch size of every forward pass: replicate runs the
    model on N x B rows (after a one-row probe), loop and vmap on B rows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5))
        self.seen: list[int] = []

    def forward(self, x):
        self.seen.append(len(x))
        return self.net(x)


def _data(model, n, seed, scale=1.0):
    x = scale * torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model.net(x).argmax(1)
    return x, y


TABLE = StrategyTable({1: "vmap", 10: "replicate"})  # chunks of 10 -> replicate, the last chunk of 7 -> vmap


def _same_scores(a, b):
    torch.testing.assert_close(a.csm, b.csm, atol=1e-6, rtol=0)
    assert torch.equal(a.flagged, b.flagged) and torch.equal(a.label, b.label)
    assert torch.equal(a.top_classes, b.top_classes)
    torch.testing.assert_close(a.trust, b.trust, atol=0.01, rtol=0)


def test_gga_detector_scores_with_a_table_as_with_a_fixed_strategy():
    model = _Recording().eval()
    det = GGADetector(model, top_n=3, strategy="loop").fit(*_data(model, 600, 4))
    q = torch.cat([torch.randn(30, 8, generator=torch.Generator().manual_seed(5)),
                   torch.randn(7, 8, generator=torch.Generator().manual_seed(6)) * 6])  # far: some flagged
    model.seen.clear()
    fixed = det.score(q, return_csm=True, batch_size=10)
    assert model.seen == [10, 10, 10, 7]
    det.strategy = TABLE
    model.seen.clear()
    tabled = det.score(q, return_csm=True, batch_size=10)
    assert model.seen == [1, 30, 1, 30, 1, 30, 7]  # replicate (probe + 3 x 10 rows) x 3, then vmap on 7
    _same_scores(tabled, fixed)
    assert tabled.flagged.any() and not tabled.flagged.all()


def test_composite_detector_scores_with_a_table_as_with_a_fixed_strategy():
    model = _Recording().eval()
    x, y = _data(model, 1500, 1)
    det = CompositeDetector(model, top_n=3, layers=["net.0", "net.1"], strategy="loop").fit(
        x, y, calibration=_data(model, 500, 2))
    q = torch.cat([_data(model, 30, 3)[0], _data(model, 7, 4, scale=8.0)[0]])
    fixed = det.score(q, return_csm=True, batch_size=10)
    det.strategy = TABLE
    model.seen.clear()
    tabled = det.score(q, return_csm=True, batch_size=10)
    assert model.seen == [1, 30, 1, 30, 1, 30, 7]
    _same_scores(tabled, fixed)
    assert tabled.flagged.any() and not tabled.flagged.all()

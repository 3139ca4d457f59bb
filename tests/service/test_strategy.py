"""GGA_STRATEGY: measured at startup (auto), the device rule, or fixed; shown in /info, applied to swaps."""

from __future__ import annotations

import logging

import pytest

from detectors.autotune import MEASURED, PROCESS_CACHE, StrategyTable
from detectors.persist import load_detector
from detectors.presets import build_detector
from service import app as app_module
from service.app import strategy_batch_sizes
from service.settings import DEFAULT_MODEL_DIR, SettingsError
from tests.support.service import Running, make_settings, run


def _strategy_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("GGA strategy")]


def test_batch_sizes_measured():
    assert [strategy_batch_sizes(m) for m in (1, 4, 8, 9, 64)] == [(1,), (1, 4), (1, 8), (1, 8, 9), (1, 8, 64)]


def test_unknown_strategy_is_refused(tmp_path):
    with pytest.raises(SettingsError, match="GGA_STRATEGY='fastest': Input should be 'auto', 'device'"):
        make_settings(tmp_path, strategy="fastest")


def test_auto_measures_at_startup_shows_the_table_and_tunes_swapped_detectors(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="service")
    # a budget no machine, however busy, spends on batch sizes 1 and 2 of the MNIST CNN: every entry is measured
    monkeypatch.setattr(app_module, "STRATEGY_BUDGET_S", 600.0)
    settings = make_settings(tmp_path, strategy="auto", max_batch_rows=2)

    async def go():
        async with Running(settings) as svc:
            startup_lines = _strategy_lines(caplog)
            info = (await svc.client.get("/info")).json()
            served, _ = svc.app.state.slot.get()
            slot, model = svc.app.state.slot, svc.app.state.model
            # a fit job's detector with another top-N gets its own measurement before it is served ...
            before = PROCESS_CACHE.measurements
            other = build_detector("gga", model, num_classes=10, top_n=4)
            slot.swap(other, "v1")
            measured_for_4 = PROCESS_CACHE.measurements - before
            # ... one with the served top-N reuses the startup table
            same = load_detector(DEFAULT_MODEL_DIR / "detector", model)
            slot.swap(same, "v2")
            measured_again = PROCESS_CACHE.measurements - before - measured_for_4
            info2 = (await svc.client.get("/info")).json()
            return startup_lines, info, served, other, same, measured_for_4, measured_again, info2

    startup_lines, info, served, other, same, measured_for_4, measured_again, info2 = run(go())
    s = info["strategy"]
    assert s["mode"] == "auto" and s["top_n"] == 5 and s["device"] == "cpu"
    assert set(s["table"]) == {"1", "2"} and set(s["table"].values()) <= set(MEASURED)
    assert set(s["timings_ms"]) == {"1", "2"}
    for b, choice in s["table"].items():
        times = s["timings_ms"][b]
        assert "loop" in times and choice == min(times, key=times.get)  # the CPU default is always measured
    assert isinstance(served.strategy, StrategyTable) and served.strategy.to_dict() == {
        k: v for k, v in s.items() if k != "mode"}
    assert len(startup_lines) == 1 and "top-5" in startup_lines[0] and "batch 2:" in startup_lines[0]
    assert isinstance(other.strategy, StrategyTable) and other.strategy.top_n == 4 and measured_for_4 == 1
    assert same.strategy is served.strategy and measured_again == 0
    assert info2["detector_version"] == "v2" and info2["strategy"] == s


def test_fixed_strategy_measures_nothing(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="service")
    before = PROCESS_CACHE.measurements

    async def go():
        async with Running(make_settings(tmp_path, strategy="loop")) as svc:
            info = (await svc.client.get("/info")).json()
            served, _ = svc.app.state.slot.get()
            swapped = load_detector(DEFAULT_MODEL_DIR / "detector", svc.app.state.model)
            svc.app.state.slot.swap(swapped, "v1")
            return info, served, swapped

    info, served, swapped = run(go())
    assert info["strategy"] == {"mode": "loop", "strategy": "loop", "table": None, "timings_ms": None}
    assert served.strategy == "loop" and swapped.strategy == "loop"
    assert PROCESS_CACHE.measurements == before
    assert _strategy_lines(caplog)[0] == "GGA strategy loop (fixed)"


def test_device_rule(tmp_path):
    before = PROCESS_CACHE.measurements

    async def go():
        async with Running(make_settings(tmp_path, strategy="device")) as svc:
            return (await svc.client.get("/info")).json(), svc.app.state.slot.get()[0]

    info, served = run(go())
    assert info["strategy"] == {"mode": "device", "strategy": "loop", "table": None, "timings_ms": None}  # CPU
    assert served.strategy == "auto" and PROCESS_CACHE.measurements == before

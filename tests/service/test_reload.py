"""Hot reload: newer valid versions in the shared store are swapped in; older, equal and broken ones never are."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
import time

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from detectors.fingerprint import model_fingerprint
from service.artifacts import ArtifactStore
from service.reload import ReloadWatcher, SwapGate, version_number
from service.settings import DEFAULT_MODEL_DIR, Settings, SettingsError
from service.worker import DetectorSlot
from tests.support.service import Running, make_settings, run

BUNDLED = DEFAULT_MODEL_DIR / "detector"
SKIP_LINE = "skipping detector artifact"


# --- the gate and the poll, with a fake loader ---------------------------------------------------


class FakeLoader:
    """Loads ``<path>/detector.json`` holding "ok" (returns a token naming the folder) or raises."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, path, model):
        self.calls.append(path.name)
        if (path / "detector.json").read_text() != "ok":
            raise ValueError(f"{path.name} is broken")
        return f"detector {path.name}"


def _store(tmp_path, **versions: str) -> ArtifactStore:
    """A store whose version folders (``v0001=...``) hold "ok" or anything else (broken)."""
    store = ArtifactStore(tmp_path, "f" * 16)
    store.dir.mkdir(parents=True)
    for name, content in versions.items():
        _write(store, name, content)
    return store


def _write(store: ArtifactStore, name: str, content: str) -> None:
    (store.dir / name).mkdir(exist_ok=True)
    (store.dir / name / "detector.json").write_text(content)


def _watcher(store, served: str | None, interval_s: float = 1.0):
    slot, swapped, loader = DetectorSlot(None if served is None else f"detector {served}", served), [], FakeLoader()
    gate = SwapGate(slot, on_swap=swapped.append)
    return ReloadWatcher(store, None, gate, interval_s=interval_s, loader=loader), slot, swapped, loader


def test_version_numbers():
    assert [version_number(v) for v in ("v0", "v1", "v0012", "v123456", None, "", "latest", "v", "1")] == \
        [0, 1, 12, 123456, -1, -1, -1, -1, -1]


def test_the_gate_swaps_only_newer_versions_and_reports_each_swap():
    slot, swapped = DetectorSlot("a", "v2"), []
    gate = SwapGate(slot, on_swap=swapped.append)
    assert gate.swap("b", "v2") is False and gate.swap("c", "v1") is False and gate.swap("d", "v0") is False
    assert slot.get() == ("a", "v2") and swapped == []
    assert gate.swap("e", "v3") is True and slot.get() == ("e", "v3") and swapped == ["v3"]
    assert gate.get() == ("e", "v3")
    empty = SwapGate(DetectorSlot(None, None))
    assert empty.swap("bundled", "v0") is True and empty.get() == ("bundled", "v0")


def test_a_newer_version_is_swapped_in_and_then_left_alone(tmp_path):
    store = _store(tmp_path, v0001="ok", v0002="ok", v0003="ok")
    watcher, slot, swapped, loader = _watcher(store, "v1")
    assert watcher.poll() == "v3"
    assert slot.get() == ("detector v0003", "v3") and swapped == ["v3"] and loader.calls == ["v0003"]
    assert watcher.poll() is None and watcher.poll() is None  # v3 is served: nothing is even loaded
    assert loader.calls == ["v0003"] and swapped == ["v3"]
    _write(store, "v0004", "ok")  # another replica's fit
    assert watcher.poll() == "v4" and slot.get() == ("detector v0004", "v4") and loader.calls == ["v0003", "v0004"]


def test_older_or_equal_versions_never_replace_the_served_one(tmp_path):
    store = _store(tmp_path, v0001="ok", v0002="ok")
    for served in ("v2", "v3", "v9"):
        watcher, slot, swapped, loader = _watcher(store, served)
        assert watcher.poll() is None
        assert slot.get() == (f"detector {served}", served) and swapped == [] and loader.calls == []


def test_anything_replaces_no_detector_and_the_bundled_one(tmp_path):
    for served in (None, "v0"):
        watcher, slot, swapped, _ = _watcher(_store(tmp_path / str(served), v0001="ok"), served)
        assert watcher.poll() == "v1" and slot.get() == ("detector v0001", "v1") and swapped == ["v1"]


def test_a_broken_newer_version_is_skipped_once_and_the_next_newer_one_served(tmp_path, caplog):
    store = _store(tmp_path, v0001="ok", v0002="ok", v0003="broken")
    watcher, slot, swapped, loader = _watcher(store, "v1")
    with caplog.at_level(logging.WARNING, logger="service.reload"):
        assert watcher.poll() == "v2"
        assert [watcher.poll() for _ in range(5)] == [None] * 5
    assert slot.get() == ("detector v0002", "v2") and swapped == ["v2"]
    assert loader.calls == ["v0003", "v0002"]  # v0003 tried once, not on each of the 5 later polls
    lines = [r.getMessage() for r in caplog.records if SKIP_LINE in r.getMessage()]
    assert len(lines) == 1 and "v0003" in lines[0] and "v0003 is broken" in lines[0]


def test_a_broken_version_that_is_rewritten_is_tried_again(tmp_path):
    store = _store(tmp_path, v0001="ok", v0002="broken")
    watcher, slot, swapped, loader = _watcher(store, "v1")
    assert watcher.poll() is None and watcher.poll() is None and loader.calls == ["v0002"]
    _write(store, "v0002", "ok")
    later = time.time() + 5  # a coarse-mtime file system still sees the rewrite
    os.utime(store.dir / "v0002" / "detector.json", (later, later))
    assert watcher.poll() == "v2" and slot.get() == ("detector v0002", "v2") and loader.calls == ["v0002", "v0002"]


def test_only_broken_newer_versions_keep_the_served_one(tmp_path):
    store = _store(tmp_path, v0001="ok", v0002="broken", v0003="also broken")
    watcher, slot, swapped, loader = _watcher(store, "v1")
    assert [watcher.poll() for _ in range(3)] == [None] * 3
    assert slot.get() == ("detector v1", "v1") and swapped == [] and loader.calls == ["v0003", "v0002"]


def test_a_slow_load_of_an_older_version_never_replaces_a_fit_swapped_in_meanwhile(tmp_path):
    store = _store(tmp_path, v0001="ok", v0002="ok")
    watcher, slot, swapped, loader = _watcher(store, "v1")
    real = watcher.loader

    def slow(path, model):  # while v0002 loads, a fit job of this replica saves and swaps v3
        out = real(path, model)
        watcher.gate.swap("fit job's v3", "v3")
        return out

    watcher.loader = slow
    assert watcher.poll() is None
    assert slot.get() == ("fit job's v3", "v3") and swapped == ["v3"]


def test_an_empty_or_missing_store_changes_nothing(tmp_path):
    watcher, slot, swapped, loader = _watcher(ArtifactStore(tmp_path / "none", "f" * 16), "v0")
    assert watcher.poll() is None and slot.get() == ("detector v0", "v0") and loader.calls == []


# --- settings -------------------------------------------------------------------------------------


def test_the_interval_setting(monkeypatch):
    assert Settings(_env_file=None).storage.reload_interval_s == 5.0
    monkeypatch.setenv("GGA_RELOAD_INTERVAL_S", "0.5")
    assert Settings(_env_file=None).storage.reload_interval_s == 0.5
    monkeypatch.setenv("GGA_RELOAD_INTERVAL_S", "-1")
    with pytest.raises(SettingsError, match="GGA_RELOAD_INTERVAL_S='-1': Input should be greater than or equal to 0"):
        Settings(_env_file=None)
    with pytest.raises(ValueError, match="interval_s must be >= 0"):
        ReloadWatcher(None, None, None, interval_s=-1)


# --- the service: the lifespan's watcher -----------------------------------------------------------


def _served_store(app) -> ArtifactStore:
    return ArtifactStore(app.state.settings.storage.artifact_dir, model_fingerprint(app.state.model))


def _publish(store: ArtifactStore, name: str, *, broken: bool = False):
    """The bundled detector as version ``name``, written like ``save_new``: complete, then renamed into place.

    ``broken``: its calibration scores NaN (fails validation)."""
    store.dir.mkdir(parents=True, exist_ok=True)
    tmp = store.dir / f".tmp-{name}"
    shutil.copytree(BUNDLED, tmp)
    if broken:
        tensors = load_file(str(tmp / "detector.safetensors"))
        tensors["calibration_scores"] = tensors["calibration_scores"] * float("nan")
        save_file(tensors, str(tmp / "detector.safetensors"))
    os.rename(tmp, store.dir / name)


async def _wait_version(svc, version: str, timeout: float = 10.0) -> float:
    t0 = time.monotonic()
    while (await svc.client.get("/info")).json()["detector_version"] != version:
        assert time.monotonic() - t0 < timeout, f"{version} not served within {timeout} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def _wait_polls(watcher, n: int, timeout: float = 10.0) -> None:
    """Until the watcher has looked at the store ``n`` more times."""
    target, t0 = watcher.polls + n, time.monotonic()
    while watcher.polls < target:
        assert time.monotonic() - t0 < timeout, f"the watcher polled {watcher.polls - target + n} times, not {n}"
        await asyncio.sleep(0.02)


def _info_versions(metrics) -> dict[str, float]:
    return {dict(labels)["version"]: v for (name, labels), v in metrics.items() if name == "gga_detector_info"}


def test_the_service_swaps_in_a_version_written_by_another_process(tmp_path, mnist_test, caplog):
    x = np.ascontiguousarray(mnist_test[0][:2])
    settings = make_settings(tmp_path, reload_interval_s=0.05)

    async def go():
        async with Running(settings) as svc:
            first = (await svc.client.get("/info")).json()["detector_version"]
            bundled = svc.app.state.slot.get()[0]
            store = _served_store(svc.app)
            _publish(store, "v0001")
            await _wait_version(svc, "v1")
            reloaded = svc.app.state.slot.get()[0]
            predicted = (await svc.client.post("/predict", json={"inputs": x.tolist()})).json()
            metrics = await svc.metrics()
            _publish(store, "v0002", broken=True)  # a newer but broken version: skipped, once
            await _wait_polls(svc.app.state.watcher, 10)
            after_broken = (await svc.client.get("/info")).json()["detector_version"]
            return first, bundled, reloaded, predicted, metrics, after_broken

    with caplog.at_level(logging.INFO, logger="service"):
        first, bundled, reloaded, predicted, metrics, after_broken = run(go())
    assert first == "v0" and reloaded is not bundled
    assert [p["detector_version"] for p in predicted["predictions"]] == ["v1", "v1"]
    assert _info_versions(metrics) == {"v1": 1.0}  # the v0 series is gone
    assert after_broken == "v1"
    skipped = [r.getMessage() for r in caplog.records if SKIP_LINE in r.getMessage()]
    assert len(skipped) == 1 and "v0002" in skipped[0] and "calibration" in skipped[0]
    assert sum("reloaded detector v1" in r.getMessage() for r in caplog.records) == 1


def test_requests_in_flight_keep_the_detector_they_started_with(tmp_path, mnist_test):
    x = np.ascontiguousarray(mnist_test[0][:1])
    settings = make_settings(tmp_path, reload_interval_s=0.05)
    started, release = threading.Event(), threading.Event()

    async def go():
        async with Running(settings) as svc:
            bundled, _ = svc.app.state.slot.get()
            real_score = bundled.score

            def held_score(*args, **kwargs):  # the worker thread computes this batch until released
                started.set()
                assert release.wait(20)
                return real_score(*args, **kwargs)

            bundled.score = held_score
            in_flight = asyncio.create_task(svc.client.post("/predict", json={"inputs": x.tolist()}))
            try:
                assert await asyncio.to_thread(started.wait, 20)
                store = _served_store(svc.app)
                _publish(store, "v0001")
                await _wait_version(svc, "v1")  # swapped while the v0 batch is still computing
            finally:
                release.set()  # never leave the worker held, even when the reload failed
            first = await in_flight
            second = await svc.client.post("/predict", json={"inputs": x.tolist()})
            return first, second

    first, second = run(go())
    assert first.status_code == 200 and first.json()["predictions"][0]["detector_version"] == "v0"
    assert second.status_code == 200 and second.json()["predictions"][0]["detector_version"] == "v1"


def test_a_fit_job_and_the_watcher_agree_on_the_version(tmp_path, mnist_test):
    """The fitting replica's own new version is not reloaded again (equal), and the metric shows it once."""
    x, y = mnist_test
    settings = make_settings(tmp_path, reload_interval_s=0.05, admin_token="t", fit_batch_size=128)

    async def go():
        async with Running(settings) as svc:
            job = svc.app.state.fits.submit(x[:300], y[:300], options=None)
            t0 = time.monotonic()
            while job.state == "running":
                assert time.monotonic() - t0 < 120, "the fit job did not finish"
                await asyncio.sleep(0.05)
            served = svc.app.state.slot.get()
            await _wait_polls(svc.app.state.watcher, 5)
            return job, served, svc.app.state.slot.get(), await svc.metrics()

    job, served, later, metrics = run(go())
    assert job.state == "succeeded", job.error
    assert served[1] == "v1" and later[0] is served[0]  # the job's own detector, not a reload of it
    assert _info_versions(metrics) == {"v1": 1.0}


def test_interval_zero_starts_no_watcher(tmp_path):
    settings = make_settings(tmp_path, reload_interval_s=0)

    async def go():
        async with Running(settings) as svc:
            store = _served_store(svc.app)
            _publish(store, "v0001")
            await asyncio.sleep(0.3)
            tasks = {t.get_name() for t in asyncio.all_tasks()}
            return (await svc.client.get("/info")).json()["detector_version"], tasks, svc.app.state.watcher.polls

    version, tasks, polls = run(go())
    assert version == "v0" and "gga-reload" not in tasks and polls == 0


def test_the_watcher_task_ends_with_the_lifespan(tmp_path):
    settings = make_settings(tmp_path, reload_interval_s=0.05)

    async def go():
        async with Running(settings) as svc:
            running = {t.get_name() for t in asyncio.all_tasks()}
            watcher = svc.app.state.watcher
        return running, {t.get_name() for t in asyncio.all_tasks()}, watcher

    running, after, watcher = run(go())
    assert "gga-reload" in running and "gga-reload" not in after and watcher._task is None

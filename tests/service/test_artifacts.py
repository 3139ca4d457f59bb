"""Artifact faults: a broken newest version falls back to the last good one; leftovers are cleaned."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from detectors.fingerprint import model_fingerprint
from detectors.zoo import MnistCNN
from service.artifacts import STALE_TMP_S, ArtifactStore
from service.settings import DEFAULT_MODEL_DIR

BUNDLED = DEFAULT_MODEL_DIR / "detector"


@pytest.fixture(scope="module")
def model():
    m = MnistCNN()
    m.load_state_dict(load_file(str(DEFAULT_MODEL_DIR / "model.safetensors")))
    return m.eval()


def _store(tmp_path, model, n_versions: int) -> ArtifactStore:
    store = ArtifactStore(tmp_path, model_fingerprint(model))
    store.dir.mkdir(parents=True)
    for i in range(1, n_versions + 1):
        shutil.copytree(BUNDLED, store.dir / f"v{i:04d}")
    return store


def _edit(path, **changes):
    tensors = load_file(str(path / "detector.safetensors"))
    for key, fn in changes.items():
        tensors[key.replace("__", ".")] = fn(tensors[key.replace("__", ".")]).contiguous()
    save_file(tensors, str(path / "detector.safetensors"))


BROKEN = {
    "NaN calibration scores": {"calibration_scores": lambda t: torch.full_like(t, float("nan"))},
    "calibration too small to flag": {"calibration_scores": lambda t: t[:12]},
    "wrong-shaped layer means": {"layer.features__1.means": lambda t: t[:, :5]},
    "wrong-shaped reference": {"reference__sorted": lambda t: t[:, :3]},
}


@pytest.mark.parametrize("what", sorted(BROKEN))
def test_a_broken_newest_version_falls_back_to_the_last_good_one(tmp_path, model, caplog, what):
    store = _store(tmp_path, model, 2)
    _edit(store.dir / "v0002", **BROKEN[what])
    with caplog.at_level(logging.WARNING, logger="service.artifacts"):
        det, version = store.load_newest(model)
    assert version == "v1"
    assert [r.getMessage() for r in caplog.records if "skipping detector artifact" in r.getMessage()] != []
    assert "v0002" in caplog.text
    x = torch.zeros(1, 1, 28, 28)
    assert det.score(x).flagged.tolist() == [True]


def test_unreadable_json_and_missing_files_are_skipped(tmp_path, model):
    store = _store(tmp_path, model, 3)
    (store.dir / "v0003" / "detector.json").write_text("{not json")
    os.remove(store.dir / "v0002" / "detector.safetensors")
    _, version = store.load_newest(model)
    assert version == "v1"
    meta = json.loads((store.dir / "v0001" / "detector.json").read_text())
    assert meta["kind"] == "composite"


def test_stale_tmp_folders_are_removed_fresh_ones_kept(tmp_path, model):
    store = _store(tmp_path, model, 1)
    old, fresh = store.dir / ".tmp-old", store.dir / ".tmp-fresh"
    for d in (old, fresh):
        d.mkdir()
        (d / "detector.json").write_text("{}")
    past = time.time() - STALE_TMP_S - 60
    os.utime(old, (past, past))
    _, version = store.load_newest(model)
    assert version == "v1" and not old.exists() and fresh.exists()


def test_save_new_takes_the_next_free_number_when_another_writer_won(tmp_path, model):
    from detectors.persist import load_detector

    store = _store(tmp_path, model, 1)
    det = load_detector(BUNDLED, model)
    real_versions = store.versions
    calls = []

    def racing_versions():
        # the first time: another writer saves v0002 right after we listed the folder
        out = real_versions()
        if not calls:
            shutil.copytree(BUNDLED, store.dir / "v0002")
        calls.append(1)
        return out

    store.versions = racing_versions
    version, path = store.save_new(det)
    assert (version, path.name) == ("v3", "v0003")
    assert not [p for p in store.dir.iterdir() if p.name.startswith(".tmp-")]

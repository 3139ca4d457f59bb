"""Crash faults: ``kill -9`` during a fit and during an artifact write.

On restart the last good version serves, the leftovers of the interrupted write are
removed and the next fit takes the next version number. Real processes throughout: a
uvicorn server (``benchmarks.serverproc``) killed with SIGKILL mid-fit, and ``gga-fit``
in a subprocess that SIGKILLs itself at an exact point of ``ArtifactStore.save_new``
(half of ``detector.json`` written; the files whole but not yet renamed; renamed but the
lock file not yet removed). A version folder is never half complete: the files are
written and fsynced under ``.tmp-<hex>`` and the rename is the commit (there is no
"latest" pointer), so a kill after the rename leaves a whole version, which serves.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.serverproc import start_server, stop_server
from service import artifacts
from service.artifacts import STALE_TMP_S, ArtifactStore
from service.fitcli import build_parser
from service.fitcli import run as fit_offline

ROOT = Path(__file__).resolve().parents[2]
AUTH = {"Authorization": "Bearer t"}
TMP_RE = re.compile(r"^\.tmp-[0-9a-f]{32}$")
N_GOOD = 150  # samples of each small fit (the gga preset: under a second; 45 calibrate, enough to flag)


def _env(art: Path, **extra: str) -> dict[str, str]:
    return {"GGA_ADMIN_TOKEN": "t", "GGA_ARTIFACT_DIR": str(art), "GGA_LOG_LEVEL": "warning",
            "GGA_DEVICE": "cpu", "GGA_STRATEGY": "device", "GGA_MODEL": "mnist_cnn", **extra}


def _start(art: Path, **extra: str) -> tuple[subprocess.Popen, str]:
    return start_server(_env(art, **extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def _npz(x: np.ndarray, y: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    return buf.getvalue()


@pytest.fixture(scope="module")
def good_store(tmp_path_factory, mnist_test) -> tuple[Path, str]:
    """An artifact root holding one good version, v1, written by ``gga-fit`` (its ``run``, in-process):
    (root, the store folder's name). Tests copy it."""
    x, y = mnist_test
    tmp = tmp_path_factory.mktemp("good")
    np.savez(tmp / "train.npz", x=x[:N_GOOD], y=y[:N_GOOD])
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("GGA_")]:
            mp.delenv(key)
        res = fit_offline(build_parser().parse_args(
            ["--data", str(tmp / "train.npz"), "--preset", "gga", "--device", "cpu", "--no-progress",
             "--artifact-dir", str(tmp / "art")]))
    assert res["version"] == "v1" and res["n_samples"] == N_GOOD
    name = res["fingerprint"][:16]
    assert _listing(tmp / "art" / name) == ["v0001"]
    return tmp / "art", name


def _copy_store(good_store, tmp_path: Path) -> tuple[Path, Path]:
    root, name = good_store
    art = tmp_path / "art"
    shutil.copytree(root, art)
    return art, art / name


def _wait_fit(c: httpx.Client, job: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        view = c.get(f"/fit/{job}", headers=AUTH).json()
        if view["state"] != "running":
            return view
        assert time.monotonic() < deadline, view
        time.sleep(0.1)


# --------------------------------------------------------------------------- kill -9 during a fit


def test_kill_9_during_a_fit_restarts_on_the_last_good_version(tmp_path, good_store, mnist_test):
    art, store = _copy_store(good_store, tmp_path)
    x, y = mnist_test
    n = 4000  # minutes of features on 2 cores: the kill lands mid-way
    proc, base = _start(art, GGA_FIT_BATCH_SIZE="16")
    try:
        with httpx.Client(base_url=base, timeout=30) as c:
            assert c.get("/readyz").json() == {"status": "ready", "detector_version": "v1"}
            r = c.post("/fit", files={"file": ("d.npz", _npz(x[:n], y[:n]))}, data={"preset": "composite"},
                       headers=AUTH)
            assert r.status_code == 202, r.text
            job = r.json()["id"]
            deadline = time.monotonic() + 60
            while True:
                view = c.get(f"/fit/{job}", headers=AUTH).json()
                assert view["state"] == "running", view
                if view["phase"] == "features" and view["progress"]["done"] > 0:
                    break
                assert time.monotonic() < deadline, view
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, out
    assert 0 < view["progress"]["done"] < view["progress"]["total"] == n
    assert _listing(store) == ["v0001"]  # features of a fit write nothing

    t0 = time.monotonic()
    proc, base = _start(art)
    restart_s = time.monotonic() - t0
    try:
        with httpx.Client(base_url=base, timeout=30) as c:
            assert c.get("/readyz").json() == {"status": "ready", "detector_version": "v1"}
            info = c.get("/info").json()
            assert info["detector_version"] == "v1"
            assert info["detector"]["preset"] == "gga" and info["detector"]["fit"]["n_samples"] == N_GOOD
            assert c.get(f"/fit/{job}", headers=AUTH).status_code == 404  # jobs lived in the killed process
            r = c.post("/predict", json={"inputs": x[:1].tolist()})
            assert r.status_code == 200 and r.json()["predictions"][0]["label"] == int(y[0])
    finally:
        out = stop_server(proc)
    assert _listing(store) == ["v0001"]
    assert "Traceback" not in out and "removed the leftover" not in out, out
    assert restart_s < 60


# --------------------------------------------------------------------------- kill -9 during the write

# gga-fit in a subprocess that SIGKILLs itself at one point of ArtifactStore.save_new (argv[1])
KILLER = r"""
import os, pathlib, signal, sys

point = sys.argv[1]
real_rename, real_write_text = os.rename, pathlib.Path.write_text


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def rename(src, dst, *a, **k):
    ours = pathlib.Path(src).name.startswith(".tmp-")
    if ours and point == "before_rename":
        die()
    real_rename(src, dst, *a, **k)
    if ours and point == "after_rename":
        die()


def write_text(self, data, *a, **k):
    if point == "mid_file" and self.name == "detector.json" and self.parent.name.startswith(".tmp-"):
        with open(self, "w") as f:  # half of the JSON reaches the file, then the writer dies
            f.write(data[: len(data) // 2])
            f.flush()
        die()
    return real_write_text(self, data, *a, **k)


os.rename, pathlib.Path.write_text = rename, write_text
from service.fitcli import main

sys.exit(main(sys.argv[2:]))
"""


def _killed_fit(point: str, data: Path, art: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GGA_")}
    env["GGA_DEVICE"] = "cpu"
    return subprocess.run([sys.executable, "-c", KILLER, point, "--data", str(data), "--preset", "gga",
                           "--no-progress", "--artifact-dir", str(art)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("point", ["mid_file", "before_rename", "after_rename"])
def test_kill_9_during_an_artifact_write(tmp_path, good_store, mnist_test, point):
    art, store = _copy_store(good_store, tmp_path)
    x, y = mnist_test
    np.savez(tmp_path / "train.npz", x=x[N_GOOD:2 * N_GOOD], y=y[N_GOOD:2 * N_GOOD])
    proc = _killed_fit(point, tmp_path / "train.npz", art)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout == ""  # no result line: the command never finished

    names = _listing(store)
    (lock,) = [n for n in names if n.endswith(".lock")]
    tmp = lock.removesuffix(".lock")
    assert TMP_RE.match(tmp), names
    assert (store / lock).read_text() == socket.gethostname()  # the lock file names the writer's host
    if point == "after_rename":
        # renamed: the version is whole (files fsynced before the rename); only the lock file is left
        assert names == [lock, "v0001", "v0002"]
        assert _listing(store / "v0002") == ["detector.json", "detector.safetensors"]
        assert json.loads((store / "v0002" / "detector.json").read_text())["kind"] == "gga"
        served, kept, removed_log = "v2", ["v0001", "v0002"], False
    else:
        assert names == [tmp, lock, "v0001"]
        assert _listing(store / tmp) == ["detector.json", "detector.safetensors"]
        meta_text = (store / tmp / "detector.json").read_text()
        if point == "mid_file":
            with pytest.raises(json.JSONDecodeError):
                json.loads(meta_text)
        else:
            assert json.loads(meta_text)["kind"] == "gga"
        served, kept, removed_log = "v1", ["v0001"], True

    server, base = _start(art)
    try:
        # the startup cleanup has run: the dead writer's lock was free and taken on this host
        assert _listing(store) == kept
        with httpx.Client(base_url=base, timeout=30) as c:
            assert c.get("/readyz").json() == {"status": "ready", "detector_version": served}
            assert c.get("/info").json()["detector_version"] == served
            r = c.post("/predict", json={"inputs": x[:1].tolist()})
            assert r.status_code == 200 and r.json()["predictions"][0]["label"] == int(y[0])
            # a later fit takes the next number: the leftover confused nothing
            r = c.post("/fit", files={"file": ("d.npz", _npz(x[:N_GOOD], y[:N_GOOD]))}, data={"preset": "gga"},
                       headers=AUTH)
            assert r.status_code == 202, r.text
            view = _wait_fit(c, r.json()["id"])
            following = f"v{int(served[1:]) + 1}"
            assert (view["state"], view["error"], view["result"]["version"]) == ("succeeded", None, following)
            assert c.get("/readyz").json() == {"status": "ready", "detector_version": following}
        assert _listing(store) == [*kept, f"v{int(served[1:]) + 1:04d}"]  # no lock file, no temporary folder
    finally:
        out = stop_server(server)
    assert "Traceback" not in out, out
    assert ("removed the leftover of an interrupted save: " + str(store / tmp) in out) is removed_log, out


# --------------------------------------------------------------------------- the cleanup's rules, in-process


def test_cleanup_keeps_a_live_writers_leftover_and_removes_a_dead_ones(tmp_path):
    store = ArtifactStore(tmp_path, "0123456789abcdef")
    store.dir.mkdir(parents=True)
    past = time.time() - STALE_TMP_S - 60

    def leftover(name: str, owner: str | None) -> Path:
        lock = store.dir / f"{name}.lock"
        fd = None
        if owner is None:  # a live writer: it holds the lock (flock is per open file: this fd is "another writer")
            fd = artifacts._take_lock(lock)
            assert fd is not None
        else:  # a dead writer: its lock file is left, nobody holds it
            lock.write_text(owner)
        (store.dir / name).mkdir()
        (store.dir / name / "detector.json").write_text("{")
        return fd

    live = leftover(".tmp-live", None)
    leftover(".tmp-here", socket.gethostname())
    leftover(".tmp-there", "another-host")
    (store.dir / ".tmp-orphan.lock").write_text(socket.gethostname())  # killed after the rename
    (store.dir / "v0001").mkdir()

    removed = store.remove_stale_tmp()
    assert [p.name for p in removed] == [".tmp-here"]
    assert _listing(store.dir) == [".tmp-live", ".tmp-live.lock", ".tmp-there", ".tmp-there.lock", "v0001"]

    # past the stale age: another host's leftover goes too; a held lock still keeps the live writer's
    for name in (".tmp-live", ".tmp-live.lock", ".tmp-there", ".tmp-there.lock"):
        os.utime(store.dir / name, (past, past))
    removed = store.remove_stale_tmp()
    assert [p.name for p in removed] == [".tmp-there"]
    assert _listing(store.dir) == [".tmp-live", ".tmp-live.lock", "v0001"]

    os.close(live)  # the writer dies: the kernel drops its lock
    assert [p.name for p in store.remove_stale_tmp()] == [".tmp-live"]
    assert _listing(store.dir) == ["v0001"]


def test_cleanup_survives_a_leftover_renamed_while_it_looks(tmp_path, monkeypatch):
    """A replica starting while another one finishes a save: the listed ``.tmp-*`` is gone when
    looked at (the old code's ``stat`` raised FileNotFoundError, and the startup failed)."""
    store = ArtifactStore(tmp_path, "0123456789abcdef")
    store.dir.mkdir(parents=True)
    (store.dir / "v0001").mkdir()
    real_iterdir = Path.iterdir

    def iterdir(self):
        yield from real_iterdir(self)
        if self == store.dir:
            yield self / ".tmp-renamed-meanwhile"
            yield self / ".tmp-renamed-meanwhile.lock"

    monkeypatch.setattr(Path, "iterdir", iterdir)
    assert store.remove_stale_tmp() == []
    assert store.versions() == [(1, store.dir / "v0001")]

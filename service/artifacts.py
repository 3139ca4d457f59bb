"""Versioned detector artifacts on disk.

Layout: ``<artifact_dir>/<model fingerprint, 16 hex>/v<NNNN>/`` holding the files of
``GGADetector.save``. A new version is written under a temporary name in the same
folder, fsynced, then renamed into place (rename is atomic on POSIX), so a crash never
leaves a half-written version behind a valid name: the rename is the commit, there is no
"latest" pointer to update afterwards. On startup the newest version that loads for the
served model wins; without one, the bundled detector (version ``v0``) is used when it
matches the model.

A writer killed mid-save (``kill -9``, OOM) leaves its ``.tmp-<hex>`` folder behind. While
it writes, the writer holds an exclusive ``flock`` on ``.tmp-<hex>.lock`` (which names its
host); the kernel drops that lock when the process dies. The cleanup at startup removes a
leftover at once when its lock is free and was taken on this host (a restart of the same
pod or machine: the lock is authoritative there); a leftover whose lock is held is a live
writer and is kept; anything else (another host's writer, a file system without locks,
folders from before the lock files) is removed once older than ``STALE_TMP_S``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

import torch

from detectors.persist import load_detector

try:
    import fcntl
except ImportError:  # not POSIX: no locks, leftovers go by age only
    fcntl = None

log = logging.getLogger("service.artifacts")
_VERSION_RE = re.compile(r"^v(\d{4,})$")
BUNDLED_VERSION = "v0"
STALE_TMP_S = 600.0
TMP_PREFIX, LOCK_SUFFIX = ".tmp-", ".lock"


class ArtifactStore:
    def __init__(self, root: Path, fingerprint: str) -> None:
        self.root = Path(root)
        self.dir = self.root / fingerprint[:16]

    def versions(self) -> list[tuple[int, Path]]:
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = _VERSION_RE.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def remove_stale_tmp(self, now: float | None = None) -> list[Path]:
        """Remove the leftovers of interrupted saves (``.tmp-*`` folders and their lock files).

        A leftover goes at once when its writer is gone for sure (its lock is free and was
        taken on this host); one whose lock is held (a live writer: another replica, a
        ``gga-fit`` saving right now) is kept; any other goes once older than STALE_TMP_S."""
        if not self.dir.is_dir():
            return []
        now = time.time() if now is None else now
        host = socket.gethostname()
        removed = []
        names = {p.name.removesuffix(LOCK_SUFFIX) for p in self.dir.iterdir() if p.name.startswith(TMP_PREFIX)}
        for name in sorted(names):
            tmp, lock = self.dir / name, self.dir / (name + LOCK_SUFFIX)
            with _probe_lock(lock) as (state, owner):
                if state == "held":
                    continue
                if not (state == "free" and owner == host):
                    ages = [now - st.st_mtime for st in map(_stat, (tmp, lock)) if st is not None]
                    if not ages or min(ages) <= STALE_TMP_S:
                        continue
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
                    log.warning("removed the leftover of an interrupted save: %s", tmp)
                    removed.append(tmp)
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
        return removed

    def load_newest(self, model: torch.nn.Module):
        """The newest version that loads for ``model`` (skipping broken ones), or None.

        Loading validates every tensor (shapes against the configuration, finiteness, a
        calibration set large enough to flag) and the model fingerprint; a version that
        fails is skipped with a log line and the next older one is tried."""
        self.remove_stale_tmp()
        for number, path in reversed(self.versions()):
            try:
                return load_detector(path, model), f"v{number}"
            except Exception as exc:  # noqa: BLE001 - a broken version must not stop the service
                log.warning("skipping detector artifact %s: %s", path, exc)
        return None

    def save_new(self, detector) -> tuple[str, Path]:
        """Persist ``detector`` as the next version; returns (version, path)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"{TMP_PREFIX}{uuid.uuid4().hex}"
        tmp, lock = self.dir / name, self.dir / (name + LOCK_SUFFIX)
        lock_fd = _take_lock(lock)  # held until the rename: a cleanup elsewhere leaves this folder alone
        try:
            detector.save(tmp)
            for _ in range(100):  # another writer (a replica, an offline fit) may take a number first
                existing = self.versions()
                number = (existing[-1][0] + 1) if existing else 1
                final = self.dir / f"v{number:04d}"
                try:
                    os.rename(tmp, final)  # atomic; fails if that version exists (non-empty folder)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
            else:
                raise RuntimeError(f"could not find a free version number in {self.dir}")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            if lock_fd is not None:
                os.close(lock_fd)  # releases the lock
        _fsync_dir(self.dir)
        return f"v{number}", final


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:  # renamed or removed since the folder was listed
        return None


def _take_lock(lock: Path) -> int | None:
    """Create ``lock``, hold an exclusive flock on it and write this host's name into it.

    Returns the descriptor (closing it releases the lock), or None where the file system
    has no locks (the leftover then goes by age only)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        if fcntl is None:
            raise OSError(errno.ENOLCK, "no fcntl")
        fcntl.flock(fd, fcntl.LOCK_EX)  # a cleanup may hold it for a moment: wait for it
        os.write(fd, socket.gethostname().encode())
        return fd
    except OSError as exc:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        log.debug("no lock for %s (%s): its leftover would go by age only", lock, exc)
        return None


@contextlib.contextmanager
def _probe_lock(lock: Path):
    """Yields ("held", None) when a live writer holds ``lock``; ("free", host the writer named) with
    the lock taken (so no writer can take it while the caller removes the leftover); ("unknown", None)
    when there is no lock file or the file system has no locks."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:  # no lock file (a folder from before lock files, a writer's lock already gone), not ours
        yield "unknown", None
        return
    try:
        try:
            if fcntl is None:
                raise OSError(errno.ENOLCK, "no fcntl")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield "held", None
            return
        except OSError:
            yield "unknown", None
            return
        yield "free", os.pread(fd, 256, 0).decode(errors="replace")
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Versioned detector artifacts on disk.

Layout: ``<artifact_dir>/<model fingerprint, 16 hex>/v<NNNN>/`` holding the files of
``GGADetector.save``. A new version is written under a temporary name in the same
folder, fsynced, then renamed into place (rename is atomic on POSIX), so a crash never
leaves a half-written version behind a valid name. On startup the newest version that
loads for the served model wins; without one, the bundled detector (version ``v0``) is
used when it matches the model.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import torch

from detectors.persist import load_detector

log = logging.getLogger("service.artifacts")
_VERSION_RE = re.compile(r"^v(\d{4,})$")
BUNDLED_VERSION = "v0"
STALE_TMP_S = 600.0


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
        """Remove ``.tmp-*`` folders older than STALE_TMP_S (a writer killed mid-save leaves one behind).

        Younger ones may belong to another replica saving right now and are kept."""
        if not self.dir.is_dir():
            return []
        now = time.time() if now is None else now
        removed = []
        for p in self.dir.iterdir():
            if p.name.startswith(".tmp-") and now - p.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
                log.warning("removed the leftover of an interrupted save: %s", p)
                removed.append(p)
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
        tmp = self.dir / f".tmp-{uuid.uuid4().hex}"
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
        _fsync_dir(self.dir)
        return f"v{number}", final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

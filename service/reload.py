"""Hot reload: pick up detector versions that another process wrote into the shared store.

Several serving replicas read one artifact store (a directory; a volume in Kubernetes)
and fits run elsewhere (``POST /fit`` on one replica, ``gga-fit`` as a batch job). Each
replica runs a :class:`ReloadWatcher`: an asyncio task (started by the lifespan) that
every ``GGA_RELOAD_INTERVAL_S`` seconds (0: off) lists the store in a worker thread and,
when a version newer than the served one is there, loads it there with the same
validation as at startup (:func:`detectors.persist.load_detector`: shapes, finiteness,
calibration size, model fingerprint) and swaps it in. A version that fails to load is
logged once and skipped (remembered by name and modification time: rewritten, it is
tried again); the next older one that is still newer than the served one is tried.

Every swap, the fit jobs' and the watcher's, goes through one :class:`SwapGate`: under
one lock it swaps only a version strictly newer than the served one (so a slow load of
an older version can never replace what a fit job has just swapped in), through the
served slot's own ``swap`` (the strategy slot applies GGA_STRATEGY there), then sets
``gga_detector_info``. Requests in flight keep the detector they started with: the slot
swaps one reference and the worker reads it once per batch.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from detectors.persist import load_detector
from service.artifacts import ArtifactStore

log = logging.getLogger("service.reload")
_VERSION_RE = re.compile(r"^v(\d+)$")


def version_number(version: str | None) -> int:
    """``"v12"`` -> 12, the bundled ``"v0"`` -> 0; None (no detector) or anything else -> -1."""
    m = _VERSION_RE.match(version or "")
    return int(m.group(1)) if m else -1


class SwapGate:
    """The one way a detector is swapped in: newest version wins, the version metric follows.

    ``swap(detector, version)`` returns True when it swapped, False when ``version`` is not
    newer than the served one (nothing changes). ``get()`` is the slot's.
    """

    def __init__(self, slot, on_swap: Callable[[str], None] | None = None) -> None:
        self.slot, self.on_swap = slot, on_swap
        self._lock = threading.Lock()

    def get(self):
        return self.slot.get()

    def swap(self, detector, version: str) -> bool:
        with self._lock:
            served = self.slot.get()[1]
            if version_number(version) <= version_number(served):
                log.info("detector %s not swapped in: %s is served and is not older", version, served)
                return False
            self.slot.swap(detector, version)
            if self.on_swap is not None:
                self.on_swap(version)
            return True


class ReloadWatcher:
    """Polls ``store`` every ``interval_s`` seconds and swaps newer valid versions in through ``gate``.

    ``poll()`` is one look (blocking: run it in a thread); ``start()`` runs it periodically
    as an asyncio task, ``astop()`` ends that task.
    """

    def __init__(self, store: ArtifactStore, model: torch.nn.Module, gate: SwapGate, *, interval_s: float,
                 loader: Callable = load_detector) -> None:
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0 (0 turns reloading off), got {interval_s}")
        self.store, self.model, self.gate, self.interval_s, self.loader = store, model, gate, interval_s, loader
        self.broken: set[tuple[str, int]] = set()  # (version folder name, _stamp) of versions that failed to load
        self.polls = 0
        self._task: asyncio.Task | None = None
        self._closed = False

    @staticmethod
    def _stamp(path: Path) -> int:
        """Newest modification (or status change) time, ns, of the version folder and its files.

        Changes when the version is rewritten, even by a copy that keeps the old files' mtimes."""
        stats = [path.stat(), *(p.stat() for p in path.iterdir())]
        return max(max(st.st_mtime_ns, st.st_ctime_ns) for st in stats)

    def poll(self) -> str | None:
        """Swap in the newest valid version newer than the served one; returns it, or None when nothing changed."""
        self.polls += 1
        served = version_number(self.gate.get()[1])
        for number, path in reversed(self.store.versions()):
            if number <= served or self._closed:
                return None
            version = f"v{number}"
            try:
                key = (path.name, self._stamp(path))
            except OSError as exc:  # removed while we looked
                log.warning("skipping detector artifact %s: %s", path, exc)
                continue
            if key in self.broken:
                continue
            try:
                detector = self.loader(path, self.model)
            except Exception as exc:  # noqa: BLE001 - a broken version must not stop the service
                self.broken.add(key)
                log.warning("skipping detector artifact %s (not retried until it changes): %s", path, exc)
                continue
            if self._closed:
                return None
            if self.gate.swap(detector, version):
                log.info("reloaded detector %s from %s (was %s)", version, path,
                         f"v{served}" if served >= 0 else None)
                return version
            return None
        return None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await asyncio.to_thread(self.poll)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - an unreadable store (a volume hiccup) is retried next time
                log.exception("detector reload: polling %s failed", self.store.dir)

    def start(self) -> asyncio.Task | None:
        """Start polling (on the running loop); None when ``interval_s`` is 0 (off)."""
        if self.interval_s == 0:
            log.info("detector reload off (GGA_RELOAD_INTERVAL_S=0)")
            return None
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gga-reload")
        log.info("detector reload: polling %s every %g s", self.store.dir, self.interval_s)
        return self._task

    async def astop(self) -> None:
        """Stop polling; a load under way finishes in its thread but swaps nothing."""
        self._closed = True
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None

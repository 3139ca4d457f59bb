"""Fit jobs: calibrate a new detector in the background and swap it in atomically.

One job runs at a time (a second one gets :class:`FitBusyError`, HTTP 409). A job
computes the GGA features of the uploaded data (reporting samples done / total), fits
LODA and the calibration split, writes a new artifact version (temporary name, fsync,
rename) and swaps it into the :class:`DetectorSlot`; requests in flight keep the
detector they started with. A failure at any step leaves the served detector and the
artifact directory as they were.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from detectors.gga import GGADetector
from service.artifacts import ArtifactStore
from service.metrics import ServiceMetrics
from service.worker import DetectorSlot

log = logging.getLogger("service.fitjobs")
MAX_JOBS_KEPT = 50


class FitBusyError(RuntimeError):
    """A fit job is already running."""


@dataclass
class FitJob:
    id: str
    state: str = "queued"  # queued | running | succeeded | failed
    phase: str = "queued"  # queued | features | fitting | saving | done
    done: int = 0
    total: int = 0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id, "state": self.state, "phase": self.phase,
            "progress": {"done": self.done, "total": self.total},
            "created_at": self.created_at, "started_at": self.started_at, "finished_at": self.finished_at,
            "result": self.result, "error": self.error,
        }


class FitJobManager:
    def __init__(self, model: torch.nn.Module, device: torch.device, store: ArtifactStore, slot: DetectorSlot,
                 metrics: ServiceMetrics, *, top_n: int | None, batch_size: int,
                 on_swap=None) -> None:
        self.model, self.device, self.store, self.slot, self.metrics = model, device, store, slot, metrics
        self.top_n, self.batch_size, self.on_swap = top_n, batch_size, on_swap
        self.jobs: dict[str, FitJob] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing = False

    @property
    def running(self) -> FitJob | None:
        with self._lock:
            return next((j for j in self.jobs.values() if j.state in ("queued", "running")), None)

    def submit(self, x: np.ndarray, y: np.ndarray,
               calibration: tuple[np.ndarray, np.ndarray] | None = None) -> FitJob:
        with self._lock:
            if self._closing:
                raise FitBusyError("the service is shutting down")
            busy = next((j for j in self.jobs.values() if j.state in ("queued", "running")), None)
            if busy is not None:
                raise FitBusyError(f"fit job {busy.id} is still {busy.state}; wait for it (GET /fit/{busy.id})")
            job = FitJob(id=uuid.uuid4().hex[:16], total=len(x) + (len(calibration[0]) if calibration else 0))
            self.jobs[job.id] = job
            while len(self.jobs) > MAX_JOBS_KEPT:
                self.jobs.pop(next(iter(self.jobs)))
            self._thread = threading.Thread(target=self._run, args=(job, x, y, calibration), name=f"gga-fit-{job.id}",
                                            daemon=True)
            self._thread.start()
        return job

    def _config(self) -> dict[str, Any]:
        current, _ = self.slot.get()
        cfg = dict(vars(current.config)) if current is not None else {}
        if self.top_n is not None:
            cfg["top_n"] = self.top_n
        return cfg

    def _run(self, job: FitJob, x: np.ndarray, y: np.ndarray, calibration) -> None:
        job.state, job.phase, job.started_at = "running", "features", time.time()

        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total
            if done >= total:
                job.phase = "fitting"

        try:
            det = GGADetector(self.model, **self._config())
            cal = None if calibration is None else tuple(torch.from_numpy(a) for a in calibration)
            det.fit(torch.from_numpy(x), torch.from_numpy(y), batch_size=self.batch_size, progress=progress,
                    calibration=cal)
            if self._closing:
                raise RuntimeError("the service shut down before the detector was saved")
            job.phase = "saving"
            version, path = self.store.save_new(det)
            self.slot.swap(det, version)
            if self.on_swap is not None:
                self.on_swap(version)
            st = det.fit_stats
            job.result = {
                "version": version, "path": str(path), "n_samples": st.n_samples, "n_correct": st.n_correct,
                "n_fit": st.n_fit, "n_calibration": st.n_calibration, "model_accuracy": st.model_accuracy,
                "threshold": st.threshold if np.isfinite(st.threshold) else None, "seconds": st.seconds,
                "config": dict(vars(det.config)),
            }
            job.phase, job.state = "done", "succeeded"
            self.metrics.fit_jobs.labels(state="succeeded").inc()
        except Exception as exc:  # noqa: BLE001 - the job reports any failure; nothing is swapped
            log.warning("fit job %s failed: %s", job.id, traceback.format_exc())
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
            self.metrics.fit_jobs.labels(state="failed").inc()
        finally:
            job.finished_at = time.time()

    def close(self, timeout: float = 5.0) -> None:
        self._closing = True
        if self._thread is not None:
            self._thread.join(timeout)

"""Fit jobs: calibrate a new detector in the background and swap it in atomically.

One job runs at a time (a second one gets :class:`FitBusyError`, HTTP 409). A job
computes the GGA features of the uploaded data (reporting samples done / total), fits
LODA and the calibration split, writes a new artifact version (temporary name, fsync,
rename) and swaps it into the :class:`DetectorSlot`; requests in flight keep the
detector they started with. A failure at any step leaves the served detector and the
artifact directory as they were.

In the service a job's model passes run on the compute worker, between request
batches (``run=DynamicBatcher.run_between``): the model is never used by two threads
at once (forward hooks of the layer signals would otherwise see both), and a fit
delays requests by at most one fit batch at a time instead of competing with them for
the cores.
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

from detectors.base import BatchRunner
from detectors.decisions import DecisionConfig
from detectors.presets import PRESETS, build_detector, describe
from service.artifacts import ArtifactStore
from service.metrics import ServiceMetrics
from service.worker import DetectorSlot

log = logging.getLogger("service.fitjobs")
MAX_JOBS_KEPT = 50


class FitBusyError(RuntimeError):
    """A fit job is already running."""


def fit_result(det, version: str, path) -> dict[str, Any]:
    """What a finished fit reports (``GET /fit/{id}`` and ``gga-fit``): version, counts, kind, preset, config."""
    meta = det.metadata()
    st = meta["fit"]
    return {
        "version": version, "path": str(path), "n_samples": st["n_samples"], "n_correct": st["n_correct"],
        "n_fit": st["n_fit"], "n_calibration": st["n_calibration"], "model_accuracy": st["model_accuracy"],
        "threshold": st["threshold"] if np.isfinite(st["threshold"]) else None, "seconds": st["seconds"],
        **describe(det), "config": meta["config"],
        "decisions": None if det.decisions is None else det.decisions.info(),
    }


@dataclass(frozen=True)
class FitOptions:
    """What a fit builds: the preset, the CSM's top-N (None: the preset's choice) and alpha.

    The same options for ``POST /fit`` and offline fits; validated here, with messages
    that say what to send.
    """

    preset: str = "composite"
    top_n: int | None = None
    alpha: float = 0.05
    set_alpha: float | None = None  # prediction sets' miscoverage (None: 0.1)
    risk_target: float | None = None  # the gate's risk (None: 0.01); given: a gate that cannot meet it fails the fit
    delta: float | None = None  # the gate's confidence 1 - delta (None: 0.05); given: as risk_target

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {list(PRESETS)}, got {self.preset!r}")
        if self.top_n is not None and (isinstance(self.top_n, bool) or not isinstance(self.top_n, int)
                                       or self.top_n < 3):
            raise ValueError(f"top_n must be an integer >= 3 or null (the preset's choice), got {self.top_n!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be a number in (0, 1), e.g. 0.05; got {self.alpha!r}")
        self.decision_config()  # validates set_alpha, risk_target, delta

    def decision_config(self) -> DecisionConfig:
        given = {k: getattr(self, k) for k in ("set_alpha", "risk_target", "delta") if getattr(self, k) is not None}
        return DecisionConfig(**given)

    def configure(self, det):
        """``det`` with the decisions these options ask for; an explicit risk_target or delta makes the gate
        strict (the fit fails when the bound cannot be met), the defaults leave accept null with the reason."""
        return det.configure_decisions(self.decision_config(),
                                       strict=self.risk_target is not None or self.delta is not None)


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
                 metrics: ServiceMetrics, *, num_classes: int, feature_layers: tuple[str, ...] | None,
                 batch_size: int, on_swap=None, run: BatchRunner | None = None,
                 second_opinion: str | None = None) -> None:
        self.model, self.device, self.store, self.slot, self.metrics = model, device, store, slot, metrics
        self.run = run  # how each fit batch's model pass runs (None: on the job's own thread)
        self.num_classes, self.feature_layers = num_classes, feature_layers
        self.second_opinion = second_opinion  # the card's robust second opinion (composite fits)
        self.batch_size, self.on_swap = batch_size, on_swap
        self.jobs: dict[str, FitJob] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing = False

    @property
    def running(self) -> FitJob | None:
        with self._lock:
            return next((j for j in self.jobs.values() if j.state in ("queued", "running")), None)

    def build(self, options: FitOptions):
        """The unfitted detector that ``options`` ask for (ValueError when the model cannot take them)."""
        return options.configure(build_detector(
            options.preset, self.model, num_classes=self.num_classes, top_n=options.top_n, alpha=options.alpha,
            layers=self.feature_layers, second_opinion=self.second_opinion))

    def submit(self, x: np.ndarray, y: np.ndarray, calibration: tuple[np.ndarray, np.ndarray] | None = None,
               options: FitOptions | None = None) -> FitJob:
        """Start a job; raises FitBusyError (one at a time) or ValueError (options the model cannot take)."""
        options = options or FitOptions()
        self.build(options)  # refuse bad options now (HTTP 422), not in the job
        with self._lock:
            if self._closing:
                raise FitBusyError("the service is shutting down")
            busy = next((j for j in self.jobs.values() if j.state in ("queued", "running")), None)
            if busy is not None:
                raise FitBusyError(f"fit job {busy.id} is still {busy.state}; wait for it (GET /fit/{busy.id})")
            job = FitJob(id=uuid.uuid4().hex[:16], total=len(x) + (len(calibration[0]) if calibration else 0))
            # running from the moment it is accepted (the thread starts now): the 202 always says "running"
            job.state, job.phase, job.started_at = "running", "features", time.time()
            self.jobs[job.id] = job
            while len(self.jobs) > MAX_JOBS_KEPT:
                self.jobs.pop(next(iter(self.jobs)))
            self._thread = threading.Thread(target=self._run, args=(job, x, y, calibration, options),
                                            name=f"gga-fit-{job.id}", daemon=True)
            self._thread.start()
        return job

    def _run(self, job: FitJob, x: np.ndarray, y: np.ndarray, calibration, options: FitOptions) -> None:

        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total
            if done >= total:
                job.phase = "fitting"

        try:
            det = self.build(options)
            cal = None if calibration is None else tuple(torch.from_numpy(a) for a in calibration)
            det.fit(torch.from_numpy(x), torch.from_numpy(y), batch_size=self.batch_size, progress=progress,
                    calibration=cal, run=self.run)
            if self._closing:
                raise RuntimeError("the service shut down before the detector was saved")
            job.phase = "saving"
            version, path = self.store.save_new(det)
            self.slot.swap(det, version)
            if self.on_swap is not None:
                self.on_swap(version)
            job.result = fit_result(det, version, path)
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

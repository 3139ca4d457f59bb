"""The compute side of /predict: runs on the batcher's worker thread, never on the loop.

One call scores one batch: the items' rows are concatenated, scored by the detector
in one pass (forward, N gradient passes, CSM, features, LODA, trust) and split back
into per-sample results in each item's order.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import torch

from detectors.base import Detector
from service.batching import BatchInfo, Chunk
from service.decisions import decision_columns
from service.explain import component_p_values
from service.metrics import ServiceMetrics
from service.models import ModelCard

TOP_CLASSES = 5


class NoDetectorError(RuntimeError):
    """No fitted detector is loaded for the served model."""


@dataclass(frozen=True)
class PredictPayload:
    x: np.ndarray  # float32 [rows, *input_shape]
    return_csm: bool = False
    explain: bool = False  # each row with its components' p-values (service/explain.py)


def split_payload(p: PredictPayload, start: int, stop: int) -> PredictPayload:
    return PredictPayload(p.x[start:stop], p.return_csm, p.explain)


def merge_results(parts: list[list[dict]]) -> list[dict]:
    return [row for part in parts for row in part]


class DetectorSlot:
    """The detector being served and its version, swapped as one reference."""

    def __init__(self, detector: Detector | None, version: str | None) -> None:
        self._current = (detector, version)
        self._lock = threading.Lock()

    def get(self) -> tuple[Detector | None, str | None]:
        return self._current

    def swap(self, detector: Detector, version: str) -> None:
        with self._lock:
            self._current = (detector, version)


class PredictWorker:
    def __init__(self, slot: DetectorSlot, card: ModelCard, metrics: ServiceMetrics, device: torch.device,
                 alpha: float | None = None) -> None:
        self.slot, self.card, self.metrics, self.device, self.alpha = slot, card, metrics, device, alpha

    def compute(self, items: list[Chunk[PredictPayload]]) -> list[list[dict]]:
        detector, version = self.slot.get()
        if detector is None:
            raise NoDetectorError("no fitted detector for this model: POST /fit to calibrate one")
        x = torch.from_numpy(np.concatenate([it.payload.x for it in items])).to(self.device)
        timings: dict[str, float] = {}
        out = detector.score(x, return_csm=any(it.payload.return_csm for it in items), timings=timings)
        for stage, seconds in timings.items():
            self.metrics.compute_seconds.labels(stage=stage).observe(seconds)
        alpha = self.alpha if self.alpha is not None else detector.alpha
        rows = self._rows(out, version, alpha)
        if any(it.payload.explain for it in items):
            for r, comps in zip(rows, component_p_values(detector, out) or [None] * len(rows), strict=True):
                r["components"] = comps
        n_flagged = sum(r["flagged"] for r in rows)
        self.metrics.rows.inc(len(rows))
        self.metrics.flagged.inc(n_flagged)
        for r in rows:
            self.metrics.trust.observe(r["trust"])
        self.metrics.observe_decisions(rows)
        results, start = [], 0
        for it in items:
            part = rows[start:start + it.rows]
            for r in part:
                if not it.payload.return_csm:
                    r.pop("csm", None)
                if not it.payload.explain:
                    r.pop("components", None)
            results.append(part)
            start += it.rows
        return results

    def _rows(self, out, version: str, alpha: float) -> list[dict]:
        names = self.card.class_names
        label = out.label.tolist()
        conf = out.confidence.tolist()
        top = out.top_classes[:, :TOP_CLASSES].tolist()
        score = out.score.tolist()
        trust = out.trust.tolist()
        csm = out.csm.tolist() if out.csm is not None else None
        flagged = [t < alpha for t in trust]
        sets, set_names, accept = decision_columns(out, names, flagged)
        rows = []
        for i in range(len(label)):
            rows.append({
                "label": label[i],
                "label_name": names[label[i]] if label[i] < len(names) else str(label[i]),
                "confidence": conf[i],
                "top_classes": [{"label": c, "name": names[c] if c < len(names) else str(c)} for c in top[i]],
                "score": score[i] if math.isfinite(score[i]) else None,
                "trust": trust[i],
                "flagged": flagged[i],
                "prediction_set": sets[i],
                "prediction_set_names": set_names[i],
                "accept": accept[i],
                "detector_version": version,
            })
            if csm is not None:
                rows[-1]["csm"] = csm[i]
        return rows

    def on_batch(self, info: BatchInfo) -> None:
        m = self.metrics
        m.batches.inc()
        m.batch_rows.observe(info.rows)
        for w in info.queue_wait_s:
            m.queue_wait.observe(w)

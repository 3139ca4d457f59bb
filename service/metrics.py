"""Prometheus metrics of the service, on an injected ``CollectorRegistry``.

Latency is exported as histograms (aggregatable across replicas, unlike summaries);
rows vs batches give the mean batch size; detector outputs (flags, trust, version) are
exported too, so a rising flag rate can raise a drift alert; so are the selective gate's accept
counts (accepted / gated rows: a falling accept rate is a drift signal too) and the sizes of the
conformal prediction sets.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SET_SIZE_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100, 1000)
TRUST_BUCKETS = (0.001, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
STAGES = ("forward", "gradients", "features", "score")


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter("gga_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=registry)
        self.request_seconds = Histogram("gga_request_duration_seconds", "HTTP request latency",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_wait = Histogram("gga_queue_wait_seconds", "time a request chunk waited in the batch queue",
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_rows = Histogram("gga_batch_rows", "rows per compute batch", buckets=BATCH_BUCKETS,
                                    registry=registry)
        self.batches = Counter("gga_batches", "compute batches run", registry=registry)
        self.compute_seconds = Histogram("gga_compute_seconds", "compute time per batch and stage", ["stage"],
                                         buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_rows = Gauge("gga_queue_rows", "rows waiting in the batch queue", registry=registry)
        self.rows = Counter("gga_rows", "rows (samples) scored", registry=registry)
        self.flagged = Counter("gga_flagged", "rows flagged as untrustworthy (trust < alpha)", registry=registry)
        self.trust = Histogram("gga_trust", "trust (conformal p-value) of scored rows", buckets=TRUST_BUCKETS,
                               registry=registry)
        self.alpha = Gauge("gga_alpha", "the served alpha: rows are flagged when trust < alpha", registry=registry)
        self.calibration_size = Gauge("gga_calibration_size", "calibration scores of the served detector: the m of "
                                      "its conformal p-values", registry=registry)
        self.detector_info = Gauge("gga_detector_info", "the detector version being served (value 1)",
                                   ["version"], registry=registry)
        self.accepted = Counter("gga_accepted", "rows the selective gate accepted (accept true; never a flagged "
                                "row)", registry=registry)
        self.gated = Counter("gga_gated_rows", "rows scored by a detector with an accept gate (the denominator of "
                             "the accept rate)", registry=registry)
        self.set_size = Histogram("gga_prediction_set_size", "classes in each row's conformal prediction set",
                                  buckets=SET_SIZE_BUCKETS, registry=registry)
        self.accept_expected = Gauge("gga_accept_rate_calibration", "the served gate's accepted fraction on its "
                                     "calibration data (NaN without a gate): the accept rate of in-distribution "
                                     "traffic", registry=registry)
        self.gate_calibration_size = Gauge("gga_gate_calibration_size", "calibration samples the served gate was "
                                           "fitted on (NaN without a gate)", registry=registry)
        self.fit_jobs = Counter("gga_fit_jobs", "fit jobs by final state", ["state"], registry=registry)
        for stage in STAGES:
            self.compute_seconds.labels(stage=stage)
        for state in ("succeeded", "failed"):
            self.fit_jobs.labels(state=state)

    def observe_decisions(self, rows: list[dict]) -> None:
        """Accept counts and set sizes of scored rows (rows without a set or a gate are left out)."""
        gated = [r["accept"] for r in rows if r.get("accept") is not None]
        if gated:
            self.gated.inc(len(gated))
            self.accepted.inc(sum(gated))
        for r in rows:
            if r.get("prediction_set") is not None:
                self.set_size.observe(len(r["prediction_set"]))

    def watch_gate(self, detector_of) -> None:
        """Read the served gate's calibration accept fraction and size at each scrape (``detector_of()``:
        the served detector or None)."""

        def gate():
            return getattr(getattr(detector_of(), "decisions", None), "gate", None)

        self.accept_expected.set_function(lambda: float("nan") if (g := gate()) is None
                                          else g.n_accepted / g.n_calibration)
        self.gate_calibration_size.set_function(lambda: float("nan") if (g := gate()) is None else g.n_calibration)

    def set_detector_version(self, version: str) -> None:
        self.detector_info.clear()
        self.detector_info.labels(version=version).set(1)

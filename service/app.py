"""The FastAPI application: ``create_app(settings)``.

The lifespan owns every resource: it loads the model and the newest valid detector,
starts the compute worker thread (the dynamic batcher) and releases all of it in
``finally``. Everything lives on ``app.state``; nothing reads the environment at import.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from detectors.autotune import PROCESS_CACHE, StrategyCache, StrategyTable
from detectors.base import BatchRunner
from detectors.csm import resolve_strategy
from detectors.fingerprint import model_fingerprint
from detectors.persist import load_detector
from service.artifacts import BUNDLED_VERSION, ArtifactStore
from service.auth import READER_PATHS, matches, presented, secret_of
from service.batching import DynamicBatcher
from service.docs import install_docs
from service.errors import ApiError, envelope, install_error_handlers, internal_error
from service.fitjobs import FitJobManager
from service.metrics import ServiceMetrics
from service.models import load_model
from service.reload import ReloadWatcher, SwapGate
from service.routes import predict, router
from service.settings import DEFAULT_MODEL_DIR, Settings
from service.worker import DetectorSlot, PredictWorker

log = logging.getLogger("service")

STRATEGY_BUDGET_S = 5.0  # the whole startup measurement (GGA_STRATEGY=auto), all batch sizes together


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("GGA_DEVICE=cuda but no CUDA device is available (use auto or cpu)")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _initial_detector(model: torch.nn.Module, store: ArtifactStore):
    found = store.load_newest(model)
    if found is not None:
        return found
    bundled = DEFAULT_MODEL_DIR / "detector"
    if bundled.exists():
        try:
            return load_detector(bundled, model), BUNDLED_VERSION
        except ValueError as exc:  # fitted for another model: serve without a detector until /fit
            log.info("bundled detector not used: %s", exc)
    return None, None


def strategy_batch_sizes(max_batch_rows: int) -> tuple[int, ...]:
    """Where GGA_STRATEGY=auto measures: 1, 8 (when below the maximum) and GGA_MAX_BATCH_ROWS."""
    return tuple(sorted({1, min(8, max_batch_rows), max_batch_rows}))


class ServedStrategy:
    """GGA_STRATEGY, applied to every detector the service serves (``apply``) and shown in ``/info``.

    ``auto``: each of loop / vmap / replicate timed on the served model at
    :func:`strategy_batch_sizes` with the detector's top-N (``detectors.autotune``), within
    ``budget_s`` (default ``STRATEGY_BUDGET_S``); the table is kept for the process
    (``StrategyCache``), so a detector swapped in with the same top-N reuses it and one with
    another top-N is measured once, in the fit job's thread, before it is swapped in. An
    empty measurement falls back to the device rule.
    ``device``: loop on CPU, vmap on accelerators. ``loop`` / ``vmap`` / ``replicate``: fixed.
    """

    def __init__(self, mode: str, model: torch.nn.Module, fingerprint: str, input_shape: tuple[int, ...],
                 num_classes: int, device: torch.device, max_batch_rows: int, *,
                 cache: StrategyCache = PROCESS_CACHE, budget_s: float | None = None) -> None:
        self.mode, self.model, self.fingerprint, self.input_shape = mode, model, fingerprint, tuple(input_shape)
        self.num_classes, self.device, self.cache = num_classes, device, cache
        self.budget_s = STRATEGY_BUDGET_S if budget_s is None else budget_s
        self.batch_sizes = strategy_batch_sizes(max_batch_rows)

    def apply(self, detector) -> None:
        """Set ``detector.strategy`` (a name, or a measured table) and log it in one line; nothing for a
        detector without a CSM (its ``strategy`` is None)."""
        if detector is None or detector.strategy is None:
            return
        if self.mode != "auto":
            detector.strategy = "auto" if self.mode == "device" else self.mode
            log.info("GGA strategy %s (%s)", resolve_strategy(detector.strategy, self.device),
                     "device rule" if self.mode == "device" else "fixed")
            return
        n = min(detector.top_n, self.num_classes) if detector.top_n is not None else self.num_classes
        table, fresh = self.cache.get(self.model, self.fingerprint, self.input_shape, n, self.device,
                                      self.batch_sizes, budget_s=self.budget_s)
        if not table.best:
            detector.strategy = "auto"
            log.warning("GGA strategy auto: nothing could be measured for top-%d (%s); using the device rule (%s)",
                        n, table.summary(), resolve_strategy("auto", self.device))
            return
        detector.strategy = table
        how = f"measured in {table.seconds:.1f} s" if fresh else "cached"
        log.info("GGA strategy auto for top-%d on %s, %d torch threads, %s: %s", n, self.device,
                 torch.get_num_threads(), how, table.summary())

    def info(self, detector) -> dict:
        """``{"mode", "table", "timings_ms", ...}`` for ``/info``; table and timings None without a measurement."""
        current = None if detector is None else detector.strategy
        if isinstance(current, StrategyTable):
            return {"mode": self.mode, **current.to_dict()}
        resolved = resolve_strategy(current, self.device) if isinstance(current, str) else None
        return {"mode": self.mode, "strategy": resolved, "table": None, "timings_ms": None}


class StrategySlot(DetectorSlot):
    """The detector slot, giving every detector swapped in (by fit jobs) the served strategy first."""

    def __init__(self, detector, version: str | None, strategy: ServedStrategy) -> None:
        super().__init__(detector, version)
        self.strategy = strategy
        self.run: BatchRunner | None = None  # where the measurement runs (the compute worker, once it exists)

    def swap(self, detector, version: str) -> None:
        try:
            if self.run is not None and self.strategy.mode == "auto":  # (only auto runs the model)
                self.run(lambda: self.strategy.apply(detector))
            else:
                self.strategy.apply(detector)
        except Exception:  # noqa: BLE001 - the version is already saved: serve it with the device rule
            log.exception("GGA strategy for detector %s: measurement failed, using the device rule", version)
            detector.strategy = "auto"
        super().swap(detector, version)


PREDICT_ROUTE = next(r for r in router.routes if getattr(r, "path", None) == "/predict")


async def _predict_direct(scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /predict`` (no query string) straight to its handler: the same function the router
    calls, its :class:`ApiError` answered with the same envelope the exception handler writes,
    without the router's and the exception middleware's work per request (a few percent of a
    core at saturation, on the core the model computes on)."""
    scope["route"] = PREDICT_ROUTE  # the metrics' route label, as the router sets it
    try:
        response = await predict(Request(scope, receive))
    except ApiError as exc:
        response = envelope(exc.status, exc.type, exc.message, exc.headers)
    await response(scope, receive, send)


UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes are never shed


class RequestMetrics:
    """Counts every HTTP response in ``gga_requests_total{route,status}`` and times it; sheds excess requests.

    A plain ASGI middleware (inside Starlette's server-error layer): it sees the status
    of every response, the 4xx of :class:`ApiError` as well as 500s, and is the one place
    where an unhandled exception becomes an answer: :func:`service.errors.internal_error`
    (500 envelope, traceback logged), counted like any response, the connection kept open.

    It checks the read token (``GGA_READ_TOKEN``, :mod:`service.auth`) of ``/info`` and the
    docs, and holds the concurrency limit (``GGA_MAX_CONCURRENT_REQUESTS``): a request
    beyond it gets a 503 envelope before routing, before its body is read, which costs
    the event loop next to nothing. Probes and ``/metrics`` are neither counted nor shed.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.active = 0  # requests in progress, of the limited paths (one event loop: no lock needed)
        self._paths: frozenset[str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status: int | None = None

        async def send_seen(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        limited = scope.get("path") not in UNLIMITED_PATHS
        if limited and self._over_limit(scope):
            try:
                await envelope(503, "overloaded", f"too many requests in progress ({self.active}); retry later",
                               {"Retry-After": "1"})(scope, receive, send_seen)
            finally:
                self._count(scope, status or 503, time.perf_counter() - t0, self._route_of(scope))
            return
        if scope.get("path") in READER_PATHS and not self._reader(scope):
            await envelope(401, "unauthorized", "this page needs the read token (GGA_READ_TOKEN) or the admin token: "
                           "'Authorization: Bearer <token>', or HTTP Basic with the token as password",
                           {"WWW-Authenticate": 'Basic realm="GGA trust service", Bearer'})(scope, receive, send_seen)
            self._count(scope, 401, time.perf_counter() - t0, self._route_of(scope))
            return
        if limited:
            self.active += 1
        try:
            try:
                if scope.get("method") == "POST" and scope.get("path") == "/predict" and not scope.get("query_string"):
                    await _predict_direct(scope, receive, send_seen)  # the hot path, without the router
                else:
                    await self.app(scope, receive, send_seen)
            except Exception as exc:
                if status is not None:  # the answer has begun: nothing left but to let the server close it
                    raise
                await internal_error(scope, exc)(scope, receive, send_seen)
        finally:
            if limited:
                self.active -= 1
            if status is not None:
                self._count(scope, status, time.perf_counter() - t0)

    def _over_limit(self, scope: Scope) -> bool:
        app = scope.get("app")
        settings = getattr(app.state, "settings", None) if app is not None else None
        limit = getattr(settings, "max_concurrent_requests", None)
        return limit is not None and self.active >= limit

    @staticmethod
    def _reader(scope: Scope) -> bool:
        """Whether the request may read /info and the docs: no read token set, or it presents one of the tokens."""
        app = scope.get("app")
        settings = getattr(app.state, "settings", None) if app is not None else None
        reader = secret_of(getattr(settings, "read_token", None))
        if not reader:
            return True
        header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"), "")
        return matches(presented(header, basic=True), reader, secret_of(settings.admin_token))

    def _route_of(self, scope: Scope) -> str:
        """The route label of a request shed before routing: its path when it is one of ours, else unmatched."""
        if self._paths is None:
            self._paths = frozenset(getattr(r, "path", "") for r in router.routes) | READER_PATHS
        path = scope.get("path", "")
        return path if path in self._paths else "unmatched"

    @staticmethod
    def _count(scope: Scope, status: int, seconds: float, route: str | None = None) -> None:
        app = scope.get("app")
        m = getattr(app.state, "metrics", None) if app is not None else None
        if m is None:
            return
        label = route or getattr(scope.get("route"), "path", None) or "unmatched"
        m.requests.labels(route=label, status=str(status)).inc()
        m.request_seconds.labels(route=label).observe(seconds)


def create_app(settings: Settings | None = None, registry: CollectorRegistry | None = None) -> FastAPI:
    settings = settings or Settings()
    registry = registry if registry is not None else CollectorRegistry()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = fits = watcher = None
        try:
            if settings.torch_threads:
                torch.set_num_threads(settings.torch_threads)
            device = resolve_device(settings.device)
            model, card = load_model(settings, device)
            fingerprint = model_fingerprint(model)
            store = ArtifactStore(settings.artifact_dir, fingerprint)
            log.info("artifact directory %s", settings.artifact_dir)  # absolute (Settings resolves it)
            detector, version = _initial_detector(model, store)
            metrics = ServiceMetrics(registry)
            strategy = ServedStrategy(settings.strategy, model, fingerprint, card.input_shape, len(card.class_names),
                                      device, settings.max_batch_rows)
            strategy.apply(detector)  # GGA_STRATEGY=auto: measured here, before the warm-up below
            slot = StrategySlot(detector, version, strategy)
            if version is not None:
                metrics.set_detector_version(version)
            worker = PredictWorker(slot, card, metrics, device, settings.alpha)
            batcher = DynamicBatcher(
                worker.compute, max_batch_rows=settings.max_batch_rows,
                max_delay_s=settings.max_delay_ms / 1000.0,
                max_queue_rows=max(settings.max_queue_rows, settings.max_batch_rows),
                timeout_s=max(settings.request_timeout_s, settings.max_delay_ms / 1000.0 + 1e-3),
                max_wait_s=(None if settings.max_queue_wait_s is None
                            else min(settings.max_queue_wait_s, settings.request_timeout_s)),
                on_batch=worker.on_batch,
            )
            metrics.queue_rows.set_function(lambda: batcher.queued_rows)  # read at each scrape
            metrics.alpha.set_function(  # the served alpha (GGA_ALPHA, else the detector's), read at each scrape
                lambda: worker.alpha if worker.alpha is not None else
                float("nan") if (d := slot.get()[0]) is None else d.alpha)
            metrics.calibration_size.set_function(  # the served detector's m (drift alarm's bound), per scrape
                lambda: float("nan") if (d := slot.get()[0]) is None else d.metadata()["fit"]["n_calibration"])
            gate = SwapGate(slot, on_swap=metrics.set_detector_version)  # fit jobs and reloads: newest wins
            # everything that runs the model after startup runs on the compute worker, between batches: fit
            # passes (in batches of at most a request batch) and the strategy measurement of a new top-N
            slot.run = batcher.run_between
            fits = FitJobManager(model, device, store, gate, metrics, num_classes=len(card.class_names),
                                 feature_layers=card.feature_layers,
                                 batch_size=min(settings.fit_batch_size, settings.max_batch_rows),
                                 run=batcher.run_between)
            watcher = ReloadWatcher(store, model, gate, interval_s=settings.reload_interval_s)
            app.state.__dict__.update(
                settings=settings, registry=registry, metrics=metrics, model=model, card=card, device=device,
                fingerprint=fingerprint, store=store, slot=slot, worker=worker, batcher=batcher, fits=fits,
                strategy=strategy, watcher=watcher,
            )
            if detector is not None:  # warm-up: the first request should not pay for lazy init
                detector.score(torch.zeros((1, *card.input_shape), device=device))
            batcher.start()
            # the compute worker runs torch with the process's thread count: a thread's OpenMP setting can differ
            # from the one set on the main thread, which would skew both the compute and the strategy cache's key
            threads = torch.get_num_threads()
            batcher.run_between(lambda: torch.set_num_threads(threads))
            watcher.start()
            app.state.ready = True
            log.info("serving %s on %s, detector %s", card.name, device, version)
            yield
        finally:
            app.state.ready = False
            if watcher is not None:
                await watcher.astop()
            if batcher is not None:
                await batcher.astop()
            if fits is not None:
                fits.close()

    app = FastAPI(
        title="GGA trust service",
        version="0.1.0",
        description="Serves a PyTorch classifier and flags untrustworthy predictions (out-of-distribution "
        "inputs, adversarial examples) with Geometric Gradient Analysis (Schwinn et al., UAI 2021).",
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc: install_docs below, assets served locally (no CDN)
        redoc_url=None,
    )
    app.state.ready = False
    install_error_handlers(app)
    app.include_router(router)
    install_docs(app)

    app.add_middleware(RequestMetrics)

    return app

"""The FastAPI application: ``create_app(settings)``.

The lifespan owns every resource: it loads the model and the newest valid detector,
starts the compute worker thread (the dynamic batcher) and releases all of it in
``finally``. Everything lives on ``app.state``; nothing reads the environment at import.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.datastructures import State
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
from service.oip import error_response as v2_error
from service.oip import is_v2, route_label
from service.oip import router as oip_router
from service.page import install_page
from service.reload import ReloadWatcher, SwapGate
from service.routes import admission_refusal, router
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


# probes and scrapes are never shed
UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})


class BodyTimeoutError(ApiError):
    """No request body bytes for ``GGA_BODY_TIMEOUT_S`` while the service waited for them: 408, connection closed."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, "request_timeout", f"the request body stalled: no bytes received for {timeout_s:g} s",
                         headers={"Connection": "close"})


def receive_within(receive: Receive, timeout_s: float) -> Receive:
    """``receive`` with a deadline on each wait for body bytes (ASGI ``http.request`` messages).

    Each call waits at most ``timeout_s`` seconds (an inactivity bound: every chunk restarts
    it, the total upload time is bounded by the size limits) and raises
    :class:`BodyTimeoutError` past it. The clock runs only while the app waits in
    ``receive()``, so time the service spends elsewhere is never counted against the client
    (and a client waiting for ``100 Continue`` gets it when the app first asks). Once the last
    body message has arrived, later calls (a wait for ``http.disconnect``) have no deadline.
    """
    done = False

    async def receive_() -> Message:
        nonlocal done
        if done:
            return await receive()
        try:
            async with asyncio.timeout(timeout_s):  # one timer handle, no extra task
                message = await receive()
        except TimeoutError:
            raise BodyTimeoutError(timeout_s) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            done = True
        return message

    return receive_


class RouteLabels:
    """The metrics' route label of a request path: the template of the route it matches (``/fit/{job_id}``),
    else ``unmatched``; computed from the routes' paths alone, before or without routing."""

    def __init__(self, paths: Iterable[str]) -> None:
        self.fixed = frozenset(p for p in paths if "{" not in p)
        self.templates = [(p, p.split("/")) for p in paths if "{" in p]

    def __call__(self, path: str) -> str:
        if path in self.fixed:
            return path
        parts = path.split("/")
        for template, segments in self.templates:  # a {parameter} segment matches one non-empty segment
            if len(parts) == len(segments) and all(
                    (s.startswith("{") and s.endswith("}") and p) or s == p
                    for s, p in zip(segments, parts, strict=True)):
                return template
        return "unmatched"


class RequestMetrics:
    """Counts every HTTP response in ``gga_requests_total{route,status}`` and times it; sheds excess requests.

    A plain ASGI middleware (inside Starlette's server-error layer), reading only the
    documented ASGI scope (``type``, ``method``, ``path``, ``headers``) and the service's
    ``app.state`` (given at construction). It sees the status of every response, the 4xx of
    :class:`ApiError` as well as 500s, and is the one place where an unhandled exception
    becomes an answer: :func:`service.errors.internal_error` (500 envelope, traceback logged),
    counted like any response, the connection kept open.

    Before routing, before any body is read, it answers 503 (``Retry-After``) to a request
    beyond the concurrency limit (``GGA_MAX_CONCURRENT_REQUESTS``) and to a ``POST /predict``
    while the queue admits nothing now (:func:`service.routes.admission_refusal`), and 401 to
    ``/info`` and the docs without the read token (``GGA_READ_TOKEN``, :mod:`service.auth`).
    Every request body is read under ``GGA_BODY_TIMEOUT_S`` (:func:`receive_within`). Probes
    and ``/metrics`` are never shed. The route label is the path template the request matches
    (:class:`RouteLabels`, from the paths of the OpenAPI schema and the docs' paths), found
    without the router.
    """

    def __init__(self, app: ASGIApp, state: State, openapi: Callable[[], dict]) -> None:
        self.app = app
        self.state = state  # the service's app.state: settings, batcher, metrics (set by the lifespan)
        self.openapi = openapi  # the application's OpenAPI schema (FastAPI.openapi): its paths are the route labels
        self.active = 0  # requests in progress, of the limited paths (one event loop: no lock needed)
        self._labels: RouteLabels | None = None

    def label(self, path: str) -> str:
        v2 = route_label(path)  # the inference protocol's routes (service.oip): v2_infer, v2_model_metadata, ...
        if v2 is not None:
            return v2
        if self._labels is None:  # at the first request: every route is in place by then
            self._labels = RouteLabels([*self.openapi().get("paths", {}), *READER_PATHS])
        return self._labels(path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status: int | None = None
        path = scope["path"]

        async def send_seen(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        async def answer(response, code: int) -> None:
            try:
                await response(scope, receive, send_seen)
            finally:
                self._count(self.label(path), status or code, time.perf_counter() - t0)

        settings = getattr(self.state, "settings", None)
        limited = path not in UNLIMITED_PATHS
        limit = settings.limits.max_concurrent_requests if settings is not None else None
        if limited and limit is not None and self.active >= limit:
            message = f"too many requests in progress ({self.active}); retry later"
            await answer(v2_error(503, message, {"Retry-After": "1"}) if is_v2(path)
                         else envelope(503, "overloaded", message, {"Retry-After": "1"}), 503)
            return
        if scope["method"] == "POST" and (path == "/predict" or self.label(path) == "v2_infer"):
            refusal = admission_refusal(self.state)
            if refusal is not None:
                await answer(v2_error(refusal.status, refusal.message, refusal.headers) if is_v2(path)
                             else envelope(refusal.status, refusal.type, refusal.message, refusal.headers), 503)
                return
        if path in READER_PATHS and not self._reader(settings, scope):
            await answer(envelope(401, "unauthorized", "this page needs the read token (GGA_READ_TOKEN) or the admin "
                                  "token: 'Authorization: Bearer <token>', or HTTP Basic with the token as password",
                                  {"WWW-Authenticate": 'Basic realm="GGA trust service", Bearer'}), 401)
            return
        if settings is not None:
            receive = receive_within(receive, settings.server.body_timeout_s)
        if limited:
            self.active += 1
        try:
            try:
                await self.app(scope, receive, send_seen)
            except Exception as exc:
                if status is not None:  # the answer has begun: nothing left but to let the server close it
                    raise
                await internal_error(scope, exc)(scope, receive, send_seen)
        finally:
            if limited:
                self.active -= 1
            if status is not None:
                self._count(self.label(path), status, time.perf_counter() - t0)

    @staticmethod
    def _reader(settings: Settings | None, scope: Scope) -> bool:
        """Whether the request may read /info and the docs: no read token set, or it presents one of the tokens."""
        reader = secret_of(settings.auth.read_token) if settings is not None else None
        if not reader:
            return True
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
        return matches(presented(header, basic=True), reader, secret_of(settings.auth.admin_token))

    def _count(self, route: str, status: int, seconds: float) -> None:
        m = getattr(self.state, "metrics", None)
        if m is None:
            return
        m.requests.labels(route=route, status=str(status)).inc()
        m.request_seconds.labels(route=route).observe(seconds)


def create_app(settings: Settings | None = None, registry: CollectorRegistry | None = None) -> FastAPI:
    settings = settings or Settings()
    batching = settings.batching
    registry = registry if registry is not None else CollectorRegistry()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = fits = watcher = None
        try:
            if settings.model.torch_threads:
                torch.set_num_threads(settings.model.torch_threads)
            device = resolve_device(settings.model.device)
            model, card = load_model(settings, device)
            fingerprint = model_fingerprint(model)
            store = ArtifactStore(settings.storage.artifact_dir, fingerprint)
            log.info("artifact directory %s", settings.storage.artifact_dir)  # absolute (Settings resolves it)
            detector, version = _initial_detector(model, store)
            metrics = ServiceMetrics(registry)
            strategy = ServedStrategy(settings.model.strategy, model, fingerprint, card.input_shape,
                                      len(card.class_names), device, batching.max_batch_rows)
            strategy.apply(detector)  # GGA_STRATEGY=auto: measured here, before the warm-up below
            slot = StrategySlot(detector, version, strategy)
            if version is not None:
                metrics.set_detector_version(version)
            worker = PredictWorker(slot, card, metrics, device, settings.model.alpha)
            batcher = DynamicBatcher(
                worker.compute, max_batch_rows=batching.max_batch_rows,
                max_delay_s=batching.max_delay_ms / 1000.0,
                max_queue_rows=batching.max_queue_rows,  # Settings: at least max_batch_rows
                timeout_s=batching.request_timeout_s,  # Settings: above the batching delay
                max_wait_s=(None if batching.max_queue_wait_s is None
                            else min(batching.max_queue_wait_s, batching.request_timeout_s)),
                on_batch=worker.on_batch,
            )
            metrics.queue_rows.set_function(lambda: batcher.queued_rows)  # read at each scrape
            metrics.alpha.set_function(  # the served alpha (GGA_SERVE_ALPHA, else the detector's), read at each scrape
                lambda: worker.alpha if worker.alpha is not None else
                float("nan") if (d := slot.get()[0]) is None else d.alpha)
            metrics.calibration_size.set_function(  # the served detector's m (drift alarm's bound), per scrape
                lambda: float("nan") if (d := slot.get()[0]) is None else d.metadata()["fit"]["n_calibration"])
            metrics.watch_gate(lambda: slot.get()[0])  # the accept-rate alarm's expected rate and m
            gate = SwapGate(slot, on_swap=metrics.set_detector_version)  # fit jobs and reloads: newest wins
            # everything that runs the model after startup runs on the compute worker, between batches: fit
            # passes (in batches of at most a request batch) and the strategy measurement of a new top-N
            slot.run = batcher.run_between
            fits = FitJobManager(model, device, store, gate, metrics, num_classes=len(card.class_names),
                                 feature_layers=card.feature_layers, second_opinion=card.second_opinion,
                                 batch_size=min(settings.fit.batch_size, batching.max_batch_rows),
                                 run=batcher.run_between)
            watcher = ReloadWatcher(store, model, gate, interval_s=settings.storage.reload_interval_s)
            for name, value in dict(
                registry=registry, metrics=metrics, model=model, card=card, device=device,
                fingerprint=fingerprint, store=store, slot=slot, worker=worker, batcher=batcher, fits=fits,
                strategy=strategy, watcher=watcher,
            ).items():
                setattr(app.state, name, value)
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
    app.state.settings = settings  # before the lifespan: the request middleware reads its limits
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(oip_router)  # the Open Inference Protocol (KServe v2) on the same batcher and detector
    install_docs(app)
    install_page(app)

    app.add_middleware(RequestMetrics, state=app.state, openapi=app.openapi)

    return app

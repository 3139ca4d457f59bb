"""A Python client for the GGA trust service: numpy in and out, ``.npy`` on the wire.

    from service.client import GGAClient

    with GGAClient("http://localhost:8000") as client:
        result = client.predict(x)            # x: (B, 1, 28, 28) or one (1, 28, 28) sample
        result.labels, result.trust, result.flagged

    GGAClient(url, token=ADMIN, read_token=READER)   # a service with GGA_ADMIN_TOKEN / GGA_READ_TOKEN

Credentials: ``token`` (the admin token) goes with the fit calls; ``read_token`` with
``info`` and ``predict`` (``token`` when there is no ``read_token``: the service accepts
either on what it protects for readers); the probes carry none. See :class:`GGAClient`.

:class:`GGAClient` is synchronous, :class:`AsyncGGAClient` has the same methods as
coroutines. A 503 that carries ``Retry-After`` (the queue is full) is retried after that
many seconds (at most ``max_retry_wait_s``), up to ``max_retries`` times; every other
error, and a 503 still there after the retries, raises a :class:`GGAError` subclass that
carries the service's envelope ``{"error": {"type", "message"}}`` and the HTTP status.
Network failures (connection refused, client-side timeouts) are httpx's own exceptions
(``httpx.TransportError``) and are not retried.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np

__all__ = [
    "AsyncGGAClient",
    "BadRequest",
    "Conflict",
    "GGAClient",
    "GGAError",
    "NotFound",
    "Overloaded",
    "PredictResult",
    "ServerError",
    "Timeout",
    "Unauthorized",
]

NPY = "application/x-npy"
FINAL_STATES = ("succeeded", "failed")


# --------------------------------------------------------------------------- errors


class GGAError(Exception):
    """An error answer of the service: ``status`` (HTTP), ``type`` and ``message`` (the envelope)."""

    def __init__(self, status: int, type_: str, message: str, response: httpx.Response | None = None) -> None:
        super().__init__(f"{status} {type_}: {message}")
        self.status, self.type, self.message, self.response = status, type_, message, response

    @property
    def envelope(self) -> dict:
        return {"error": {"type": self.type, "message": self.message}}


class BadRequest(GGAError):
    """400, 413, 415, 422 (and any other 4xx not listed below): the request cannot be served as sent."""


class Unauthorized(GGAError):
    """401 (missing or wrong admin or read token) or 403 (fitting disabled, path forbidden)."""


class NotFound(GGAError):
    """404, e.g. an unknown fit job."""


class Conflict(GGAError):
    """409: a fit job is already running."""


class ServerError(GGAError):
    """Any 5xx (500 ``internal`` carries an error id that the server log explains)."""


class Overloaded(ServerError):
    """503: a full queue still full after the retries (``retry_after`` is the last Retry-After in
    seconds), or a 503 without Retry-After (``type`` says which: ``no_detector``, ``unavailable``)."""

    def __init__(self, status: int, type_: str, message: str, response: httpx.Response | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(status, type_, message, response)
        self.retry_after = retry_after


class Timeout(ServerError):
    """504: the request waited longer than the service's ``GGA_REQUEST_TIMEOUT_S`` and was not computed."""


def _error_class(status: int) -> type[GGAError]:
    if status in (401, 403):
        return Unauthorized
    if status == 404:
        return NotFound
    if status == 409:
        return Conflict
    if status == 503:
        return Overloaded
    if status == 504:
        return Timeout
    if status >= 500:
        return ServerError
    if status >= 400:
        return BadRequest
    return GGAError


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (a number of seconds or an HTTP date); None if absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _error_from(response: httpx.Response) -> GGAError:
    status = response.status_code
    try:
        err = response.json()["error"]
        type_, message = str(err["type"]), str(err["message"])
    except Exception:  # noqa: BLE001 - not the service's envelope (a proxy's page, an empty body)
        type_, message = f"http_{status}", (response.text[:500] or response.reason_phrase)
    cls = _error_class(status)
    if cls is Overloaded:
        return Overloaded(status, type_, message, response, retry_after=_retry_after(response))
    return cls(status, type_, message, response)


# --------------------------------------------------------------------------- results


@dataclass
class PredictResult:
    """One array per field, one row per sample (in the order sent).

    ``score`` is NaN where the service returns none; ``top_classes`` is (B, k) class indices,
    best first; ``csm`` is (B, N, N) when asked for, else None; ``warnings`` lists the samples
    outside the model card's value range (``{"sample", "message"}``, only under the card's
    ``warn`` policy); with ``explain``, ``components`` names the detector's signals and
    ``p_values`` is (B, K), each signal's p-value per sample (NaN where none), else both None;
    ``raw`` is the JSON answer. ``prediction_set`` holds each sample's conformal set (class indices,
    may be empty) and ``prediction_set_names`` their names, None when the detector has no sets;
    ``accept`` is bool (B,), the selective gate (False whenever flagged), None when the detector has
    no gate.
    """

    labels: np.ndarray
    label_names: list[str]
    confidence: np.ndarray
    score: np.ndarray
    trust: np.ndarray
    flagged: np.ndarray
    detector_version: list[str]
    top_classes: np.ndarray
    csm: np.ndarray | None
    model: str
    alpha: float
    warnings: list[dict]
    raw: dict = field(repr=False)
    components: list[str] | None = None
    p_values: np.ndarray | None = None
    prediction_set: list[list[int]] | None = None
    prediction_set_names: list[list[str]] | None = None
    accept: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


def _parse_predict(doc: dict) -> PredictResult:
    rows = doc["predictions"]
    top = [[t["label"] for t in r["top_classes"]] for r in rows]
    k = min((len(t) for t in top), default=0)
    csm = None
    if rows and all(r.get("csm") is not None for r in rows):
        csm = np.array([r["csm"] for r in rows], dtype=np.float64)
    components = p_values = None
    if rows and all(r.get("components") is not None for r in rows):
        components = [c["name"] for c in rows[0]["components"]]
        p_values = np.array([[np.nan if c["p_value"] is None else c["p_value"] for c in r["components"]]
                             for r in rows], dtype=np.float64)
    return PredictResult(
        labels=np.array([r["label"] for r in rows], dtype=np.int64),
        label_names=[r["label_name"] for r in rows],
        confidence=np.array([r["confidence"] for r in rows], dtype=np.float64),
        score=np.array([np.nan if r["score"] is None else r["score"] for r in rows], dtype=np.float64),
        trust=np.array([r["trust"] for r in rows], dtype=np.float64),
        flagged=np.array([r["flagged"] for r in rows], dtype=bool),
        detector_version=[r["detector_version"] for r in rows],
        top_classes=np.array([t[:k] for t in top], dtype=np.int64).reshape(len(rows), k),
        csm=csm,
        model=doc.get("model", ""),
        alpha=doc.get("alpha", float("nan")),
        warnings=list(doc.get("warnings") or []),
        raw=doc,
        components=components,
        p_values=p_values,
        prediction_set=[list(r["prediction_set"]) for r in rows]
        if rows and all(r.get("prediction_set") is not None for r in rows) else None,
        prediction_set_names=[list(r["prediction_set_names"]) for r in rows]
        if rows and all(r.get("prediction_set_names") is not None for r in rows) else None,
        accept=np.array([r["accept"] for r in rows], dtype=bool)
        if rows and all(r.get("accept") is not None for r in rows) else None,
    )


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def _npz_upload(data: str | os.PathLike | np.ndarray, y, x_cal, y_cal) -> bytes:
    """The bytes of the .npz to upload: a file as it is, or arrays packed in memory."""
    if isinstance(data, str | os.PathLike):
        if any(a is not None for a in (y, x_cal, y_cal)):
            raise TypeError("pass either an .npz path or arrays x, y (x_cal, y_cal), not both")
        with open(data, "rb") as fh:
            return fh.read()
    if y is None:
        raise TypeError("fit(x, y): labels y are needed with an array x")
    if (x_cal is None) != (y_cal is None):
        raise TypeError("pass both x_cal and y_cal, or neither")
    arrays = {"x": np.ascontiguousarray(data, dtype=np.float32), "y": np.asarray(y, dtype=np.int64)}
    if x_cal is not None:
        arrays["x_cal"] = np.ascontiguousarray(x_cal, dtype=np.float32)
        arrays["y_cal"] = np.asarray(y_cal, dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _fit_form(preset: str | None, top_n: int | str | None, alpha: float | None) -> dict[str, str]:
    form = {}
    if preset is not None:
        form["preset"] = str(preset)
    if top_n is not None:
        form["top_n"] = str(top_n)
    if alpha is not None:
        form["alpha"] = repr(float(alpha))
    return form


def _job_id(job: str | Mapping) -> str:
    return str(job["id"]) if isinstance(job, Mapping) else str(job)


def _json(response: httpx.Response) -> Any:
    return response.json()


def _predict_result(response: httpx.Response) -> PredictResult:
    return _parse_predict(response.json())


@dataclass(frozen=True)
class _Call:
    """One request of the API, built once for both clients: what to send and how to read the answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], Any] = _json
    kwargs: dict = field(default_factory=dict)


class _Base:
    """What the sync and the async client share: the calls of the API (URL, credentials, body, how the
    answer is read), the batch, the retry policy and the fit poll. The two subclasses only send."""

    def __init__(self, base_url: str, token: str | None, read_token: str | None, timeout: float | httpx.Timeout,
                 max_retries: int, max_retry_wait_s: float, input_shape: Sequence[int] | None) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.read_token = read_token
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_wait_s = max_retry_wait_s
        self.input_shape = tuple(input_shape) if input_shape is not None else None

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    @staticmethod
    def _bearer(token: str | None) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"} if token else {}

    def _auth(self) -> dict[str, str]:
        """The admin credential (``token``): the fit calls."""
        return self._bearer(self.token)

    def _read_auth(self) -> dict[str, str]:
        """The reader credential: ``read_token``, else ``token`` (the service opens its reader paths to either)."""
        return self._bearer(self.read_token or self.token)

    def _batch(self, x: np.ndarray, shape: tuple[int, ...] | None) -> np.ndarray:
        """float32, C order; one sample of the input shape becomes a batch of one."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if shape is not None and x.shape == shape:
            x = x[None]
        return x

    def _needs_shape(self, x) -> bool:
        return self.input_shape is None and np.ndim(x) > 0

    def _wait_for(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying this answer, or None to stop (return or raise)."""
        if response.status_code != 503 or attempt >= self.max_retries:
            return None
        wait = _retry_after(response)
        if wait is None:
            return None
        return min(wait, self.max_retry_wait_s)

    # the calls: one definition each, sent by GGAClient._send or AsyncGGAClient._send

    def _info_call(self) -> _Call:
        return _Call("GET", "/info", kwargs={"headers": self._read_auth()})

    def _health_call(self) -> _Call:
        return _Call("GET", "/healthz")

    def _predict_call(self, x: np.ndarray, return_csm: bool, explain: bool = False) -> _Call:
        batch = self._batch(x, self.input_shape)
        headers = {"content-type": NPY, **self._read_auth()}
        params = {k: "true" for k, on in (("return_csm", return_csm), ("explain", explain)) if on} or None
        return _Call("POST", "/predict", _predict_result,
                     {"content": _npy(batch), "headers": headers, "params": params})

    def _fit_call(self, data, y, x_cal, y_cal, preset, top_n, alpha) -> _Call:
        files = {"file": ("fit.npz", _npz_upload(data, y, x_cal, y_cal), "application/octet-stream")}
        return _Call("POST", "/fit", kwargs={"files": files, "data": _fit_form(preset, top_n, alpha),
                                             "headers": self._auth()})

    def _fit_status_call(self, job_id: str | Mapping) -> _Call:
        return _Call("GET", f"/fit/{_job_id(job_id)}", kwargs={"headers": self._auth()})

    @staticmethod
    def _fit_done(job: dict, job_id: str | Mapping, deadline: float, timeout_s: float) -> bool:
        """Whether a polled job is final; ``TimeoutError`` when it is not and ``deadline`` has passed."""
        if job["state"] in FINAL_STATES:
            return True
        if time.monotonic() >= deadline:
            raise TimeoutError(f"fit job {_job_id(job_id)} is still {job['state']} after {timeout_s} s")
        return False


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise _error_from(response)
    return response


# --------------------------------------------------------------------------- sync


class GGAClient(_Base):
    """Synchronous client.

    ``base_url``: the service (``http://localhost:8000``). Credentials, each sent as
    ``Authorization: Bearer <token>``:

    - ``token``: the admin token (``GGA_ADMIN_TOKEN``), sent with the fit calls (``fit``,
      ``fit_status``, ``wait_fit``);
    - ``read_token``: the read token (``GGA_READ_TOKEN``), sent with the reading calls
      (``info``, and ``predict``, which reads ``/info`` for the input shape when none is
      given). Without ``read_token`` those calls carry ``token`` instead: the service opens
      what it protects for readers to the admin token too, so one admin token serves every
      call. With neither, nothing is sent and a service with a read token answers 401
      (:class:`Unauthorized`) to ``info``.
    - The probes (``health``, ``ready``) carry no credential: the service never asks for one.

    ``timeout``: seconds per HTTP request (of the client this one builds; an injected
    ``client`` keeps its own). ``max_retries``: retries of a 503 that carries Retry-After,
    each after that many seconds (at most ``max_retry_wait_s``). ``input_shape``: the
    model's input shape; if not given, read from ``/info`` once, on the first ``predict``.
    ``client`` or ``transport``: an ``httpx.Client`` (not closed by this client) or a
    transport to build one on (tests). ``sleep``: how to wait between retries and polls
    (tests pass a recorder).
    """

    def __init__(self, base_url: str, token: str | None = None, *, read_token: str | None = None,
                 timeout: float | httpx.Timeout = 30.0, max_retries: int = 3, max_retry_wait_s: float = 30.0,
                 input_shape: Sequence[int] | None = None, client: httpx.Client | None = None,
                 transport: httpx.BaseTransport | None = None, sleep: Callable[[float], Any] = time.sleep) -> None:
        super().__init__(base_url, token, read_token, timeout, max_retries, max_retry_wait_s, input_shape)
        if client is not None and transport is not None:
            raise TypeError("pass either client or transport, not both")
        self._owns = client is None
        self._http = client if client is not None else httpx.Client(transport=transport, timeout=timeout)
        self._sleep = sleep

    def close(self) -> None:
        if self._owns:
            self._http.close()

    def __enter__(self) -> GGAClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, call: _Call) -> Any:
        """Send ``call``, retrying a 503 with Retry-After; its parsed answer, or the typed error."""
        attempt = 0
        while True:
            response = self._http.request(call.method, self._url(call.path), **call.kwargs)
            wait = self._wait_for(response, attempt)
            if wait is None:
                return call.parse(_checked(response))
            attempt += 1
            self._sleep(wait)

    def predict(self, x: np.ndarray, return_csm: bool = False, explain: bool = False) -> PredictResult:
        """Predictions with trust for a batch (B, *input_shape) or one sample (*input_shape); ``explain``:
        each detector component's p-value too (``components``, ``p_values``)."""
        if self._needs_shape(x):
            self.input_shape = tuple(self.info()["input_shape"])
        return self._send(self._predict_call(x, return_csm, explain))

    def info(self) -> dict:
        return self._send(self._info_call())

    def health(self) -> dict:
        return self._send(self._health_call())

    def ready(self) -> bool:
        """Whether ``/readyz`` answers 200 (model and detector loaded); False on 503 or no connection."""
        try:
            return self._http.get(self._url("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    def fit(self, data: str | os.PathLike | np.ndarray, y: np.ndarray | None = None,
            x_cal: np.ndarray | None = None, y_cal: np.ndarray | None = None, *, preset: str | None = None,
            top_n: int | str | None = None, alpha: float | None = None) -> dict:
        """Start a fit job on an ``.npz`` file or on arrays ``x, y`` (and held-out ``x_cal, y_cal``);
        returns the job (``{"id", "state", "status_url"}``). Needs the admin token."""
        return self._send(self._fit_call(data, y, x_cal, y_cal, preset, top_n, alpha))

    def fit_status(self, job_id: str | Mapping) -> dict:
        return self._send(self._fit_status_call(job_id))

    def wait_fit(self, job_id: str | Mapping, poll_s: float = 0.5, timeout_s: float = 3600.0) -> dict:
        """Poll until the job has succeeded or failed and return it (check ``job["state"]``);
        ``TimeoutError`` if it is still running after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self._fit_done(job := self.fit_status(job_id), job_id, deadline, timeout_s):
            self._sleep(poll_s)
        return job


# --------------------------------------------------------------------------- async


class AsyncGGAClient(_Base):
    """The :class:`GGAClient` methods as coroutines, on an ``httpx.AsyncClient``; the same credentials
    (``token`` for the fit calls, ``read_token``, else ``token``, for ``info`` and ``predict``)."""

    def __init__(self, base_url: str, token: str | None = None, *, read_token: str | None = None,
                 timeout: float | httpx.Timeout = 30.0, max_retries: int = 3, max_retry_wait_s: float = 30.0,
                 input_shape: Sequence[int] | None = None, client: httpx.AsyncClient | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        super().__init__(base_url, token, read_token, timeout, max_retries, max_retry_wait_s, input_shape)
        if client is not None and transport is not None:
            raise TypeError("pass either client or transport, not both")
        self._owns = client is None
        self._http = client if client is not None else httpx.AsyncClient(transport=transport, timeout=timeout)
        self._sleep = sleep

    async def aclose(self) -> None:
        if self._owns:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncGGAClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _send(self, call: _Call) -> Any:
        attempt = 0
        while True:
            response = await self._http.request(call.method, self._url(call.path), **call.kwargs)
            wait = self._wait_for(response, attempt)
            if wait is None:
                return call.parse(_checked(response))
            attempt += 1
            await self._sleep(wait)

    async def predict(self, x: np.ndarray, return_csm: bool = False, explain: bool = False) -> PredictResult:
        if self._needs_shape(x):
            self.input_shape = tuple((await self.info())["input_shape"])
        return await self._send(self._predict_call(x, return_csm, explain))

    async def info(self) -> dict:
        return await self._send(self._info_call())

    async def health(self) -> dict:
        return await self._send(self._health_call())

    async def ready(self) -> bool:
        try:
            return (await self._http.get(self._url("/readyz"))).status_code == 200
        except httpx.TransportError:
            return False

    async def fit(self, data: str | os.PathLike | np.ndarray, y: np.ndarray | None = None,
                  x_cal: np.ndarray | None = None, y_cal: np.ndarray | None = None, *, preset: str | None = None,
                  top_n: int | str | None = None, alpha: float | None = None) -> dict:
        return await self._send(self._fit_call(data, y, x_cal, y_cal, preset, top_n, alpha))

    async def fit_status(self, job_id: str | Mapping) -> dict:
        return await self._send(self._fit_status_call(job_id))

    async def wait_fit(self, job_id: str | Mapping, poll_s: float = 0.5, timeout_s: float = 3600.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while not self._fit_done(job := await self.fit_status(job_id), job_id, deadline, timeout_s):
            await self._sleep(poll_s)
        return job

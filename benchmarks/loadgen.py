"""The load generator of the benchmarks: raw HTTP/1.1 over asyncio, closed and open loops, inputs.

Used by :mod:`benchmarks.load` and :mod:`benchmarks.overload`, through the names in ``__all__``:

- :class:`Conn` (one keep-alive connection), :func:`http_request` (the raw bytes of a
  request), :func:`send_pooled` (a request on an idle pooled connection);
- :func:`closed_loop` (a fixed number of clients, each sending when answered) and
  :func:`open_loop` (Poisson arrivals; latency from the scheduled arrival, no coordinated
  omission, scheduled by :func:`send_on_schedule`), one :class:`Record` per request;
- :func:`percentile`, :func:`latency_summary` (p50/p99/mean/max in ms), :func:`no_gc`;
- :class:`Pinning` (server and client on separate cores with ``taskset``) and
  :func:`client_side` (this process as the load client);
- :func:`load_inputs` (MNIST test images), :func:`request_bodies` (raw ``/predict`` requests with
  ``.npy`` or JSON bodies, or v2 binary inference requests: :func:`v2_request`) and :func:`npy_bytes`
  (an ``.npy`` body).

CPU use of every point is measured by :class:`benchmarks.cpustat.CpuMeter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import os
import resource
import socket
import time
from dataclasses import dataclass, field

import numpy as np

from benchmarks.cpustat import CpuMeter
from benchmarks.serverproc import ROOT

__all__ = ["MNIST_DIR", "Conn", "Pinning", "Record", "client_side", "closed_loop", "http_request", "latency_summary",
           "load_inputs", "no_gc", "npy_bytes", "open_loop", "percentile", "request_bodies", "send_on_schedule",
           "send_pooled", "v2_request"]

MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"


# --------------------------------------------------------------------------- the HTTP client


class Conn:
    """One HTTP/1.1 keep-alive connection over asyncio streams (no parsing beyond what is needed)."""

    __slots__ = ("r", "w", "closed")

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w, self.closed = r, w, False

    @classmethod
    async def open(cls, host: str, port: int) -> Conn:
        r, w = await asyncio.open_connection(host, port, limit=1 << 20)
        sock = w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(r, w)

    def stale(self) -> bool:
        return self.closed or self.r.at_eof() or self.w.is_closing()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.w.close()

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.w.write(raw)
        if len(raw) > 65536:
            await self.w.drain()
        head = await self.r.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, chunked, close = None, False, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = b"close" in value.lower()
        if length is not None:
            body = await self.r.readexactly(length)
        elif chunked:
            parts = []
            while True:
                size = int((await self.r.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.r.readuntil(b"\r\n")
                    break
                parts.append(await self.r.readexactly(size))
                await self.r.readexactly(2)
            body = b"".join(parts)
        else:
            body, close = await self.r.read(), True
        if close:
            self.close()
        return status, body


def http_request(host: str, port: int, method: str, path: str, body: bytes = b"", ctype: str | None = None) -> bytes:
    """The raw bytes of one HTTP/1.1 request (Host, Content-Type when given, Content-Length for a body or a POST)."""
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    if ctype:
        head.append(f"Content-Type: {ctype}")
    if body or method == "POST":
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def send_pooled(pool: list[Conn], host: str, port: int, raw: bytes) -> tuple[int, bytes, Conn]:
    """One request on a pooled connection (a new one when none is idle); a connection the
    server closed while idle is replaced and the request sent again, once."""
    conn = None
    while pool and conn is None:
        c = pool.pop()
        if c.stale():
            c.close()
        else:
            conn = c
    reused = conn is not None
    if conn is None:
        conn = await Conn.open(host, port)
    try:
        status, body = await conn.request(raw)
    except (asyncio.IncompleteReadError, ConnectionError):
        conn.close()
        if not reused:
            raise
        conn = await Conn.open(host, port)
        status, body = await conn.request(raw)
    return status, body, conn


@dataclass
class Record:
    t0: float  # sent (closed loop) or scheduled (open loop), perf_counter seconds
    t1: float  # answered
    status: int  # HTTP status; 0 = transport error, -1 = unanswered within the drain limit
    lag: float = 0.0  # open loop: how late the client sent it against its schedule


@contextlib.contextmanager
def no_gc():
    """No cyclic garbage collection while a point runs: a full collection over thousands of
    connections and records pauses the client's event loop (late sends) for tens of ms."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def percentile(values: list[float] | np.ndarray, q: float) -> float | None:
    """The ``q``-th percentile of ``values`` (numpy's linear interpolation); None when there are none."""
    return float(np.percentile(values, q)) if len(values) else None


def latency_summary(recs: list[Record]) -> dict:
    """``{"n", "p50_ms", "p99_ms", "mean_ms", "max_ms"}`` of the latencies t1 - t0 of ``recs`` (None when empty)."""
    lat = [1000 * (r.t1 - r.t0) for r in recs]
    return {"n": len(lat), "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
            "mean_ms": float(np.mean(lat)) if lat else None, "max_ms": max(lat) if lat else None}


# --------------------------------------------------------------------------- closed and open loops


async def closed_loop(host: str, port: int, bodies: list[bytes], clients: int, warmup_s: float, duration_s: float,
                      rows: int, server_pid: int | None = None, keep_latencies: bool = False) -> dict:
    with no_gc():
        return await _closed_loop(host, port, bodies, clients, warmup_s, duration_s, rows, server_pid, keep_latencies)


async def _closed_loop(host: str, port: int, bodies: list[bytes], clients: int, warmup_s: float, duration_s: float,
                       rows: int, server_pid: int | None, keep_latencies: bool) -> dict:
    """``clients`` connections, each sending its next request as soon as its previous one is
    answered, for ``warmup_s + duration_s``. Throughput: answers received inside the window
    [warm-up end, end]; latency: requests sent inside it (each awaited to its answer)."""
    conns = [await Conn.open(host, port) for _ in range(clients)]
    t_start = time.perf_counter() + warmup_s
    t_end = t_start + duration_s
    recs: list[Record] = []

    async def client(k: int) -> None:
        i = k
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            try:
                if conns[k].stale():
                    conns[k] = await Conn.open(host, port)
                status, _ = await conns[k].request(bodies[i % len(bodies)])
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
                status = 0
                conns[k].close()
            recs.append(Record(t0, time.perf_counter(), status))
            i += clients

    tasks = [asyncio.create_task(client(k)) for k in range(clients)]
    await asyncio.sleep(max(0.0, t_start - time.perf_counter()))
    with CpuMeter(server_pid) as cpu:
        await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
    await asyncio.gather(*tasks)
    for c in conns:
        c.close()
    answered = [r for r in recs if t_start <= r.t1 <= t_end]  # throughput: answers inside the window
    sent = [r for r in recs if r.t0 >= t_start]  # latency: requests sent inside the window
    counts: dict[str, int] = {}
    for r in sent:
        counts[str(r.status)] = counts.get(str(r.status), 0) + 1
    n_ok = sum(r.status == 200 for r in answered)
    extra = {"latencies_ms": [1000 * (r.t1 - r.t0) for r in sent if r.status == 200]} if keep_latencies else {}
    return {**extra,
        "clients": clients, "duration_s": duration_s, "requests": len(sent), "statuses": counts,
        "requests_per_s": n_ok / duration_s, "rows_per_s": n_ok * rows / duration_s,
        **{k: v for k, v in latency_summary([r for r in sent if r.status == 200]).items() if k != "n"},
        **cpu.as_dict(len(answered)),
    }


async def open_loop(host: str, port: int, bodies: list[bytes], rate: float, duration_s: float, rows: int,
                    drain_s: float, slo_ms: float, seed: int, server_pid: int | None = None,
                    preopen: int = 64) -> dict:
    with no_gc():
        return await _open_loop(host, port, bodies, rate, duration_s, rows, drain_s, slo_ms, seed, server_pid,
                                preopen)


async def _open_loop(host: str, port: int, bodies: list[bytes], rate: float, duration_s: float, rows: int,
                     drain_s: float, slo_ms: float, seed: int, server_pid: int | None, preopen: int) -> dict:
    """Poisson arrivals at ``rate`` requests/s for ``duration_s``; each request on an idle
    keep-alive connection (a new one when none is idle); then at most ``drain_s`` for the
    answers still outstanding (counted as unanswered, status -1, beyond that)."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=int(rate * duration_s * 1.5) + 16)
    times = np.cumsum(gaps)
    while times[-1] < duration_s:  # practically never: draw more
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate, size=len(times)))])
    times = times[times < duration_s]
    pool = [await Conn.open(host, port) for _ in range(min(preopen, len(times)))]
    recs: list[Record] = []
    max_open = 0
    in_flight = 0

    async def one(i: int, at: float) -> None:
        nonlocal in_flight, max_open
        in_flight += 1
        max_open = max(max_open, in_flight)
        lag = time.perf_counter() - at
        try:
            status, _, conn = await send_pooled(pool, host, port, bodies[i % len(bodies)])
            pool.append(conn)
        except (asyncio.IncompleteReadError, ConnectionError, OSError, asyncio.LimitOverrunError):
            status = 0
        except asyncio.CancelledError:
            recs.append(Record(at, time.perf_counter(), -1, lag))
            raise
        finally:
            in_flight -= 1
        recs.append(Record(at, time.perf_counter(), status, lag))

    t0 = time.perf_counter() + 0.05
    with CpuMeter(server_pid) as cpu:
        sent_end, pending = await send_on_schedule(times, t0, one, drain_s)
    for c in pool:
        c.close()
    window = duration_s  # the arrival window as scheduled
    last = max((r.t1 for r in recs if r.status > 0), default=sent_end)
    by_status: dict[str, list[Record]] = {}
    for r in recs:
        by_status.setdefault(str(r.status), []).append(r)
    ok = by_status.get("200", [])
    lags = [1000 * r.lag for r in recs]
    return {
        "rate_per_s": rate, "duration_s": duration_s, "sent": len(recs), "sent_per_s": len(recs) / window,
        "statuses": {s: len(v) for s, v in sorted(by_status.items())},
        "latency_by_status": {s: latency_summary(v) for s, v in sorted(by_status.items())},
        "ok_rows_per_s": len(ok) * rows / max(last - t0, window),
        "goodput_rows_per_s": sum(1000 * (r.t1 - r.t0) <= slo_ms for r in ok) * rows / window,
        "slo_ms": slo_ms, "send_lag_p99_ms": percentile(lags, 99), "max_open_requests": max_open,
        "drain_s": time.perf_counter() - sent_end, "unanswered": len(pending),
        **cpu.as_dict(len(recs)),
    }


async def send_on_schedule(times: np.ndarray, t0: float, one, drain_s: float) -> tuple[float, set]:
    """Start ``one(i, t0 + times[i])`` at each scheduled time (offsets in seconds from ``t0``),
    then wait at most ``drain_s`` for them; those still running are cancelled. Returns when the
    last one was started and the set of cancelled (unanswered) tasks."""
    tasks = []
    for i, at in enumerate(times):
        target = t0 + float(at)
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, target)))
    sent_end = time.perf_counter()
    _, pending = await asyncio.wait(tasks, timeout=drain_s) if tasks else (set(), set())
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return sent_end, pending


# --------------------------------------------------------------------------- pinning, inputs


@dataclass
class Pinning:
    server: str | None  # taskset cpu list for servers and the ceiling, None: not pinned
    client: set[int] | None
    cores: list[int] = field(default_factory=list)

    @classmethod
    def choose(cls, enabled: bool) -> Pinning:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if not enabled or len(cores) < 2 or not _which("taskset"):
            return cls(None, None, cores)
        return cls(str(cores[0]), {cores[1]}, cores)

    def prefix(self) -> list[str]:
        return ["taskset", "-c", self.server] if self.server is not None else []

    def describe(self) -> str:
        if self.server is None:
            return (f"not pinned ({len(self.cores)} usable core(s){'' if _which('taskset') else ', no taskset'}): "
                    "server and client share the cores")
        return f"server pinned with taskset to core {self.server}, load client to core {min(self.client)}"


def _which(cmd: str) -> bool:
    from shutil import which

    return which(cmd) is not None


@contextlib.contextmanager
def client_side(pin: Pinning):
    """This process as the load client: on its own core (when pinning) and allowed as many open
    files as the hard limit (beyond capacity: thousands of connections); both restored after."""
    affinity = sorted(os.sched_getaffinity(0)) if pin.client is not None else None
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if pin.client is not None:
            os.sched_setaffinity(0, pin.client)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (limits[1], limits[1]))
        yield
    finally:
        if affinity is not None:
            os.sched_setaffinity(0, affinity)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def load_inputs(n: int) -> np.ndarray:
    """``n`` MNIST test images [n, 1, 28, 28] float32 in [0, 1] (uniform noise when the data is absent)."""
    try:
        from detectors.datasets import load_idx_split

        x, _ = load_idx_split(MNIST_DIR, "t10k")
        return np.ascontiguousarray(x[:n])
    except (OSError, FileNotFoundError, ValueError):
        return np.random.default_rng(0).random((n, 1, 28, 28), dtype=np.float32)


def npy_bytes(a: np.ndarray) -> bytes:
    """``a`` as the bytes of an ``.npy`` file (no pickles): the body of a ``/predict`` request."""
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


V2_MODEL = "mnist_cnn"  # the served model card's name: the model of the v2 requests' URL


def v2_request(host: str, port: int, part: np.ndarray, model: str = V2_MODEL) -> bytes:
    """A raw Open Inference Protocol (KServe v2) request of ``part`` with the binary tensor data extension: the
    JSON inference header, then the float32 bytes; every output asked for in binary (as tritonclient does)."""
    head = json.dumps({"inputs": [{"name": "input", "shape": list(part.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": part.nbytes}}],
                       "parameters": {"binary_data_output": True}}, separators=(",", ":")).encode()
    body = head + np.ascontiguousarray(part, dtype="<f4").tobytes()
    raw = http_request(host, port, "POST", f"/v2/models/{model}/infer", body, "application/octet-stream")
    return raw.replace(b"\r\n\r\n", f"\r\nInference-Header-Content-Length: {len(head)}\r\n\r\n".encode(), 1)


def png_body(part: np.ndarray) -> tuple[bytes, str]:
    """Grey-scale rows [n, 1, H, W] in [0, 1] as images: one PNG body (one row) or a multipart body of PNG
    ``file`` fields (several), with its content type."""
    from PIL import Image

    pngs = []
    for row in part:
        buf = io.BytesIO()
        Image.fromarray(np.rint(row[0] * 255).astype(np.uint8)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    if len(pngs) == 1:
        return pngs[0], "image/png"
    boundary = "gga-load-boundary"
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.png"\r\n'
                    f"Content-Type: image/png\r\n\r\n".encode() + png + b"\r\n" for i, png in enumerate(pngs))
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def request_bodies(x: np.ndarray, rows: int, fmt: str, host: str, port: int, count: int = 256) -> list[bytes]:
    out = []
    for k in range(count):
        i = (k * rows) % (len(x) - rows + 1)
        part = x[i:i + rows]
        if fmt == "v2":
            out.append(v2_request(host, port, part))
            continue
        if fmt == "npy":
            body, ctype = npy_bytes(part), "application/x-npy"
        elif fmt == "png":
            body, ctype = png_body(part)
        else:
            body, ctype = json.dumps({"inputs": part.tolist()}).encode(), "application/json"
        out.append(http_request(host, port, "POST", "/predict", body, ctype))
    return out

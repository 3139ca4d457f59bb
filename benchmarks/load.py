"""Load benchmark of the real service: closed loop, open loop, in-process ceiling, LitServe.

    python -m benchmarks.load            # full run, about 7 minutes; writes benchmarks/results/load.{json,md}
    python -m benchmarks.load --quick    # a few seconds per point (smoke test); writes benchmarks/results/tmp/

One command, loopback only, bounded duration; every server it starts it also stops.

1. **In-process ceiling**: the served detector's ``score`` on batches of
   ``GGA_MAX_BATCH_ROWS`` rows (and of 1 row, for reference) in a process on the server's
   core with the same torch threads and the strategy the service chose at startup.
2. **Closed loop**: a fixed number of clients (1, 8, 64, 256), each sending its next request
   when the previous one is answered; rows/s and latency p50/p99.
3. **Open loop**: Poisson arrivals at 0.5x, 1x, 2x and 3x the closed-loop capacity
   measured just before for the same configuration and body format. Every request sent
   is counted by its answer (200, 503, 504, other, or unanswered when the drain limit is
   reached), with p50/p99 latency per status measured from its scheduled arrival (no
   coordinated omission), and goodput: rows answered 200 within ``--slo-ms`` per second
   of the arrival window.

Points 2 and 3 run for the service with its default settings (dynamic batching, up to
64 rows, no batching delay) and with batching off (``GGA_MAX_BATCH_ROWS=1``), each with
``.npy`` and JSON bodies of one MNIST test image per request (``--rows``).

4. **LitServe** (``pip install -e ".[bench]"``; skipped with a note when not installed):
   the same model and detector (the same loading code, strategy and response rows) in a
   small ``LitAPI`` that decodes the same ``.npy``/JSON bodies with the service's decoders,
   batching up to the same rows per batch with a ``--litserve-batch-timeout-ms`` timeout,
   under the same closed-loop load.

Where the machine has two or more cores, every server (and the ceiling) is pinned with
``taskset`` to one core and the load client to another, with one torch thread
(``GGA_TORCH_THREADS=1``). The client is one asyncio process speaking raw HTTP/1.1 over
keep-alive connections; its own overhead is measured against ``/healthz`` (requests/s,
latency and client CPU time per request), and its CPU use is recorded for every point.

Results: JSON (machine, date, command, git commit, settings, every point) and a
markdown table with the ratios against the targets of issue 8.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import io
import json
import math
import os
import platform
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"

# what the two modes measure; every value can be overridden on the command line
FULL = dict(clients=(1, 8, 64, 256), rates=(0.5, 1.0, 2.0, 3.0), warmup_s=1.5, closed_s=5.0, open_s=6.0,
            ceiling_s=4.0, health_s=2.0, drain_s=30.0, serial_reps=4, serial_s=2.0)
QUICK = dict(clients=(1, 8), rates=(2.0,), warmup_s=0.2, closed_s=0.6, open_s=0.8,
             ceiling_s=0.5, health_s=0.5, drain_s=10.0, serial_reps=1, serial_s=0.4)
TARGETS = {"saturation_vs_ceiling": 0.85, "serial_vs_batch1": 0.95, "serial_p50_delta_ms": 1.0,
           "batching_gain": 1.7}


# --------------------------------------------------------------------------- the HTTP client


class _Conn:
    """One HTTP/1.1 keep-alive connection over asyncio streams (no parsing beyond what is needed)."""

    __slots__ = ("r", "w", "closed")

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w, self.closed = r, w, False

    @classmethod
    async def open(cls, host: str, port: int) -> _Conn:
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
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    if ctype:
        head.append(f"Content-Type: {ctype}")
    if body or method == "POST":
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _send(pool: list[_Conn], host: str, port: int, raw: bytes) -> tuple[int, bytes, _Conn]:
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
        conn = await _Conn.open(host, port)
    try:
        status, body = await conn.request(raw)
    except (asyncio.IncompleteReadError, ConnectionError):
        conn.close()
        if not reused:
            raise
        conn = await _Conn.open(host, port)
        status, body = await conn.request(raw)
    return status, body, conn


@dataclass
class Record:
    t0: float  # sent (closed loop) or scheduled (open loop), perf_counter seconds
    t1: float  # answered
    status: int  # HTTP status; 0 = transport error, -1 = unanswered within the drain limit
    lag: float = 0.0  # open loop: how late the client sent it against its schedule


@contextlib.contextmanager
def _no_gc():
    """No cyclic garbage collection while a point runs: a full collection over thousands of
    connections and records pauses the client's event loop (late sends) for tens of ms."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _pct(values: list[float] | np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def _latency(recs: list[Record]) -> dict:
    lat = [1000 * (r.t1 - r.t0) for r in recs]
    return {"n": len(lat), "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99), "mean_ms": float(np.mean(lat)) if lat
            else None, "max_ms": max(lat) if lat else None}


_SERVER_CORES: list[int] | None = None  # the cores the servers are pinned to (None: all of them)


def cores_busy_s(cores: list[int] | None) -> float:
    """Busy CPU seconds (user, nice, system, irq, softirq, steal) of ``cores`` (None: all) since boot."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return 0.0
    want = {f"cpu{c}" for c in cores} if cores is not None else {"cpu"}
    ticks = 0
    for line in lines:
        f = line.split()
        if f and f[0] in want:
            ticks += sum(int(v) for v in f[1:4]) + sum(int(v) for v in f[6:9])
    return ticks / os.sysconf("SC_CLK_TCK")


class _CpuMeter:
    """CPU seconds over a window: this process (the client), a server's process tree, and
    everything else on the server's core(s) (other load: what the pinned server competed with)."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid

    def __enter__(self) -> _CpuMeter:
        self.w0, self.c0, self.s0 = time.perf_counter(), time.process_time(), tree_cpu_s(self.server_pid)
        self.b0 = cores_busy_s(_SERVER_CORES)
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.w0
        self.client_cpu_s = time.process_time() - self.c0
        self.server_cpu_s = tree_cpu_s(self.server_pid) - self.s0
        busy = cores_busy_s(_SERVER_CORES) - self.b0
        self.other_cpu_s = max(0.0, busy - self.server_cpu_s - (self.client_cpu_s if _SERVER_CORES is None else 0.0))

    def as_dict(self, requests: int) -> dict:
        return {"client_cpu_util": self.client_cpu_s / self.wall, "server_cpu_util": self.server_cpu_s / self.wall,
                "other_cpu_on_server_cores": self.other_cpu_s / self.wall,
                "client_cpu_us_per_request": 1e6 * self.client_cpu_s / requests if requests else None}


async def closed_loop(host: str, port: int, bodies: list[bytes], clients: int, warmup_s: float, duration_s: float,
                      rows: int, server_pid: int | None = None, keep_latencies: bool = False) -> dict:
    with _no_gc():
        return await _closed_loop(host, port, bodies, clients, warmup_s, duration_s, rows, server_pid, keep_latencies)


async def _closed_loop(host: str, port: int, bodies: list[bytes], clients: int, warmup_s: float, duration_s: float,
                       rows: int, server_pid: int | None, keep_latencies: bool) -> dict:
    """``clients`` connections, each sending its next request as soon as its previous one is
    answered, for ``warmup_s + duration_s``. Throughput: answers received inside the window
    [warm-up end, end]; latency: requests sent inside it (each awaited to its answer)."""
    conns = [await _Conn.open(host, port) for _ in range(clients)]
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
                    conns[k] = await _Conn.open(host, port)
                status, _ = await conns[k].request(bodies[i % len(bodies)])
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
                status = 0
                conns[k].close()
            recs.append(Record(t0, time.perf_counter(), status))
            i += clients

    tasks = [asyncio.create_task(client(k)) for k in range(clients)]
    await asyncio.sleep(max(0.0, t_start - time.perf_counter()))
    with _CpuMeter(server_pid) as cpu:
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
        **{k: v for k, v in _latency([r for r in sent if r.status == 200]).items() if k != "n"},
        **cpu.as_dict(len(answered)),
    }


async def open_loop(host: str, port: int, bodies: list[bytes], rate: float, duration_s: float, rows: int,
                    drain_s: float, slo_ms: float, seed: int, server_pid: int | None = None,
                    preopen: int = 64) -> dict:
    with _no_gc():
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
    pool = [await _Conn.open(host, port) for _ in range(min(preopen, len(times)))]
    recs: list[Record] = []
    max_open = 0
    in_flight = 0

    async def one(i: int, at: float) -> None:
        nonlocal in_flight, max_open
        in_flight += 1
        max_open = max(max_open, in_flight)
        lag = time.perf_counter() - at
        try:
            status, _, conn = await _send(pool, host, port, bodies[i % len(bodies)])
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
    with _CpuMeter(server_pid) as cpu:
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
        "latency_by_status": {s: _latency(v) for s, v in sorted(by_status.items())},
        "ok_rows_per_s": len(ok) * rows / max(last - t0, window),
        "goodput_rows_per_s": sum(1000 * (r.t1 - r.t0) <= slo_ms for r in ok) * rows / window,
        "slo_ms": slo_ms, "send_lag_p99_ms": _pct(lags, 99), "max_open_requests": max_open,
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


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo, else platform.processor())."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_cpu_ticks(pid: int) -> tuple[int, int] | None:
    """(ppid, utime + stime) from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            rest = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return int(rest[1]), int(rest[11]) + int(rest[12])


def tree_cpu_s(root: int | None) -> float:
    """CPU seconds (user + system) of process ``root`` and its descendants alive now (0 without /proc)."""
    if root is None or not os.path.isdir("/proc"):
        return 0.0
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _proc_cpu_ticks(int(name))
            if st is not None:
                stats[int(name)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo.extend(children.get(pid, []))
    return total / os.sysconf("SC_CLK_TCK")


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


class Server:
    """A server process started in its own session (stopped with its whole process group)."""

    def __init__(self, cmd: list[str], env: dict[str, str], port: int, ready_path: str, log: Path,
                 timeout: float = 180.0) -> None:
        self.port, self.log = port, log
        self._logf = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self._logf, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.get(ready_path)[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{cmd[-1]} exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{cmd[-1]} not ready within {timeout} s:\n{self.tail()}")
            time.sleep(0.25)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def get(self, path: str) -> tuple[int, bytes]:
        async def go():
            c = await _Conn.open("127.0.0.1", self.port)
            try:
                return await c.request(http_request("127.0.0.1", self.port, "GET", path))
            finally:
                c.close()
        return asyncio.run(go())

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self._logf.closed:  # stopped already
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # leftovers of the group (LitServe workers)
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._logf.close()


def _metric_values(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value.split()[0])
    return out


# --------------------------------------------------------------------------- served detector (ceiling, LitServe)


def served_detector(threads: int, strategy: dict | None):
    """The detector the service serves by default (the same loading code), with ``strategy``
    (the table the service measured at startup, from /info) or the service's own measurement."""
    import torch

    from detectors.autotune import StrategyTable
    from detectors.fingerprint import model_fingerprint
    from detectors.persist import load_detector
    from service.app import ServedStrategy, resolve_device
    from service.models import load_model
    from service.settings import DEFAULT_MODEL_DIR, Settings

    torch.set_num_threads(threads)
    settings = Settings()
    device = resolve_device(settings.model.device)
    model, card = load_model(settings, device)
    detector = load_detector(DEFAULT_MODEL_DIR / "detector", model)
    if strategy and strategy.get("table"):
        detector.strategy = StrategyTable.from_dict(strategy)
    else:
        ServedStrategy(settings.model.strategy, model, model_fingerprint(model), card.input_shape,
                       len(card.class_names), device, settings.batching.max_batch_rows).apply(detector)
    return detector, card, device, settings


def _ceiling_main() -> None:
    """Entry of the ceiling subprocess: JSON arguments on argv[1], one JSON line on stdout."""
    import torch

    args = json.loads(sys.argv[1])
    detector, card, device, _ = served_detector(args["threads"], args["strategy"])
    x = torch.from_numpy(load_inputs(args["n_inputs"])).to(device)
    out = {"threads": torch.get_num_threads(), "strategy": str(getattr(detector.strategy, "best", detector.strategy)),
           "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None, "batches": {}}
    for batch in args["batches"]:
        detector.score(x[:batch])  # warm
        n = rows = 0
        t0 = time.perf_counter()
        while True:
            start = (n * batch) % max(1, len(x) - batch)
            detector.score(x[start:start + batch])
            n += 1
            rows += batch
            wall = time.perf_counter() - t0
            if wall >= args["seconds"] and n >= 2:
                break
        out["batches"][str(batch)] = {"rows_per_s": rows / wall, "ms_per_batch": 1000 * wall / n, "batches": n}
    print(json.dumps(out), flush=True)


def run_ceiling(pin: Pinning, env: dict[str, str], threads: int, strategy: dict | None, batches: list[int],
                seconds: float, n_inputs: int) -> dict:
    arg = json.dumps({"threads": threads, "strategy": strategy, "batches": batches, "seconds": seconds,
                      "n_inputs": n_inputs})
    cmd = [*pin.prefix(), sys.executable, "-c", "from benchmarks.load import _ceiling_main; _ceiling_main()", arg]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"the ceiling measurement failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


try:  # LitServe is a benchmark-only extra (pip install -e ".[bench]")
    import litserve as _ls
except ImportError:  # pragma: no cover - depends on the environment
    _ls = None


async def _raw_body(request) -> tuple[str, bytes]:
    """FastAPI dependency of the LitServe endpoint: (media type, raw body), decoded in the worker."""
    return (request.headers.get("content-type") or "").split(";")[0].strip().lower(), await request.body()


if _ls is not None:
    from fastapi import Depends, Request

    _raw_body.__annotations__["request"] = Request

    class GGALitAPI(_ls.LitAPI):
        """The served detector behind LitServe: the service's decoders, ``detector.score`` on the
        batch, the service's response rows."""

        def __init__(self, threads: int, strategy: dict | None, **kwargs) -> None:
            super().__init__(**kwargs)
            self.threads, self.strategy_dict = threads, strategy

        def setup(self, device) -> None:
            import torch
            from prometheus_client import CollectorRegistry

            from service.artifacts import BUNDLED_VERSION
            from service.metrics import ServiceMetrics
            from service.worker import DetectorSlot, PredictWorker

            self.detector, self.card, self.device, settings = served_detector(self.threads, self.strategy_dict)
            self.version = BUNDLED_VERSION
            self.alpha = settings.model.alpha if settings.model.alpha is not None else self.detector.alpha
            self.rows_of = PredictWorker(DetectorSlot(self.detector, self.version), self.card,
                                         ServiceMetrics(CollectorRegistry()), self.device, settings.model.alpha)._rows
            self.detector.score(torch.zeros((1, *self.card.input_shape), device=self.device))

        def decode_request(self, request, **kwargs):
            from service.decode import decode_json_inputs, decode_npy, parse_json_body

            ctype, body = request
            if ctype == "application/json":
                return decode_json_inputs(parse_json_body(body), self.card.input_shape)
            return decode_npy(body, self.card.input_shape)

        def batch(self, inputs):
            return inputs

        def predict(self, xs):
            import torch

            out = self.detector.score(torch.from_numpy(np.concatenate(xs)).to(self.device))
            rows = self.rows_of(out, self.version, self.alpha)
            parts, start = [], 0
            for x in xs:
                parts.append(rows[start:start + len(x)])
                start += len(x)
            return parts

        def unbatch(self, output):
            return output

        def encode_response(self, output, **kwargs):
            return {"model": self.card.name, "alpha": self.alpha, "predictions": output}

    # LitServe builds its endpoint from this annotation: the raw body, not request.json()
    GGALitAPI.decode_request.__annotations__["request"] = Annotated[tuple, Depends(_raw_body)]


def _litserve_main() -> None:
    """Entry of the LitServe server process: JSON arguments on argv[1]."""
    args = json.loads(sys.argv[1])
    api = GGALitAPI(args["threads"], args["strategy"], max_batch_size=args["max_batch_size"],
                    batch_timeout=args["batch_timeout_s"])
    server = _ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=args["timeout_s"],
                           fast_queue=args["fast_queue"])
    server.run(host="127.0.0.1", port=args["port"], num_api_servers=1, generate_client_file=False,
               log_level="warning")


# --------------------------------------------------------------------------- inputs


def load_inputs(n: int) -> np.ndarray:
    """``n`` MNIST test images [n, 1, 28, 28] float32 in [0, 1] (uniform noise when the data is absent)."""
    try:
        from detectors.datasets import load_idx_split

        x, _ = load_idx_split(MNIST_DIR, "t10k")
        return np.ascontiguousarray(x[:n])
    except (OSError, FileNotFoundError, ValueError):
        return np.random.default_rng(0).random((n, 1, 28, 28), dtype=np.float32)


def request_bodies(x: np.ndarray, rows: int, fmt: str, host: str, port: int, count: int = 256) -> list[bytes]:
    out = []
    for k in range(count):
        i = (k * rows) % (len(x) - rows + 1)
        part = x[i:i + rows]
        if fmt == "npy":
            buf = io.BytesIO()
            np.save(buf, part, allow_pickle=False)
            body, ctype = buf.getvalue(), "application/x-npy"
        else:
            body, ctype = json.dumps({"inputs": part.tolist()}).encode(), "application/json"
        out.append(http_request(host, port, "POST", "/predict", body, ctype))
    return out


# --------------------------------------------------------------------------- the run


def _git() -> dict:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    changed = [ln[3:] for ln in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(changed), "changed_files": changed}


def _machine(pin: Pinning) -> dict:
    import fastapi
    import torch
    import uvicorn

    cpu = cpu_model()

    def has(mod: str) -> bool:
        import importlib.util

        return importlib.util.find_spec(mod) is not None

    return {
        "host": platform.node(), "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "usable_cores": pin.cores, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__,
        "litserve": getattr(_ls, "__version__", None),
        "uvicorn_loop_http": f"{'uvloop' if has('uvloop') else 'asyncio'}/{'httptools' if has('httptools') else 'h11'}",
        "loadavg_start": os.getloadavg(),
    }


_T0 = time.perf_counter()


def _print(msg: str) -> None:
    print(f"{time.perf_counter() - _T0:6.1f} s {msg}", file=sys.stderr, flush=True)


def _statuses(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


def _fmt(v, nd: int = 0) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def start_service(label: str, env_over: dict[str, str], pin: Pinning, base_env: dict[str, str], tmp: Path,
                  result: dict) -> tuple[Server, dict, dict[str, str]]:
    """``gga-serve`` (pinned) with ``env_over`` on top of the shared settings; its entry in ``result``."""
    port = free_port()
    env = dict(base_env, GGA_HOST="127.0.0.1", GGA_PORT=str(port), **env_over)
    _print(f"[{label}] starting gga-serve ({' '.join(f'{k}={v}' for k, v in env_over.items()) or 'defaults'})")
    t = time.perf_counter()
    srv = Server([*pin.prefix(), sys.executable, "-m", "service.cli"], env, port, "/readyz", tmp / f"{label}.log")
    info = json.loads(srv.get("/info")[1])
    cfg = {"env": env_over, "port": port, "startup_s": time.perf_counter() - t, "batching": info["batching"],
           "strategy": info.get("strategy"), "detector": (info.get("detector") or {}).get("kind"),
           "detector_version": info.get("detector_version"), "closed": {}, "open": {}}
    result["configs"][label] = cfg
    return srv, cfg, env


def measure_ceiling(args, pin: Pinning, env: dict[str, str], cfg: dict, n_inputs: int, result: dict) -> None:
    """One more run of the in-process ceiling; ``result["ceiling"]["batches"]`` is the mean over the runs."""
    mbr = cfg["batching"]["max_batch_rows"]
    _print(f"in-process ceiling ({args.ceiling_s:.0f} s per batch size)")
    run = run_ceiling(pin, env, args.threads, cfg.get("strategy"), sorted({1, mbr}), args.ceiling_s, n_inputs)
    ceil = result.setdefault("ceiling", {"max_batch_rows": mbr, "runs": []})
    ceil["runs"].append(run)
    ceil["threads"], ceil["strategy"], ceil["affinity"] = run["threads"], run["strategy"], run["affinity"]
    ceil["batches"] = {b: {k: float(np.mean([r["batches"][b][k] for r in ceil["runs"]]))
                           for k in ("rows_per_s", "ms_per_batch")} for b in run["batches"]}
    _print("in-process ceiling: " + ", ".join(f"batch {b}: {r['rows_per_s']:.1f} rows/s"
                                               for b, r in run["batches"].items()))


def measure_health(args, srv: Server, result: dict) -> None:
    health = http_request("127.0.0.1", srv.port, "GET", "/healthz")
    result["client_overhead"] = {}
    for c in sorted({1, max(args.clients)}):
        r = asyncio.run(closed_loop("127.0.0.1", srv.port, [health], c, args.warmup_s, args.health_s, 1, srv.pid))
        result["client_overhead"][str(c)] = r
        _print(f"/healthz c={c}: {r['requests_per_s']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, "
               f"client {r['client_cpu_us_per_request']:.0f} us CPU/request")


def measure_serial(args, servers: dict[str, Server], x: np.ndarray, result: dict) -> None:
    """One serial client, alternating between the configurations in short slices (ABBA...),
    so that drift on a shared machine hits both alike; pooled over the slices."""
    out = result["serial"] = {"reps": args.serial_reps, "slice_s": args.serial_s, "formats": {}}
    labels = list(servers)
    for fmt in args.formats:
        bodies = {lab: request_bodies(x, args.rows, fmt, "127.0.0.1", srv.port) for lab, srv in servers.items()}
        acc = {lab: {"ok": 0, "seconds": 0.0, "lat": [], "per_slice": [], "other": []} for lab in labels}
        for rep in range(args.serial_reps):
            for lab in (labels if rep % 2 == 0 else labels[::-1]):
                srv = servers[lab]
                r = asyncio.run(closed_loop("127.0.0.1", srv.port, bodies[lab], 1, args.warmup_s / 3, args.serial_s,
                                            args.rows, srv.pid, keep_latencies=True))
                a = acc[lab]
                a["ok"] += r["requests_per_s"] * args.serial_s
                a["seconds"] += args.serial_s
                a["lat"] += r.pop("latencies_ms")
                a["per_slice"].append(r["rows_per_s"])
                a["other"].append(r["other_cpu_on_server_cores"])
        res = {}
        for lab, a in acc.items():
            res[lab] = {"rows_per_s": a["ok"] * args.rows / a["seconds"], "p50_ms": _pct(a["lat"], 50),
                        "p99_ms": _pct(a["lat"], 99), "requests": len(a["lat"]),
                        "rows_per_s_per_slice": a["per_slice"], "other_cpu_on_server_cores_max": max(a["other"])}
        out["formats"][fmt] = res
        _print(f"serial {fmt}: " + "; ".join(f"{lab} {r['rows_per_s']:.1f} rows/s, p50 {_fmt(r['p50_ms'], 2)} ms"
                                             for lab, r in res.items()))


def sweep_service(label: str, args, srv: Server, cfg: dict, x: np.ndarray, loops: str) -> None:
    """The closed-loop sweep (``loops="closed"``) or the open-loop sweep (``"open"``, after the closed one)."""
    port = srv.port
    if loops == "closed":
        for fmt in args.formats:
            bodies = request_bodies(x, args.rows, fmt, "127.0.0.1", port)
            asyncio.run(closed_loop("127.0.0.1", port, bodies, 8, 0.0, args.warmup_s, args.rows))  # warm
            for c in args.clients:
                m0 = _metric_values(srv.get("/metrics")[1].decode())
                r = asyncio.run(closed_loop("127.0.0.1", port, bodies, c, args.warmup_s, args.closed_s, args.rows,
                                            srv.pid))
                m1 = _metric_values(srv.get("/metrics")[1].decode())
                nb = m1.get("gga_batch_rows_count", 0) - m0.get("gga_batch_rows_count", 0)
                r["mean_batch_rows"] = (m1.get("gga_batch_rows_sum", 0) - m0.get("gga_batch_rows_sum", 0)) / nb \
                    if nb else None
                cfg["closed"].setdefault(fmt, {})[str(c)] = r
                _print(f"[{label}] closed {fmt} c={c}: {r['rows_per_s']:.1f} rows/s, p50 {_fmt(r['p50_ms'], 1)} ms, "
                       f"p99 {_fmt(r['p99_ms'], 1)} ms, batch {_fmt(r['mean_batch_rows'], 1)}, "
                       f"server CPU {r['server_cpu_util']:.0%}, other {r['other_cpu_on_server_cores']:.0%}, "
                       f"client CPU {r['client_cpu_util']:.0%}")
        return
    for fmt in args.formats if args.rates else ():
        bodies = request_bodies(x, args.rows, fmt, "127.0.0.1", port)
        capacity = max(r["requests_per_s"] for r in cfg["closed"][fmt].values())
        cfg.setdefault("capacity_requests_per_s", {})[fmt] = capacity
        for k, mult in enumerate(args.rates):
            r = asyncio.run(open_loop("127.0.0.1", port, bodies, mult * capacity, args.open_s, args.rows,
                                      args.drain_s, args.slo_ms, seed=1000 + k, server_pid=srv.pid))
            r["multiple"] = mult
            cfg["open"].setdefault(fmt, []).append(r)
            lat = r["latency_by_status"].get("200", {})
            _print(f"[{label}] open {fmt} {mult}x ({r['rate_per_s']:.0f}/s): {r['statuses']}, "
                   f"ok {r['ok_rows_per_s']:.0f} rows/s, goodput {r['goodput_rows_per_s']:.0f}, "
                   f"p50 {_fmt(lat.get('p50_ms'), 0)} p99 {_fmt(lat.get('p99_ms'), 0)} ms, "
                   f"drain {r['drain_s']:.1f} s, lag p99 {r['send_lag_p99_ms']:.1f} ms, "
                   f"other {r['other_cpu_on_server_cores']:.0%}")
            _wait_idle(srv, args.drain_s)


def _wait_idle(srv: Server, limit: float) -> None:
    """Until the service has no queued rows (after an open-loop point with unanswered requests)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if _metric_values(srv.get("/metrics")[1].decode()).get("gga_queue_rows", 0) == 0:
            return
        time.sleep(0.2)


def measure_litserve(args, pin: Pinning, base_env: dict[str, str], x: np.ndarray, tmp: Path, result: dict) -> None:
    if _ls is None:
        result["litserve"] = {"skipped": "litserve is not installed (pip install -e \".[bench]\")"}
        _print("[litserve] skipped: not installed")
        return
    port = free_port()
    strategy = result["configs"].get("default", {}).get("strategy")
    arg = json.dumps({"threads": args.threads, "strategy": strategy, "max_batch_size": args.max_batch_rows,
                      "batch_timeout_s": args.litserve_batch_timeout_ms / 1000.0, "timeout_s": 30,
                      "fast_queue": args.litserve_fast_queue, "port": port})
    cmd = [*pin.prefix(), sys.executable, "-c", "from benchmarks.load import _litserve_main; _litserve_main()", arg]
    _print(f"[litserve] starting LitServe {_ls.__version__} (max_batch_size {args.max_batch_rows}, batch_timeout "
           f"{args.litserve_batch_timeout_ms} ms, fast_queue {args.litserve_fast_queue})")
    t = time.perf_counter()
    srv = Server(cmd, dict(base_env), port, "/health", tmp / "litserve.log")
    out = {"version": _ls.__version__, "port": port, "startup_s": time.perf_counter() - t,
           "max_batch_size": args.max_batch_rows,
           "batch_timeout_ms": args.litserve_batch_timeout_ms, "fast_queue": args.litserve_fast_queue,
           "workers": 1, "api_servers": 1, "closed": {}}
    result["litserve"] = out
    try:
        for fmt in args.formats:
            bodies = request_bodies(x, args.rows, fmt, "127.0.0.1", port)
            asyncio.run(closed_loop("127.0.0.1", port, bodies, 8, 0.0, args.warmup_s, args.rows))  # warm
            for c in args.clients:
                r = asyncio.run(closed_loop("127.0.0.1", port, bodies, c, args.warmup_s, args.closed_s, args.rows,
                                            srv.pid))
                out["closed"].setdefault(fmt, {})[str(c)] = r
                _print(f"[litserve] closed {fmt} c={c}: {r['rows_per_s']:.1f} rows/s, p50 {_fmt(r['p50_ms'], 1)} ms, "
                       f"p99 {_fmt(r['p99_ms'], 1)} ms, statuses {r['statuses']}, server CPU "
                       f"{r['server_cpu_util']:.0%}, other {r['other_cpu_on_server_cores']:.0%}")
    finally:
        srv.stop()


# --------------------------------------------------------------------------- targets and report


def _sat(closed: dict, fmt: str) -> tuple[float, str] | None:
    pts = closed.get(fmt, {})
    if not pts:
        return None
    c = max(pts, key=lambda k: pts[k]["rows_per_s"])
    return pts[c]["rows_per_s"], c


def _p99_lower(ours: dict, theirs: dict) -> bool:
    return ours["p99_ms"] is not None and (theirs["p99_ms"] is None or ours["p99_ms"] < theirs["p99_ms"])


def targets(result: dict, formats: list[str]) -> list[dict]:
    out = []
    cfgs = result["configs"]
    d, b1 = cfgs.get("default", {}).get("closed", {}), cfgs.get("batch1", {}).get("closed", {})
    ceiling = result.get("ceiling", {}).get("batches", {}).get(str(result.get("ceiling", {}).get("max_batch_rows")))
    lit = result.get("litserve", {}).get("closed", {})
    for fmt in formats:
        sat = _sat(d, fmt)
        if sat and ceiling:
            v = sat[0] / ceiling["rows_per_s"]
            out.append({"target": "service at saturation >= 85% of the in-process ceiling", "format": fmt,
                        "measured": f"{v:.0%} ({sat[0]:.0f} of {ceiling['rows_per_s']:.0f} rows/s, {sat[1]} clients)",
                        "value": v, "met": v >= TARGETS["saturation_vs_ceiling"]})
        serial = result.get("serial", {}).get("formats", {}).get(fmt, {})
        if "default" in serial and "batch1" in serial:  # the alternating comparison
            a, b = serial["default"], serial["batch1"]
        elif "1" in d.get(fmt, {}) and "1" in b1.get(fmt, {}):
            a, b = d[fmt]["1"], b1[fmt]["1"]
        else:
            a = b = None
        if a and b:
            v = a["rows_per_s"] / b["rows_per_s"]
            out.append({"target": "one serial client >= 0.95x batch-1 serving", "format": fmt,
                        "measured": f"{v:.3f}x ({a['rows_per_s']:.1f} vs {b['rows_per_s']:.1f} rows/s)", "value": v,
                        "met": v >= TARGETS["serial_vs_batch1"]})
            if a["p50_ms"] is not None and b["p50_ms"] is not None:
                dv = a["p50_ms"] - b["p50_ms"]
                out.append({"target": "one serial client: p50 within 1 ms of batch-1 serving", "format": fmt,
                            "measured": f"{dv:+.2f} ms ({a['p50_ms']:.2f} vs {b['p50_ms']:.2f} ms)", "value": dv,
                            "met": dv <= TARGETS["serial_p50_delta_ms"]})
        sat1 = _sat(b1, fmt)
        if sat and sat1:
            v = sat[0] / sat1[0]
            out.append({"target": "batching at saturation >= 1.7x batch-1 serving", "format": fmt,
                        "measured": f"{v:.2f}x ({sat[0]:.0f} vs {sat1[0]:.0f} rows/s)", "value": v,
                        "met": v >= TARGETS["batching_gain"]})
        lsat = _sat(lit, fmt)
        if result.get("litserve", {}).get("skipped"):
            out.append({"target": "throughput >= LitServe's, with a lower p99", "format": fmt,
                        "measured": f"not measured: {result['litserve']['skipped']}", "value": None, "met": None})
        elif lsat and sat:
            v = sat[0] / lsat[0] if lsat[0] else math.inf
            common = sorted((c for c in lit[fmt] if c in d[fmt]), key=int)
            worse = [c for c in common if not _p99_lower(d[fmt][c], lit[fmt][c])]
            p99s = "; ".join(f"{c}: {_fmt(d[fmt][c]['p99_ms'], 0)} vs {_fmt(lit[fmt][c]['p99_ms'], 0)}" for c in common)
            out.append({"target": "throughput >= LitServe's, with a lower p99", "format": fmt,
                        "measured": f"{v:.2f}x at saturation ({sat[0]:.0f} rows/s at {sat[1]} clients vs "
                                    f"{lsat[0]:.0f} at {lsat[1]}); p99 ms by clients, service vs LitServe: {p99s}"
                                    + (f" (not lower at {', '.join(worse)} clients)" if worse else ""),
                        "value": v, "met": v >= 1.0 and not worse})
    return out


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    g = result["git"]
    dirty = f" (working tree with uncommitted changes: {', '.join(g['changed_files'])})" if g["dirty"] else ""
    L = [f"# Load benchmark ({'quick' if s['quick'] else 'full'} mode)", "",
         f"- Date: {result['date']}; command: `{result['command']}`; commit `{g['commit'][:12]}`{dirty}",
         f"- Machine: {m['cpu']}, {m['cpu_count']} cores; torch {m['torch']}, uvicorn {m['uvicorn']} "
         f"({m['uvicorn_loop_http']}), fastapi {m['fastapi']}, LitServe {m['litserve'] or 'not installed'}",
         f"- Pinning: {s['pinning']}; {s['threads']} torch thread(s) (GGA_TORCH_THREADS)",
         f"- Load average at start / end: {', '.join(f'{v:.2f}' for v in m['loadavg_start'])} / "
         f"{', '.join(f'{v:.2f}' for v in m['loadavg_end'])}" + (f". **{s['note']}**" if s.get("note") else ""),
         f"- Requests: {s['rows']} MNIST test image(s) per request, bodies {', '.join(s['formats'])}; service "
         "settings are the defaults except GGA_TORCH_THREADS, GGA_LOG_LEVEL=warning (no access log) and a fresh "
         "GGA_ARTIFACT_DIR (the bundled detector)"
         + (f", GGA_STRATEGY={s['strategy']}" if s["strategy"] != "service default" else "")
         + "; `batch1` adds GGA_MAX_BATCH_ROWS=1",
         f"- Durations: closed loop {s['warmup_s']} s warm-up + {s['closed_s']} s per point; open loop "
         f"{s['open_s']} s of arrivals + up to {s['drain_s']} s drain per point; goodput = rows answered 200 "
         f"within {s['slo_ms']:.0f} ms per second of arrivals",
         "- Server CPU: CPU time of the server's process tree per second of the point (100% = one core busy); "
         "other load on its core: busy time of the server's core(s) not spent by the server (other processes "
         "of a shared machine; the comparison is clean where it is near 0%)", ""]
    ceil = result.get("ceiling")
    if ceil:
        runs = ceil["runs"]
        L += ["## In-process ceiling (`detector.score`, same core and threads, the service's strategy)", "",
              f"Strategy {ceil['strategy']}; {len(runs)} run(s) of {s['ceiling_s']} s per batch size (before the "
              "load and right after the default service's closed-loop sweep); the mean is the ceiling.", "",
              "| batch rows | rows/s (mean) | ms per batch | rows/s per run |", "|---|---|---|---|"]
        for b, r in ceil["batches"].items():
            per = ", ".join(f"{run['batches'][b]['rows_per_s']:.1f}" for run in runs)
            L.append(f"| {b} | {r['rows_per_s']:.1f} | {r['ms_per_batch']:.1f} | {per} |")
        L.append("")
    co = result.get("client_overhead")
    if co:
        L += ["## Load client overhead (`GET /healthz` on the default service)", "",
              "| clients | requests/s | p50 ms | p99 ms | client CPU µs/request | client CPU | server CPU | "
              "other load on its core |", "|---|---|---|---|---|---|---|---|"]
        for c, r in co.items():
            L.append(f"| {c} | {r['requests_per_s']:,.0f} | {_fmt(r['p50_ms'], 2)} | {_fmt(r['p99_ms'], 2)} | "
                     f"{_fmt(r['client_cpu_us_per_request'], 0)} | {r['client_cpu_util']:.0%} | "
                     f"{r['server_cpu_util']:.0%} | {r['other_cpu_on_server_cores']:.0%} |")
        L.append("")
    serial = result.get("serial")
    if serial:
        L += ["## One serial client, default vs batch-1 (alternating slices)", "",
              f"{serial['reps']} alternations (ABBA order) of {serial['slice_s']} s per configuration and body, "
              "pooled.", "", "| body | server | rows/s | p50 ms | p99 ms | requests | rows/s per slice | other load "
              "on its core (max) |", "|---|---|---|---|---|---|---|---|"]
        for fmt, res in serial["formats"].items():
            for lab, r in res.items():
                per = ", ".join(f"{v:.0f}" for v in r["rows_per_s_per_slice"])
                L.append(f"| {fmt} | {lab} | {r['rows_per_s']:.1f} | {_fmt(r['p50_ms'], 2)} | {_fmt(r['p99_ms'], 2)} "
                         f"| {r['requests']} | {per} | {r['other_cpu_on_server_cores_max']:.0%} |")
        L.append("")
    L += ["## Closed loop (fixed concurrency)", "",
          "| server | body | clients | rows/s | p50 ms | p99 ms | mean batch rows | server CPU | other load on its "
          "core | client CPU | statuses |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = [(lab, cfg["closed"]) for lab, cfg in result["configs"].items()]
    if result.get("litserve", {}).get("closed"):
        rows.append(("litserve", result["litserve"]["closed"]))
    for lab, closed in rows:
        for fmt, pts in closed.items():
            for c, r in pts.items():
                L.append(f"| {lab} | {fmt} | {c} | {r['rows_per_s']:.1f} | {_fmt(r['p50_ms'], 1)} | "
                         f"{_fmt(r['p99_ms'], 1)} | {_fmt(r.get('mean_batch_rows'), 1)} | {r['server_cpu_util']:.0%} "
                         f"| {r['other_cpu_on_server_cores']:.0%} | {r['client_cpu_util']:.0%} | "
                         f"{_statuses(r['statuses'])} |")
    L.append("")
    if any(cfg["open"] for cfg in result["configs"].values()):
        L += ["## Open loop (Poisson arrivals; latency from the scheduled arrival)", "",
              "| server | body | × capacity | offered req/s | sent | 200 | 503 | 504 | other | unanswered | "
              "200 rows/s | goodput rows/s | p50 / p99 ms (200) | p50 / p99 ms (503) | p50 / p99 ms (504) | "
              "client lag p99 ms | server CPU | other load on its core |", "|" + "---|" * 18]
        for lab, cfg in result["configs"].items():
            for fmt, pts in cfg["open"].items():
                for r in pts:
                    st, lat = r["statuses"], r["latency_by_status"]
                    other = sum(v for k, v in st.items() if k not in ("200", "503", "504", "-1"))

                    def pp(code: str, lat=lat) -> str:
                        v = lat.get(code)
                        return f"{_fmt(v['p50_ms'], 0)} / {_fmt(v['p99_ms'], 0)}" if v else "–"
                    L.append(f"| {lab} | {fmt} | {r['multiple']} | {r['rate_per_s']:.0f} | {r['sent']} | "
                             f"{st.get('200', 0)} | {st.get('503', 0)} | {st.get('504', 0)} | {other} | "
                             f"{st.get('-1', 0)} | {r['ok_rows_per_s']:.0f} | {r['goodput_rows_per_s']:.0f} | "
                             f"{pp('200')} | {pp('503')} | {pp('504')} | {_fmt(r['send_lag_p99_ms'], 1)} | "
                             f"{r['server_cpu_util']:.0%} | {r['other_cpu_on_server_cores']:.0%} |")
        L.append("")
    lit = result.get("litserve", {})
    if lit.get("skipped"):
        L += [f"LitServe: skipped ({lit['skipped']}).", ""]
    elif lit:
        L += [f"LitServe {lit['version']}: one API server process and one inference worker, max_batch_size "
              f"{lit['max_batch_size']}, batch_timeout {lit['batch_timeout_ms']} ms, fast_queue "
              f"{lit['fast_queue']}; the LitAPI decodes with the service's decoders, calls the same detector's "
              "`score` and returns the service's response rows.", ""]
    L += ["## Targets (issue 8)", "", "| target | body | measured | met |", "|---|---|---|---|"]
    for t in result["targets"]:
        met = "–" if t["met"] is None else "yes" if t["met"] else "**no**"
        L.append(f"| {t['target']} | {t['format']} | {t['measured']} | {met} |")
    L.append("")
    return "\n".join(L)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few seconds per point (smoke test)")
    p.add_argument("--out-dir", type=Path, help="where load.json and load.md go (default benchmarks/results, "
                   "benchmarks/results/tmp with --quick)")
    ints = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    floats = lambda s: tuple(float(v) for v in s.split(",") if v)  # noqa: E731
    strs = lambda s: tuple(v for v in s.split(",") if v)  # noqa: E731
    p.add_argument("--clients", type=ints, help="closed-loop concurrencies (full: 1,8,64,256; quick: 1,8)")
    p.add_argument("--rates", type=floats, help="open-loop rates as multiples of the closed-loop capacity "
                   "(full: 0.5,1,2,3; quick: 2; empty: no open loop)")
    p.add_argument("--formats", type=strs, default=("npy", "json"), help="request bodies: npy,json")
    p.add_argument("--configs", type=strs, default=("default", "batch1"),
                   help="service configurations: default (its settings) and batch1 (GGA_MAX_BATCH_ROWS=1)")
    p.add_argument("--rows", type=int, default=1, help="rows (images) per request")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every server (GGA_TORCH_THREADS)")
    p.add_argument("--max-batch-rows", type=int, default=64,
                   help="the default service's GGA_MAX_BATCH_ROWS (its default: 64), also LitServe's max_batch_size")
    for name in ("warmup_s", "closed_s", "open_s", "ceiling_s", "health_s", "drain_s", "serial_s"):
        p.add_argument("--" + name.replace("_", "-"), type=float)
    p.add_argument("--serial-reps", type=int, help="alternations of the one-serial-client comparison")
    p.add_argument("--slo-ms", type=float, default=1000.0, help="latency bound of goodput")
    p.add_argument("--strategy", help="GGA_STRATEGY of every server (default: the service's default, auto, which "
                   "measures at startup; quick mode: device, no measurement)")
    p.add_argument("--no-litserve", action="store_true")
    p.add_argument("--litserve-batch-timeout-ms", type=float, default=5.0,
                   help="LitServe batch_timeout (0 makes its worker poll the queue without sleeping)")
    p.add_argument("--litserve-fast-queue", action="store_true", help="LitServe fast_queue (ZeroMQ)")
    p.add_argument("--no-pin", action="store_true", help="do not pin server and client to separate cores")
    p.add_argument("--note", default="", help="free text recorded with the results (e.g. other load)")
    args = p.parse_args(argv)
    mode = QUICK if args.quick else FULL
    for k, v in mode.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out_dir is None:
        args.out_dir = RESULTS / "tmp" if args.quick else RESULTS
    if args.strategy is None and args.quick:
        args.strategy = "device"
    for fmt in args.formats:
        if fmt not in ("npy", "json"):
            p.error(f"unknown format {fmt!r}")
    for c in args.configs:
        if c not in ("default", "batch1"):
            p.error(f"unknown config {c!r}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cmd = "python -m benchmarks.load" + ("" if argv is None and len(sys.argv) <= 1 else " " + shlex.join(
        argv if argv is not None else sys.argv[1:]))
    global _SERVER_CORES
    pin = Pinning.choose(not args.no_pin)
    _SERVER_CORES = [int(c) for c in pin.server.split(",")] if pin.server is not None else None
    with client_side(pin):
        return _run(args, pin, cmd)


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


def _run(args: argparse.Namespace, pin: Pinning, cmd: str) -> dict:
    x = load_inputs(512)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("GGA_")}
    base_env.update(GGA_TORCH_THREADS=str(args.threads), GGA_LOG_LEVEL="warning", PYTHONUNBUFFERED="1")
    if args.strategy:
        base_env["GGA_STRATEGY"] = args.strategy
    result = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "command": cmd, "git": _git(),
        "machine": _machine(pin),
        "settings": {"quick": args.quick, "pinning": pin.describe(), "threads": args.threads, "rows": args.rows,
                     "formats": list(args.formats), "clients": list(args.clients), "rates": list(args.rates),
                     "warmup_s": args.warmup_s, "closed_s": args.closed_s, "open_s": args.open_s,
                     "ceiling_s": args.ceiling_s, "health_s": args.health_s, "drain_s": args.drain_s,
                     "serial_reps": args.serial_reps, "serial_s": args.serial_s,
                     "slo_ms": args.slo_ms, "note": args.note, "strategy": args.strategy or "service default",
                     "targets": TARGETS,
                     "client": "one asyncio process, raw HTTP/1.1 keep-alive connections"},
        "configs": {},
    }
    t0 = time.perf_counter()
    _print(f"load benchmark: {pin.describe()}")
    with tempfile.TemporaryDirectory(prefix="gga-load-") as tmpd:
        tmp = Path(tmpd)
        base_env["GGA_ARTIFACT_DIR"] = str(tmp / "artifacts")
        plan = {"default": {"GGA_MAX_BATCH_ROWS": str(args.max_batch_rows)} if args.max_batch_rows != 64 else {},
                "batch1": {"GGA_MAX_BATCH_ROWS": "1"}}
        servers: dict[str, Server] = {}
        try:  # every configuration up at once (idle ones cost nothing), so the serial comparison can alternate
            envs = {}
            for label in args.configs:
                srv, cfg, envs[label] = start_service(label, plan[label], pin, base_env, tmp, result)
                servers[label] = srv
            first = args.configs[0] if args.configs else None
            if "default" in servers:
                measure_ceiling(args, pin, envs["default"], result["configs"]["default"], len(x), result)
            if first:
                measure_health(args, servers[first], result)
            if len(servers) > 1 and 1 in args.clients:
                measure_serial(args, servers, x, result)
            for label, srv in servers.items():
                sweep_service(label, args, srv, result["configs"][label], x, "closed")
                if label == "default" and not args.quick:  # the ceiling again, right after the saturation points
                    measure_ceiling(args, pin, envs["default"], result["configs"]["default"], len(x), result)
                sweep_service(label, args, srv, result["configs"][label], x, "open")
                srv.stop()
        finally:
            for srv in servers.values():
                srv.stop()
        if not args.no_litserve:
            measure_litserve(args, pin, base_env, x, tmp, result)
        else:
            result["litserve"] = {"skipped": "--no-litserve"}
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - t0
    result["targets"] = targets(result, list(args.formats))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "load.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    md = markdown(result)
    (args.out_dir / "load.md").write_text(md)
    print(md)
    _print(f"wrote {args.out_dir / 'load.json'} and load.md in {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()

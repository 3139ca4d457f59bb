"""Overload benchmark: the real service at a multiple of its sustainable rate.

    python -m benchmarks.overload            # full size: 3x capacity for 20 s per configuration
    python -m benchmarks.overload --quick    # a few seconds (the CI test); writes benchmarks/results/tmp/

One command, loopback only, bounded duration; every server it starts it also stops. For
each configuration:

1. **Sustainable rate**: closed loop with 64 clients on keep-alive connections (rows/s).
2. **Overload**: Poisson arrivals at ``--multiple`` (3) times that rate for ``--seconds``,
   **one new connection per request** (the costly case for the server: accept, parse,
   answer, close), latency from the scheduled arrival. Meanwhile a prober opens a new
   connection for ``GET /healthz`` every 100 ms (a liveness probe), and the server's
   resident memory is sampled every 0.5 s.

Reported per configuration: every request by its answer (200, 503, 504, other, or
unanswered after the drain limit), latency per status, 200s later than the service's
request timeout, goodput (rows answered 200 within the request timeout, per second of
arrivals) against the sustainable rate, ``/healthz`` latency, server RSS.

Targets (issue 9): every request answered 200/503/504; 503 p99 <= 1 s; ``/healthz``
p99 <= 1 s; goodput >= 60% of the sustainable rate; no 200 later than its timeout; RSS
bounded. Configurations: ``issue`` (the issue's: queue 64 rows, timeout 5 s) and
``default`` (the service's defaults: 2,048 rows, 30 s timeout, wait bound 2 s).
Results: ``benchmarks/results/overload.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.cpustat import CpuMeter
from benchmarks.harness import RESULTS, Server, fmt_value, free_port, git_info, log, machine_info
from benchmarks.loadgen import (
    Conn,
    Pinning,
    Record,
    client_side,
    closed_loop,
    http_request,
    latency_summary,
    load_inputs,
    no_gc,
    percentile,
    request_bodies,
    send_on_schedule,
)

CONFIGS = {
    "issue": {"GGA_MAX_QUEUE_ROWS": "64", "GGA_REQUEST_TIMEOUT_S": "5"},
    "default": {},
}
TARGETS = {"p99_503_ms": 1000.0, "p99_healthz_ms": 1000.0, "goodput_share": 0.60}


def rss_mb(pid: int) -> float | None:
    """Resident memory of process ``pid`` in MiB (None without /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


async def _one_shot(host: str, port: int, raw: bytes) -> int:
    """One request on a new connection, closed after the answer; 0 on a transport error."""
    try:
        conn = await Conn.open(host, port)
    except OSError:
        return 0
    try:
        status, _ = await conn.request(raw)
        return status
    except (asyncio.IncompleteReadError, ConnectionError, OSError, asyncio.LimitOverrunError):
        return 0
    finally:
        conn.close()


async def overload(host: str, port: int, bodies: list[bytes], rate: float, duration_s: float, rows: int,
                   timeout_s: float, drain_s: float, seed: int, server_pid: int | None) -> dict:
    with no_gc():
        return await _overload(host, port, bodies, rate, duration_s, rows, timeout_s, drain_s, seed, server_pid)


async def _overload(host: str, port: int, bodies: list[bytes], rate: float, duration_s: float, rows: int,
                    timeout_s: float, drain_s: float, seed: int, server_pid: int | None) -> dict:
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * duration_s * 1.5) + 16))
    times = times[times < duration_s]
    recs: list[Record] = []
    health: list[Record] = []
    rss: list[float] = []
    probe = http_request(host, port, "GET", "/healthz")
    done = asyncio.Event()

    async def one(i: int, at: float) -> None:
        lag = time.perf_counter() - at
        try:
            status = await _one_shot(host, port, bodies[i % len(bodies)])
        except asyncio.CancelledError:
            recs.append(Record(at, time.perf_counter(), -1, lag))
            raise
        recs.append(Record(at, time.perf_counter(), status, lag))

    async def probe_once(at: float) -> None:
        status = await _one_shot(host, port, probe)
        health.append(Record(at, time.perf_counter(), status))

    async def prober() -> None:
        """A probe every 100 ms, each on its own (like a kubelet's: one slow probe does not delay the next)."""
        k, probes = 0, []
        while not done.is_set():
            at = t0 + 0.1 * k
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            if done.is_set():
                break
            probes.append(asyncio.create_task(probe_once(at)))
            k += 1
        await asyncio.gather(*probes)

    async def sampler() -> None:
        while not done.is_set():
            if server_pid is not None and (mb := rss_mb(server_pid)) is not None:
                rss.append(mb)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), 0.5)

    t0 = time.perf_counter() + 0.05
    side = [asyncio.create_task(prober()), asyncio.create_task(sampler())]
    with CpuMeter(server_pid) as cpu:
        sent_end, pending = await send_on_schedule(times, t0, one, drain_s)
    done.set()
    await asyncio.gather(*side)
    by_status: dict[str, list[Record]] = {}
    for r in recs:
        by_status.setdefault(str(r.status), []).append(r)
    ok = by_status.get("200", [])
    late = [r for r in ok if r.t1 - r.t0 > timeout_s]
    return {
        "rate_per_s": rate, "duration_s": duration_s, "sent": len(recs), "timeout_s": timeout_s,
        "statuses": {s: len(v) for s, v in sorted(by_status.items())},
        "latency_by_status": {s: latency_summary(v) for s, v in sorted(by_status.items())},
        "late_200": len(late), "late_200_max_ms": max((1000 * (r.t1 - r.t0) for r in late), default=None),
        "goodput_rows_per_s": (len(ok) - len(late)) * rows / duration_s,
        "healthz": {**latency_summary(health), "statuses": {str(s): sum(r.status == s for r in health)
                                                     for s in sorted({r.status for r in health})}},
        "rss_mb": {"start": rss[0] if rss else None, "max": max(rss) if rss else None,
                   "end": rss[-1] if rss else None},
        "send_lag_p99_ms": percentile([1000 * r.lag for r in recs], 99), "drain_s": time.perf_counter() - sent_end,
        "unanswered": len(pending), **cpu.as_dict(len(recs)),
    }


def measure_capacity(port: int, bodies: list[bytes], capacity_s: float, server_pid: int) -> dict:
    """The closed-loop capacity (64 clients) over ``capacity_s``; on a machine so busy that no
    answer came back inside the window, measured again over a window twice as long (up to
    three times) instead of dividing by a rate of zero."""
    for _ in range(3):
        cap = asyncio.run(closed_loop("127.0.0.1", port, bodies, 64, 0.5, capacity_s, 1, server_pid))
        if cap["rows_per_s"] > 0:
            return cap
        log(f"no answer inside the {capacity_s:.1f} s capacity window (busy machine?): measuring over "
            f"{2 * capacity_s:.1f} s")
        capacity_s *= 2
    raise RuntimeError("the service answered no request in three capacity windows: cannot set the overload rate")


def verdicts(run: dict, sustainable_rows_per_s: float) -> list[dict]:
    lat = run["latency_by_status"]
    p99_503 = lat.get("503", {}).get("p99_ms")
    hz = run["healthz"]["p99_ms"]
    share = run["goodput_rows_per_s"] / sustainable_rows_per_s if sustainable_rows_per_s else 0.0
    other = {s: n for s, n in run["statuses"].items() if s not in ("200", "503", "504")}
    return [
        {"target": "every request answered 200, 503 or 504", "measured": "yes" if not other else f"no: {other}",
         "met": not other},
        {"target": "503 p99 <= 1 s", "measured": f"{fmt_value(p99_503, 0)} ms" if p99_503 is not None else "no 503",
         "met": p99_503 is None or p99_503 <= TARGETS["p99_503_ms"]},
        {"target": "/healthz p99 <= 1 s", "measured": f"{fmt_value(hz, 0)} ms", "met": hz is not None
         and hz <= TARGETS["p99_healthz_ms"] and set(run["healthz"]["statuses"]) == {"200"}},
        {"target": "goodput >= 60% of the sustainable rate",
         "measured": f"{share:.0%} ({run['goodput_rows_per_s']:.0f} of {sustainable_rows_per_s:.0f} rows/s)",
         "met": share >= TARGETS["goodput_share"]},
        {"target": "no 200 later than its timeout",
         "measured": f"{run['late_200']} late" + (f" (max {run['late_200_max_ms']:.0f} ms)" if run["late_200"]
                                                   else ""), "met": run["late_200"] == 0},
        {"target": "RSS bounded", "measured": f"{fmt_value(run['rss_mb']['start'], 0)} -> max "
         f"{fmt_value(run['rss_mb']['max'], 0)} MiB", "met": None},
    ]


def markdown(result: dict) -> str:
    m, s, g = result["machine"], result["settings"], result["git"]
    dirty = f" (uncommitted changes: {', '.join(g['changed_files'])})" if g["dirty"] else ""
    L = [f"# Overload benchmark ({'quick' if s['quick'] else 'full'} mode)", "",
         f"- Date: {result['date']}; command: `{result['command']}`; commit `{g['commit'][:12]}`{dirty}",
         f"- Machine: {m['cpu']}, {m['cpu_count']} cores; torch {m['torch']}, uvicorn {m['uvicorn']} "
         f"({m['uvicorn_loop_http']})",
         f"- Pinning: {s['pinning']}; {s['threads']} torch thread(s)",
         f"- Load: {s['multiple']}x the sustainable rate (closed loop, 64 clients, keep-alive, measured just before) "
         f"for {s['seconds']} s, Poisson arrivals, one new connection per request, {s['rows']} MNIST image per "
         f"request ({s['format']}); `/healthz` on a new connection every 100 ms (each probe on its own); "
         "latency from the scheduled arrival",
         "- Goodput: rows answered 200 within the service's request timeout, per second of arrivals", ""]
    for label, c in result["configs"].items():
        run = c["overload"]
        L += [f"## `{label}`: {' '.join(f'{k}={v}' for k, v in c['env'].items()) or 'service defaults'}", "",
              f"Sustainable: {c['sustainable_rows_per_s']:.0f} rows/s; offered {run['rate_per_s']:.0f} requests/s, "
              f"{run['sent']} sent; server CPU {run['server_cpu_util']:.0%}, client send lag p99 "
              f"{fmt_value(run['send_lag_p99_ms'], 1)} ms; batching {c['batching']}", "",
              "| status | requests | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|"]
        for st, n in run["statuses"].items():
            lat = run["latency_by_status"][st]
            L.append(f"| {st} | {n} | {fmt_value(lat['p50_ms'], 0)} | {fmt_value(lat['p99_ms'], 0)} | "
                     f"{fmt_value(lat['max_ms'], 0)} |")
        hz = run["healthz"]
        L += [f"| /healthz | {hz['n']} | {fmt_value(hz['p50_ms'], 1)} | {fmt_value(hz['p99_ms'], 1)} | "
              f"{fmt_value(hz['max_ms'], 1)} |",
              "", "| target | measured | met |", "|---|---|---|"]
        for v in c["targets"]:
            met = "–" if v["met"] is None else "yes" if v["met"] else "NO"
            L.append(f"| {v['target']} | {v['measured']} | {met} |")
        L.append("")
    return "\n".join(L)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overload", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 s of overload after 1 s of capacity measurement")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--multiple", type=float, default=3.0, help="times the sustainable rate (default 3)")
    p.add_argument("--seconds", type=float, help="seconds of arrivals (default 20; quick 2)")
    p.add_argument("--format", choices=("npy", "json"), default="npy")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    p.add_argument("--no-pin", action="store_true", help="do not pin server and client to separate cores")
    p.add_argument("--out", type=Path, help="output folder (default benchmarks/results, quick: results/tmp)")
    args = p.parse_args(argv)
    args.seconds = args.seconds or (2.0 if args.quick else 20.0)
    args.capacity_s = 1.0 if args.quick else 5.0
    args.out = args.out or (RESULTS / "tmp" if args.quick else RESULTS)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cmd = "python -m benchmarks.overload" + ("" if argv is None and len(sys.argv) <= 1 else " " + shlex.join(
        argv if argv is not None else sys.argv[1:]))
    pin = Pinning.choose(not args.no_pin)
    with client_side(pin):  # one connection per request: thousands open at once
        return _run(args, pin, cmd)


def _run(args: argparse.Namespace, pin: Pinning, cmd: str) -> dict:
    x = load_inputs(512)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("GGA_")}
    base_env.update(GGA_TORCH_THREADS=str(args.threads), GGA_LOG_LEVEL="warning", PYTHONUNBUFFERED="1")
    result = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "command": cmd, "git": git_info(),
        "machine": machine_info(pin),
        "settings": {"quick": args.quick, "pinning": pin.describe(), "threads": args.threads, "rows": 1,
                     "format": args.format, "multiple": args.multiple, "seconds": args.seconds,
                     "capacity_s": args.capacity_s, "targets": TARGETS},
        "configs": {},
    }
    with tempfile.TemporaryDirectory(prefix="gga-overload-") as tmpd:
        tmp = Path(tmpd)
        for k, label in enumerate(args.configs):
            port = free_port()
            env = dict(base_env, GGA_HOST="127.0.0.1", GGA_PORT=str(port), GGA_ARTIFACT_DIR=str(tmp / label),
                       **CONFIGS[label])
            log(f"[{label}] starting gga-serve ({' '.join(f'{a}={b}' for a, b in CONFIGS[label].items())})")
            srv = Server([*pin.prefix(), sys.executable, "-m", "service.cli"], env, port, "/readyz",
                         tmp / f"{label}.log")
            try:
                info = json.loads(srv.get("/info")[1])
                timeout_s = float(info["batching"]["request_timeout_s"])
                bodies = request_bodies(x, 1, args.format, "127.0.0.1", port)
                asyncio.run(closed_loop("127.0.0.1", port, bodies, 8, 0.0, 0.5, 1))  # warm
                cap = measure_capacity(port, bodies, args.capacity_s, srv.pid)
                rate = args.multiple * cap["requests_per_s"]
                log(f"[{label}] sustainable {cap['rows_per_s']:.0f} rows/s; overload at {rate:.0f}/s for "
                       f"{args.seconds:.0f} s")
                run = asyncio.run(overload("127.0.0.1", port, bodies, rate, args.seconds, 1, timeout_s,
                                           drain_s=timeout_s + 10, seed=7 + k, server_pid=srv.pid))
                cfg = {"env": CONFIGS[label], "batching": info["batching"], "sustainable": cap,
                       "sustainable_rows_per_s": cap["rows_per_s"], "overload": run,
                       "targets": verdicts(run, cap["rows_per_s"])}
                result["configs"][label] = cfg
                log(f"[{label}] {run['statuses']}; " + "; ".join(
                    f"{v['target']}: {v['measured']}" for v in cfg["targets"]))
            finally:
                srv.stop()
    result["machine"]["loadavg_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overload.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    (args.out / "overload.md").write_text(markdown(result) + "\n")
    log(f"wrote {args.out / 'overload.json'} and overload.md")
    return result


if __name__ == "__main__":
    main()

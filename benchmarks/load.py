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

This module is the run (what is measured, in which order); the pieces are
:mod:`benchmarks.loadgen` (the load client and inputs), :mod:`benchmarks.cpustat` (CPU
accounting), :mod:`benchmarks.harness` (server processes, git and machine records, the
log), :mod:`benchmarks.ceiling`, :mod:`benchmarks.litserve_api` and
:mod:`benchmarks.load_report` (targets and markdown).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.ceiling import run_ceiling
from benchmarks.cpustat import CpuMeter
from benchmarks.harness import RESULTS, Server, fmt_value, free_port, git_info, log, machine_info, metric_values
from benchmarks.litserve_api import LITSERVE
from benchmarks.load_report import TARGETS, markdown, targets
from benchmarks.loadgen import (
    Pinning,
    client_side,
    closed_loop,
    http_request,
    load_inputs,
    open_loop,
    percentile,
    request_bodies,
)

# what the two modes measure; every value can be overridden on the command line
FULL = dict(clients=(1, 8, 64, 256), rates=(0.5, 1.0, 2.0, 3.0), warmup_s=1.5, closed_s=5.0, open_s=6.0,
            ceiling_s=4.0, health_s=2.0, drain_s=30.0, serial_reps=4, serial_s=2.0)
QUICK = dict(clients=(1, 8), rates=(2.0,), warmup_s=0.2, closed_s=0.6, open_s=0.8,
             ceiling_s=0.5, health_s=0.5, drain_s=10.0, serial_reps=1, serial_s=0.4)


# --------------------------------------------------------------------------- the measurements


def start_service(label: str, env_over: dict[str, str], pin: Pinning, base_env: dict[str, str], tmp: Path,
                  result: dict) -> tuple[Server, dict, dict[str, str]]:
    """``gga-serve`` (pinned) with ``env_over`` on top of the shared settings; its entry in ``result``."""
    port = free_port()
    env = dict(base_env, GGA_HOST="127.0.0.1", GGA_PORT=str(port), **env_over)
    log(f"[{label}] starting gga-serve ({' '.join(f'{k}={v}' for k, v in env_over.items()) or 'defaults'})")
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
    log(f"in-process ceiling ({args.ceiling_s:.0f} s per batch size)")
    run = run_ceiling(pin, env, args.threads, cfg.get("strategy"), sorted({1, mbr}), args.ceiling_s, n_inputs)
    ceil = result.setdefault("ceiling", {"max_batch_rows": mbr, "runs": []})
    ceil["runs"].append(run)
    ceil["threads"], ceil["strategy"], ceil["affinity"] = run["threads"], run["strategy"], run["affinity"]
    ceil["batches"] = {b: {k: float(np.mean([r["batches"][b][k] for r in ceil["runs"]]))
                           for k in ("rows_per_s", "ms_per_batch")} for b in run["batches"]}
    log("in-process ceiling: " + ", ".join(f"batch {b}: {r['rows_per_s']:.1f} rows/s"
                                               for b, r in run["batches"].items()))


def measure_health(args, srv: Server, result: dict) -> None:
    health = http_request("127.0.0.1", srv.port, "GET", "/healthz")
    result["client_overhead"] = {}
    for c in sorted({1, max(args.clients)}):
        r = asyncio.run(closed_loop("127.0.0.1", srv.port, [health], c, args.warmup_s, args.health_s, 1, srv.pid))
        result["client_overhead"][str(c)] = r
        log(f"/healthz c={c}: {r['requests_per_s']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, "
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
            res[lab] = {"rows_per_s": a["ok"] * args.rows / a["seconds"], "p50_ms": percentile(a["lat"], 50),
                        "p99_ms": percentile(a["lat"], 99), "requests": len(a["lat"]),
                        "rows_per_s_per_slice": a["per_slice"], "other_cpu_on_server_cores_max": max(a["other"])}
        out["formats"][fmt] = res
        log(f"serial {fmt}: " + "; ".join(f"{lab} {r['rows_per_s']:.1f} rows/s, p50 {fmt_value(r['p50_ms'], 2)} ms"
                                             for lab, r in res.items()))


def measure_v2_vs_npy(args, srv: Server, x: np.ndarray, result: dict) -> None:
    """The Open Inference Protocol's binary requests against native ``.npy`` bodies on one server: closed loops
    of ``--v2-clients`` clients, alternating slices (ABBA...) so that drift hits both alike; pooled rows/s, ratio."""
    c = args.v2_clients
    bodies = {fmt: request_bodies(x, args.rows, fmt, "127.0.0.1", srv.port) for fmt in ("npy", "v2")}
    acc = {fmt: {"rows": 0.0, "seconds": 0.0, "per_slice": [], "p50_ms": [], "statuses": {}} for fmt in bodies}
    for rep in range(args.v2_reps):
        for fmt in (("npy", "v2") if rep % 2 == 0 else ("v2", "npy")):
            r = asyncio.run(closed_loop("127.0.0.1", srv.port, bodies[fmt], c, args.warmup_s, args.closed_s,
                                        args.rows, srv.pid))
            a = acc[fmt]  # rows/s counts 200s only; the statuses (503: shed by admission, alike for both) are kept
            for k, n in r["statuses"].items():
                a["statuses"][k] = a["statuses"].get(k, 0) + n
            a["rows"] += r["rows_per_s"] * args.closed_s
            a["seconds"] += args.closed_s
            a["per_slice"].append(r["rows_per_s"])
            a["p50_ms"].append(r["p50_ms"])
    out = {fmt: {"rows_per_s": a["rows"] / a["seconds"], "rows_per_s_per_slice": a["per_slice"],
                 "p50_ms_per_slice": a["p50_ms"], "statuses": a["statuses"]} for fmt, a in acc.items()}
    out.update(clients=c, rows=args.rows, reps=args.v2_reps, slice_s=args.closed_s,
               ratio=out["v2"]["rows_per_s"] / out["npy"]["rows_per_s"])
    result["v2_vs_npy"] = out
    log(f"v2 binary vs native npy, {c} clients of {args.rows} row(s), {args.v2_reps} alternations of "
        f"{args.closed_s:g} s: {out['v2']['rows_per_s']:.1f} vs {out['npy']['rows_per_s']:.1f} rows/s = "
        f"{out['ratio']:.3f}x (per slice v2 {', '.join(f'{v:.0f}' for v in out['v2']['rows_per_s_per_slice'])}; "
        f"npy {', '.join(f'{v:.0f}' for v in out['npy']['rows_per_s_per_slice'])}; statuses v2 "
        f"{out['v2']['statuses']}, npy {out['npy']['statuses']})")


def sweep_service(label: str, args, srv: Server, cfg: dict, x: np.ndarray, loops: str) -> None:
    """The closed-loop sweep (``loops="closed"``) or the open-loop sweep (``"open"``, after the closed one)."""
    port = srv.port
    if loops == "closed":
        for fmt in args.formats:
            bodies = request_bodies(x, args.rows, fmt, "127.0.0.1", port)
            asyncio.run(closed_loop("127.0.0.1", port, bodies, 8, 0.0, args.warmup_s, args.rows))  # warm
            for c in args.clients:
                m0 = metric_values(srv.get("/metrics")[1].decode())
                r = asyncio.run(closed_loop("127.0.0.1", port, bodies, c, args.warmup_s, args.closed_s, args.rows,
                                            srv.pid))
                m1 = metric_values(srv.get("/metrics")[1].decode())
                nb = m1.get("gga_batch_rows_count", 0) - m0.get("gga_batch_rows_count", 0)
                r["mean_batch_rows"] = (m1.get("gga_batch_rows_sum", 0) - m0.get("gga_batch_rows_sum", 0)) / nb \
                    if nb else None
                cfg["closed"].setdefault(fmt, {})[str(c)] = r
                log(f"[{label}] closed {fmt} c={c}: {r['rows_per_s']:.1f} rows/s, p50 {fmt_value(r['p50_ms'], 1)} ms, "
                       f"p99 {fmt_value(r['p99_ms'], 1)} ms, batch {fmt_value(r['mean_batch_rows'], 1)}, "
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
            log(f"[{label}] open {fmt} {mult}x ({r['rate_per_s']:.0f}/s): {r['statuses']}, "
                   f"ok {r['ok_rows_per_s']:.0f} rows/s, goodput {r['goodput_rows_per_s']:.0f}, "
                   f"p50 {fmt_value(lat.get('p50_ms'), 0)} p99 {fmt_value(lat.get('p99_ms'), 0)} ms, "
                   f"drain {r['drain_s']:.1f} s, lag p99 {r['send_lag_p99_ms']:.1f} ms, "
                   f"other {r['other_cpu_on_server_cores']:.0%}")
            _wait_idle(srv, args.drain_s)


def _wait_idle(srv: Server, limit: float) -> None:
    """Until the service has no queued rows (after an open-loop point with unanswered requests)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if metric_values(srv.get("/metrics")[1].decode()).get("gga_queue_rows", 0) == 0:
            return
        time.sleep(0.2)


def measure_litserve(args, pin: Pinning, base_env: dict[str, str], x: np.ndarray, tmp: Path, result: dict) -> None:
    if LITSERVE is None:
        result["litserve"] = {"skipped": "litserve is not installed (pip install -e \".[bench]\")"}
        log("[litserve] skipped: not installed")
        return
    port = free_port()
    strategy = result["configs"].get("default", {}).get("strategy")
    arg = json.dumps({"threads": args.threads, "strategy": strategy, "max_batch_size": args.max_batch_rows,
                      "batch_timeout_s": args.litserve_batch_timeout_ms / 1000.0, "timeout_s": 30,
                      "fast_queue": args.litserve_fast_queue, "port": port})
    cmd = [*pin.prefix(), sys.executable, "-c", "from benchmarks.litserve_api import litserve_main; litserve_main()",
           arg]
    log(f"[litserve] starting LitServe {LITSERVE.__version__} (max_batch_size {args.max_batch_rows}, batch_timeout "
           f"{args.litserve_batch_timeout_ms} ms, fast_queue {args.litserve_fast_queue})")
    t = time.perf_counter()
    srv = Server(cmd, dict(base_env), port, "/health", tmp / "litserve.log")
    out = {"version": LITSERVE.__version__, "port": port, "startup_s": time.perf_counter() - t,
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
                log(f"[litserve] closed {fmt} c={c}: {r['rows_per_s']:.1f} rows/s, p50 {fmt_value(r['p50_ms'], 1)} ms, "
                       f"p99 {fmt_value(r['p99_ms'], 1)} ms, statuses {r['statuses']}, server CPU "
                       f"{r['server_cpu_util']:.0%}, other {r['other_cpu_on_server_cores']:.0%}")
    finally:
        srv.stop()


# --------------------------------------------------------------------------- the command


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
    p.add_argument("--formats", type=strs, default=("npy", "json"), help="request bodies: npy,json,png,v2 (png: PNG "
                   "images, multipart for several rows; v2: the Open Inference Protocol's binary requests; with npy "
                   "also the alternating v2 vs npy comparison)")
    p.add_argument("--v2-clients", type=int, default=64, help="clients of the v2 vs npy comparison")
    p.add_argument("--v2-reps", type=int, default=4, help="alternations (ABBA order) of the v2 vs npy comparison")
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
        if fmt not in ("npy", "json", "png", "v2"):
            p.error(f"unknown format {fmt!r}")
    for c in args.configs:
        if c not in ("default", "batch1"):
            p.error(f"unknown config {c!r}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cmd = "python -m benchmarks.load" + ("" if argv is None and len(sys.argv) <= 1 else " " + shlex.join(
        argv if argv is not None else sys.argv[1:]))
    pin = Pinning.choose(not args.no_pin)
    CpuMeter.server_cores = [int(c) for c in pin.server.split(",")] if pin.server is not None else None
    with client_side(pin):
        return _run(args, pin, cmd)


def _run(args: argparse.Namespace, pin: Pinning, cmd: str) -> dict:
    x = load_inputs(512)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("GGA_")}
    base_env.update(GGA_TORCH_THREADS=str(args.threads), GGA_LOG_LEVEL="warning", PYTHONUNBUFFERED="1")
    if args.strategy:
        base_env["GGA_STRATEGY"] = args.strategy
    result = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "command": cmd, "git": git_info(),
        "machine": machine_info(pin),
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
    log(f"load benchmark: {pin.describe()}")
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
                if label == "default" and {"npy", "v2"} <= set(args.formats):
                    measure_v2_vs_npy(args, srv, x, result)
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
    result["png_vs_npy"] = png_vs_npy(result)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "load.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    md = markdown(result)
    (args.out_dir / "load.md").write_text(md)
    print(md)
    for line in result["png_vs_npy"]:
        print(line)
    log(f"wrote {args.out_dir / 'load.json'} and load.md in {result['wall_s']:.0f} s")
    return result


def png_vs_npy(result: dict) -> list[str]:
    """Closed-loop throughput of PNG bodies over npy bodies, per configuration and client count, in this run."""
    lines = []
    for label, cfg in result.get("configs", {}).items():
        closed = cfg.get("closed", {})
        for c, r in closed.get("png", {}).items():
            npy = closed.get("npy", {}).get(c)
            if npy and npy["rows_per_s"]:
                lines.append(f"[{label}] PNG vs npy bodies, {c} clients: {r['rows_per_s']:.1f} / "
                             f"{npy['rows_per_s']:.1f} rows/s = {r['rows_per_s'] / npy['rows_per_s']:.2f}x")
    return lines


if __name__ == "__main__":
    main()

"""Throughput and latency of the running service under a concurrent burst.

    python -m benchmarks.bench_service [--clients 64] [--requests 8] [--rows 1]

Starts ``gga-serve`` (the bundled default model and detector) as a real uvicorn process
on a free loopback port, once with dynamic batching and once with batching disabled
(max batch rows = 1) as the baseline, and for each fires ``--clients`` concurrent
clients that each send ``--requests`` requests of ``--rows`` MNIST test images. Prints
rows/s, request latency p50/p99 and the mean batch size read from /metrics, and the
ratios of the two configurations measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.loadgen import npy_bytes
from benchmarks.serverproc import ROOT, start_server
from detectors.datasets import load_idx_split


def _metric(text: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and not s.labels:
                return s.value
    return float("nan")


async def _burst(base: str, x: np.ndarray, clients: int, requests: int, rows: int, fmt: str) -> dict:
    latencies: list[float] = []
    ctype = "application/x-npy" if fmt == "npy" else "application/json"
    statuses: dict[int, int] = {}

    async def client(c: httpx.AsyncClient, k: int) -> None:
        for r in range(requests):
            i = ((k * requests + r) * rows) % (len(x) - rows)
            body = npy_bytes(x[i:i + rows]) if fmt == "npy" else json.dumps({"inputs": x[i:i + rows].tolist()}).encode()
            t0 = time.perf_counter()
            resp = await c.post("/predict", content=body, headers={"content-type": ctype})
            latencies.append(time.perf_counter() - t0)
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as c:
        await asyncio.gather(*(c.post("/predict", json={"inputs": x[:1].tolist()}) for _ in range(4)))  # warm
        m0 = (await c.get("/metrics")).text
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, k) for k in range(clients)))
        wall = time.perf_counter() - t0
        m1 = (await c.get("/metrics")).text
    batches = _metric(m1, "gga_batch_rows_count") - _metric(m0, "gga_batch_rows_count")
    batch_rows = _metric(m1, "gga_batch_rows_sum") - _metric(m0, "gga_batch_rows_sum")
    lat = sorted(latencies)
    return {
        "rows": clients * requests * rows, "wall_s": wall, "rows_per_s": clients * requests * rows / wall,
        "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "mean_batch_rows": batch_rows / batches if batches else float("nan"), "statuses": statuses,
    }


def run_config(x: np.ndarray, args, max_batch_rows: int) -> dict:
    env = dict(GGA_MAX_BATCH_ROWS=str(max_batch_rows), GGA_MAX_DELAY_MS=str(args.delay_ms),
               GGA_MAX_QUEUE_ROWS="100000", GGA_LOG_LEVEL="warning",
               GGA_ARTIFACT_DIR=str(Path(args.artifact_dir).resolve()))
    if args.threads:
        env["GGA_TORCH_THREADS"] = str(args.threads)
    proc, base = start_server(env)
    try:
        return asyncio.run(_burst(base, x, args.clients, args.requests, args.rows, args.format))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=8, help="requests per client")
    p.add_argument("--rows", type=int, default=1, help="rows per request")
    p.add_argument("--format", choices=("npy", "json"), default="npy", help="request body encoding")
    p.add_argument("--max-batch-rows", type=int, default=64)
    p.add_argument("--delay-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--artifact-dir", default="/tmp/gga-bench-artifacts")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    x, _ = load_idx_split(args.data_dir, "t10k")
    results = {}
    for label, mbr in (("batched", args.max_batch_rows), ("unbatched", 1)):
        results[label] = run_config(x, args, mbr)
        print(label, json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in results[label].items()}),
              flush=True)
    b, u = results["batched"], results["unbatched"]
    print("\n| config | rows/s | p50 ms | p99 ms | mean batch rows |\n|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['rows_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
              f"| {r['mean_batch_rows']:.1f} |")
    print(f"\nbatched / unbatched throughput: {b['rows_per_s'] / u['rows_per_s']:.2f}x; "
          f"p99 ratio {b['p99_ms'] / u['p99_ms']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2))


if __name__ == "__main__":
    main()

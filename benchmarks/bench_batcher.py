"""Micro-benchmark of the batcher alone: its per-request cost, without a model or HTTP.

    python -m benchmarks.bench_batcher [--module service.batching] [--path DIR]
        [--requests 20000] [--clients 64] [--max-batch-rows 64] [--repeats 5]

``--clients`` coroutines on one asyncio loop submit one-row requests back to back until
``--requests`` have been answered, through a ``DynamicBatcher`` imported from
``--module`` (any module that exports it: ``service.batching``, or an older copy such as
a ``batcher.py`` placed in ``--path``). ``compute`` is trivial (one int per item), so
the time measured is the batcher's own: admission, queueing, the worker's hand-off and
the delivery back to the loop. Prints, per repeat and as the median over repeats,
requests/s and the p50/p99 latency of one request (submit to result).

Give ``--module`` several times as ``LABEL=MODULE`` to compare versions in one process:
the repeats alternate between them (A B A B ...), so drift of a busy machine hits both
alike, and the summary prints each version's medians and their ratio to the first.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import statistics
import sys
import time
from typing import Any


def _compute(items: list[Any]) -> list[int]:
    return [item.rows for item in items]


async def _one_run(batcher_cls: type, *, requests: int, clients: int, max_batch_rows: int) -> dict[str, float]:
    batcher = batcher_cls(_compute, max_batch_rows=max_batch_rows, max_queue_rows=max(requests, max_batch_rows),
                          timeout_s=60.0)
    batcher.start()
    latencies: list[float] = []
    left = requests
    clock = time.perf_counter

    async def client() -> None:
        nonlocal left
        submit, record = batcher.submit, latencies.append
        while left > 0:
            left -= 1
            t0 = clock()
            await submit(None, 1)
            record(clock() - t0)

    try:
        t0 = clock()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = clock() - t0
    finally:
        await batcher.astop(timeout=10.0)
    counters = batcher.counters
    if counters.completed != requests:
        raise RuntimeError(f"{counters.completed} of {requests} requests completed: {counters}")
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"rps": requests / elapsed, "p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3,
            "rows_per_batch": counters.batch_rows / counters.batches}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--module", action="append", default=None,
                    help="[LABEL=]MODULE exporting DynamicBatcher (repeatable; default service.batching)")
    ap.add_argument("--path", action="append", default=[], help="directory put first on sys.path (repeatable)")
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-batch-rows", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if args.requests < 1 or args.clients < 1 or args.max_batch_rows < 1 or args.repeats < 1:
        ap.error("--requests, --clients, --max-batch-rows and --repeats must be >= 1")
    sys.path[:0] = args.path
    versions: dict[str, type] = {}
    for spec in args.module or ["service.batching"]:
        label, _, module = spec.rpartition("=")
        versions[label or module] = importlib.import_module(module).DynamicBatcher

    runs: dict[str, list[dict[str, float]]] = {label: [] for label in versions}
    print(f"{args.requests} one-row requests, {args.clients} clients, max_batch_rows {args.max_batch_rows}")
    for i in range(args.repeats):
        for label, cls in versions.items():
            r = asyncio.run(_one_run(cls, requests=args.requests, clients=args.clients,
                                     max_batch_rows=args.max_batch_rows))
            runs[label].append(r)
            print(f"  run {i + 1} {label:>20}: {r['rps']:9.0f} req/s  p50 {r['p50_ms']:.3f} ms  "
                  f"p99 {r['p99_ms']:.3f} ms  {r['rows_per_batch']:.1f} rows/batch")
    first = None
    print(f"median of {args.repeats}:")
    for label, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50_ms", "p99_ms")}
        first = first or med
        print(f"  {label:>20}: {med['rps']:9.0f} req/s ({med['rps'] / first['rps']:.3f}x)  "
              f"p50 {med['p50_ms']:.3f} ms ({med['p50_ms'] / first['p50_ms']:.3f}x)  "
              f"p99 {med['p99_ms']:.3f} ms ({med['p99_ms'] / first['p99_ms']:.3f}x)")


if __name__ == "__main__":
    main()

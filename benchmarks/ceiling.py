"""The in-process ceiling: the served detector's ``score`` on full batches, with no server in between.

:func:`served_detector` loads what the service serves by default (the same loading code
and strategy); :func:`run_ceiling` measures rows/s per batch size in a subprocess (pinned
like the servers), whose entry is :func:`ceiling_main`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from benchmarks.loadgen import Pinning, load_inputs
from benchmarks.serverproc import ROOT


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


def ceiling_main() -> None:
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
    cmd = [*pin.prefix(), sys.executable, "-c", "from benchmarks.ceiling import ceiling_main; ceiling_main()", arg]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"the ceiling measurement failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])

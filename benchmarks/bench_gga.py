"""Throughput of the GGA cosine similarity maps (CSM): ours against the official algorithm.

Run ``python -m benchmarks.bench_gga`` (``--help`` for the options). For every model and
batch size B, the benchmark times, interleaved in one run so that ratios are fair:

- ``forward``: one forward pass under ``torch.no_grad`` (the price of a plain prediction);
- ``official``: the algorithm of the paper's public code (``src/CSM.py`` of
  mad-lab-fau/GGA-Identifying-Untrustworthy-Predictions): one forward pass with the graph
  retained, then for each of ALL C classes ``F.cross_entropy(logits, full((B,), i))`` and a
  backward pass to the input, the sign of the gradient, the full C×C cosine matrix; the
  top-N sub-blocks (N < C) are gathered from it, so one ``official`` timing serves every N.
  Gradients go to the input only (``torch.autograd.grad``): the strict comparison;
- ``official code``: the same algorithm as the public code runs it: per class
  ``loss.backward(retain_graph=True)`` (which also computes and accumulates every
  parameter's gradient), read and zero the input's ``.grad``, ``model.zero_grad()`` at the
  end; logits rescaled to max |z| = 10 and the channel max, both on by default there;
- ``bare``: the lower bound for N analysed classes: one forward pass and N plain
  backward passes with fixed cotangents (no top-k, no softmax, no sign, no cosine);
- ``ours``: ``detectors.csm.cosine_similarity_maps(model, x, top_n=N, strategy=s)`` for
  N = C, 5, 3 and s in loop / vmap / replicate (``auto``, what users get, resolves to
  one of them: loop on CPU, vmap on accelerators).

Each method is warmed up once, then timed ``repeats`` times in rotating order; the table
reports the median in samples/s and the ratios of medians from the same run:
``speed-up`` = official time / ours(N, auto) time (for N < C this compares with the
official all-classes computation, which is what the official code has to do to get a
top-N block) and ``ours/bare`` = ours(N, auto) time / bare(N) time (target <= 1.1).

Repeats are adaptive: a quick probe (one forward and one backward pass at the real batch
size) estimates the cost of one round of all methods; a configuration gets
``min(repeats, floor(budget / round))`` repeats, at least one, and methods estimated to
take more than ``WARMUP_FULL_MAX_S`` per call are warmed up on an 8-sample slice instead
of the full batch (on CPU, first-call costs are milliseconds against calls of seconds).
``vmap`` and ``replicate`` are skipped where their estimated extra memory (N·B copies of
the activations) exceeds ``--max-expanded-gb``.

Within a round, each method estimated to take at most ``SETTLE_MAX_S`` is called once
untimed right before its timed call: a method that runs after one that allocated and freed
much more memory (replicate with N = C) otherwise pays the page faults of a trimmed heap
(measured: +30 ms, 2×, for N=5 on the CIFAR model at B=8), a bias the rotation cannot
remove because it keeps the cyclic order. Longer calls are timed once; there the effect
is a few percent at most.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from detectors.csm import cosine_similarity_maps, cosine_similarity_matrix, resolve_strategy
from detectors.zoo import MnistCNN, resnet20

ROOT = Path(__file__).resolve().parents[1]
MNIST_WEIGHTS = ROOT / "service" / "default_model" / "model.safetensors"
MODELS = ("mnist", "cifar100")
STRATEGIES = ("loop", "vmap", "replicate")
PARTIAL_NS = (5, 3)
DEFAULT_BATCH_SIZES = (1, 8, 64, 256)
QUICK_BATCH_SIZES = (1, 8)
DEFAULT_REPEATS = 5
QUICK_REPEATS = 2
DEFAULT_BUDGET_S = 60.0
QUICK_BUDGET_S = 5.0
DEFAULT_MAX_EXPANDED_GB = 4.0
WARMUP_FULL_MAX_S = 2.0
WARMUP_SLICE = 8
SETTLE_MAX_S = 1.0


# --------------------------------------------------------------------------- models


@dataclass
class BenchModel:
    name: str
    model: torch.nn.Module
    input_shape: tuple[int, ...]
    num_classes: int
    weights: str
    act_total_bytes: int = 0  # activations stored per sample (estimate)
    act_max_bytes: int = 0  # largest single activation per sample


def build_model(name: str, device: torch.device) -> BenchModel:
    torch.manual_seed(0)
    if name == "mnist":
        model = MnistCNN()
        weights = "random"
        if MNIST_WEIGHTS.is_file():
            try:
                from safetensors.torch import load_file

                model.load_state_dict(load_file(str(MNIST_WEIGHTS)))
                weights = str(MNIST_WEIGHTS.relative_to(ROOT))
            except Exception as exc:  # timing hardly depends on the weights
                weights = f"random ({type(exc).__name__} loading {MNIST_WEIGHTS.name})"
        bm = BenchModel("mnist", model, (1, 28, 28), 10, weights)
    elif name == "cifar100":
        bm = BenchModel("cifar100", resnet20(num_classes=100), (3, 32, 32), 100, "random")
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    bm.model.to(device).eval()
    bm.act_total_bytes, bm.act_max_bytes = _activation_bytes(bm.model, bm.input_shape, device)
    return bm


def _activation_bytes(model: torch.nn.Module, input_shape, device) -> tuple[int, int]:
    """Sum and max of the output sizes of all modules for one sample (a memory estimate)."""
    sizes: list[int] = []

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            sizes.append(out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        for h in handles:
            h.remove()
    return sum(sizes), max(sizes, default=0)


# --------------------------------------------------------------------------- methods


def official_csm(model: torch.nn.Module, x: torch.Tensor, partial_ns: tuple[int, ...] = ()):
    """The official algorithm: all C classes, full C×C matrix, top-N sub-blocks gathered."""
    xg = x.detach().clone().requires_grad_(True)
    logits = model(xg)
    b, c = logits.shape
    signs = []
    for i in range(c):
        target = torch.full((b,), i, dtype=torch.long, device=x.device)
        loss = F.cross_entropy(logits, target, reduction="sum")
        (g,) = torch.autograd.grad(loss, xg, retain_graph=i < c - 1)
        signs.append(torch.sign(g))
    full = cosine_similarity_matrix(torch.stack(signs, dim=1))  # [B, C, C]
    blocks = {}
    top = torch.argsort(logits.detach(), dim=1, descending=True)
    for n in partial_ns:
        idx = top[:, :n]
        rows = torch.gather(full, 1, idx[:, :, None].expand(b, n, c))
        blocks[n] = torch.gather(rows, 2, idx[:, None, :].expand(b, n, n))
    return full, blocks


def official_code_csm(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The public code's execution: backward() into the parameters for each class (C×C result)."""
    xg = x.detach().clone().requires_grad_(True)
    logits = model(xg)
    logits = logits / logits.abs().amax(dim=1, keepdim=True) * 10
    b, c = logits.shape
    signs = []
    for i in range(c):
        F.cross_entropy(logits, torch.full((b,), i, dtype=torch.long, device=x.device)).backward(retain_graph=True)
        signs.append(torch.sign(xg.grad).detach().clone())
        xg.grad.zero_()
    model.zero_grad(set_to_none=True)
    maps = torch.stack(signs, dim=1)
    if maps.dim() >= 5:  # [B, C, channels, ...]: max over the channel axis
        maps = maps.amax(dim=2)
    return cosine_similarity_matrix(maps)


def bare_gradients(model: torch.nn.Module, x: torch.Tensor, cot: torch.Tensor) -> None:
    """Lower bound: one forward, N backward passes with cotangents cot [N, B, C]; nothing else."""
    xg = x.detach().requires_grad_(True)
    z = model(xg)
    n = cot.shape[0]
    cot = cot[:, : x.shape[0]]  # the warm-up may run on a slice of the batch
    for j in range(n):
        torch.autograd.grad(z, xg, grad_outputs=cot[j], retain_graph=j < n - 1)


@dataclass
class Method:
    key: str  # "forward", "official", "bare:N", "ours:N:strategy"
    kind: str
    n: int | None
    strategy: str | None
    fn: Callable[[torch.Tensor], object]
    est_s: float
    skipped: str | None = None
    times: list[float] = field(default_factory=list)
    warmup: str = "full"


def build_methods(
    bm: BenchModel, batch: int, device: torch.device, t_fwd: float, t_bwd: float, max_expanded_gb: float
) -> list[Method]:
    model, c = bm.model, bm.num_classes
    ns = [c] + [n for n in PARTIAL_NS if 3 <= n < c]
    gen = torch.Generator().manual_seed(1)

    def fwd(x):
        with torch.no_grad():
            return model(x)

    methods = [
        Method("forward", "forward", None, None, fwd, t_fwd),
        Method(
            "official",
            "official",
            c,
            None,
            lambda x: official_csm(model, x, tuple(ns[1:])),
            t_fwd + c * t_bwd,
        ),
        Method("official_code", "official_code", c, None, lambda x: official_code_csm(model, x), t_fwd + 2 * c * t_bwd),
    ]
    for n in ns:
        cot = torch.randn((n, batch, c), generator=gen).to(device)
        methods.append(
            Method(
                f"bare:{n}",
                "bare",
                n,
                None,
                lambda x, cot=cot: bare_gradients(model, x, cot),
                t_fwd + n * t_bwd,
            )
        )
    for n in ns:
        for s in STRATEGIES:
            est = n * (t_fwd + t_bwd) if s == "replicate" else t_fwd + n * t_bwd
            m = Method(
                f"ours:{n}:{s}",
                "ours",
                n,
                s,
                lambda x, n=n, s=s: cosine_similarity_maps(model, x, top_n=n, strategy=s),
                est,
            )
            if s == "replicate":
                need = n * batch * bm.act_total_bytes
            elif s == "vmap":
                need = batch * bm.act_total_bytes + 4 * n * batch * bm.act_max_bytes
            else:
                need = 0
            if max_expanded_gb > 0 and need > max_expanded_gb * 2**30:
                m.skipped = f"est. {need / 2**30:.1f} GiB > --max-expanded-gb {max_expanded_gb:g}"
            methods.append(m)
    return methods


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_call(fn, x, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn(x)
    _sync(device)
    return time.perf_counter() - t0


def _probe(model, x, device) -> tuple[float, float]:
    """(forward-with-graph seconds, one backward-to-input seconds) at the real batch size."""
    best_f = best_b = math.inf
    spent = 0.0
    for _ in range(3):  # the minimum: the first call pays one-time costs, others may be disturbed
        xg = x.detach().requires_grad_(True)
        _sync(device)
        t0 = time.perf_counter()
        z = model(xg)
        _sync(device)
        t1 = time.perf_counter()
        torch.autograd.grad(z, xg, grad_outputs=torch.ones_like(z))
        _sync(device)
        t2 = time.perf_counter()
        best_f, best_b = min(best_f, t1 - t0), min(best_b, t2 - t1)
        spent += t2 - t0
        if spent > 5.0:  # expensive: fewer probes are precise enough
            break
    return best_f, best_b


def bench_config(
    bm: BenchModel, batch: int, repeats: int, device: torch.device, budget_s: float, max_expanded_gb: float
) -> dict:
    gen = torch.Generator().manual_seed(batch)
    x = torch.rand((batch, *bm.input_shape), generator=gen).to(device)
    t_fwd, t_bwd = _probe(bm.model, x, device)
    methods = build_methods(bm, batch, device, t_fwd, t_bwd, max_expanded_gb)
    active = [m for m in methods if m.skipped is None]
    round_est = sum(m.est_s * (2 if m.est_s <= SETTLE_MAX_S else 1) for m in active)
    reps = max(1, min(repeats, int(budget_s // max(round_est, 1e-9))))

    t_start = time.perf_counter()
    for m in active:  # warm-up
        if m.est_s > WARMUP_FULL_MAX_S and batch > WARMUP_SLICE:
            m.warmup = f"slice of {WARMUP_SLICE}"
            m.fn(x[:WARMUP_SLICE])
        else:
            m.fn(x)
    _sync(device)
    for r in range(reps):  # interleaved, rotating order
        k = r % len(active)
        for m in active[k:] + active[:k]:
            if m.est_s <= SETTLE_MAX_S:  # untimed: undo the allocator state the previous method left
                m.fn(x)
            m.times.append(_time_call(m.fn, x, device))
    elapsed = time.perf_counter() - t_start

    auto = resolve_strategy("auto", device)
    results = []
    for m in methods:
        med = statistics.median(m.times) if m.times else None
        results.append(
            {
                "method": m.key,
                "kind": m.kind,
                "n": m.n,
                "strategy": m.strategy,
                "median_s": med,
                "samples_per_s": batch / med if med else None,
                "repeats": len(m.times),
                "times_s": m.times,
                "warmup": None if m.skipped else m.warmup,
                "skipped": m.skipped,
                "estimate_s": m.est_s,
            }
        )
    by_key = {r["method"]: r for r in results}
    official = by_key["official"]["median_s"]
    official_code = by_key["official_code"]["median_s"]
    ratios = []
    for n in sorted({m.n for m in methods if m.kind == "bare"}, reverse=True):
        ours = by_key[f"ours:{n}:{auto}"]["median_s"]
        bare = by_key[f"bare:{n}"]["median_s"]
        timed = {s: by_key[f"ours:{n}:{s}"]["median_s"] for s in STRATEGIES}
        timed = {s: t for s, t in timed.items() if t}
        fastest = min(timed, key=timed.get) if timed else None
        ratios.append(
            {
                "n": n,
                "speedup_vs_official": official / ours if ours and official else None,
                "speedup_vs_official_code": official_code / ours if ours and official_code else None,
                "ours_over_bare": ours / bare if ours and bare else None,
                "fastest_strategy": fastest,
                "fastest_over_bare": timed[fastest] / bare if fastest and bare else None,
            }
        )
    return {
        "model": bm.name,
        "num_classes": bm.num_classes,
        "input_shape": list(bm.input_shape),
        "weights": bm.weights,
        "batch_size": batch,
        "device": str(device),
        "auto_strategy": auto,
        "repeats": reps,
        "repeats_requested": repeats,
        "round_estimate_s": round_est,
        "probe_forward_s": t_fwd,
        "probe_backward_s": t_bwd,
        "elapsed_s": elapsed,
        "methods": results,
        "ratios": ratios,
    }


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    return torch.device(device)


def run(
    models=MODELS,
    batch_sizes=DEFAULT_BATCH_SIZES,
    repeats: int = DEFAULT_REPEATS,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    *,
    budget_s: float = DEFAULT_BUDGET_S,
    max_expanded_gb: float = DEFAULT_MAX_EXPANDED_GB,
    log=None,
) -> list[dict]:
    """Benchmark every (model, batch size); one dict per configuration (see ``bench_config``)."""
    if threads:
        torch.set_num_threads(threads)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    rows = []
    for name in models:
        bm = build_model(name, dev)
        for b in batch_sizes:
            row = bench_config(bm, b, repeats, dev, budget_s, max_expanded_gb)
            if log:
                log(f"  {name} B={b}: {row['repeats']} repeat(s), {row['elapsed_s']:.1f} s")
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- report


def machine_info(device: torch.device | None = None) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device) if device is not None else None,
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _fmt_rate(res: dict | None) -> str:
    if res is None:
        return "–"
    if res["skipped"]:
        return "skip†"
    v = res["samples_per_s"]
    if v is None:
        return "–"
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _fmt_ratio(v: float | None, suffix: str = "") -> str:
    return "–" if v is None else f"{v:.2f}{suffix}"


def format_table(rows: list[dict]) -> str:
    """Markdown table: one line per (model, B, N); throughputs in samples/s (median)."""
    head = (
        "| model | B | N | reps | forward | official code | official (all C) | bare(N) | loop | vmap | replicate "
        "| speed-up vs official code | speed-up vs official | ours/bare | fastest/bare |"
    )
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    skips = []
    for row in rows:
        by_key = {r["method"]: r for r in row["methods"]}
        auto = row["auto_strategy"]
        for rat in row["ratios"]:
            n = rat["n"]
            n_label = f"{n} (=C)" if n == row["num_classes"] else str(n)
            cells = [
                row["model"],
                str(row["batch_size"]),
                n_label,
                str(row["repeats"]),
                _fmt_rate(by_key["forward"]),
                _fmt_rate(by_key["official_code"]),
                _fmt_rate(by_key["official"]),
                _fmt_rate(by_key[f"bare:{n}"]),
            ]
            for s in STRATEGIES:
                res = by_key[f"ours:{n}:{s}"]
                cell = _fmt_rate(res)
                cells.append(f"**{cell}**" if s == auto and not res["skipped"] else cell)
                if res["skipped"]:
                    skips.append(f"{row['model']} B={row['batch_size']} N={n} {s}: {res['skipped']}")
            fastest = rat["fastest_strategy"] or "–"
            cells += [
                _fmt_ratio(rat["speedup_vs_official_code"], "×"),
                _fmt_ratio(rat["speedup_vs_official"], "×"),
                _fmt_ratio(rat["ours_over_bare"]),
                f"{_fmt_ratio(rat['fastest_over_bare'])} ({fastest})",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    autos = sorted({row["auto_strategy"] for row in rows})
    lines += [
        "",
        "Samples/s, median of `reps` interleaved repeats (rotating order) after one warm-up call; "
        f"in each repeat, calls estimated ≤ {SETTLE_MAX_S:g} s follow an untimed call of the same method. "
        f"Bold: the strategy `auto` resolves to ({', '.join(autos)}). "
        "speed-up = official (all C classes) time / ours(N, auto) time, against the public code as it "
        "runs (backward() into the parameters) and against the strict input-only version; "
        "ours/bare = ours(N, auto) time / bare(N) time (target ≤ 1.1); "
        "fastest/bare uses the fastest strategy.",
    ]
    warm = sorted(
        {
            f"{row['model']} B={row['batch_size']}"
            for row in rows
            for r in row["methods"]
            if r["warmup"] and r["warmup"] != "full"
        }
    )
    if warm:
        lines.append(
            f"Warm-up on a {WARMUP_SLICE}-sample slice for methods estimated > "
            f"{WARMUP_FULL_MAX_S:g} s per call in: {', '.join(warm)}."
        )
    for s in skips:
        lines.append(f"† {s}")
    return "\n".join(lines)


def format_machine(info: dict, settings: dict) -> str:
    out = [
        f"- torch {info['torch']}, Python {info['python']}, {info['platform']}",
        f"- CPU: {info['cpu']} ({info['logical_cpus']} logical CPUs), torch threads: {info['torch_threads']}",
        f"- device: {info['device']}" + (f" ({info['gpu']})" if info.get("gpu") else ""),
    ]
    out.append(
        f"- repeats: up to {settings['repeats']} per configuration, fewer (at least 1) where one round "
        f"of all methods is estimated to exceed the {settings['budget_s']:g} s budget; "
        f"vmap/replicate skipped above {settings['max_expanded_gb']:g} GiB of estimated extra memory"
    )
    return "\n".join(out)


def _csv(text: str, conv=str) -> list:
    return [conv(t.strip()) for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_gga",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: mnist,cifar100")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,8,64,256; --quick: 1,8)")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"max timed repeats per configuration (default {DEFAULT_REPEATS}; --quick: {QUICK_REPEATS})",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help=f"time budget per configuration that caps the repeats (default {DEFAULT_BUDGET_S:g}; "
        f"--quick: {QUICK_BUDGET_S:g})",
    )
    p.add_argument(
        "--max-expanded-gb",
        type=float,
        default=DEFAULT_MAX_EXPANDED_GB,
        help="skip vmap/replicate above this estimated extra memory in GiB (0: never skip)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument("--quick", action="store_true", help="smoke run: few repeats, batch sizes 1,8")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)

    models = _csv(args.models)
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    batch_sizes = (
        _csv(args.batch_sizes, int)
        if args.batch_sizes
        else list(QUICK_BATCH_SIZES if args.quick else DEFAULT_BATCH_SIZES)
    )
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    budget_s = args.budget_s if args.budget_s is not None else (QUICK_BUDGET_S if args.quick else DEFAULT_BUDGET_S)
    if repeats < 1 or any(b < 1 for b in batch_sizes):
        p.error("--repeats and batch sizes must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    settings = {
        "models": models,
        "batch_sizes": batch_sizes,
        "repeats": repeats,
        "budget_s": budget_s,
        "max_expanded_gb": args.max_expanded_gb,
        "quick": args.quick,
    }
    info = machine_info(device)
    print("## GGA CSM throughput\n")
    print(format_machine(info, settings), flush=True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    rows = run(
        models,
        batch_sizes,
        repeats,
        device,
        args.threads,
        budget_s=budget_s,
        max_expanded_gb=args.max_expanded_gb,
        log=log,
    )
    total = time.perf_counter() - t0
    weights = sorted({f"{r['model']}: {r['weights']}" for r in rows})
    print(f"- weights: {'; '.join(weights)}")
    print(f"- total time: {total:.1f} s\n")
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"machine": info, "settings": settings, "total_s": total, "results": rows}, indent=2)
        )
        print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

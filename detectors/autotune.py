"""Choose the CSM strategy (loop / vmap / replicate) by measuring it, per batch size.

``strategy="auto"`` in :func:`detectors.csm.cosine_similarity_maps` decides by device type
only (loop on CPU, vmap on accelerators). Which one is fastest also depends on the model,
the number N of analysed classes and the batch size: ``benchmarks/bench_gga.py`` shows
replicate 2.3x faster than loop for a 100-class model at batch 1 on CPU. Here each
strategy is timed on the model itself, on random inputs of its shape:

    table = measure_strategies(model, (1, 28, 28), top_n=5, device=cpu, batch_sizes=(1, 8, 64))
    table.pick(20)                # -> the strategy measured best at batch 8
    det.strategy = table          # detectors take a table where they take a strategy name

Per batch size and strategy: one untimed warm-up call, then the median of ``repeats``
timed calls (CUDA is synchronised around each). A strategy that raises (an operator
without a batching rule under vmap, out of memory) is recorded in ``skipped`` and not
tried again at larger batch sizes. The whole measurement stops when ``budget_s`` is spent
(checked before every call; a strategy is not started at all when the time it took at the
previous batch size, scaled to this one, says it would overrun). Strategies whose
estimated extra memory (N copies of the activations) exceeds ``max_expanded_bytes`` are
skipped. The device's own default (:func:`detectors.csm.resolve_strategy`) is measured
first at every batch size, so a measurement cut short by the budget still has it, and a
batch size where nothing could be measured gets the device default (with no timings),
not the choice of a smaller batch size: replicate, fastest for one row, would run
N x B rows there.

:class:`StrategyCache` keeps tables for the life of a process, keyed by the model's
weights, device, input shape, N, batch sizes and torch thread count: the service measures
once at startup and again only for a detector with another N.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from detectors.csm import STRATEGIES, cosine_similarity_maps, resolve_strategy

MEASURED = tuple(s for s in STRATEGIES if s != "auto")  # ("loop", "vmap", "replicate")
DEFAULT_BUDGET_S = 5.0
DEFAULT_MAX_EXPANDED_BYTES = 2 * 2**30
BUDGET = "budget"  # the reason recorded for a strategy not measured because the time budget was spent


@dataclass
class StrategyTable:
    """Measured strategies: ``best`` {batch size: fastest strategy}, ``timings_ms``
    {batch size: {strategy: median ms per call}}, ``skipped`` {batch size: {strategy:
    why}}; ``top_n`` (None: all classes) and ``device`` it was measured for, ``seconds``
    the measurement took. ``to_dict()`` / ``from_dict()`` give and take plain JSON."""

    best: dict[int, str]
    timings_ms: dict[int, dict[str, float]] = field(default_factory=dict)
    skipped: dict[int, dict[str, str]] = field(default_factory=dict)
    top_n: int | None = None
    device: str = "cpu"
    seconds: float = 0.0

    def __post_init__(self) -> None:
        for b, s in self.best.items():
            if not isinstance(b, int) or isinstance(b, bool) or b < 1:
                raise ValueError(f"batch sizes must be integers >= 1, got {b!r}")
            if s not in MEASURED:
                raise ValueError(f"strategy for batch {b} must be one of {MEASURED}, got {s!r}")

    def pick(self, batch: int) -> str:
        """The strategy of the largest measured batch size <= ``batch`` (of the smallest
        measured one when ``batch`` is below all of them)."""
        if not self.best:
            raise ValueError("no strategy was measured (every one raised or the budget was spent): "
                             "use a strategy name instead of this table")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch!r}")
        sizes = sorted(self.best)
        chosen = sizes[0]
        for b in sizes:
            if b <= batch:
                chosen = b
        return self.best[chosen]

    def to_dict(self) -> dict[str, Any]:
        """JSON-native: batch sizes become string keys (``{"1": "loop", "64": "vmap"}``)."""
        return {
            "table": {str(b): s for b, s in sorted(self.best.items())},
            "timings_ms": {str(b): dict(t) for b, t in sorted(self.timings_ms.items())},
            "skipped": {str(b): dict(r) for b, r in sorted(self.skipped.items())},
            "top_n": self.top_n,
            "device": self.device,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StrategyTable:
        return cls(
            best={int(b): s for b, s in d["table"].items()},
            timings_ms={int(b): {s: float(v) for s, v in t.items()} for b, t in d.get("timings_ms", {}).items()},
            skipped={int(b): dict(r) for b, r in d.get("skipped", {}).items()},
            top_n=d.get("top_n"),
            device=d.get("device", "cpu"),
            seconds=float(d.get("seconds", 0.0)),
        )

    def summary(self) -> str:
        """One line: ``batch 1: replicate (loop 3.10, vmap 4.02, replicate 1.35 ms); batch 64: ...``."""
        parts = []
        for b in sorted(set(self.best) | set(self.skipped)):
            times = ", ".join(f"{s} {ms:.2f}" for s, ms in self.timings_ms.get(b, {}).items())
            skipped = "; ".join(f"{s} skipped: {why}" for s, why in self.skipped.get(b, {}).items())
            inner = "; ".join(p for p in (f"{times} ms" if times else "", skipped) if p)
            unmeasured = ", unmeasured: device default" if b in self.best and not self.timings_ms.get(b) else ""
            parts.append(f"batch {b}: {self.best.get(b, 'none')}{unmeasured} ({inner})")
        return "; ".join(parts)


def check_strategy(strategy: str | StrategyTable) -> str | StrategyTable:
    """``strategy`` when it is one of :data:`detectors.csm.STRATEGIES` or a :class:`StrategyTable`."""
    if not isinstance(strategy, StrategyTable) and strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return strategy


def strategy_for(strategy: str | StrategyTable, batch: int) -> str:
    """The strategy name for a batch of ``batch`` rows: ``strategy`` itself when it is a name,
    ``strategy.pick(batch)`` when it is a :class:`StrategyTable`."""
    if isinstance(strategy, StrategyTable):
        return strategy.pick(batch)
    if isinstance(strategy, str):
        return strategy
    raise TypeError(f"strategy must be one of {STRATEGIES} or a StrategyTable, got {type(strategy).__name__}")


def measure_strategies(
    model: torch.nn.Module,
    input_shape: Sequence[int],
    top_n: int | None,
    device: torch.device | str,
    batch_sizes: Sequence[int],
    repeats: int = 3,
    budget_s: float = DEFAULT_BUDGET_S,
    *,
    strategies: Sequence[str] = MEASURED,
    max_expanded_bytes: float | None = DEFAULT_MAX_EXPANDED_BYTES,
    seed: int = 0,
    timer: Callable[[], float] = time.perf_counter,
    csm: Callable[..., Any] = cosine_similarity_maps,
) -> StrategyTable:
    """Time each strategy at each batch size and return the fastest per batch size.

    ``model`` in eval mode on ``device``; inputs are uniform [0, 1) noise of shape
    [b, *input_shape] in the model's dtype (seeded). ``top_n`` as in
    :func:`~detectors.csm.cosine_similarity_maps` (None: all classes). Times are wall
    clock (``timer``, seconds) medians in ms; a batch size where no strategy could be
    measured gets the device default in ``best`` (no entry when that one raised).
    ``timer`` and ``csm`` are injectable for tests.
    """
    device = torch.device(device)
    sizes = sorted(set(batch_sizes))
    if not sizes or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in sizes):
        raise ValueError(f"batch_sizes must be a non-empty list of integers >= 1, got {list(batch_sizes)!r}")
    if top_n is not None and (not isinstance(top_n, int) or top_n < 3):
        raise ValueError(f"top_n must be an integer >= 3 or None for all classes, got {top_n!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    if not budget_s > 0:
        raise ValueError(f"budget_s must be > 0 seconds, got {budget_s!r}")
    unknown = [s for s in strategies if s not in MEASURED]
    if unknown or not strategies:
        raise ValueError(f"strategies must be a non-empty subset of {MEASURED}, got {list(strategies)!r}")
    default = resolve_strategy("auto", device)
    order = sorted(dict.fromkeys(strategies), key=lambda s: s != default)  # the device default first
    dtype = _float_dtype(model)
    gen = torch.Generator().manual_seed(seed)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n, act_total, act_max = _expansion(model, input_shape, top_n, device, dtype, max_expanded_bytes)

    start = timer()
    best: dict[int, str] = {}
    timings: dict[int, dict[str, float]] = {}
    skipped: dict[int, dict[str, str]] = {}
    failed: dict[str, str] = {}
    last: dict[str, tuple[int, float]] = {}  # strategy -> (batch, seconds per call) of its last measurement

    def skip(b: int, s: str, why: str) -> None:
        skipped.setdefault(b, {})[s] = why

    for b in sizes:
        x = torch.rand((b, *input_shape), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        for s in order:
            if s in failed:
                skip(b, s, failed[s])
                continue
            need = _expanded_bytes(s, n, b, act_total, act_max)
            if max_expanded_bytes is not None and need > max_expanded_bytes:
                skip(b, s, f"memory: est. {need / 2**30:.2f} GiB > {max_expanded_bytes / 2**30:.2f} GiB")
                continue
            left = budget_s - (timer() - start)
            if s in last:  # warm-up + one timed call at this size, extrapolated from the previous size
                prev_b, prev_t = last[s]
                if 2 * prev_t * b / prev_b > left:
                    skip(b, s, BUDGET)
                    continue
            if left <= 0:
                skip(b, s, BUDGET)
                continue
            try:
                csm(model, x, top_n, strategy=s)  # warm-up: lazy init, allocator
                times: list[float] = []
                for _ in range(repeats):
                    if times and timer() - start >= budget_s:
                        break
                    sync()
                    t0 = timer()
                    csm(model, x, top_n, strategy=s)
                    sync()
                    times.append(timer() - t0)
            except Exception as exc:  # noqa: BLE001 - any failure disqualifies the strategy, recorded
                failed[s] = _describe(exc, b)
                skip(b, s, failed[s])
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            median = statistics.median(times)
            timings.setdefault(b, {})[s] = median * 1000.0
            last[s] = (b, median)
        if timings.get(b):
            best[b] = min(timings[b], key=timings[b].get)  # ties: the earlier in order (the default)
        elif default in order and default not in failed:
            best[b] = default  # not measured (budget, memory): the device default, never a guess from a smaller b
    return StrategyTable(best, timings, skipped, top_n, str(device), timer() - start)


class StrategyCache:
    """Measured tables kept for the process (thread-safe), keyed by (weights fingerprint,
    model class, device, input shape, top_n, batch sizes, torch threads). ``measurements``
    counts the measurements actually run."""

    def __init__(self) -> None:
        self._tables: dict[tuple, StrategyTable] = {}
        self._lock = threading.Lock()
        self.measurements = 0

    def get(self, model: torch.nn.Module, fingerprint: str, input_shape: Sequence[int], top_n: int | None,
            device: torch.device | str, batch_sizes: Sequence[int], **kw: Any) -> tuple[StrategyTable, bool]:
        """(table, measured_now): the cached table for this key, or a new measurement
        (``**kw`` goes to :func:`measure_strategies`)."""
        key = (fingerprint, type(model).__qualname__, str(torch.device(device)), tuple(input_shape), top_n,
               tuple(sorted(set(batch_sizes))), torch.get_num_threads())
        with self._lock:  # one measurement at a time: two at once would time each other
            if key in self._tables:
                return self._tables[key], False
            table = measure_strategies(model, input_shape, top_n, device, batch_sizes, **kw)
            self.measurements += 1
            if table.best:  # an empty table is not worth keeping: a later call may try again
                self._tables[key] = table
            return table, True

    def clear(self) -> None:
        with self._lock:
            self._tables.clear()


PROCESS_CACHE = StrategyCache()


def _describe(exc: BaseException, batch: int) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    msg = msg[:200] + ("…" if len(msg) > 200 else "")
    return f"{type(exc).__name__} at batch {batch}" + (f": {msg}" if msg else "")


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _expansion(model, input_shape, top_n, device, dtype, max_expanded_bytes) -> tuple[int, int, int]:
    """(N, activation bytes stored per sample, largest activation per sample); zeros when
    not needed or unknown (a TorchScript module takes no hooks: no memory guard)."""
    if max_expanded_bytes is None:
        return 0, 0, 0
    sizes: list[int] = []

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            sizes.append(out.numel() * out.element_size())

    handles = []
    try:
        handles = [m.register_forward_hook(hook) for m in model.modules()]
        with torch.no_grad():
            z = model(torch.zeros((1, *input_shape), device=device, dtype=dtype))
    except Exception:  # noqa: BLE001 - no estimate; the measurement itself reports real failures
        return 0, 0, 0
    finally:
        for h in handles:
            h.remove()
    n = z.shape[-1] if top_n is None else top_n
    return n, sum(sizes), max(sizes, default=0)


def _expanded_bytes(strategy: str, n: int, batch: int, act_total: int, act_max: int) -> float:
    """Estimated memory beyond one plain backward pass (as ``benchmarks/bench_gga.py`` estimates it)."""
    if strategy == "replicate":
        return n * batch * act_total
    if strategy == "vmap":
        return batch * act_total + 4 * n * batch * act_max
    return 0.0

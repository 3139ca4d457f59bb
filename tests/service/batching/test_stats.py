"""What the batcher measures: the compute-time averages and the counters' names."""

from __future__ import annotations

from dataclasses import fields

import pytest

from service.batching.stats import EWMA_ALPHA, BatcherCounters, ComputeTimes, new_counts


def test_compute_times_start_at_the_first_batch_then_average_with_rows_weights() -> None:
    times = ComputeTimes(max_batch_rows=4)
    assert (times.mean_s, times.row_s) == (None, None)
    times.record(1.0, 4)  # the first batch sets both
    assert (times.mean_s, times.row_s) == (1.0, 0.25)
    times.record(2.0, 2)  # half a batch: weight 0.2 * 2/4 = 0.1 for its 1 s per row
    assert EWMA_ALPHA == 0.2
    assert times.mean_s == pytest.approx(0.8 * 1.0 + 0.2 * 2.0, rel=1e-15)
    assert times.row_s == pytest.approx(0.9 * 0.25 + 0.1 * 1.0, rel=1e-15)
    times.record(0.5, 8)  # more rows than a batch (never happens) weighs as a full batch
    assert times.row_s == pytest.approx(0.8 * (0.9 * 0.25 + 0.1 * 1.0) + 0.2 * 0.0625, rel=1e-15)


def test_counts_are_the_counters_fields_at_zero() -> None:
    counts = new_counts()
    assert list(counts) == [f.name for f in fields(BatcherCounters)]
    assert set(counts.values()) == {0}
    counts["rejected"] += 2
    assert BatcherCounters(**counts).rejected == 2
    assert new_counts()["rejected"] == 0  # a fresh dict each time

"""``python -m benchmarks.overload --quick``: the overload run end to end at CI size, and its verdicts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.overload import verdicts

ROOT = Path(__file__).resolve().parents[2]


def _run(statuses: dict[str, int], p99_503: float | None, hz_p99: float, goodput: float, late: int = 0) -> dict:
    lat = {s: {"n": n, "p50_ms": 1.0, "p99_ms": p99_503 if s == "503" else 10.0, "mean_ms": 1.0, "max_ms": 20.0}
           for s, n in statuses.items()}
    return {"statuses": statuses, "latency_by_status": lat, "late_200": late, "late_200_max_ms": 6000.0 if late
            else None, "goodput_rows_per_s": goodput, "rss_mb": {"start": 500.0, "max": 600.0, "end": 550.0},
            "healthz": {"n": 10, "p50_ms": 1.0, "p99_ms": hz_p99, "mean_ms": 1.0, "max_ms": hz_p99,
                        "statuses": {"200": 10}}}


def test_verdicts() -> None:
    good = verdicts(_run({"200": 300, "503": 600}, 250.0, 40.0, 90.0), 100.0)
    assert [v["met"] for v in good] == [True, True, True, True, True, None]
    assert good[3]["measured"] == "90% (90 of 100 rows/s)"
    assert good[5]["measured"] == "500 -> max 600 MiB"
    bad = verdicts(_run({"200": 100, "503": 600, "0": 3}, 1500.0, 1200.0, 59.0, late=2), 100.0)
    assert [v["met"] for v in bad] == [False, False, False, False, False, None]
    assert bad[0]["measured"] == "no: {'0': 3}"
    assert bad[4]["measured"] == "2 late (max 6000 ms)"


def test_quick_overload_run(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.overload", "--quick", "--configs", "issue",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "overload.json").read_text())
    run = result["configs"]["issue"]["overload"]
    assert result["configs"]["issue"]["batching"]["max_queue_rows"] == 64
    assert run["timeout_s"] == 5.0
    # at 3x the sustainable rate: every request answered, the excess with 503, no answer late, probes fine
    assert set(run["statuses"]) <= {"200", "503", "504"}, run["statuses"]
    assert run["statuses"].get("503", 0) > 0 and run["statuses"].get("200", 0) > 0
    assert sum(run["statuses"].values()) == run["sent"]
    assert run["unanswered"] == 0 and run["late_200"] == 0
    assert set(run["healthz"]["statuses"]) == {"200"} and run["healthz"]["n"] >= 15
    md = (tmp_path / "overload.md").read_text()
    assert "| every request answered 200, 503 or 504 | yes | yes |" in md

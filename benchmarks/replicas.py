"""Replica run: 3 ``gga-serve`` processes on one artifact store behind nginx, recorded.

    python -m benchmarks.replicas        # about a minute; writes benchmarks/results/replicas.{json,md}

It runs the replica test (``tests/test_replicas.py::test_replicas_behind_nginx_pick_up_every_new_version``,
the same code CI runs) and records the figures the test measures: for a fit through the
balancer (``POST /fit``) and one by ``gga-fit`` (the batch job), the seconds from the new
version's rename into the store until each replica answers with it (the reload interval
is the default 5 s), the fit times, and every ``/predict`` a client sent through nginx
during both swaps, by status and by the detector version that answered it. nginx must be
on the ``PATH`` (``.ci/run`` shows how to unpack it from Debian's package).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys

from benchmarks.harness import RESULTS, ROOT, git_info

TEST = "tests/test_replicas.py::test_replicas_behind_nginx_pick_up_every_new_version"
MARK = "replica figures:"


def main() -> int:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", TEST], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith(MARK)]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n", file=sys.stderr)
        print("the replica run failed or was skipped (is nginx on the PATH?)", file=sys.stderr)
        return 1
    figures = json.loads(lines[-1].split(MARK, 1)[1])
    commit = git_info()["commit"]
    result = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "command": "python -m benchmarks.replicas", "commit": commit,
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()}, "test": TEST,
              "figures": figures}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "replicas.json").write_text(json.dumps(result, indent=1) + "\n")
    f = figures
    md = [
        "# Replica run: 3 gga-serve processes behind nginx on one artifact store", "",
        f"- Date: {result['date']}; command: `{result['command']}`; commit `{commit[:12]}`; "
        f"{result['machine']['cpu_count']} cores, {result['machine']['platform']}",
        f"- Runs `{TEST}`; reload interval 5 s (the default); a client posts `/predict` through nginx throughout", "",
        "| step | fit seconds | seconds from the version's rename until each replica serves it |",
        "|---|---|---|",
        f"| `POST /fit` through the balancer (v1) | {f['fit_seconds_post']} | "
        + ", ".join(f"{v}" for v in f["propagation_s_post_fit"].values()) + " |",
        f"| `gga-fit` batch job (v2) | {f['fit_seconds_gga_fit_process']} (process) | "
        + ", ".join(f"{v}" for v in f["propagation_s_gga_fit"].values()) + " |", "",
        f"Client `/predict` through nginx: statuses {f['predict_statuses']}, answered by versions "
        f"{f['predict_versions']}.", ""]
    (RESULTS / "replicas.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())

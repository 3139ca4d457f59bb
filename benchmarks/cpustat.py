"""CPU accounting of the benchmarks, from ``/proc`` (Linux; zero where it is missing).

- :func:`cores_busy_s`: busy seconds of some cores since boot (``/proc/stat``);
- :func:`tree_cpu_s`: CPU seconds of a process and its descendants (``/proc/<pid>/stat``);
- :class:`CpuMeter`: over a window, the CPU of this process (the load client), of a server's
  process tree, and of everything else on the server's cores;
- :func:`cpu_model`: the CPU's model name.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path

__all__ = ["CpuMeter", "cores_busy_s", "cpu_model", "tree_cpu_s"]


def cores_busy_s(cores: list[int] | None) -> float:
    """Busy CPU seconds (user, nice, system, irq, softirq, steal) of ``cores`` (None: all) since boot."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return 0.0
    want = {f"cpu{c}" for c in cores} if cores is not None else {"cpu"}
    ticks = 0
    for line in lines:
        f = line.split()
        if f and f[0] in want:
            ticks += sum(int(v) for v in f[1:4]) + sum(int(v) for v in f[6:9])
    return ticks / os.sysconf("SC_CLK_TCK")


def _proc_cpu_ticks(pid: int) -> tuple[int, int] | None:
    """(ppid, utime + stime) from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            rest = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return int(rest[1]), int(rest[11]) + int(rest[12])


def tree_cpu_s(root: int | None) -> float:
    """CPU seconds (user + system) of process ``root`` and its descendants alive now (0 without /proc)."""
    if root is None or not os.path.isdir("/proc"):
        return 0.0
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _proc_cpu_ticks(int(name))
            if st is not None:
                stats[int(name)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo.extend(children.get(pid, []))
    return total / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds over a window: this process (the client), a server's process tree, and
    everything else on the server's core(s) (other load: what the pinned server competed with).

    ``CpuMeter.server_cores``: the cores the servers are pinned to, set once by a run that
    pins them (:func:`benchmarks.load.main`); None (the default): all cores, and the client's
    own CPU is then subtracted from the other load too."""

    server_cores: list[int] | None = None

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid

    def __enter__(self) -> CpuMeter:
        self.w0, self.c0, self.s0 = time.perf_counter(), time.process_time(), tree_cpu_s(self.server_pid)
        self.b0 = cores_busy_s(self.server_cores)
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.w0
        self.client_cpu_s = time.process_time() - self.c0
        self.server_cpu_s = tree_cpu_s(self.server_pid) - self.s0
        busy = cores_busy_s(self.server_cores) - self.b0
        client = self.client_cpu_s if self.server_cores is None else 0.0
        self.other_cpu_s = max(0.0, busy - self.server_cpu_s - client)

    def as_dict(self, requests: int) -> dict:
        return {"client_cpu_util": self.client_cpu_s / self.wall, "server_cpu_util": self.server_cpu_s / self.wall,
                "other_cpu_on_server_cores": self.other_cpu_s / self.wall,
                "client_cpu_us_per_request": 1e6 * self.client_cpu_s / requests if requests else None}


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo, else platform.processor())."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()

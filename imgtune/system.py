"""What this machine lets imgtune use: cores for threads and loader processes (no torch import)."""

from __future__ import annotations

import math
import os
from pathlib import Path


def usable_cores(cgroup_cpu_max: str | Path = "/sys/fs/cgroup/cpu.max") -> int:
    """The CPU cores this process may really use: its affinity mask, capped by a cgroup CPU quota (a
    container limited to 2 CPUs on a 64-core host sees 64 in ``os.cpu_count()``, and PyTorch would
    start 32 threads that fight over 2 cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path(cgroup_cpu_max).read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def io_threads() -> int:
    """Threads for work that mostly waits on the disk (reading and checking image files): one more
    than the cores, at most 8."""
    return min(8, usable_cores() + 1)

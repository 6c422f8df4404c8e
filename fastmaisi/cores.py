"""How many CPU cores this process may use (its affinity mask where the OS has one: a Slurm or taskset allocation,
not the whole machine)."""

from __future__ import annotations

import os


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # (not on Linux)
        return os.cpu_count() or 1

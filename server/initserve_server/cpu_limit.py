"""The CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota (a container's CPU limit).

The generation pool is sized from it. ``os.cpu_count()`` reports the node's cores, not the container's share:
a pod limited to 2 CPUs on a 64-core node would otherwise run 64 generations at once, each at 1/32 speed, all
contending for the GIL with the threads that answer calls and health checks.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cgroup_cpu_quota(
    proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup", root: str | os.PathLike[str] = "/sys/fs/cgroup"
) -> float | None:
    """CPUs granted by this process's cgroup quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``),
    or None where there is none or it cannot be read."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        relative = path.lstrip("/")
        if hierarchy == "0" and controllers == "":  # cgroup v2
            for directory in (Path(root) / relative, Path(root)):
                try:
                    quota, period = (directory / "cpu.max").read_text().split()
                except (OSError, ValueError):
                    continue
                return None if quota == "max" else int(quota) / int(period)
        elif "cpu" in controllers.split(","):  # cgroup v1
            mount = Path(root) / "cpu,cpuacct" if (Path(root) / "cpu,cpuacct").is_dir() else Path(root) / "cpu"
            for directory in (mount / relative, mount):
                try:
                    quota = int((directory / "cpu.cfs_quota_us").read_text())
                    period = int((directory / "cpu.cfs_period_us").read_text())
                except (OSError, ValueError):
                    continue
                return None if quota <= 0 else quota / period
    return None


def usable_cpus() -> int:
    """Whole CPUs this process may keep busy: its affinity, or its cgroup quota rounded up where smaller."""
    cpus = affinity_cpus()
    quota = cgroup_cpu_quota()
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota)))

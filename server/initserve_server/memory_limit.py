"""The memory this process may use: the machine's, capped by its cgroup's limit (a container's memory limit).

The server's default budgets are fractions of it. In a container, sysconf reports the node's memory, not the
container's limit: a 4 GiB pod on a 512 GiB node would otherwise default to a 64 GiB cache and be killed long
before reaching it.
"""

from __future__ import annotations

import os
from pathlib import Path

FALLBACK_BYTES = 16 << 30  # not POSIX: assume a modest machine
# cgroup v1 reports "no limit" as a huge page-aligned number (2**63 - 4096 here); anything past this is none.
UNLIMITED_BYTES = 1 << 60


def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return FALLBACK_BYTES


def cgroup_memory_limit_bytes(
    proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup", root: str | os.PathLike[str] = "/sys/fs/cgroup"
) -> int | None:
    """The tightest memory limit of this process's cgroup and its ancestors (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``), or None where there is none or it cannot be read."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2: the unified hierarchy
            limits += _along(Path(root), path, "memory.max")
        elif "memory" in controllers.split(","):  # cgroup v1: the memory controller's hierarchy
            limits += _along(Path(root) / "memory", path, "memory.limit_in_bytes")
    limits = [limit for limit in limits if limit < UNLIMITED_BYTES]
    return min(limits) if limits else None


def _along(mount: Path, path: str, name: str) -> list[int]:
    """``name``'s value in the cgroup at ``path`` under ``mount`` and in each of its ancestors (limits nest).
    Inside a container's cgroup namespace the path is "/" and only the mount's own file exists."""
    parts = [part for part in path.split("/") if part]
    values = []
    for depth in range(len(parts), -1, -1):
        try:
            text = (mount.joinpath(*parts[:depth]) / name).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            values.append(int(text))
    return values


def usable_memory_bytes() -> int:
    """The machine's memory, or its cgroup's limit where that is smaller."""
    limit = cgroup_memory_limit_bytes()
    physical = physical_memory_bytes()
    return physical if limit is None else min(physical, limit)

"""Default budgets follow a container's memory limit: cgroup v1 and v2 files, nesting, and a real cgroup."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from initserve_server.memory_limit import cgroup_memory_limit_bytes, physical_memory_bytes

GIB = 1 << 30
V1_UNLIMITED = "9223372036854771712"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_takes_the_tightest_of_the_cgroup_and_its_ancestors(tmp_path: Path) -> None:
    write(tmp_path / "proc", "0::/kubepods/pod1/container\n")
    write(tmp_path / "fs/kubepods/memory.max", "max\n")
    write(tmp_path / "fs/kubepods/pod1/memory.max", f"{4 * GIB}\n")  # the pod's limit
    write(tmp_path / "fs/kubepods/pod1/container/memory.max", "max\n")
    assert cgroup_memory_limit_bytes(tmp_path / "proc", tmp_path / "fs") == 4 * GIB


def test_cgroup_v2_inside_a_cgroup_namespace_reads_the_mounts_own_file(tmp_path: Path) -> None:
    write(tmp_path / "proc", "0::/\n")
    write(tmp_path / "fs/memory.max", f"{3 * GIB}\n")
    assert cgroup_memory_limit_bytes(tmp_path / "proc", tmp_path / "fs") == 3 * GIB


def test_cgroup_v1_reads_the_memory_controllers_hierarchy(tmp_path: Path) -> None:
    write(tmp_path / "proc", "9:pids:/\n4:memory:/docker/abc\n1:cpu,cpuacct:/docker/abc\n0::/\n")
    write(tmp_path / "fs/memory/memory.limit_in_bytes", V1_UNLIMITED)
    write(tmp_path / "fs/memory/docker/abc/memory.limit_in_bytes", f"{2 * GIB}\n")
    assert cgroup_memory_limit_bytes(tmp_path / "proc", tmp_path / "fs") == 2 * GIB


@pytest.mark.parametrize(
    ("proc", "files"),
    [
        ("0::/\n", {"memory.max": "max\n"}),  # v2, no limit
        ("4:memory:/\n", {"memory/memory.limit_in_bytes": V1_UNLIMITED}),  # v1, no limit
        ("0::/\n", {}),  # nothing readable
        ("garbage\n", {}),
    ],
    ids=["v2-max", "v1-huge", "unreadable", "garbage"],
)
def test_no_limit_is_none(tmp_path: Path, proc: str, files: dict[str, str]) -> None:
    write(tmp_path / "proc", proc)
    for name, text in files.items():
        write(tmp_path / "fs" / name, text)
    assert cgroup_memory_limit_bytes(tmp_path / "proc", tmp_path / "fs") is None
    assert cgroup_memory_limit_bytes(tmp_path / "missing", tmp_path / "fs") is None


def test_a_server_in_a_real_memory_cgroup_sizes_its_budgets_by_the_limit() -> None:
    """A process moved into a memory cgroup of 2 GiB (cgroup v1, as on this machine; needs root) reports a
    2 GiB default cache of 1/8 of it, where the machine's memory would give more."""
    group = Path("/sys/fs/cgroup/memory") / f"initserve-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(2 * GIB))
    except OSError as error:
        pytest.skip(f"cannot make a v1 memory cgroup here: {error}")
    try:
        code = (
            "import os, sys; open(sys.argv[1], 'w').write(str(os.getpid()));"
            "from initserve_server import config; print(config.DEFAULT_CACHE_BYTES, config.DEFAULT_MAX_INFLIGHT_BYTES)"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, str(group / "cgroup.procs")], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        cache, inflight = map(int, done.stdout.split())
        assert physical_memory_bytes() // 8 > 2 * GIB // 8  # the machine alone would give more
        assert cache == 2 * GIB // 8
        assert inflight == max(2 * GIB // 4, 4 * GIB)  # at least one largest tensor, as documented
    finally:
        os.rmdir(group)

"""The client's shared-memory regions and their pool: reuse, limits, names removed, fork and crash."""

from __future__ import annotations

import gc
import os
import time

import pytest
import torch

from initserve import _regions, _shared
from tests.conftest import run_python

pytestmark = pytest.mark.skipif(not _shared.available(), reason="needs a writable /dev/shm")
PAGE = 4096
TRACKER_CLEANUP_SECONDS = 30.0


def names() -> set[str]:
    return {name for name in os.listdir(_regions.SHARED_MEMORY_DIR) if name.startswith("initserve-")}


def lent(pool: _regions.RegionPool, nbytes: int, fill: int) -> tuple[torch.Tensor, str]:
    region = pool.take(nbytes)
    tensor = pool.lend(region, torch.uint8, (nbytes,))
    tensor.fill_(fill)
    return tensor, region.name


def test_a_freed_tensor_s_region_is_taken_again_and_a_live_one_never() -> None:
    pool = _regions.RegionPool(4 * PAGE)
    try:
        first, first_name = lent(pool, PAGE, 1)
        second, second_name = lent(pool, PAGE, 2)  # the first is alive: a new region
        assert first_name != second_name and {first_name, second_name} <= names()
        view = first[10:20]
        del first
        gc.collect()
        assert pool.free_bytes() == 0  # a view still holds the first region
        del view
        assert pool.free_bytes() == PAGE
        third = pool.take(PAGE)
        assert third.name == first_name and pool.free_bytes() == 0
        assert bytes(third.map[:4]) == b"\x01" * 4  # the same pages: nothing to fault in again
        assert pool.take(2 * PAGE).name not in (first_name, second_name)  # only an exact size is reused
        assert torch.equal(second, torch.full((PAGE,), 2, dtype=torch.uint8))  # untouched throughout
    finally:
        pool.close()


def test_the_pool_keeps_at_most_max_bytes_evicting_the_oldest() -> None:
    before = names()
    pool = _regions.RegionPool(2 * PAGE)
    tensors = [lent(pool, PAGE, k) for k in range(3)] + [lent(pool, 3 * PAGE, 9)]
    created = [name for _, name in tensors]
    assert set(created) == names() - before
    while tensors:
        tensors.pop(0)
    # freed in order: 0, 1, 2 (0 evicted to make room for 2), then 3 (larger than the whole pool: removed)
    assert pool.free_bytes() == 2 * PAGE
    assert names() - before == set(created[1:3])
    pool.close()
    assert names() == before
    with pytest.raises(ValueError, match="shared_memory_pool_bytes must be at least 0, got -1"):
        _regions.RegionPool(-1)


def test_closing_removes_every_name_and_lent_tensors_stay_readable() -> None:
    before = names()
    pool = _regions.RegionPool(1 << 20)
    kept, _ = lent(pool, PAGE, 7)
    freed, _ = lent(pool, PAGE, 8)
    del freed
    assert len(names() - before) == 2
    pool.close()
    assert names() == before
    assert torch.equal(kept, torch.full((PAGE,), 7, dtype=torch.uint8))
    del kept  # back to a closed pool: unmapped, nothing pooled
    assert pool.free_bytes() == 0
    late = pool.take(PAGE)
    assert late.poolable is False  # after close, regions are not kept either
    late.close()
    assert names() == before


def test_without_a_pool_nothing_is_kept_or_tracked() -> None:
    pool = _regions.RegionPool(0)
    region = pool.take(PAGE)
    assert not pool.keeps_names and not region.tracked and not region.poolable
    tensor = pool.lend(region, torch.uint8, (PAGE,))
    region.unlink()  # what fetch_shared does once the call returns
    del tensor
    assert pool.free_bytes() == 0 and region.name not in names()


def test_across_fork_shared_pages_are_never_reused_and_only_the_creator_removes_names() -> None:
    """In a process of its own (no gRPC threads to fork): a region lent at the fork is shared with the child."""
    done = run_python(
        """
        import os
        import torch
        from initserve import _regions

        pool = _regions.RegionPool(1 << 20)
        region = pool.take(4096)
        shared = pool.lend(region, torch.uint8, (4096,))
        spare = pool.lend(pool.take(4096), torch.uint8, (4096,))
        del spare  # pooled before the fork
        assert pool.free_bytes() == 4096
        path = region.path
        child = os.fork()
        if child == 0:
            ok = pool.free_bytes() == 0  # the parent's free regions are not the child's
            fresh = pool.take(4096)
            ok = ok and fresh.path != path
            fresh.close()
            del shared  # the child's copy: unmapped here, the name is the parent's
            ok = ok and os.path.exists(path)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "child checks failed"
        assert os.path.exists(path)
        del shared  # shared with the child at the fork: removed, not pooled
        assert not os.path.exists(path), "a region lent at the fork was kept"
        assert pool.free_bytes() == 4096  # the spare, pooled before the fork, is still there
        pool.close()
        print("ok")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_names_of_a_killed_process_are_removed_by_the_resource_tracker() -> None:
    done = run_python(
        """
        import os, signal
        import torch
        from initserve import _regions

        pool = _regions.RegionPool(1 << 20)
        region = pool.take(4096)
        tensor = pool.lend(region, torch.uint8, (4096,))
        del tensor  # pooled: the name stays
        assert pool.free_bytes() == 4096
        print(region.path, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    assert done.returncode == -9
    path = done.stdout.strip()
    assert path.startswith("/dev/shm/initserve-")
    deadline = time.monotonic() + TRACKER_CLEANUP_SECONDS
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)  # the tracker notices its pipe closing, then unlinks
    assert not os.path.exists(path), f"{path} outlived its process by {TRACKER_CLEANUP_SECONDS}s"

"""The client's shared-memory regions and their pool: sealed allocated memfds, reuse, limits, closing, fork."""

from __future__ import annotations

import fcntl
import gc
import os

import pytest
import torch

from initserve import _regions
from tests.conftest import run_python

PAGE = 4096


def lent(pool: _regions.RegionPool, nbytes: int, fill: int) -> tuple[torch.Tensor, _regions.SharedRegion]:
    region = pool.take(nbytes)
    tensor = pool.lend(region, torch.uint8, (nbytes,))
    tensor.fill_(fill)
    return tensor, region


def closed_regions(monkeypatch) -> list[_regions.SharedRegion]:
    """Every region closed from now on, in order."""
    closed: list[_regions.SharedRegion] = []
    close = _regions.SharedRegion.close

    def recording(region: _regions.SharedRegion) -> None:
        if not any(seen is region for seen in closed):
            closed.append(region)
        close(region)

    monkeypatch.setattr(_regions.SharedRegion, "close", recording)
    return closed


def test_a_region_is_a_sealed_fully_allocated_memfd_with_no_name() -> None:
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    region = _regions.SharedRegion(3 * PAGE + 100)
    try:
        assert region.fd is not None and region.token == ""
        info = os.fstat(region.fd)
        assert info.st_size == 3 * PAGE + 100 and info.st_blocks * 512 >= info.st_size  # every page allocated
        assert fcntl.fcntl(region.fd, fcntl.F_GET_SEALS) == fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
        with pytest.raises(PermissionError):
            os.ftruncate(region.fd, PAGE)  # it can never shrink under the server's mapping
        with pytest.raises(PermissionError):
            os.ftruncate(region.fd, 8 * PAGE)
        assert os.readlink(f"/proc/self/fd/{region.fd}").startswith("/memfd:initserve-region")
        assert fcntl.fcntl(region.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC  # never inherited by a child program
        region.map[:4] = b"abcd"
        region.close_fd()
        assert region.fd is None and bytes(region.map[:4]) == b"abcd"  # the mapping keeps the memory
        if os.path.isdir("/dev/shm"):
            assert set(os.listdir("/dev/shm")) == before  # nothing named anywhere
    finally:
        region.close()


def test_closing_a_region_tells_its_owner_once() -> None:
    told: list[_regions.SharedRegion] = []
    region = _regions.SharedRegion(PAGE)
    region.on_close = told.append
    region.close()
    region.close()
    assert told == [region] and region.fd is None and region.map.closed and not region.poolable


def test_a_freed_tensor_s_region_is_taken_again_and_a_live_one_never() -> None:
    pool = _regions.RegionPool(4 * PAGE)
    try:
        first, first_region = lent(pool, PAGE, 1)
        second, second_region = lent(pool, PAGE, 2)  # the first is alive: a new region
        assert first_region is not second_region
        view = first[10:20]
        del first
        gc.collect()
        assert pool.free_bytes() == 0  # a view still holds the first region
        del view
        assert pool.free_bytes() == PAGE
        third = pool.take(PAGE)
        assert third is first_region and pool.free_bytes() == 0
        assert bytes(third.map[:4]) == b"\x01" * 4  # the same pages: nothing to allocate or fault in again
        other = pool.take(2 * PAGE)
        assert other not in (first_region, second_region)  # only an exact size is reused
        other.close()
        assert torch.equal(second, torch.full((PAGE,), 2, dtype=torch.uint8))  # untouched throughout
    finally:
        pool.close()


def test_take_closes_free_regions_that_are_no_longer_usable() -> None:
    pool = _regions.RegionPool(4 * PAGE)
    try:
        first, dead = lent(pool, PAGE, 1)
        second, alive = lent(pool, PAGE, 2)
        del second
        del first  # returned last: taken (and found unusable) first
        assert pool.free_bytes() == 2 * PAGE
        taken = pool.take(PAGE, lambda region: region is not dead)  # e.g. registered on a connection now closed
        assert taken is alive and dead.map.closed and pool.free_bytes() == 0
        taken.close()
    finally:
        pool.close()


def test_the_pool_keeps_at_most_max_bytes_evicting_the_oldest(monkeypatch) -> None:
    closed = closed_regions(monkeypatch)
    pool = _regions.RegionPool(2 * PAGE)
    tensors = [lent(pool, PAGE, k) for k in range(3)] + [lent(pool, 3 * PAGE, 9)]
    regions = [region for _, region in tensors]
    while tensors:
        tensors.pop(0)
    # freed in order: 0, 1, 2 (0 evicted to make room for 2), then 3 (larger than the whole pool: closed)
    assert pool.free_bytes() == 2 * PAGE
    assert closed == [regions[0], regions[3]]
    pool.close()
    assert closed == [regions[0], regions[3], regions[1], regions[2]]
    with pytest.raises(ValueError, match="shared_memory_pool_bytes must be at least 0, got -1"):
        _regions.RegionPool(-1)


def test_closing_closes_free_regions_and_lent_tensors_stay_readable(monkeypatch) -> None:
    closed = closed_regions(monkeypatch)
    pool = _regions.RegionPool(1 << 20)
    kept, kept_region = lent(pool, PAGE, 7)
    freed, freed_region = lent(pool, PAGE, 8)
    del freed
    pool.close()
    assert closed == [freed_region]
    assert torch.equal(kept, torch.full((PAGE,), 7, dtype=torch.uint8))
    del kept  # back to a closed pool: closed, nothing pooled
    assert closed == [freed_region, kept_region] and pool.free_bytes() == 0
    late = pool.take(PAGE)
    assert late.poolable is False  # after close, regions are not kept either
    late.close()


def test_without_a_pool_nothing_is_kept(monkeypatch) -> None:
    closed = closed_regions(monkeypatch)
    pool = _regions.RegionPool(0)
    region = pool.take(PAGE)
    assert not region.poolable
    tensor = pool.lend(region, torch.uint8, (PAGE,))
    del tensor
    assert pool.free_bytes() == 0 and closed == [region]


def test_a_region_given_back_unused_is_pooled() -> None:
    pool = _regions.RegionPool(4 * PAGE)
    region = pool.take(PAGE)
    pool.give(region)
    assert pool.free_bytes() == PAGE and pool.take(PAGE) is region
    pool.discard(region)
    assert region.map.closed and pool.free_bytes() == 0
    pool.close()


def test_across_fork_shared_pages_are_never_reused() -> None:
    """In a process of its own (no gRPC threads to fork): a region lent at the fork is shared with the child."""
    done = run_python(
        """
        import os
        import torch
        from initserve import _regions

        pool = _regions.RegionPool(1 << 20)
        region = pool.take(4096)
        shared = pool.lend(region, torch.uint8, (4096,))
        spare_region = pool.take(4096)
        spare = pool.lend(spare_region, torch.uint8, (4096,))
        del spare  # pooled before the fork
        assert pool.free_bytes() == 4096
        child = os.fork()
        if child == 0:
            ok = pool.free_bytes() == 0  # the parent's free regions are not the child's
            fresh = pool.take(4096)
            ok = ok and fresh is not region and fresh is not spare_region
            fresh.close()
            shared[0] = 99  # MAP_SHARED: the parent sees it
            os._exit(0 if ok else 1)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "child checks failed"
        assert int(shared[0]) == 99
        del shared  # shared with the child at the fork: closed, not pooled
        assert region.map.closed, "a region lent at the fork was kept"
        assert pool.free_bytes() == 4096 and pool.take(4096) is spare_region  # pooled before the fork: still here
        pool.close()
        print("ok")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"

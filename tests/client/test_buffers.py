"""The client's pool of freed tensor memory: a gRPC fetch's new tensor takes the pages of a freed one.

What must hold: the bytes are the contract's whatever memory they land in; memory still reachable from any
tensor or view is never handed out again; the pool keeps at most ``MemoryPolicy.reuse_bytes`` of free memory,
and there is no pool unless the policy asks for one.
"""

from __future__ import annotations

import mmap
import resource

import pytest
import torch

import initserve
from initserve_memory import page_moves
from initserve_memory.buffer_pool import MIN_POOLED_BYTES, BufferPool
from tests.conftest import ServerProcess, reference, same_bytes

MIB = 1 << 20
LARGE = (MIN_POOLED_BYTES // 4 // 1024, 1024)  # float32: exactly MIN_POOLED_BYTES


def test_a_miss_makes_room_for_the_new_tensor_within_the_limit() -> None:
    pool = BufferPool(lambda: 3 * MIN_POOLED_BYTES, min_bytes=MIN_POOLED_BYTES, make_room_on_miss=True)
    small, reused = pool.allocate((16, 16), torch.float32)
    assert not reused
    assert small.untyped_storage().resizable()  # under min_bytes: torch.empty's own storage
    first, reused = pool.allocate(LARGE, torch.float32)
    second, _ = pool.allocate(LARGE, torch.float32)
    assert not reused
    del first, second
    assert pool.free_bytes() == 2 * MIN_POOLED_BYTES
    again, reused = pool.allocate((MIN_POOLED_BYTES,), torch.uint8)
    assert reused and pool.free_bytes() == MIN_POOLED_BYTES
    other, reused = pool.allocate((2 * LARGE[0], 1024), torch.float32)  # a miss: takes the free one's pages
    assert not reused and pool.free_bytes() == 0  # half of it: the other half is fresh memory
    bigger, reused = pool.allocate((3 * LARGE[0], 1024), torch.float32)  # nothing free: all fresh
    assert not reused and pool.free_bytes() == 0
    del other
    assert pool.free_bytes() == 2 * MIN_POOLED_BYTES
    del again, bigger  # the least recently used give way to the last one back
    assert pool.free_bytes() == 3 * MIN_POOLED_BYTES
    assert pool.release() == 3 * MIN_POOLED_BYTES and pool.free_bytes() == 0
    kept, _ = pool.allocate(LARGE, torch.float32)
    del kept
    assert pool.free_bytes() == MIN_POOLED_BYTES  # release() leaves the pool on; close() turns it off
    pool.close()
    closed, _ = pool.allocate(LARGE, torch.float32)
    del closed
    assert pool.free_bytes() == 0


def test_a_miss_takes_the_pages_of_free_buffers_of_other_sizes_without_faulting() -> None:
    pool = BufferPool(lambda: 1 << 30, min_bytes=MIN_POOLED_BYTES)
    first, _ = pool.allocate(LARGE, torch.float32)
    second, _ = pool.allocate((3 * LARGE[0], 1024), torch.float32)
    held, _ = pool.allocate(LARGE, torch.float32)
    for tensor in (first, second, held):
        tensor.fill_(2.5)  # written: resident pages
    view = held[1:3]
    del first, second, held, tensor
    assert pool.free_bytes() == 4 * MIN_POOLED_BYTES  # ``held`` is still reached by its view: not free

    faults = faults_of_this_thread()
    double, reused = pool.allocate((2 * LARGE[0], 1024), torch.float32)  # first's pages, then half of second's
    double.normal_(generator=torch.Generator().manual_seed(1))
    moved_faults = faults_of_this_thread() - faults
    assert reused and pool.free_bytes() == 2 * MIN_POOLED_BYTES  # the rest of second, a free buffer of its own
    assert same_bytes(double, torch.empty_like(double).normal_(generator=torch.Generator().manual_seed(1)))
    assert same_bytes(view, torch.full((2, 1024), 2.5))  # a view's memory is never moved

    rest, reused = pool.allocate((2 * MIN_POOLED_BYTES,), torch.uint8)  # the rest's size exactly: a plain hit
    assert reused and pool.free_bytes() == 0
    faults = faults_of_this_thread()
    fresh, reused = pool.allocate((2 * LARGE[0], 1024), torch.float32)
    fresh.normal_(generator=torch.Generator().manual_seed(1))
    fresh_faults = faults_of_this_thread() - faults
    assert not reused and same_bytes(fresh, double)
    assert fresh_faults >= 8  # 16 MiB of fresh memory: at least one fault per 2 MiB page (4,096 with 4 KiB pages)
    assert moved_faults <= fresh_faults // 8, (moved_faults, fresh_faults)
    del rest, double, fresh, view
    pool.close()


def test_without_page_moving_a_miss_takes_fresh_memory_and_leaves_the_free_buffers(monkeypatch) -> None:
    monkeypatch.setattr(page_moves, "_mremap", None)  # as on another OS, or a kernel before 5.7
    pool = BufferPool(lambda: 1 << 30, min_bytes=MIN_POOLED_BYTES)
    first, _ = pool.allocate(LARGE, torch.float32)
    del first
    double, reused = pool.allocate((2 * LARGE[0], 1024), torch.float32)
    assert not reused and pool.free_bytes() == MIN_POOLED_BYTES
    pool.close()


def test_moved_pages_keep_their_bytes_and_leave_the_source_empty() -> None:
    if not page_moves.supported():
        pytest.skip("no mremap(MREMAP_DONTUNMAP) here")
    page = page_moves.PAGE
    source = mmap.mmap(-1, 4 * page, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    destination = mmap.mmap(-1, 3 * page, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    source[:] = bytes(range(256)) * (4 * page // 256)
    expected = source[page : 3 * page]
    here, there = page_moves.address(source), page_moves.address(destination)
    assert page_moves.move(here + page, there + page, 2 * page)
    assert destination[page:] == expected and destination[:page] == bytes(page)
    assert source[page : 3 * page] == bytes(2 * page)  # still mapped, now empty
    assert source[:page] == expected[:page] and source[3 * page :] == expected[:page]  # the pages around stay
    source.close()
    destination.close()


def faults_of_this_thread() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def test_a_fetch_writes_the_contract_bytes_into_a_freed_tensor_s_memory(server: ServerProcess) -> None:
    with server.client(memory=initserve.MemoryPolicy.fast()) as client:
        first = client.normal(LARGE, seed=1)
        address = first.data_ptr()
        assert same_bytes(first, reference("normal", LARGE, seed=1))
        del first
        second = client.kaiming_normal(LARGE, seed=2)  # same byte size: the freed memory, written over
        assert second.data_ptr() == address
        assert same_bytes(second, reference("kaiming_normal", LARGE, seed=2))
        assert not second.untyped_storage().resizable()  # a mapping's (documented)


def test_memory_a_view_still_reaches_is_never_handed_out(server: ServerProcess) -> None:
    with server.client(memory=initserve.MemoryPolicy.fast()) as client:
        first = client.normal(LARGE, seed=3)
        expected = first.clone()
        view = first[5:7]
        address = first.data_ptr()
        del first
        second = client.normal(LARGE, seed=4)
        assert second.data_ptr() != address
        assert same_bytes(view, expected[5:7])  # the view's bytes are untouched by the second fetch
        assert same_bytes(second, reference("normal", LARGE, seed=4))
        del view
        third = client.normal(LARGE, seed=5)  # now it is free, and reused
        assert third.data_ptr() == address and same_bytes(third, reference("normal", LARGE, seed=5))


def test_fetch_many_and_a_sliced_fetch_take_freed_memory_too(server: ServerProcess) -> None:
    shape = (2 * LARGE[0], 1024)
    spec = initserve.TensorSpec("w", shape, "normal", seed=8, derive=False)
    with server.client(memory=initserve.MemoryPolicy.fast()) as client:
        whole = client.normal(shape, seed=6)
        del whole
        half = client.fetch(shape, "normal", seed=7, slices=[initserve.Range(0, 0, LARGE[0])]).tensor
        assert client._memory.free_bytes() == MIN_POOLED_BYTES  # half of whole's pages; the rest stays free
        assert same_bytes(half, reference("normal", shape, seed=7)[: LARGE[0]])
        results = client.fetch_many([spec])
        assert client._memory.free_bytes() == 0  # the rest went into it
        assert same_bytes(results["w"].tensor, reference("normal", shape, seed=8))
        address = results["w"].tensor.data_ptr()
        del results
        again = client.fetch_many([initserve.TensorSpec("w", shape, "normal", seed=9, derive=False)])
        assert again["w"].tensor.data_ptr() == address  # the same byte size: the same memory
        assert same_bytes(again["w"].tensor, reference("normal", shape, seed=9))


def test_the_pool_keeps_at_most_its_bytes_and_gives_them_back(server: ServerProcess) -> None:
    with server.client(memory=initserve.MemoryPolicy(reuse_bytes=MIN_POOLED_BYTES)) as client:
        tensors = [client.normal(LARGE, seed=seed) for seed in range(3)]
        del tensors
        assert client._memory.free_bytes() == MIN_POOLED_BYTES  # one of the three fits
        assert client.release_memory() == MIN_POOLED_BYTES
        assert client._memory.free_bytes() == 0


def test_by_default_there_is_no_pool_and_fetches_give_torch_empty_s_tensors(server: ServerProcess) -> None:
    assert initserve.MemoryPolicy.fast().reuse_bytes == 1 << 30
    with pytest.raises(ValueError, match="reuse_bytes must be at least 0, got -1"):
        initserve.MemoryPolicy(reuse_bytes=-1)
    with server.client() as client:
        tensor = client.normal(LARGE, seed=9)
        assert same_bytes(tensor, reference("normal", LARGE, seed=9))
        assert tensor.untyped_storage().resizable()  # torch.empty's storage
        assert client.release_memory() == 0


def test_bytes_made_here_take_the_pools_memory_too(server: ServerProcess) -> None:
    """local=True makes the bytes in this process; they go where a fetched tensor's would, under the same policy."""
    from initserve import portable

    memory = initserve.MemoryPolicy(reuse_bytes=MIN_POOLED_BYTES)
    with server.client(memory=memory, rng=portable.PHILOX, local=True) as client:
        first = client.fetch(LARGE, "normal", seed=1).tensor
        address = first.data_ptr()
        del first
        assert client._memory.free_bytes() == MIN_POOLED_BYTES
        again = client.fetch(LARGE, "normal", seed=2)
        assert again.transport == "local" and again.tensor.data_ptr() == address
        assert same_bytes(again.tensor, portable.generate(LARGE, "normal", seed=2))

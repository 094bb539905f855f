"""The client's pool of freed tensor memory: a gRPC fetch's new tensor takes the pages of a freed one.

What must hold: the bytes are the contract's whatever memory they land in; memory still reachable from any
tensor or view is never handed out again; the pool keeps at most ``buffer_pool_bytes`` of free memory.
"""

from __future__ import annotations

import pytest
import torch

import initserve
from initserve._buffers import DEFAULT_POOL_BYTES, MIN_POOLED_BYTES, BufferPool
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
    other, reused = pool.allocate((2 * LARGE[0], 1024), torch.float32)  # a miss: free + new fit the limit
    assert not reused and pool.free_bytes() == MIN_POOLED_BYTES
    bigger, reused = pool.allocate((3 * LARGE[0], 1024), torch.float32)  # they would not: the free one goes
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


def test_a_fetch_writes_the_contract_bytes_into_a_freed_tensor_s_memory(server: ServerProcess) -> None:
    with server.client() as client:
        first = client.normal(LARGE, seed=1)
        address = first.data_ptr()
        assert same_bytes(first, reference("normal", LARGE, seed=1))
        del first
        second = client.kaiming_normal(LARGE, seed=2)  # same byte size: the freed memory, written over
        assert second.data_ptr() == address
        assert same_bytes(second, reference("kaiming_normal", LARGE, seed=2))
        assert not second.untyped_storage().resizable()  # a mapping's (documented)


def test_memory_a_view_still_reaches_is_never_handed_out(server: ServerProcess) -> None:
    with server.client() as client:
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
    with server.client() as client:
        whole = client.normal(shape, seed=6)
        address = whole.data_ptr()
        del whole
        half = client.fetch(shape, "normal", seed=7, slices=[initserve.Range(0, 0, LARGE[0])]).tensor
        assert half.data_ptr() != address  # another byte size
        assert same_bytes(half, reference("normal", shape, seed=7)[: LARGE[0]])
        results = client.fetch_many([initserve.TensorSpec("w", shape, "normal", seed=8, derive=False)])
        assert results["w"].tensor.data_ptr() == address
        assert same_bytes(results["w"].tensor, reference("normal", shape, seed=8))


def test_the_pool_keeps_at_most_its_bytes_and_gives_them_back(server: ServerProcess) -> None:
    with server.client(buffer_pool_bytes=MIN_POOLED_BYTES) as client:
        tensors = [client.normal(LARGE, seed=seed) for seed in range(3)]
        del tensors
        assert client._buffers.free_bytes() == MIN_POOLED_BYTES  # one of the three fits
        assert client.release_memory() == MIN_POOLED_BYTES
        assert client._buffers.free_bytes() == 0


def test_no_pool_gives_torch_empty_s_tensors(server: ServerProcess) -> None:
    assert DEFAULT_POOL_BYTES == 1 << 30
    with pytest.raises(ValueError, match="buffer_pool_bytes must be at least 0, got -1"):
        initserve.Client(server.target, buffer_pool_bytes=-1)
    with server.client(buffer_pool_bytes=0) as client:
        tensor = client.normal(LARGE, seed=9)
        assert same_bytes(tensor, reference("normal", LARGE, seed=9))
        assert tensor.untyped_storage().resizable()  # torch.empty's storage
        assert client.release_memory() == 0

"""The server's pool of freed tensor memory: reused for the next tensor of a size, within the budgets."""

from __future__ import annotations

import time

import pytest
import torch

import initserve
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_server.buffers import MIN_POOLED_BYTES, BufferPool
from tests.conftest import page_faults, preallocated, reference, same_bytes, start_server

MIB = 1 << 20
CACHED_WITHIN_SECONDS = 10.0
LARGE = (MIN_POOLED_BYTES // 4 // 1024, 1024)  # float32: exactly MIN_POOLED_BYTES


def test_a_freed_tensor_s_memory_is_reused_for_its_size_only() -> None:
    spare = [4 * MIN_POOLED_BYTES]
    pool = BufferPool(lambda: spare[0])
    small = pool.empty((16, 16), torch.float32)
    del small
    assert pool.free_bytes() == 0  # under MIN_POOLED_BYTES: plain torch.empty, nothing kept
    first = pool.empty(LARGE, torch.float32)
    address = first.data_ptr()
    first.fill_(1.5)
    row = first[3]
    del first
    assert pool.free_bytes() == 0  # a view still holds it
    del row
    assert pool.free_bytes() == MIN_POOLED_BYTES
    again = pool.empty((MIN_POOLED_BYTES // 2,), torch.int16)  # same byte size, another dtype and shape
    assert again.data_ptr() == address and pool.free_bytes() == 0
    assert again.shape == (MIN_POOLED_BYTES // 2,) and again.dtype == torch.int16 and again.is_contiguous()
    other = pool.empty((MIN_POOLED_BYTES // 4 + 1024,), torch.float32)  # another size: new memory
    assert other.data_ptr() != address
    del again, other
    assert pool.free_bytes() == 2 * MIN_POOLED_BYTES + 4096


def test_free_buffers_stay_within_the_spare_budget() -> None:
    spare = [MIN_POOLED_BYTES]
    pool = BufferPool(lambda: spare[0])
    tensors = [pool.empty(LARGE, torch.float32) for _ in range(3)]
    del tensors
    assert pool.free_bytes() == MIN_POOLED_BYTES  # one fits the room the budgets leave
    spare[0] = 0
    bigger = pool.empty((2 * LARGE[0], 1024), torch.float32)  # no buffer of its size: the pool gives way first
    assert pool.free_bytes() == 0
    del bigger  # comes back with no room: unmapped
    assert pool.free_bytes() == 0
    pool.close()
    spare[0] = 1 << 40
    freed = pool.empty(LARGE, torch.float32)
    del freed  # a closed pool keeps nothing
    assert pool.free_bytes() == 0


@pytest.mark.parametrize("scheme", ["normal", "orthogonal"])  # filled in pieces; generated in one call
def test_tensors_generated_into_reused_memory_are_the_contract_bytes(scheme) -> None:
    """A cache of 2 tensors, 4 generations: the last two are written over evicted tensors' pages."""
    shape = (2048, 1024) if scheme == "normal" else (1024, 2048)  # 8 MiB
    running = start_server("--cache-bytes", "16M", "--max-inflight-bytes", "64M")
    try:
        with running.client() as client:
            for seed in range(4):
                result = client.fetch(shape, scheme, seed=seed)
                assert not result.header.cache_hit
                assert same_bytes(result.tensor, reference(scheme, shape, seed=seed))
                del result
                stats = cached_after(client, seed + 1)  # the next generation starts after this one's eviction
            assert stats.cache_evictions == 2 and stats.buffer_pool_bytes == 8 * MIB
            sliced = client.fetch(shape, scheme, seed=3, slices=[initserve.Range(0, 0, 1024)])
            assert same_bytes(sliced.tensor, reference(scheme, shape, seed=3)[:1024])
    finally:
        running.stop()


def test_a_generation_takes_the_pages_of_evicted_tensors_of_another_size() -> None:
    """A cache of four 8 MiB tensors, then 16 MiB ones: the first 16 MiB generation writes fresh memory and
    evicts two 8 MiB tensors; the next one is written into their pages, without page faults."""
    small, large = (2048, 1024), (4096, 1024)
    running = start_server("--cache-bytes", "32M", "--max-inflight-bytes", "64M")
    try:
        with running.client() as client:
            faults = []
            for seed, shape in enumerate([small] * 4 + [large] * 2):
                before = page_faults(running.process.pid)
                result = client.fetch(shape, "normal", seed=seed)
                assert not result.header.cache_hit
                assert same_bytes(result.tensor, reference("normal", shape, seed=seed))
                del result
                stats = cached_after(client, seed + 1)
                faults.append(page_faults(running.process.pid) - before)
            assert stats.cache_evictions == 4 and stats.buffer_pool_bytes == 16 * MIB
            fresh, moved = faults[4], faults[5]
            assert fresh >= 16 * MIB // (2 << 20)  # at least one fault per 2 MiB page (4,096 with 4 KiB pages)
            assert moved <= fresh // 8, faults
    finally:
        running.stop()


def test_preallocated_memory_serves_a_fresh_server_s_first_generations() -> None:
    """--preallocate-bytes: memory written at start-up, in 64 MiB pieces, for generations of any size."""
    shape = (4096, 1024)  # 16 MiB
    running = start_server("--cache-bytes", "64M", "--max-inflight-bytes", "64M", "--preallocate-bytes", "96M")
    try:
        with running.client() as client:
            assert preallocated(client, 96 * MIB) == 96 * MIB
            warm_up = client.normal((256, 1024), seed=99)  # 1 MiB, from the heap: the server's first call's faults
            assert same_bytes(warm_up, reference("normal", (256, 1024), seed=99))
            faults = []
            for seed in range(3):
                before = page_faults(running.process.pid)
                result = client.fetch(shape, "normal", seed=seed)
                assert same_bytes(result.tensor, reference("normal", shape, seed=seed))
                del result
                stats = cached_after(client, seed + 2)
                faults.append(page_faults(running.process.pid) - before)
            assert stats.buffer_pool_bytes == 48 * MIB and stats.cache_evictions == 0
            assert max(faults) <= 16 * MIB // 4096 // 8, faults  # an eighth of a fresh 16 MiB's 4 KiB pages
        assert any("preallocated 100663296 bytes of tensor memory" in line for line in running.output)
    finally:
        running.stop()


def cached_after(client: initserve.Client, generations: int) -> pb.ServerStats:
    """The server's stats once its producer has filed generation number ``generations`` in the cache (which
    evicts); the client can have its last byte a moment before that."""
    deadline = time.monotonic() + CACHED_WITHIN_SECONDS
    while True:
        stats = client.describe().stats
        if stats.generations >= generations or time.monotonic() > deadline:
            return stats
        time.sleep(0.01)

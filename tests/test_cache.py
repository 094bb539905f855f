"""TensorCache on its own: single-flight, LRU under a byte budget, the in-flight budget, errors and abandonment.

Real torch tensors and real threads throughout; a generation that must stay in progress blocks on a
threading.Event, and every wait is bounded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable

import pytest
import torch

from initserve_server.cache import WAIT_POLL_SECONDS, Abandoned, Lease, Overloaded, TensorCache
from initserve_server.production import Production

WAIT_SECONDS = 10.0  # the bound on every wait for another thread
FLOATS = 1024
NBYTES = FLOATS * 4  # one float32 tensor of FLOATS elements
LIMIT = "in-flight tensor bytes limit (max_inflight_bytes={})"


def tensor_for(seed: int, floats: int = FLOATS) -> torch.Tensor:
    return torch.empty(floats).normal_(generator=torch.Generator().manual_seed(seed))


class Producer:
    """A produce() that makes a real tensor, counts its calls and may block on a gate or raise."""

    def __init__(
        self,
        seed: int = 0,
        floats: int = FLOATS,
        *,
        gate: threading.Event | None = None,
        error: BaseException | None = None,
    ) -> None:
        self.seed = seed
        self.floats = floats
        self.gate = gate
        self.error = error
        self.calls = 0
        self.started = threading.Event()

    @property
    def nbytes(self) -> int:
        return self.floats * 4

    def __call__(self) -> Production:
        self.calls += 1
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT_SECONDS), "the test never opened the gate"
        if self.error is not None:
            raise self.error
        return Production.finished(tensor_for(self.seed, self.floats))


def must_not_produce() -> Production:
    raise AssertionError("produce() was called for what should have been a cache hit or a join")


def acquire(cache: TensorCache, key: Hashable, producer: Producer | Callable[[], Production], **options) -> Lease:
    nbytes = producer.nbytes if isinstance(producer, Producer) else NBYTES
    return cache.acquire(key, nbytes, producer, **options)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_SECONDS}s waiting for {what}")
        time.sleep(0.005)


class Worker(threading.Thread):
    """Runs one acquire on its own thread and keeps the lease or the exception it ended with."""

    def __init__(self, call: Callable[[], Lease]) -> None:
        super().__init__(daemon=True)
        self._call = call
        self.lease: Lease | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.lease = self._call()
        except BaseException as error:  # noqa: BLE001 - kept for the test to inspect
            self.error = error

    def finish(self) -> Worker:
        self.join(WAIT_SECONDS)
        assert not self.is_alive(), "an acquire did not return in time"
        return self


def cached_keys(cache: TensorCache) -> list[Hashable]:
    """The cache's keys in LRU order (oldest first), read without touching recency."""
    with cache._lock:
        return list(cache._cached)


def check_invariants(cache: TensorCache) -> None:
    entries, cached_bytes, inflight_bytes = cache.gauges()
    assert 0 <= cached_bytes <= cache.cache_bytes
    assert inflight_bytes >= 0
    assert entries == len(cached_keys(cache))


# --- single-flight --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_bytes", [1 << 20, 0], ids=["cache", "no-cache"])
def test_identical_requests_in_flight_share_one_generation(cache_bytes: int) -> None:
    threads = 8
    cache = TensorCache(cache_bytes=cache_bytes, max_inflight_bytes=1 << 20)
    gate = threading.Event()
    producer = Producer(seed=3, gate=gate)
    workers = [Worker(lambda: acquire(cache, "k", producer)) for _ in range(threads)]
    for worker in workers:
        worker.start()
    # Every thread is inside acquire: one generating (blocked on the gate), the others joined to it.
    wait_until(lambda: cache.stats.joins == threads - 1, "every other thread to join the generation")
    assert producer.started.is_set() and producer.calls == 1
    assert cache.gauges() == (0, 0, NBYTES)  # generating: in flight, not yet cached
    gate.set()
    for worker in workers:
        worker.finish()
    assert [worker.error for worker in workers] == [None] * threads
    leases = [worker.lease for worker in workers]
    assert producer.calls == 1
    first = leases[0].production
    assert all(lease.production is first for lease in leases)  # the very same tensor, not copies
    assert torch.equal(first.tensor, tensor_for(3))
    assert sorted(lease.shared for lease in leases) == [False] + [True] * (threads - 1)
    stats = cache.stats
    assert (stats.requests, stats.generations, stats.misses, stats.joins, stats.hits) == (threads, 1, 1, threads - 1, 0)
    for lease in leases:
        lease.release()
    expected = (1, NBYTES, 0) if cache_bytes else (0, 0, 0)
    assert cache.gauges() == expected


def test_a_finished_generation_is_a_hit_without_producing_again() -> None:
    cache = TensorCache(cache_bytes=1 << 20, max_inflight_bytes=1 << 20)
    with acquire(cache, "k", Producer(seed=1)) as first:
        assert not first.shared
    with acquire(cache, "k", must_not_produce) as second:
        assert second.shared
        assert torch.equal(second.production.tensor, tensor_for(1))
    stats = cache.stats
    assert (stats.requests, stats.generations, stats.misses, stats.hits, stats.joins) == (2, 1, 1, 1, 0)
    assert cache.gauges() == (1, NBYTES, 0)


def test_without_a_cache_every_sequential_request_generates_and_nothing_stays() -> None:
    cache = TensorCache(cache_bytes=0, max_inflight_bytes=1 << 20)
    producer = Producer(seed=2)
    for _ in range(3):
        with acquire(cache, "k", producer) as lease:
            assert not lease.shared
            assert cache.gauges() == (0, 0, NBYTES)  # held by its stream, outside the (empty) cache
        assert cache.gauges() == (0, 0, 0)
    assert producer.calls == 3
    assert (cache.stats.generations, cache.stats.hits, cache.stats.evictions) == (3, 0, 0)


# --- LRU and the cache's byte budget --------------------------------------------------------------------------------


def test_lru_evicts_the_least_recently_used_first_and_a_hit_refreshes_recency() -> None:
    cache = TensorCache(cache_bytes=3 * NBYTES, max_inflight_bytes=1 << 20)
    for seed, key in enumerate("abc"):
        acquire(cache, key, Producer(seed)).release()
        check_invariants(cache)
    assert cached_keys(cache) == ["a", "b", "c"]
    assert cache.gauges() == (3, 3 * NBYTES, 0)
    acquire(cache, "a", must_not_produce).release()  # a hit: "a" becomes the most recent
    assert cached_keys(cache) == ["b", "c", "a"]
    acquire(cache, "d", Producer(3)).release()  # over budget: the least recently used ("b") goes
    check_invariants(cache)
    assert cached_keys(cache) == ["c", "a", "d"]
    assert cache.stats.evictions == 1
    acquire(cache, "e", Producer(4)).release()
    assert cached_keys(cache) == ["a", "d", "e"]
    assert cache.stats.evictions == 2
    # What stayed is served as hits, with its own bytes; what went is generated again.
    for seed, key in ((0, "a"), (3, "d"), (4, "e")):
        with acquire(cache, key, must_not_produce) as lease:
            assert torch.equal(lease.production.tensor, tensor_for(seed))
    again = Producer(1)
    acquire(cache, "b", again).release()
    assert again.calls == 1
    assert cached_keys(cache) == ["d", "e", "b"]
    assert cache.gauges() == (3, 3 * NBYTES, 0)


def test_cached_bytes_never_exceed_the_budget_with_mixed_sizes() -> None:
    budget = 10_000
    cache = TensorCache(cache_bytes=budget, max_inflight_bytes=1 << 20)
    sizes = [100, 1000, 2500, 600, 1200, 2000, 50, 2400, 1800, 700, 2499, 900]  # floats: 400..9996 bytes
    for index, floats in enumerate(sizes * 3):
        key = ("t", index % 17, floats)
        acquire(cache, key, Producer(index, floats)).release()
        check_invariants(cache)
        entries, cached_bytes, _ = cache.gauges()
        assert cached_bytes == sum(key[2] * 4 for key in cached_keys(cache))
    assert cache.stats.evictions > 0
    assert cache.gauges()[2] == 0


def test_an_entry_larger_than_the_budget_is_not_cached_and_evicts_nothing() -> None:
    cache = TensorCache(cache_bytes=2 * NBYTES, max_inflight_bytes=1 << 20)
    acquire(cache, "small", Producer(1)).release()
    big = Producer(2, floats=3 * FLOATS)
    with acquire(cache, "big", big) as lease:
        assert cache.gauges() == (1, NBYTES, 3 * NBYTES)
        assert torch.equal(lease.production.tensor, tensor_for(2, 3 * FLOATS))
    assert cache.gauges() == (1, NBYTES, 0)
    assert cached_keys(cache) == ["small"]
    assert cache.stats.evictions == 0
    acquire(cache, "big", big).release()  # not cached: generated again
    assert big.calls == 2


def test_an_entry_exactly_the_budget_is_cached() -> None:
    cache = TensorCache(cache_bytes=NBYTES, max_inflight_bytes=NBYTES)
    acquire(cache, "exact", Producer(1)).release()
    assert cache.gauges() == (1, NBYTES, 0)


def test_uncacheable_entries_are_not_cached_but_are_single_flight() -> None:
    cache = TensorCache(cache_bytes=1 << 20, max_inflight_bytes=1 << 20)
    producer = Producer(5)
    with acquire(cache, "drawn", producer, cacheable=False) as lease:
        assert cache.gauges() == (0, 0, NBYTES)
        assert not lease.shared
    assert cache.gauges() == (0, 0, 0)
    acquire(cache, "drawn", producer, cacheable=False).release()
    assert producer.calls == 2
    gate = threading.Event()
    gated = Producer(5, gate=gate)
    workers = [Worker(lambda: acquire(cache, "drawn", gated, cacheable=False)) for _ in range(3)]
    for worker in workers:
        worker.start()
    wait_until(lambda: cache.stats.joins == 2, "two joins")
    gate.set()
    leases = [worker.finish().lease for worker in workers]
    assert gated.calls == 1
    assert cache.gauges() == (0, 0, NBYTES)
    for lease in leases:
        lease.release()
    assert cache.gauges() == (0, 0, 0)


def test_a_zero_byte_tensor_is_not_cached() -> None:
    cache = TensorCache(cache_bytes=1 << 20, max_inflight_bytes=1 << 20)
    empty = Producer(0, floats=0)
    acquire(cache, "empty", empty).release()
    acquire(cache, "empty", empty).release()
    assert empty.calls == 2
    assert cache.gauges() == (0, 0, 0)


# --- the in-flight budget -------------------------------------------------------------------------------------------


def test_a_request_larger_than_the_in_flight_budget_is_refused_with_its_size() -> None:
    cache = TensorCache(cache_bytes=1 << 20, max_inflight_bytes=10_000)
    with pytest.raises(Overloaded) as refused:
        cache.acquire("huge", 10_001, must_not_produce)
    assert str(refused.value) == f"{LIMIT.format(10_000)}: this request needs 10001 bytes, more than the limit"
    assert (cache.stats.refused, cache.stats.requests, cache.stats.misses) == (1, 1, 0)
    assert cache.gauges() == (0, 0, 0)


def test_a_request_that_does_not_fit_beside_those_in_flight_is_told_to_retry_later() -> None:
    cache = TensorCache(cache_bytes=0, max_inflight_bytes=10_000)
    held = acquire(cache, "held", Producer(1, floats=1500))  # 6000 bytes, streamed outside the cache
    assert cache.gauges() == (0, 0, 6000)
    with pytest.raises(Overloaded) as refused:
        cache.acquire("next", 5000, must_not_produce)
    assert str(refused.value) == f"{LIMIT.format(10_000)}: 6000 bytes in flight, this request needs 5000; retry later"
    assert cache.stats.refused == 1
    # Exactly up to the limit is admitted.
    fits = Producer(2, floats=1000)
    with acquire(cache, "fits", fits):
        assert cache.gauges() == (0, 0, 10_000)
    held.release()
    assert cache.gauges() == (0, 0, 0)
    # Once released, what was refused fits.
    acquire(cache, "next", Producer(3, floats=1250)).release()
    assert cache.stats.refused == 1
    assert cache.gauges() == (0, 0, 0)


def test_joins_and_hits_are_admitted_over_the_in_flight_budget() -> None:
    """Only new generations are refused: joining one in flight or streaming a cached tensor adds no memory."""
    cache = TensorCache(cache_bytes=NBYTES, max_inflight_bytes=NBYTES)
    gate = threading.Event()
    generating = Worker(lambda: acquire(cache, "k", Producer(1, gate=gate)))
    generating.start()
    wait_until(lambda: cache.gauges()[2] == NBYTES, "the generation to be admitted")
    joining = Worker(lambda: acquire(cache, "k", must_not_produce))
    joining.start()
    wait_until(lambda: cache.stats.joins == 1, "the join")
    with pytest.raises(Overloaded, match=r"retry later$"):
        acquire(cache, "other", must_not_produce)
    gate.set()
    leases = [generating.finish().lease, joining.finish().lease]
    assert cache.gauges() == (1, NBYTES, 0)  # cached now: no longer in flight
    with acquire(cache, "k", must_not_produce) as hit:
        assert hit.shared
    for lease in leases:
        lease.release()
    assert cache.stats.refused == 1


def test_releasing_every_lease_restores_the_gauges_and_release_is_idempotent() -> None:
    cache = TensorCache(cache_bytes=0, max_inflight_bytes=1 << 20)
    leases = [acquire(cache, key, Producer(seed)) for seed, key in enumerate("abcd")]
    assert cache.gauges() == (0, 0, 4 * NBYTES)
    for count, lease in enumerate(leases, start=1):
        lease.release()
        lease.release()  # a second release changes nothing
        assert cache.gauges() == (0, 0, (4 - count) * NBYTES)
    assert cache.gauges() == (0, 0, 0)


def test_an_entry_evicted_while_leased_stays_in_flight_until_released() -> None:
    budget = NBYTES + NBYTES // 2  # room for one generation, not for two
    cache = TensorCache(cache_bytes=NBYTES, max_inflight_bytes=budget)
    first = acquire(cache, "a", Producer(1))
    assert cache.gauges() == (1, NBYTES, 0)  # cached, and streamed by its generator
    second = acquire(cache, "b", Producer(2))  # evicts "a" while "a" is still streamed
    assert cached_keys(cache) == ["b"]
    assert cache.stats.evictions == 1
    assert cache.gauges() == (1, NBYTES, NBYTES)  # "a" moved to the in-flight count
    assert torch.equal(first.production.tensor, tensor_for(1))  # still intact for its stream
    # It counts against admission: nothing more fits beside it.
    with pytest.raises(Overloaded) as refused:
        acquire(cache, "c", must_not_produce)
    assert str(refused.value) == (
        f"{LIMIT.format(budget)}: {NBYTES} bytes in flight, this request needs {NBYTES}; retry later"
    )
    first.release()
    assert cache.gauges() == (1, NBYTES, 0)
    second.release()
    assert cache.gauges() == (1, NBYTES, 0)  # "b" stays cached


def test_evictions_may_push_the_in_flight_gauge_over_its_budget_but_never_the_sum_of_both() -> None:
    """Evicting a streamed entry larger than the one inserted moves more bytes to the in-flight count than it
    takes out; what stays bounded is the tensor memory, cached + in flight <= cache_bytes + max_inflight_bytes."""
    unit = NBYTES
    cache = TensorCache(cache_bytes=3 * unit, max_inflight_bytes=2 * unit)
    big = acquire(cache, "x", Producer(1, floats=2 * FLOATS))  # 2 units, cached and still streamed
    acquire(cache, "y", Producer(2)).release()  # 1 unit, cached
    held = acquire(cache, "w", Producer(3), cacheable=False)  # 1 unit in flight
    assert cache.gauges() == (2, 3 * unit, unit)
    with acquire(cache, "z", Producer(4)):  # admitted (1 + 1 <= 2); caching it evicts "x" (2 units, streamed)
        assert cached_keys(cache) == ["y", "z"]
        entries, cached_bytes, inflight_bytes = cache.gauges()
        assert (cached_bytes, inflight_bytes) == (2 * unit, 3 * unit)  # in flight: over its 2-unit budget
        assert cached_bytes + inflight_bytes <= cache.cache_bytes + cache.max_inflight_bytes
        with pytest.raises(Overloaded) as refused:
            acquire(cache, "v", must_not_produce)
        assert (
            str(refused.value)
            == f"{LIMIT.format(2 * unit)}: {3 * unit} bytes in flight, this request needs {unit}; retry later"
        )
    big.release()
    held.release()
    assert cache.gauges() == (2, 2 * unit, 0)


def test_an_evicted_entry_with_several_streams_is_in_flight_until_the_last_one_ends() -> None:
    cache = TensorCache(cache_bytes=NBYTES, max_inflight_bytes=1 << 20)
    leases = [acquire(cache, "a", Producer(1) if i == 0 else must_not_produce) for i in range(3)]
    acquire(cache, "b", Producer(2)).release()  # evicts "a"
    assert cache.gauges() == (1, NBYTES, NBYTES)
    leases[0].release()
    leases[1].release()
    assert cache.gauges() == (1, NBYTES, NBYTES)
    leases[2].release()
    assert cache.gauges() == (1, NBYTES, 0)


# --- failures -------------------------------------------------------------------------------------------------------


def test_a_failed_generation_raises_the_same_error_to_every_joiner_and_caches_nothing() -> None:
    threads = 6
    cache = TensorCache(cache_bytes=1 << 20, max_inflight_bytes=1 << 20)
    gate = threading.Event()
    error = RuntimeError("generation failed")
    producer = Producer(gate=gate, error=error)
    workers = [Worker(lambda: acquire(cache, "k", producer)) for _ in range(threads)]
    for worker in workers:
        worker.start()
    wait_until(lambda: cache.stats.joins == threads - 1, "every other thread to join")
    gate.set()
    for worker in workers:
        worker.finish()
    assert [worker.lease for worker in workers] == [None] * threads
    assert all(worker.error is error for worker in workers)
    assert producer.calls == 1
    assert cache.gauges() == (0, 0, 0)
    assert (cache.stats.generations, cache.stats.misses, cache.stats.joins) == (0, 1, threads - 1)
    # Not cached, not remembered: the next request generates (and succeeds).
    retry = Producer(seed=9)
    with acquire(cache, "k", retry) as lease:
        assert torch.equal(lease.production.tensor, tensor_for(9))
    assert retry.calls == 1
    assert cache.gauges() == (1, NBYTES, 0)


def test_a_failed_generation_alone_frees_its_in_flight_bytes() -> None:
    cache = TensorCache(cache_bytes=0, max_inflight_bytes=NBYTES)
    with pytest.raises(ValueError, match="bad parameter"):
        acquire(cache, "k", Producer(error=ValueError("bad parameter")))
    assert cache.gauges() == (0, 0, 0)
    acquire(cache, "other", Producer(1)).release()  # the whole budget is free again


# --- abandonment ----------------------------------------------------------------------------------------------------


def test_a_joiner_whose_call_ends_while_waiting_is_abandoned_and_released() -> None:
    cache = TensorCache(cache_bytes=0, max_inflight_bytes=1 << 20)
    gate = threading.Event()
    generating = Worker(lambda: acquire(cache, "k", Producer(4, gate=gate)))
    generating.start()
    wait_until(lambda: cache.gauges()[2] == NBYTES, "the generation to start")
    active = threading.Event()
    active.set()
    joining = Worker(lambda: acquire(cache, "k", must_not_produce, is_active=active.is_set))
    joining.start()
    wait_until(lambda: cache.stats.joins == 1, "the join")
    ended_at = time.monotonic()
    active.clear()  # the joiner's call is cancelled while the generation is still running
    joining.finish()
    waited = time.monotonic() - ended_at
    assert isinstance(joining.error, Abandoned)
    assert str(joining.error) == "the call ended while waiting for an identical generation in flight"
    assert waited < WAIT_POLL_SECONDS + 2.0  # noticed within a poll, not at the generation's end
    assert generating.is_alive()  # the generation itself goes on for its own caller
    gate.set()
    lease = generating.finish().lease
    assert lease is not None and torch.equal(lease.production.tensor, tensor_for(4))
    assert cache.gauges() == (0, 0, NBYTES)
    lease.release()
    assert cache.gauges() == (0, 0, 0)  # the abandoned joiner's hold was released too


def test_a_joiner_still_active_is_not_abandoned_however_long_it_waits() -> None:
    cache = TensorCache(cache_bytes=0, max_inflight_bytes=1 << 20)
    gate = threading.Event()
    generating = Worker(lambda: acquire(cache, "k", Producer(4, gate=gate)))
    generating.start()
    wait_until(lambda: cache.gauges()[2] == NBYTES, "the generation to start")
    polls = []
    joining = Worker(lambda: acquire(cache, "k", must_not_produce, is_active=lambda: polls.append(1) or True))
    joining.start()
    wait_until(lambda: len(polls) >= 3, "the joiner to poll is_active a few times")
    gate.set()
    leases = [generating.finish().lease, joining.finish().lease]
    assert joining.error is None
    assert leases[0].production is leases[1].production
    for lease in leases:
        lease.release()
    assert cache.gauges() == (0, 0, 0)

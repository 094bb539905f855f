"""TensorCache on its own: single-flight, LRU under a byte budget, the in-flight budget, errors and abandonment.

Real torch tensors and real threads throughout: a generation that must stay in progress is a thread blocked on
a threading.Event, and every wait is bounded. Acquiring never waits (start() only hands the generation to a
thread); streams then wait on the production, as the server's calls do.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable

import pytest
import torch

from initserve_server.cache import Abandoned, Lease, Overloaded, TensorCache
from initserve_server.production import Production

WAIT_SECONDS = 10.0  # the bound on every wait for another thread
FLOATS = 1024
NBYTES = FLOATS * 4  # one float32 tensor of FLOATS elements
LIMIT = "in-flight bytes limit (max_inflight_bytes={})"


def tensor_for(seed: int, floats: int = FLOATS) -> torch.Tensor:
    return torch.empty(floats).normal_(generator=torch.Generator().manual_seed(seed))


class Producer:
    """A start() that makes a real tensor, counts its calls, and generates in a thread of its own that may wait
    on a gate, fail, or stop once cancelled; without a gate or an error its production is finished at once."""

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
        self.threads: list[threading.Thread] = []

    @property
    def nbytes(self) -> int:
        return self.floats * 4

    def __call__(self) -> Production:
        self.calls += 1
        if self.gate is None and self.error is None:
            return Production.finished(tensor_for(self.seed, self.floats))
        production = Production(self.nbytes)
        thread = threading.Thread(target=self._generate, args=(production,), daemon=True)
        self.threads.append(thread)
        thread.start()
        return production

    def _generate(self, production: Production) -> None:
        try:
            if self.gate is not None:
                assert self.gate.wait(WAIT_SECONDS), "the test never opened the gate"
            production.check_cancelled()
            if self.error is not None:
                raise self.error
            production.attach(tensor_for(self.seed, self.floats))
            production.finish()
        except BaseException as error:  # noqa: BLE001 - handed to the production's readers
            production.fail(error)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(WAIT_SECONDS)
            assert not thread.is_alive(), "a generation did not end in time"


def must_not_produce() -> Production:
    raise AssertionError("start() was called for what should have been a cache hit or a join")


def acquire(cache: TensorCache, key: Hashable, producer: Producer | Callable[[], Production], **options) -> Lease:
    nbytes = producer.nbytes if isinstance(producer, Producer) else NBYTES
    return cache.acquire(key, nbytes, producer, **options)


def finished(lease: Lease) -> Lease:
    """``lease`` once its production is done (raising its error, as a stream would)."""
    deadline = time.monotonic() + WAIT_SECONDS
    lease.production.wait_for(lease.production.nbytes, is_active=lambda: time.monotonic() < deadline)
    return lease


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_SECONDS}s waiting for {what}")
        time.sleep(0.005)


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
    streams = 8
    cache = TensorCache(cache_bytes=cache_bytes, max_inflight_bytes=1 << 20)
    gate = threading.Event()
    producer = Producer(seed=3, gate=gate)
    leases = [acquire(cache, "k", producer) for _ in range(streams)]  # none of them waits
    assert producer.calls == 1 and cache.stats.joins == streams - 1
    assert cache.gauges() == (0, 0, NBYTES)  # generating: in flight, not yet cached
    first = leases[0].production
    assert all(lease.production is first for lease in leases)  # the very same production, not copies
    assert not first.done
    gate.set()
    for lease in leases:
        finished(lease)
    assert torch.equal(first.tensor, tensor_for(3))
    assert [lease.shared for lease in leases] == [False] + [True] * (streams - 1)
    stats = cache.stats
    assert (stats.requests, stats.generations, stats.misses, stats.joins, stats.hits) == (streams, 1, 1, streams - 1, 0)
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
    leases = [acquire(cache, "drawn", gated, cacheable=False) for _ in range(3)]
    assert cache.stats.joins == 2
    gate.set()
    for lease in leases:
        finished(lease)
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
    generating = acquire(cache, "k", Producer(1, gate=gate))
    assert cache.gauges()[2] == NBYTES
    joining = acquire(cache, "k", must_not_produce)
    assert cache.stats.joins == 1
    with pytest.raises(Overloaded, match=r"retry later$"):
        acquire(cache, "other", must_not_produce)
    gate.set()
    leases = [finished(generating), finished(joining)]
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


# --- working memory -----------------------------------------------------------------------------------------------


def test_working_memory_is_admitted_with_the_tensor_and_freed_when_the_producer_stops() -> None:
    cache = TensorCache(cache_bytes=1 << 20, max_inflight_bytes=4 * NBYTES)
    gate = threading.Event()
    lease = acquire(cache, "qr", Producer(1, gate=gate), working_bytes=2 * NBYTES)
    assert cache.gauges() == (0, 0, 3 * NBYTES)  # the tensor and what its scheme allocates beside it
    with pytest.raises(Overloaded) as refused:
        acquire(cache, "other", must_not_produce, working_bytes=NBYTES)  # 1 + 1 more do not fit beside 3
    assert str(refused.value) == f"{LIMIT.format(4 * NBYTES)}: {3 * NBYTES} bytes in flight, this request needs " \
        f"{2 * NBYTES}; retry later"  # fmt: skip
    gate.set()
    finished(lease)
    assert cache.gauges() == (1, NBYTES, 0)  # the working memory is gone; the tensor is cached
    lease.release()


def test_a_start_that_raises_frees_what_it_was_admitted_with() -> None:
    cache = TensorCache(cache_bytes=0, max_inflight_bytes=NBYTES)

    def refuse() -> Production:
        raise RuntimeError("the pool is closed")

    with pytest.raises(RuntimeError, match="the pool is closed"):
        cache.acquire("k", NBYTES, refuse)
    assert cache.gauges() == (0, 0, 0)
    acquire(cache, "k", Producer(1)).release()  # and nothing of it is left to join
    assert cache.stats.misses == 2


# --- failures -------------------------------------------------------------------------------------------------------


def test_a_failed_generation_raises_the_same_error_to_every_joiner_and_caches_nothing() -> None:
    streams = 6
    cache = TensorCache(cache_bytes=1 << 20, max_inflight_bytes=1 << 20)
    gate = threading.Event()
    error = RuntimeError("generation failed")
    producer = Producer(gate=gate, error=error)
    leases = [acquire(cache, "k", producer) for _ in range(streams)]
    gate.set()
    for lease in leases:
        with pytest.raises(RuntimeError) as raised:
            finished(lease)
        assert raised.value is error
    assert producer.calls == 1
    assert cache.gauges() == (0, 0, NBYTES)  # held by its streams until they end
    for lease in leases:
        lease.release()
    assert cache.gauges() == (0, 0, 0)
    assert (cache.stats.generations, cache.stats.misses, cache.stats.joins) == (0, 1, streams - 1)
    # Not cached, not remembered: the next request generates (and succeeds).
    retry = Producer(seed=9)
    with acquire(cache, "k", retry) as lease:
        assert torch.equal(lease.production.tensor, tensor_for(9))
    assert retry.calls == 1
    assert cache.gauges() == (1, NBYTES, 0)


# --- abandonment ----------------------------------------------------------------------------------------------------


def test_a_generation_nobody_wants_is_cancelled_and_its_bytes_stay_counted_until_it_stops() -> None:
    cache = TensorCache(cache_bytes=1 << 20, max_inflight_bytes=1 << 20)
    gate = threading.Event()
    producer = Producer(4, gate=gate)
    leases = [acquire(cache, "k", producer) for _ in range(2)]
    for lease in leases:
        lease.release()
    production = leases[0]._entry.production
    assert production is not None and production.cancelled
    assert cache.gauges() == (0, 0, NBYTES)  # its producer may still be writing the tensor
    again = acquire(cache, "k", Producer(5))  # nobody joins a cancelled generation: a new one starts
    assert not again.shared
    again.release()
    gate.set()
    producer.join()
    assert isinstance(production.error, Abandoned)
    assert cache.stats.abandoned == 1
    assert cache.gauges() == (1, NBYTES, 0)  # the abandoned one is let go; the second one is cached
    assert cached_keys(cache) == ["k"] and torch.equal(cache._cached["k"].production.tensor, tensor_for(5))


def test_a_stream_whose_call_ends_while_waiting_leaves_the_generation_to_the_others() -> None:
    cache = TensorCache(cache_bytes=0, max_inflight_bytes=1 << 20)
    gate = threading.Event()
    generating = acquire(cache, "k", Producer(4, gate=gate))
    joining = acquire(cache, "k", must_not_produce)
    with pytest.raises(Abandoned, match="the call ended while its tensor was being generated"):
        joining.production.wait_started(is_active=lambda: False)
    joining.release()
    assert not generating.production.cancelled  # its own stream still wants it
    gate.set()
    finished(generating)
    assert torch.equal(generating.production.tensor, tensor_for(4))
    generating.release()
    assert cache.gauges() == (0, 0, 0)


class SlowToReport(Production):
    """A production whose producer is held between finishing (``done`` is true) and reporting it (``_done``)."""

    def __init__(self, nbytes: int) -> None:
        super().__init__(nbytes)
        self.finished_event = threading.Event()
        self.report = threading.Event()

    def _done(self) -> None:
        self.finished_event.set()
        assert self.report.wait(WAIT_SECONDS)
        super()._done()


def test_a_stream_released_between_finish_and_its_report_leaves_a_whole_entry_to_cache() -> None:
    """The last stream leaves after the tensor is finished but before the producer's callback ran: the entry must
    still hold its tensor when the callback caches it (a hit after it gets the tensor, never an empty entry)."""
    cache = TensorCache(cache_bytes=1 << 20, max_inflight_bytes=1 << 20)
    production = SlowToReport(NBYTES)
    lease = cache.acquire("k", NBYTES, lambda: production)
    production.attach(tensor_for(6))
    producer = threading.Thread(target=production.finish, daemon=True)
    producer.start()
    assert production.finished_event.wait(WAIT_SECONDS) and production.done
    lease.release()  # the window: done, not yet reported
    production.report.set()
    producer.join(WAIT_SECONDS)
    assert cache.gauges() == (1, NBYTES, 0)
    with acquire(cache, "k", must_not_produce) as hit:
        assert hit.shared and torch.equal(hit.production.tensor, tensor_for(6))

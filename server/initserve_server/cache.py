"""Single-flight LRU cache of generated tensors, with byte budgets for the cache and for memory in flight.

A request asks for the tensor of a spec key. Three outcomes:
- hit: a finished tensor is in the cache; the request streams it (no new memory);
- join: an identical request is generating it now; the request streams along as its bytes become final
  (no new memory);
- miss: the request starts its production, after admission against the in-flight byte budget (refused when it
  would not fit: :class:`Overloaded`, RESOURCE_EXHAUSTED). A failed production is never cached; its joiners get
  its error. A production nobody streams any more is cancelled and never cached.

Acquiring never waits: ``start()`` only hands the generation to a thread, and every stream (the one that
started it and those that joined) then awaits the production itself. So a stream whose call ends while the
tensor is still queued or being generated leaves at once, and the generation goes on only while someone wants it.

Memory accounting, what the budgets bound: a tensor is either in the cache (counted against ``cache_bytes``) or
held by streams or its producer outside it (counted against ``max_inflight_bytes``), never both. A generation's
working memory (what its scheme allocates beside the tensor while generating: a QR's factors, a rejection
sampler's candidates; see ``costs``) is counted in flight from admission until its producer stops. A
cancelled production's bytes stay counted until its producer has really stopped writing them. So the server's
tensor and working memory is at most the sum of the two budgets. An entry evicted while streams still hold it
moves to the in-flight count until they finish.

Threads: ``acquire`` and ``release`` are called from the calls' threads; a producer's end
(:meth:`TensorCache._finished`) comes from its generation thread. One lock guards the counts.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from initserve_server.production import Abandoned, Production

__all__ = ["Abandoned", "CacheStats", "Lease", "Overloaded", "TensorCache"]


class Overloaded(Exception):
    """Admitting the request would exceed the in-flight byte budget (RESOURCE_EXHAUSTED)."""


@dataclass(eq=False)
class _Entry:
    key: Hashable
    nbytes: int
    cacheable: bool
    generates: bool = True  # its production generates a tensor (False: it cuts a slice from a cached one)
    working_bytes: int = 0  # counted in flight until its producer stops
    production: Production | None = None
    users: int = 0  # leases not yet released
    cached: bool = False
    counted_inflight: bool = True  # its tensor's bytes are in the in-flight count (not cached, not yet freed)
    stopped: bool = False  # its producer has stopped (_finished ran): the cache's own record, never the
    # production's `done`, which turns true before the producer's callbacks have run


@dataclass
class CacheStats:
    requests: int = 0
    generations: int = 0
    slices_cut: int = 0
    hits: int = 0
    joins: int = 0
    misses: int = 0
    evictions: int = 0
    refused: int = 0
    abandoned: int = 0


class Lease:
    """A stream's hold on a production; release it (or use ``with``) when the stream ends."""

    def __init__(self, cache: TensorCache, entry: _Entry, *, shared: bool) -> None:
        self._cache = cache
        self._entry = entry
        self.shared = shared  # a cache hit or a joined generation: nothing was generated for this request
        self._released = False

    @property
    def production(self) -> Production:
        assert self._entry.production is not None
        return self._entry.production

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._cache._release(self._entry)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class TensorCache:
    def __init__(self, cache_bytes: int, max_inflight_bytes: int) -> None:
        self.cache_bytes = cache_bytes
        self.max_inflight_bytes = max_inflight_bytes
        self._lock = threading.Lock()
        self._cached: OrderedDict[Hashable, _Entry] = OrderedDict()  # LRU order: oldest first
        self._generating: dict[Hashable, _Entry] = {}
        self._cached_bytes = 0
        self._inflight_bytes = 0
        self.stats = CacheStats()

    def acquire(
        self,
        key: Hashable,
        nbytes: int,
        start: Callable[[], Production],
        *,
        working_bytes: int = 0,
        cacheable: bool = True,
        generates: bool = True,
    ) -> Lease:
        """A lease on the production for ``key``: from the cache, a joined production, or ``start()`` now.

        ``start`` returns a production at once (its generation queued or running); ``working_bytes`` is what the
        generation needs beside the tensor. Raises :class:`Overloaded` when a new production does not fit the
        in-flight budget, or whatever ``start`` raised.
        """
        with self._lock:
            self.stats.requests += 1
            entry = self._cached.get(key)
            if entry is not None:
                self._cached.move_to_end(key)
                entry.users += 1
                self.stats.hits += 1
                return Lease(self, entry, shared=True)
            entry = self._generating.get(key)
            if entry is not None:
                entry.users += 1
                self.stats.joins += 1
                return Lease(self, entry, shared=True)
            self._admit_locked(nbytes + working_bytes, what="this request needs")
            entry = _Entry(key, nbytes, cacheable, generates, working_bytes, users=1)
            self._inflight_bytes += nbytes + working_bytes
            self.stats.misses += 1
            try:
                entry.production = start()  # only queues the generation: quick, and never calls back here
            except BaseException:
                self._inflight_bytes -= nbytes + working_bytes
                raise
            self._generating[key] = entry
        entry.production.on_done(lambda finished: self._finished(entry, finished))
        return Lease(self, entry, shared=False)

    def _admit_locked(self, nbytes: int, *, what: str) -> None:
        if self._inflight_bytes + nbytes <= self.max_inflight_bytes:
            return
        self.stats.refused += 1
        limit = f"in-flight bytes limit (max_inflight_bytes={self.max_inflight_bytes})"
        if nbytes > self.max_inflight_bytes:
            raise Overloaded(f"{limit}: {what} {nbytes} bytes, more than the limit")
        raise Overloaded(f"{limit}: {self._inflight_bytes} bytes in flight, {what} {nbytes}; retry later")

    def _finished(self, entry: _Entry, production: Production) -> None:
        """The producer stopped: its working memory is free; a finished tensor enters the cache (if it may and
        fits), a failed one never; a tensor nobody holds any more is let go."""
        with self._lock:
            entry.stopped = True
            self._inflight_bytes -= entry.working_bytes
            entry.working_bytes = 0
            if self._generating.get(entry.key) is entry:
                del self._generating[entry.key]
            if production.error is not None:
                if isinstance(production.error, Abandoned):
                    self.stats.abandoned += 1
            else:
                if entry.generates:
                    self.stats.generations += 1
                else:
                    self.stats.slices_cut += 1
                if entry.cacheable and 0 < entry.nbytes <= self.cache_bytes and entry.key not in self._cached:
                    self._insert_locked(entry)  # kept even when every stream already went
                    return
            if entry.users == 0:
                self._let_go_locked(entry)

    def _insert_locked(self, entry: _Entry) -> None:
        while self._cached and self._cached_bytes + entry.nbytes > self.cache_bytes:
            _, oldest = self._cached.popitem(last=False)
            oldest.cached = False
            self._cached_bytes -= oldest.nbytes
            self.stats.evictions += 1
            if oldest.users:  # still streamed: its memory is in flight until they finish
                self._inflight_bytes += oldest.nbytes
                oldest.counted_inflight = True
            else:
                oldest.production = None
        entry.cached = True
        self._cached[entry.key] = entry
        self._cached_bytes += entry.nbytes
        if entry.counted_inflight:  # it was held by its producer and streams, outside the cache
            self._inflight_bytes -= entry.nbytes
            entry.counted_inflight = False

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            entry.users -= 1
            if entry.users > 0 or entry.cached:
                return
            if self._generating.get(entry.key) is entry:
                del self._generating[entry.key]  # nobody may join a production that nobody wants
            production = entry.production
            if production is not None and not entry.stopped:
                cancel = production.cancel  # its bytes stay counted until the producer stops (_finished)
            else:
                cancel = None
                self._let_go_locked(entry)
        if cancel is not None:
            cancel()  # outside the lock: it may call back (a queued generation fails at once)

    def _let_go_locked(self, entry: _Entry) -> None:
        """Nobody holds the entry and it is not cached: its tensor's bytes leave the in-flight count."""
        if entry.counted_inflight:
            self._inflight_bytes -= entry.nbytes
            entry.counted_inflight = False
        entry.production = None  # drop the tensor now

    def spare_bytes(self) -> int:
        """Budget bytes neither cached nor in flight (what a pool of freed tensor memory may hold).

        Read without the lock: a tensor can be freed, and its memory offered to the pool, by a thread that
        holds it (an eviction). Every count drops before the tensor it counted is dropped, so the figure never
        includes memory that is still in use.
        """
        cache_room = max(0, self.cache_bytes - self._cached_bytes)
        return cache_room + max(0, self.max_inflight_bytes - self._inflight_bytes)

    def gauges(self) -> tuple[int, int, int]:
        """(entries cached, bytes cached, bytes in flight)."""
        with self._lock:
            return len(self._cached), self._cached_bytes, self._inflight_bytes

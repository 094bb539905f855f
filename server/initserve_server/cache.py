"""Single-flight LRU cache of generated tensors, with byte budgets for the cache and for tensors in flight.

A request asks for the tensor of a spec key. Three outcomes:
- hit: a finished tensor is in the cache; the request streams it (no new memory);
- join: an identical request is generating it now; the request streams along as its bytes become final
  (no new memory);
- miss: the request starts its production, after admission against the in-flight byte budget (refused when it
  would not fit: :class:`Overloaded`, RESOURCE_EXHAUSTED). A failed production is never cached; its joiners get
  its error. A production nobody streams any more is cancelled and never cached.

A production enters the cache when it finishes. Memory accounting: a tensor is either in the cache (counted
against ``cache_bytes``) or held by streams or its producer outside it (counted against ``max_inflight_bytes``),
never both; so the server's tensor memory is at most the sum of the two budgets. An entry evicted while streams
still hold it moves to the in-flight count until they finish.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from initserve_server.production import WAIT_POLL_SECONDS, Abandoned, Production

__all__ = ["WAIT_POLL_SECONDS", "Abandoned", "CacheStats", "Lease", "Overloaded", "TensorCache"]


class Overloaded(Exception):
    """Admitting the request would exceed the in-flight byte budget (RESOURCE_EXHAUSTED)."""


@dataclass(eq=False)
class _Entry:
    key: Hashable
    nbytes: int
    cacheable: bool
    generates: bool = True  # its production generates a tensor (False: it cuts a slice from a cached one)
    started: threading.Event = field(default_factory=threading.Event)  # production started, or failed to
    production: Production | None = None
    error: BaseException | None = None
    users: int = 0  # leases not yet released
    cached: bool = False
    counted_inflight: bool = True  # its bytes are in the in-flight count (not cached, not yet released)


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
    """A stream's hold on a finished tensor; release it (or use ``with``) when the stream ends."""

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
        cacheable: bool = True,
        generates: bool = True,
        is_active: Callable[[], bool] = lambda: True,
    ) -> Lease:
        """A lease on the production for ``key``: from the cache, a joined production, or ``start()`` now.

        ``start`` returns once the production's first bytes are final (or it is finished); it may still be
        filling. Raises :class:`Overloaded` when a new production does not fit the in-flight budget, whatever
        ``start`` raised (for this request and for every request that joined it), or :class:`Abandoned` when
        ``is_active`` turns false while waiting for a joined production to start.
        """
        leader = False
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
            else:
                if self._inflight_bytes + nbytes > self.max_inflight_bytes:
                    self.stats.refused += 1
                    limit = f"in-flight tensor bytes limit (max_inflight_bytes={self.max_inflight_bytes})"
                    if nbytes > self.max_inflight_bytes:
                        raise Overloaded(f"{limit}: this request needs {nbytes} bytes, more than the limit")
                    raise Overloaded(
                        f"{limit}: {self._inflight_bytes} bytes in flight, this request needs {nbytes}; retry later"
                    )
                entry = _Entry(key=key, nbytes=nbytes, cacheable=cacheable, generates=generates, users=1)
                self._generating[key] = entry
                self._inflight_bytes += nbytes
                self.stats.misses += 1
                leader = True
        if leader:
            return self._start(entry, start)
        return self._wait(entry, is_active)

    def _start(self, entry: _Entry, start: Callable[[], Production]) -> Lease:
        try:
            production = start()
        except BaseException as error:
            with self._lock:
                if self._generating.get(entry.key) is entry:
                    del self._generating[entry.key]
                entry.error = error
                self._release_locked(entry)
            entry.started.set()
            raise
        with self._lock:
            entry.production = production
        entry.started.set()
        production.on_done(lambda finished: self._finished(entry, finished))
        return Lease(self, entry, shared=False)

    def _finished(self, entry: _Entry, production: Production) -> None:
        """The producer is done: a finished tensor enters the cache (if it may and fits), a failed one never."""
        with self._lock:
            if self._generating.get(entry.key) is entry:
                del self._generating[entry.key]
            if production.error is not None:
                if isinstance(production.error, Abandoned):
                    self.stats.abandoned += 1
                return
            if entry.generates:
                self.stats.generations += 1
            else:
                self.stats.slices_cut += 1
            if entry.cacheable and 0 < entry.nbytes <= self.cache_bytes and entry.key not in self._cached:
                entry.production = production  # kept even when every stream already went (one-piece generation)
                self._insert_locked(entry)

    def _wait(self, entry: _Entry, is_active: Callable[[], bool]) -> Lease:
        while not entry.started.wait(WAIT_POLL_SECONDS):
            if not is_active():
                self._release(entry)
                raise Abandoned("the call ended while waiting for an identical generation in flight")
        if entry.error is not None:
            self._release(entry)
            raise entry.error
        return Lease(self, entry, shared=True)

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
            self._release_locked(entry)

    def _release_locked(self, entry: _Entry) -> None:
        entry.users -= 1
        if entry.users == 0 and not entry.cached:
            if entry.counted_inflight:
                self._inflight_bytes -= entry.nbytes
                entry.counted_inflight = False
            if self._generating.get(entry.key) is entry:
                del self._generating[entry.key]  # nobody may join a production that nobody wants
            production, entry.production = entry.production, None  # drop the tensor now
            if production is not None and not production.done:
                production.cancel()

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

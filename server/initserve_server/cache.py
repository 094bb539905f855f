"""Single-flight LRU cache of finished tensors, with byte budgets for the cache and for tensors in flight.

A request asks for the tensor of a spec key. Three outcomes:
- hit: a finished tensor is in the cache; the request streams it (no new memory);
- join: an identical request is generating it now; the request waits for that generation (no new memory);
- miss: the request generates it, after admission against the in-flight byte budget (refused when it would not
  fit: :class:`Overloaded`, RESOURCE_EXHAUSTED). A failed generation is never cached; its joiners get its error.

Memory accounting: a tensor is either in the cache (counted against ``cache_bytes``) or held by streams outside
it (counted against ``max_inflight_bytes``), never both; so the server's tensor memory is at most the sum of the
two budgets. An entry evicted while streams still hold it moves to the in-flight count until they finish.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

WAIT_POLL_SECONDS = 0.1


class Overloaded(Exception):
    """Admitting the request would exceed the in-flight byte budget (RESOURCE_EXHAUSTED)."""


class Abandoned(Exception):
    """The caller went away (cancelled or expired) while waiting for a joined generation."""


@dataclass
class Produced:
    tensor: torch.Tensor  # contiguous, on the CPU
    checksum: bytes  # the whole tensor's checksum


@dataclass(eq=False)
class _Entry:
    key: Hashable
    nbytes: int
    cacheable: bool
    done: threading.Event = field(default_factory=threading.Event)
    produced: Produced | None = None
    error: BaseException | None = None
    users: int = 0
    cached: bool = False


@dataclass
class CacheStats:
    requests: int = 0
    generations: int = 0
    hits: int = 0
    joins: int = 0
    misses: int = 0
    evictions: int = 0
    refused: int = 0


class Lease:
    """A stream's hold on a finished tensor; release it (or use ``with``) when the stream ends."""

    def __init__(self, cache: TensorCache, entry: _Entry, *, shared: bool) -> None:
        self._cache = cache
        self._entry = entry
        self.shared = shared  # a cache hit or a joined generation: nothing was generated for this request
        self._released = False

    @property
    def produced(self) -> Produced:
        assert self._entry.produced is not None
        return self._entry.produced

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
        produce: Callable[[], Produced],
        *,
        cacheable: bool = True,
        is_active: Callable[[], bool] = lambda: True,
    ) -> Lease:
        """A lease on the tensor for ``key``: from the cache, a joined generation, or ``produce()`` now.

        Raises :class:`Overloaded` when a new generation does not fit the in-flight budget, whatever
        ``produce`` raised (for this request and for every request that joined it), or :class:`Abandoned`
        when ``is_active`` turns false while waiting for a joined generation.
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
            else:
                if self._inflight_bytes + nbytes > self.max_inflight_bytes:
                    self.stats.refused += 1
                    limit = f"in-flight tensor bytes limit (max_inflight_bytes={self.max_inflight_bytes})"
                    if nbytes > self.max_inflight_bytes:
                        raise Overloaded(f"{limit}: this request needs {nbytes} bytes, more than the limit")
                    raise Overloaded(
                        f"{limit}: {self._inflight_bytes} bytes in flight, this request needs {nbytes}; retry later"
                    )
                entry = _Entry(key=key, nbytes=nbytes, cacheable=cacheable, users=1)
                self._generating[key] = entry
                self._inflight_bytes += nbytes
                self.stats.misses += 1
                return self._generate(entry, produce)
        return self._wait(entry, is_active)

    def _generate(self, entry: _Entry, produce: Callable[[], Produced]) -> Lease:
        # Called with the lock held; generation itself runs without it.
        self._lock.release()
        try:
            try:
                produced = produce()
            except BaseException as error:
                with self._lock:
                    del self._generating[entry.key]
                    entry.error = error
                    self._release_locked(entry)
                entry.done.set()
                raise
            with self._lock:
                del self._generating[entry.key]
                entry.produced = produced
                self.stats.generations += 1
                if entry.cacheable and 0 < entry.nbytes <= self.cache_bytes:
                    self._insert_locked(entry)
            entry.done.set()
            return Lease(self, entry, shared=False)
        finally:
            self._lock.acquire()

    def _wait(self, entry: _Entry, is_active: Callable[[], bool]) -> Lease:
        while not entry.done.wait(WAIT_POLL_SECONDS):
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
        entry.cached = True
        self._cached[entry.key] = entry
        self._cached_bytes += entry.nbytes
        self._inflight_bytes -= entry.nbytes  # it was held by its generator, outside the cache

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            self._release_locked(entry)

    def _release_locked(self, entry: _Entry) -> None:
        entry.users -= 1
        if entry.users == 0 and not entry.cached:
            self._inflight_bytes -= entry.nbytes
            entry.produced = None  # drop the tensor now, not when the last reference happens to go

    def gauges(self) -> tuple[int, int, int]:
        """(entries cached, bytes cached, bytes in flight)."""
        with self._lock:
            return len(self._cached), self._cached_bytes, self._inflight_bytes

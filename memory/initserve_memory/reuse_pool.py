"""Memory kept for reuse: buffers lent out as tensors come back when the tensor and every view of it are freed.

Writing into memory a process has just mapped costs a page fault per 4 KiB page (on the benchmark machine,
0.2-0.4 s per GiB, and far more when the host has reclaimed the pages); writing into pages written before
costs none. A :class:`ReusePool` keeps buffers whose tensors are gone and hands them out again for the same
byte size. It serves the client's shared-memory regions (``_regions``) and the tensor memory of ``buffer_pool`` (the
client's gRPC destinations, the server's generated tensors).

A buffer is anything with ``map`` (an ``mmap``), ``nbytes``, a ``poolable`` flag and ``close()``. :meth:`lend`
returns a tensor over ``map`` whose storage holds a ``memoryview``; a finalizer on that ``memoryview`` runs
only once no tensor, view or exported buffer refers to the memory, so a buffer is never handed out while
anything can still read or write it.
"""

from __future__ import annotations

import collections
import mmap
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

import torch

from initserve_memory.fork_hooks import ForkHooks


class Buffer(Protocol):
    map: mmap.mmap
    nbytes: int
    poolable: bool  # False: closed, never pooled, when its tensor goes

    def close(self) -> None: ...


B = TypeVar("B", bound=Buffer)


class ReusePool(Generic[B]):
    """Free buffers, least recently returned evicted first, at most ``limit()`` bytes of them.

    ``limit`` is read whenever a buffer comes back and by :meth:`trim`; it must not take locks that a thread
    freeing a tensor may hold (a buffer comes back in whichever thread drops the last reference).
    """

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self._free: collections.OrderedDict[B, None] = collections.OrderedDict()  # oldest first
        self._free_bytes = 0
        self._lent: set[B] = set()
        self._returned: collections.deque[B] = collections.deque()  # from finalizers, any thread
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        _FORK_HOOKS.track(self)

    def free_bytes(self) -> int:
        """Bytes of free buffers held for reuse."""
        with self._locked():
            return self._free_bytes

    def take(self, nbytes: int) -> B | None:
        """A free buffer of exactly ``nbytes`` (most recently returned first), or None."""
        with self._locked():
            for buffer in reversed(self._free):
                if buffer.nbytes == nbytes:
                    del self._free[buffer]
                    self._free_bytes -= nbytes
                    return buffer
        return None

    def take_oldest(self, nbytes: int) -> list[B]:
        """Free buffers, least recently returned first, until their bytes reach ``nbytes`` (or all there are)."""
        taken: list[B] = []
        total = 0
        with self._locked():
            while self._free and total < nbytes:
                buffer, _ = self._free.popitem(last=False)
                self._free_bytes -= buffer.nbytes
                total += buffer.nbytes
                taken.append(buffer)
        return taken

    def give(self, buffer: B) -> None:
        """Take a free buffer that was never lent (kept within ``limit()`` as a returned one is, else closed)."""
        with self._locked():
            self._returned.append(buffer)

    def lend(self, buffer: B, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        """A tensor over ``buffer``; the buffer comes back when the tensor and its views are freed."""
        view = memoryview(buffer.map)
        tensor = torch.frombuffer(view, dtype=dtype).view(tuple(shape))  # the storage holds ``view``
        with self._locked():
            self._lent.add(buffer)
        returned = weakref.finalize(view, _returned, weakref.ref(self), buffer)
        returned.atexit = False  # at exit the owner closes what it must; the tensor may still be alive
        return tensor

    def trim(self, reserve: int = 0) -> None:
        """Close free buffers, oldest first, until they fit ``limit()`` less ``reserve`` bytes."""
        with self._locked():
            self._trim_locked(self._limit() - reserve)

    def release(self) -> int:
        """Close every free buffer (the pool stays open); returns their bytes."""
        with self._locked():
            released = self._free_bytes
            self._trim_locked(0)
        return released

    def close(self) -> None:
        """Close every free buffer; buffers lent out are closed, not pooled, when they come back."""
        with self._locked():
            self._closed = True
            self._trim_locked(0)

    def lent(self) -> list[B]:
        with self._locked():
            return list(self._lent)

    @property
    def closed(self) -> bool:
        return self._closed

    def _locked(self) -> _Settling:
        return _Settling(self)

    def _trim_locked(self, limit: int) -> None:
        while self._free and self._free_bytes > limit:
            oldest, _ = self._free.popitem(last=False)
            self._free_bytes -= oldest.nbytes
            oldest.close()

    def _settle(self) -> None:
        """Pool or close the buffers whose tensors were freed (under the lock)."""
        while self._returned:
            buffer = self._returned.popleft()
            self._lent.discard(buffer)
            limit = self._limit()
            if self._closed or not buffer.poolable or os.getpid() != self._pid or buffer.nbytes > limit:
                buffer.close()
                continue
            self._trim_locked(limit - buffer.nbytes)
            self._free[buffer] = None
            self._free_bytes += buffer.nbytes

    def _before_fork(self) -> None:
        with self._locked():
            for buffer in self._lent:
                buffer.poolable = False  # shared with the child (MAP_SHARED) or copied: never handed out again

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # a lock another thread held at the fork would never be released
        self._free.clear()  # the parent's: named or mapped there, and reused there
        self._free_bytes = 0
        self._lent.clear()
        self._returned.clear()
        self._pid = os.getpid()


class _Settling:
    """The pool's lock; on the way out, buffers that finalizers queued meanwhile are settled.

    A finalizer runs in whichever thread frees the tensor, possibly one that holds the lock already (a garbage
    collection inside a locked section): it only queues its buffer, and settles if the lock is free. Whoever
    holds the lock settles the queue before releasing it, and again after, for anything queued in between.
    """

    def __init__(self, pool: ReusePool) -> None:
        self.pool = pool

    def __enter__(self) -> None:
        self.pool._lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.pool._settle()
        finally:
            self.pool._lock.release()
        _settle_if_free(self.pool)


def _settle_if_free(pool: ReusePool) -> None:
    while pool._returned and pool._lock.acquire(blocking=False):
        try:
            pool._settle()
        finally:
            pool._lock.release()


def _returned(pool_ref: weakref.ref[ReusePool], buffer: Buffer) -> None:
    pool = pool_ref()
    if pool is None:
        buffer.close()
        return
    pool._returned.append(buffer)
    _settle_if_free(pool)


# Every live pool, told about forks (hooks registered with the first pool, never on import).
_FORK_HOOKS = ForkHooks(before=True)

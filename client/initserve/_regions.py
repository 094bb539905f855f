"""Shared-memory regions for the same-host transport, and the pool that lets a freed one be used again.

A region is a ``/dev/shm/initserve-<32 hex digits>`` object (mode 0600) of exactly one tensor's size, mapped by
this process; the server maps it by name and writes the tensor into it. The first use of a region costs a
page fault per 4 KiB page on both sides (0.3-0.4 s per GiB on the benchmark machine); using it again costs
none. So a region whose tensor has been freed goes back to a pool, and the next fetch of the same byte size
takes it instead of creating one.

Lifetimes:

- A region lent out as a tensor comes back when that tensor and every view of it are freed (a finalizer on the
  ``memoryview`` the tensor's storage holds).
- A region of a failed attempt is discarded, never pooled: the server may still be writing into it.
- The pool keeps at most ``max_bytes`` of free regions, least recently used evicted first.
- A pooled region's name stays in /dev/shm, so that the server can open it again. Each one is registered with
  multiprocessing's resource tracker, which removes the names a process leaves behind when it dies; ``close()``
  (``Client.close``, garbage collection, interpreter exit) removes them at once.
- Across ``fork``: a region lent out at the fork is shared with the child (``MAP_SHARED``), so it is never
  pooled again; the child starts with an empty pool; only the process that created a region removes its name.

With ``max_bytes`` 0 nothing is pooled and a region's name is removed as soon as its call returns.
"""

from __future__ import annotations

import collections
import mmap
import os
import secrets
import threading
import weakref
from collections.abc import Sequence

import torch

SHARED_MEMORY_DIR = "/dev/shm"
DEFAULT_POOL_BYTES = 1 << 30  # free regions a client keeps for reuse; 0 turns the pool off


def _track(name: str) -> bool:
    """Register ``name`` with multiprocessing's resource tracker (a helper process, started on first use, that
    removes it if this process dies first); False where the tracker cannot run."""
    try:
        from multiprocessing import resource_tracker

        resource_tracker.register("/" + name, "shared_memory")
    except Exception:  # noqa: BLE001 - no tracker (no sys.executable, say): the region is not pooled
        return False
    return True


def _untrack(name: str) -> None:
    from multiprocessing import resource_tracker

    try:
        resource_tracker.unregister("/" + name, "shared_memory")
    except Exception:  # noqa: BLE001 - the tracker is gone (interpreter exit): nothing left to tell it
        pass


class SharedRegion:
    """A new shared-memory object of ``nbytes`` (> 0), mapped; :meth:`unlink` removes its name."""

    def __init__(self, nbytes: int, directory: str = SHARED_MEMORY_DIR) -> None:
        self.name = f"initserve-{secrets.token_hex(16)}"
        self.path = os.path.join(directory, self.name)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            self.map = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self.nbytes = nbytes
        self.owner_pid = os.getpid()  # only this process removes the name
        self.linked = True
        self.tracked = False
        self.poolable = True  # False once it may be shared with a forked child, or its pool has closed

    def unlink(self) -> None:
        """Remove the name (once, and only in the process that created it); the pages live while mapped."""
        if not self.linked or os.getpid() != self.owner_pid:
            return
        self.linked = False
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self.tracked:
            self.tracked = False
            _untrack(self.name)

    def close(self) -> None:
        """Remove the name and unmap (a tensor still over the pages keeps them mapped until it is freed)."""
        self.unlink()
        try:
            self.map.close()
        except BufferError:
            pass


class RegionPool:
    """The regions of one client: :meth:`take` one, then :meth:`lend` it as a tensor or :meth:`discard` it."""

    def __init__(self, max_bytes: int = DEFAULT_POOL_BYTES, directory: str = SHARED_MEMORY_DIR) -> None:
        if max_bytes < 0:
            raise ValueError(f"shared_memory_pool_bytes must be at least 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.directory = directory
        self._free: collections.OrderedDict[SharedRegion, None] = collections.OrderedDict()  # oldest first
        self._free_bytes = 0
        self._lent: set[SharedRegion] = set()
        self._returned: collections.deque[SharedRegion] = collections.deque()  # from finalizers, any thread
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self._finalizer = weakref.finalize(self, _close_regions, self._free, self._lent)  # GC or exit
        _POOLS.add(self)

    @property
    def keeps_names(self) -> bool:
        """Whether regions keep their names after a call (to be reused); otherwise the caller unlinks them."""
        return self.max_bytes > 0

    def free_bytes(self) -> int:
        """Bytes of free regions held for reuse."""
        with self._locked():
            return self._free_bytes

    def take(self, nbytes: int) -> SharedRegion:
        """A free region of exactly ``nbytes``, or a new one."""
        with self._locked():
            for region in self._free:
                if region.nbytes == nbytes:
                    del self._free[region]
                    self._free_bytes -= nbytes
                    return region
        region = SharedRegion(nbytes, self.directory)
        if self.keeps_names and not self._closed:
            region.tracked = _track(region.name)
            region.poolable = region.tracked
        else:
            region.poolable = False
        return region

    def lend(self, region: SharedRegion, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        """A tensor over ``region``'s pages; the region comes back to the pool when it and its views are freed."""
        view = memoryview(region.map)
        tensor = torch.frombuffer(view, dtype=dtype).view(tuple(shape))  # the storage holds ``view``
        with self._locked():
            self._lent.add(region)
        returned = weakref.finalize(view, _returned, weakref.ref(self), region)
        returned.atexit = False  # at exit the pool's own finalizer removes the names; the tensor may still live
        return tensor

    def discard(self, region: SharedRegion) -> None:
        """A region that must not be used again (its attempt failed): name removed, unmapped."""
        region.close()

    def close(self) -> None:
        """Remove every region's name and unmap the free ones; lent regions stay mapped until their tensors go."""
        with self._locked():
            self._closed = True
            self._free_bytes = 0
            self._finalizer()

    def _locked(self) -> _Settling:
        return _Settling(self)

    def _settle(self) -> None:
        """Pool or close the regions whose tensors were freed (under the lock)."""
        while self._returned:
            region = self._returned.popleft()
            self._lent.discard(region)
            if self._closed or not region.poolable or os.getpid() != self._pid or region.nbytes > self.max_bytes:
                region.close()
                continue
            while self._free_bytes + region.nbytes > self.max_bytes:
                oldest, _ = self._free.popitem(last=False)
                self._free_bytes -= oldest.nbytes
                oldest.close()
            self._free[region] = None
            self._free_bytes += region.nbytes

    def _before_fork(self) -> None:
        with self._locked():
            for region in self._lent:
                region.poolable = False  # the child shares these pages: never written again

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # a lock some other thread held at the fork would never be released
        self._free.clear()  # the parent's, still named and reused there
        self._free_bytes = 0
        self._lent.clear()
        self._returned.clear()
        self._pid = os.getpid()


class _Settling:
    """The pool's lock; on the way out, regions that finalizers queued meanwhile are settled.

    A finalizer runs in whichever thread frees the tensor, possibly one that holds the lock already (a garbage
    collection inside a locked section): it only queues its region and settles if the lock is free. Whoever
    holds the lock settles the queue before releasing it, and again after, for anything queued in between.
    """

    def __init__(self, pool: RegionPool) -> None:
        self.pool = pool

    def __enter__(self) -> None:
        self.pool._lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.pool._settle()
        finally:
            self.pool._lock.release()
        _settle_if_free(self.pool)


def _settle_if_free(pool: RegionPool) -> None:
    while pool._returned and pool._lock.acquire(blocking=False):
        try:
            pool._settle()
        finally:
            pool._lock.release()


def _returned(pool_ref: weakref.ref[RegionPool], region: SharedRegion) -> None:
    pool = pool_ref()
    if pool is None:
        region.close()
        return
    pool._returned.append(region)
    _settle_if_free(pool)


def _close_regions(free: collections.OrderedDict[SharedRegion, None], lent: set[SharedRegion]) -> None:
    for region in list(free):
        region.close()
    free.clear()
    for region in list(lent):
        region.poolable = False
        region.unlink()  # its tensor keeps the pages


# Every live pool, for the fork hooks: os.register_at_fork cannot unregister, so the hooks are registered once
# and find the pools here.
_POOLS: weakref.WeakSet[RegionPool] = weakref.WeakSet()


def _before_fork() -> None:
    for pool in list(_POOLS):
        pool._before_fork()


def _after_fork_in_child() -> None:
    for pool in list(_POOLS):
        pool._after_fork_in_child()


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)

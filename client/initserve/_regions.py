"""Shared-memory regions for the same-host transport, and the pool (``_reuse``) that lets a freed one be used again.

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

import mmap
import os
import secrets
import weakref
from collections.abc import Sequence

import torch

from initserve._reuse import ReusePool

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
    """A new shared-memory object of ``nbytes`` (> 0), mapped; :meth:`unlink` removes its name. ``pooled``: it
    may be reused, so its name is registered with the resource tracker (not pooled where that fails)."""

    def __init__(self, nbytes: int, directory: str = SHARED_MEMORY_DIR, *, pooled: bool = False) -> None:
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
        self.tracked = pooled and _track(self.name)
        self.poolable = self.tracked  # False too once it may be shared with a forked child, or its pool closed

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
        self._pool: ReusePool[SharedRegion] = ReusePool(lambda: max_bytes)
        self._finalizer = weakref.finalize(self, _close_regions, self._pool)  # GC or exit

    @property
    def keeps_names(self) -> bool:
        """Whether new regions may be pooled (and so keep their names after their call)."""
        return self.max_bytes > 0

    def free_bytes(self) -> int:
        """Bytes of free regions held for reuse."""
        return self._pool.free_bytes()

    def release(self) -> int:
        """Remove and unmap every free region now (the pool stays usable); returns their bytes."""
        return self._pool.release()

    def take(self, nbytes: int) -> SharedRegion:
        """A free region of exactly ``nbytes``, or a new one."""
        region = self._pool.take(nbytes)
        if region is not None:
            return region
        return SharedRegion(nbytes, self.directory, pooled=self.keeps_names and not self._pool.closed)

    def lend(self, region: SharedRegion, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        """A tensor over ``region``'s pages; the region comes back to the pool when it and its views are freed."""
        return self._pool.lend(region, dtype, shape)

    def discard(self, region: SharedRegion) -> None:
        """A region that must not be used again (its attempt failed): name removed, unmapped."""
        region.close()

    def close(self) -> None:
        """Remove every region's name and unmap the free ones; lent regions stay mapped until their tensors go."""
        self._finalizer()


def _close_regions(pool: ReusePool[SharedRegion]) -> None:
    pool.close()
    for region in pool.lent():
        region.poolable = False
        region.unlink()  # its tensor keeps the pages

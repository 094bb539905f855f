"""Shared-memory regions for the same-host transport, and the pool (``reuse_pool``) that lets a freed one be used again.

A region is a memfd of exactly one tensor's size, every page allocated (``posix_fallocate``: charged to this
process, so the server's writes never allocate), sealed against shrinking and growing, and mapped here; the
server gets its descriptor once, at registration (``_shared``), and writes into its own mapping of it. Nothing
has a name: no other process can open a region, and a region's memory goes when the last mapping of it does
(this process's, and the server's once the region is released or the connection closes), whatever way this
process ends.

The first use of a region costs its allocation and a page fault per 4 KiB page (0.3-0.4 s per GiB on the
benchmark machine); using it again costs none, and no registration either. So a region whose tensor has been
freed goes back to a pool, with its token, and the next fetch of the same byte size takes it.

Lifetimes:

- A region lent out as a tensor comes back when that tensor and every view of it are freed (a finalizer on the
  ``memoryview`` the tensor's storage holds).
- A region of a failed attempt is discarded, never pooled: the server may still be writing into it.
- The pool keeps at most ``max_bytes`` of free regions, least recently used evicted first; with 0 nothing is
  pooled. A region closed (evicted, discarded, its tensor freed after the pool closed) is unmapped here and
  handed to ``on_close``, which tells the server to release it.
- Across ``fork``: a region lent out at the fork is shared with the child (``MAP_SHARED``), so it is never
  pooled again; the child starts with an empty pool.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from collections.abc import Callable, Sequence

import torch

from initserve_memory.reuse_pool import ReusePool

DEFAULT_POOL_BYTES = 1 << 30  # free regions a client keeps for reuse; 0 turns the pool off
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW  # the client's; the server adds F_SEAL_FUTURE_WRITE | F_SEAL_SEAL


class SharedRegion:
    """A new sealed memfd of ``nbytes`` (> 0), allocated and mapped; :attr:`fd` stays open until
    :meth:`close_fd` (after registering it). ``token`` is the server's name for it once registered."""

    def __init__(self, nbytes: int) -> None:
        fd = os.memfd_create("initserve-region", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
            os.posix_fallocate(fd, 0, nbytes)  # every page now, charged here: the server's writes allocate nothing
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            # Not populated here: the server's mapping is (zeroing the pages once, in one pass), and this
            # process's checksum then maps them 16 pages per fault (fault-around). Measured for a fresh 256 MiB
            # region, end to end: 0.28 s, against 0.35 s with MAP_POPULATE here as well.
            self.map = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self.fd: int | None = fd
        self.nbytes = nbytes
        self.token = ""
        self.registration: object = None  # the connection that issued ``token`` (``_shared``)
        self.poolable = True  # False once it may be shared with a forked child, or must not be used again
        self.on_close: Callable[[SharedRegion], None] | None = None

    def close_fd(self) -> None:
        """Close the descriptor (the mapping keeps the memory); a registered region needs it no more."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        """Unmap (a tensor still over the pages keeps them mapped until it is freed) and tell ``on_close``."""
        self.close_fd()
        self.poolable = False
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close(self)
        try:
            self.map.close()
        except BufferError:
            pass


class RegionPool:
    """The regions of one client: :meth:`take` one, then :meth:`lend` it as a tensor or :meth:`discard` it."""

    def __init__(self, max_bytes: int = DEFAULT_POOL_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"shared_memory_pool_bytes must be at least 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._pool: ReusePool[SharedRegion] = ReusePool(lambda: max_bytes)

    def free_bytes(self) -> int:
        """Bytes of free regions held for reuse."""
        return self._pool.free_bytes()

    def release(self) -> int:
        """Close every free region now (the pool stays usable); returns their bytes."""
        return self._pool.release()

    def take(self, nbytes: int, usable: Callable[[SharedRegion], bool] = lambda region: True) -> SharedRegion:
        """A free region of exactly ``nbytes`` that is ``usable`` (others of that size are closed), or a new one."""
        while (region := self._pool.take(nbytes)) is not None:
            if usable(region):
                return region
            region.close()
        region = SharedRegion(nbytes)
        region.poolable = self.max_bytes > 0 and not self._pool.closed
        return region

    def give(self, region: SharedRegion) -> None:
        """Back to the pool unused (the server never wrote into it)."""
        self._pool.give(region)

    def lend(self, region: SharedRegion, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        """A tensor over ``region``'s pages; the region comes back to the pool when it and its views are freed."""
        return self._pool.lend(region, dtype, shape)

    def lent(self) -> list[SharedRegion]:
        """The regions lent out as tensors now."""
        return self._pool.lent()

    def discard(self, region: SharedRegion) -> None:
        """A region that must not be used again (its attempt failed)."""
        region.close()

    def close(self) -> None:
        """Close the free regions; lent regions are closed, not pooled, when their tensors go."""
        self._pool.close()

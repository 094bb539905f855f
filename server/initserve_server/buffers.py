"""Tensor memory kept for reuse within the byte budgets: a new CPU tensor takes the pages of a freed one.

Every uncached generation writes a new tensor, and every tensor the cache evicts gave its pages back to the
OS (``allocator``: tensors of 8 MiB or more are mappings of their own). Writing fresh pages costs a page fault
per 4 KiB; on the benchmark machine, a VM that hands freed guest memory back to its host, it ran at
0.3-0.75 GB/s where pages already written take 16 GB/s. So a CPU tensor of :data:`MIN_POOLED_BYTES` or more
is made over an anonymous mapping from a :class:`~initserve._reuse.ReusePool`, and when the tensor and every
view of it are freed (evicted and no longer streamed) the mapping waits there for the next tensor of the same
byte size. Contents are never relied on: ``torch.empty`` promises none either.

Budget: free buffers may use only what the cache and in-flight budgets leave unused
(:meth:`TensorCache.spare_bytes`), so cached + in flight + pooled tensor memory stays within the two budgets,
the bound the server had without the pool. A tensor that finds no free buffer of its size first trims the
pool to that room. What changes for an operator: after a burst, the server's RSS stays up to the budgets.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable, Sequence

import torch

from initserve._reuse import ReusePool
from initserve_server.allocator import MMAP_THRESHOLD_BYTES

MIN_POOLED_BYTES = MMAP_THRESHOLD_BYTES  # smaller tensors come from glibc's heap, which keeps its pages anyway


class _Buffer:
    """An anonymous private mapping of ``nbytes``."""

    def __init__(self, nbytes: int) -> None:
        self.map = mmap.mmap(-1, nbytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.nbytes = nbytes
        self.poolable = True

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:  # still exported: unmapped when the last view goes
            pass


class BufferPool:
    """``empty(shape, dtype)``: a contiguous CPU tensor, over reused memory when one of its size is free."""

    def __init__(self, spare_bytes: Callable[[], int]) -> None:
        self._pool: ReusePool[_Buffer] = ReusePool(spare_bytes)

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < MIN_POOLED_BYTES:
            return torch.empty(tuple(shape), dtype=dtype)
        buffer = self._pool.take(nbytes)
        if buffer is None:
            self._pool.trim()  # the budgets already count this tensor: free buffers give way first
            buffer = _Buffer(nbytes)
        return self._pool.lend(buffer, dtype, shape)

    def free_bytes(self) -> int:
        """Bytes of freed tensor memory held for reuse."""
        return self._pool.free_bytes()

    def close(self) -> None:
        self._pool.close()

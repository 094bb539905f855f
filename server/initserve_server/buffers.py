"""Tensor memory kept for reuse within the byte budgets: a new CPU tensor takes the pages of a freed one.

Every uncached generation writes a new tensor, and every tensor the cache evicts gave its pages back to the
OS (``allocator``: tensors of 8 MiB or more are mappings of their own). Writing fresh pages costs a page fault
per 4 KiB; on the benchmark machine, a VM that hands freed guest memory back to its host, it ran at
0.3-0.75 GB/s where pages already written take 16 GB/s. So a CPU tensor of :data:`MIN_POOLED_BYTES` or more
is made over an anonymous mapping from a pool (``initserve_memory.buffer_pool``, which the client uses too), and when
the tensor and every view of it are freed (evicted and no longer streamed) the mapping waits there for the
next tensor of the same byte size; a tensor of another size has the pages of free buffers moved into its own
mapping (``initserve_memory.page_moves``), so after evictions every generation writes pages already written.
Contents are never relied on: ``torch.empty`` promises none either.

Budget: free buffers may use only what the cache and in-flight budgets leave unused
(:meth:`TensorCache.spare_bytes`), so cached + in flight + pooled tensor memory stays within the two budgets,
the bound the server had without the pool: moving pages from a free buffer into a new tensor moves their
bytes from one count to the other. A tensor that finds no free buffer of its size, once it has taken the pages
it can, trims the pool to the room left. What changes for an operator: after a burst, the server's RSS stays
up to the budgets.

Preallocation (``--preallocate-bytes``): a fresh server has nothing freed yet, so its first generations write
fresh pages, at a third of the speed or less here. Given a byte count, a background thread maps and writes that
much memory into the pool at start-up (64 MiB pieces), and the first generations, of any size, take its pages.
The server serves meanwhile; a generation that comes first takes what is there. The cost: RSS starts that much
higher (it would reach it anyway once the cache fills) and start-up writes it once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from initserve_memory.buffer_pool import BufferPool as _BufferPool
from initserve_server.allocator import MMAP_THRESHOLD_BYTES

MIN_POOLED_BYTES = MMAP_THRESHOLD_BYTES  # smaller tensors come from glibc's heap, which keeps its pages anyway
log = logging.getLogger("initserve.server")


class BufferPool(_BufferPool):
    """``empty(shape, dtype)``: a contiguous CPU tensor, over freed or preallocated memory where there is some;
    ``spare_bytes()`` is the room the budgets leave, already counting the tensor being made."""

    def __init__(self, spare_bytes: Callable[[], int]) -> None:
        super().__init__(spare_bytes, min_bytes=MIN_POOLED_BYTES)

    def start_preallocating(self, nbytes: int) -> threading.Thread | None:
        """Write ``nbytes`` of free tensor memory in a daemon thread (returned; None for 0)."""
        if nbytes <= 0:
            return None
        worker = threading.Thread(target=self._preallocate, args=(nbytes,), name="initserve-preallocate", daemon=True)
        worker.start()
        return worker

    def _preallocate(self, nbytes: int) -> None:
        started = time.monotonic()
        written = self.preallocate(nbytes)
        log.info(
            "preallocated %d bytes of tensor memory in %.2f s; %d bytes free in the pool",
            written, time.monotonic() - started, self.free_bytes(),
        )  # fmt: skip

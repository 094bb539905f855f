"""New CPU tensors over reused memory: a tensor made here takes the pages of freed ones.

Writing into memory a process has just mapped costs a page fault per 4 KiB page; on the benchmark machine that
was 0.2-0.4 s per GiB (and far more when the VM's host had reclaimed the pages), against none for pages written
before. A :class:`BufferPool` makes each tensor of ``min_bytes`` or more over an anonymous private mapping lent
from a :class:`~initserve_memory.reuse_pool.ReusePool`; when the tensor and every view of it are freed, the
mapping waits for the next tensor of the same byte size. A tensor that finds none of its size takes the pages of free
buffers of other sizes instead, least recently freed first: ``page_moves`` moves them into its new mapping (0.2-4.5
ms per GiB, no page faults), and what is left of the last one stays free as a buffer of its own. Only the part
that free buffers cannot cover is fresh memory. Contents are never relied on: ``torch.empty`` promises none
either.

Used by the client for the tensors its gRPC fetches write (``MemoryPolicy(reuse_bytes=...)``) and by the server
for the tensors it generates (``initserve_server.buffers``, within its byte budgets).

A tensor made over a mapping has a storage that cannot be resized (like ``torch.frombuffer``'s); everything
else (views, ``share_memory_``, pickling, ``numpy()``, ``.to(device)``) works as for ``torch.empty``'s.
"""

from __future__ import annotations

import ctypes
import math
import mmap
from collections.abc import Callable, Sequence

import torch

from initserve_memory import page_moves, prefault
from initserve_memory.reuse_pool import ReusePool

MIN_POOLED_BYTES = 8 << 20  # the client's: smaller tensors are torch.empty's (glibc's heap keeps their pages)
PREALLOCATED_PIECE_BYTES = 64 << 20  # preallocate()'s free buffers: a smaller tensor moves one piece's pages


class AnonymousBuffer:
    """An anonymous private mapping of ``nbytes``."""

    def __init__(self, nbytes: int) -> None:
        self.map = mmap.mmap(-1, nbytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.nbytes = nbytes
        self.poolable = True
        self.address = page_moves.address(self.map)

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:  # still exported: unmapped when the last view goes
            pass


class BufferPool:
    """``allocate(shape, dtype)``: a contiguous CPU tensor, over the memory of freed ones where there is some.

    ``limit()``: the most bytes of free buffers to keep (read when a buffer comes back and on a miss; it must
    not take locks that a thread freeing a tensor may hold). On a miss, the new tensor takes the pages of free
    buffers of other sizes, least recently used first; then what stays free is unmapped, least recently used
    first, until it fits ``limit()``, less the new tensor's bytes when ``make_room_on_miss`` (a limit that does
    not already count the tensor being made).
    """

    def __init__(
        self, limit: Callable[[], int], *, min_bytes: int = MIN_POOLED_BYTES, make_room_on_miss: bool = False
    ) -> None:
        self.min_bytes = min_bytes
        self._make_room_on_miss = make_room_on_miss
        self._pool: ReusePool[AnonymousBuffer] = ReusePool(limit)

    def allocate(self, shape: Sequence[int], dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
        """The tensor, and whether its memory was reused (written before: no page faults to pay)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < self.min_bytes:
            return torch.empty(tuple(shape), dtype=dtype), False
        buffer = self._pool.take(nbytes)
        reused = buffer is not None
        if buffer is None:
            sources = self._pool.take_oldest(nbytes) if page_moves.supported() else []
            buffer = AnonymousBuffer(nbytes)
            reused = self._move_pages(sources, buffer) == page_moves.page_bytes(nbytes)
            self._pool.trim(reserve=nbytes if self._make_room_on_miss else 0)
        return self._pool.lend(buffer, dtype, shape), reused

    def _move_pages(self, sources: list[AnonymousBuffer], buffer: AnonymousBuffer) -> int:
        """Move the pages of free ``sources`` (taken from the pool: no tensor reaches them) into ``buffer``, in
        order, until it is covered; returns the bytes covered. A source is unmapped once its pages are moved;
        the rest of the last one becomes a free buffer of its own (kept if it is ``min_bytes`` or more)."""
        need, covered = page_moves.page_bytes(buffer.nbytes), 0
        for source in sources:
            span = page_moves.page_bytes(source.nbytes)
            take = min(span, need - covered)
            if take == 0 or not page_moves.move(source.address, buffer.address + covered, take):
                self._pool.give(source)  # untouched: free as it was
                continue
            covered += take
            if span - take >= self.min_bytes:
                rest = AnonymousBuffer(span - take)
                if page_moves.move(source.address + take, rest.address, rest.nbytes):
                    self._pool.give(rest)
                else:
                    rest.close()
            source.close()
        return covered

    def preallocate(self, nbytes: int) -> int:
        """Map and write ``nbytes`` of free buffers (pieces of :data:`PREALLOCATED_PIECE_BYTES`, none under
        ``min_bytes``) for tensors to come, which then take their pages; returns the bytes written. The pool keeps
        them within ``limit()`` as it keeps any freed buffer."""
        written = 0
        while nbytes - written >= self.min_bytes and not self._pool.closed:
            buffer = AnonymousBuffer(min(PREALLOCATED_PIECE_BYTES, nbytes - written))
            if not prefault.populate(buffer.address, buffer.address + buffer.nbytes):
                ctypes.memset(buffer.address, 0, buffer.nbytes)  # what populating does, less the second write
            self._pool.give(buffer)
            written += buffer.nbytes
        return written

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return self.allocate(shape, dtype)[0]

    def free_bytes(self) -> int:
        """Bytes of freed tensor memory held for reuse."""
        return self._pool.free_bytes()

    def release(self) -> int:
        """Unmap every free buffer now (the pool stays usable); returns the bytes released."""
        return self._pool.release()

    def close(self) -> None:
        """Unmap every free buffer and keep none from now on."""
        self._pool.close()

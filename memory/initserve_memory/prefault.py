"""A large destination's pages made resident by another thread, ahead of the bytes that will be written there.

The first write to each fresh page of a new tensor is a page fault, and on the machine the benchmarks run on
that is about 0.2 ms per MiB of the client's 0.85 ms per MiB of receiving. ``madvise(MADV_POPULATE_WRITE)``
(Linux 5.14+) faults a range in without touching its contents, and ctypes releases the GIL while it runs, so a
thread can do that work on another core while the stream is received. It is only a hint: where it is not
supported, or fails, pages are faulted in by the writes themselves, as before. Contents are never changed.
"""

from __future__ import annotations

import ctypes
import mmap
import threading

import torch

from initserve_memory import c_library

MADV_POPULATE_WRITE = 23  # linux/mman.h; Python's mmap module names it from 3.13 on only
PREFAULT_MIN_BYTES = 16 << 20  # below this a thread's start costs more than it saves
PIECE_BYTES = 8 << 20  # one madvise call: a stream's writes start as soon as the first piece is resident

_madvise = c_library.function("madvise", ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def prefault_async(tensor: torch.Tensor) -> threading.Thread | None:
    """Start making a contiguous CPU ``tensor``'s pages resident in a daemon thread (returned, or None when
    there is nothing to gain: a small tensor, another OS)."""
    nbytes = tensor.numel() * tensor.element_size()
    if _madvise is None or nbytes < PREFAULT_MIN_BYTES or tensor.device.type != "cpu":
        return None
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page  # the first whole page: madvise takes page-aligned ranges
    end = tensor.data_ptr() + nbytes
    worker = threading.Thread(target=_populate, args=(tensor, start, end), name="initserve-prefault", daemon=True)
    worker.start()
    return worker


def populate(start: int, end: int) -> bool:
    """Fault the pages of ``[start, end)`` (page-aligned start, writable memory) in for writing, in pieces,
    contents unchanged; False where the call is unsupported (EINVAL before Linux 5.14) or fails."""
    if _madvise is None:
        return False
    for piece in range(start, end, PIECE_BYTES):
        if _madvise(piece, min(PIECE_BYTES, end - piece), MADV_POPULATE_WRITE) != 0:
            return False
    return True


def _populate(tensor: torch.Tensor, start: int, end: int) -> None:
    """``tensor`` is held only so that its memory stays mapped while the range is populated; where that fails,
    the writes fault the pages in themselves."""
    populate(start, end)

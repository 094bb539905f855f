"""Process memory: give freed tensors back to the OS, so the byte budgets bound the server's RSS.

glibc raises its mmap threshold dynamically after the first large block is freed (up to 32 MiB on 64-bit), so
later tensors come from heap arenas that keep their pages after free: measured under 32 clients, RSS settled
280-380 MiB above idle + both budgets and stayed there. Pinning ``M_MMAP_THRESHOLD`` at 1 MiB (which also stops
the dynamic adjustment) maps every tensor-sized block and unmaps it on free. The cost is fresh page faults for
each new tensor (measured: ~30% fewer results in the same load); the bound is the point of the budgets.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20
log = logging.getLogger("initserve.server")


def return_large_blocks_to_the_os() -> bool:
    """Pin glibc's mmap threshold (unless MALLOC_MMAP_THRESHOLD_ already sets it); False where not glibc."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return True  # the operator chose; glibc read it at start-up
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1:
        log.warning("mallopt(M_MMAP_THRESHOLD) failed; RSS may exceed the byte budgets")
        return False
    return True

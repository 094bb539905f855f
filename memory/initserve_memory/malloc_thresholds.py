"""glibc's dynamic malloc thresholds raised to their ceiling, once per process, so received memory is reused.

gRPC's channel thread frees each received message in its own malloc arena, and glibc gives back to the OS
whatever lies above the arena's trim threshold at its top. That threshold is dynamic: twice the mmap
threshold, which starts at 128 KiB and which glibc raises to the size of each mapped block the program frees,
up to 32 MiB (mallopt(3)). In a client process that never freed a large enough block it settled near 2 MiB, and
the bytes of most messages landed in pages given back and faulted in again: 20,000-60,000 page faults per
cached 256 MiB fetch; 1.2-1.7 GB/s where the same fetches ran at 1.9-2.3 GB/s with the thresholds raised.

:func:`raise_thresholds` frees one block of 31 MiB (mapped, never touched), which moves both thresholds to the
top of their range exactly as freeing a 31 MiB tensor does in any PyTorch program. It pins nothing: glibc keeps
adjusting them, and where they were pinned already (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``GLIBC_TUNABLES``, ``mallopt``) glibc ignores the freed block. What it changes for the process: blocks under
31 MiB come from the heap rather than a mapping of their own, and up to 62 MiB free at the top of an arena is
kept rather than given back. ``INITSERVE_MALLOC_NUDGE=0`` skips it; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

from initserve_memory import c_library

NUDGE_BYTES = 31 << 20  # glibc adjusts for freed mapped blocks of at most 32 MiB, chunk header included
ENV_SWITCH = "INITSERVE_MALLOC_NUDGE"

_done = False
_lock = threading.Lock()


def _is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):  # no such name: not glibc
        return False


def raise_thresholds() -> bool:
    """Free one :data:`NUDGE_BYTES` block through glibc's malloc, once per process; whether it was done now or
    before (False: switched off, or not glibc)."""
    global _done
    if os.environ.get(ENV_SWITCH, "1") == "0" or not sys.platform.startswith("linux") or not _is_glibc():
        return False
    with _lock:
        if not _done:
            malloc = c_library.function("malloc", ctypes.c_void_p, ctypes.c_size_t)
            free = c_library.function("free", None, ctypes.c_void_p)
            block = malloc(NUDGE_BYTES) if malloc and free else None
            if block:
                free(block)
            _done = True
    return True

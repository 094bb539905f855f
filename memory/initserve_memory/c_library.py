"""C library functions through ctypes, for the Linux memory calls the client makes (madvise, mremap, malloc).

:func:`function` returns the process's own C library function with its signature set, or None where there is
no such function to call (another OS, a C library without it). Each call returns a function object of its
own, so two callers' signatures never meet.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any


def function(name: str, restype: Any, *argtypes: Any) -> Any | None:
    """libc's ``name`` (errno kept for ``ctypes.get_errno``), or None off Linux or where it is missing."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        found = ctypes.CDLL(None, use_errno=True)[name]
    except (OSError, AttributeError):
        return None
    found.restype = restype
    found.argtypes = argtypes
    return found

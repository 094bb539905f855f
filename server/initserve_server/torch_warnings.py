"""Warnings torch gives during a generation, collected for the caller instead of printed in the server's log.

torch.nn.init warns where the caller should hear it: "Initializing zero-element tensors is a no-op",
trunc_normal_'s "mean is more than 2 std from [a, b]". Python's warnings machinery is process-wide in 3.11, so
:func:`install` routes every warning shown in a thread that is collecting (:func:`collecting`) into that
thread's list, and lets torch.nn.init's warnings show every time (not once per process), as a caller running
torch itself would see them once per call. Each production keeps its list, and the trailer carries it
(``Trailer.warnings``): a cached answer warns as the generation did.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from typing import Any

MAX_WARNINGS = 4  # per tensor; more are dropped (torch.nn.init gives at most one per call)
MAX_WARNING_BYTES = 256  # of UTF-8 per warning; longer ones are cut at a character boundary

_local = threading.local()
_installed = False
_install_lock = threading.Lock()


def _route(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None):
    collected = getattr(_local, "collected", None)
    if collected is None:
        return _original(message, category, filename, lineno, file, line)
    if issubclass(category, UserWarning) and len(collected) < MAX_WARNINGS:
        text = str(message).encode()[:MAX_WARNING_BYTES].decode(errors="ignore")
        collected.append(text)
    return None


_original = warnings.showwarning


def install() -> None:
    """Route collected threads' warnings (idempotent); torch.nn.init's warnings show on every call."""
    global _installed, _original
    if _installed:  # every generation asks: no lock once done
        return
    with _install_lock:
        if _installed:
            return
        _original = warnings.showwarning
        warnings.showwarning = _route
        # torch.nn.init warns from its own frame (trunc_normal_) or from its caller's (stacklevel=2): the server's
        # module that called it, or torch.overrides where a tensor subclass's __torch_function__ made the call
        # (the pieces a generation streams). "always", so that the second call warns too: under "default" the
        # first warning of a place silences every later one.
        warnings.filterwarnings("always", category=UserWarning, module=r"torch\.|initserve_server\.")
        _installed = True


@contextlib.contextmanager
def collecting(into: list[str] | None = None) -> Iterator[list[str]]:
    """Warnings this thread shows inside go into ``into`` (a new list when None) instead of the log."""
    install()
    collected = [] if into is None else into
    previous = getattr(_local, "collected", None)
    _local.collected = collected
    try:
        yield collected
    finally:
        _local.collected = previous

"""A byte budget that refuses what does not fit: the memory of streams' messages on their way out."""

from __future__ import annotations

import threading
from collections.abc import Callable


class OverBudget(Exception):
    """Taking the bytes would exceed the budget (RESOURCE_EXHAUSTED); the message names the limit."""


class ByteBudget:
    def __init__(self, limit_bytes: int, name: str) -> None:
        self.limit_bytes = limit_bytes
        self.name = name  # the limit's name in refusals, e.g. "stream_buffer_bytes"
        self._lock = threading.Lock()
        self.in_use = 0

    def take(self, nbytes: int, what: str) -> Callable[[], None]:
        """Count ``nbytes`` (``what`` says for what), or raise :class:`OverBudget`; returns the function that gives
        them back (idempotent)."""
        with self._lock:
            if self.in_use + nbytes > self.limit_bytes:
                limit = f"{self.name}={self.limit_bytes}"
                if nbytes > self.limit_bytes:
                    raise OverBudget(f"{what} {nbytes} bytes, more than the limit ({limit})")
                raise OverBudget(f"{what} {nbytes} bytes and {self.in_use} of {limit} are in use; retry later")
            self.in_use += nbytes
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            with self._lock:
                if not given_back:
                    given_back = True
                    self.in_use -= nbytes

        return give_back

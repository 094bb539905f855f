"""One fetch's retry budget: which failures are worth another attempt, backoff with jitter, the deadline.

Generation is deterministic, so a stream that breaks part-way is continued by a new one (to any replica) from
the last verified byte; the whole-tensor checksum then proves the joined bytes (:mod:`initserve._pipeline`).
Nothing here sleeps or returns a tensor: :class:`Attempts` says how long to pause, or raises the last error
when the attempts or the deadline run out.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from initserve._errors import DeadlineExceeded, InitServeError, IntegrityError

# Status codes after which a new stream may succeed: the server or the connection went away (UNAVAILABLE),
# the transport broke or a damaged message failed to parse (INTERNAL, UNKNOWN "stream removed"), or a
# shutting-down server cancelled the stream (CANCELLED). Everything else is an answer, and is raised.
RETRYABLE_CODES = frozenset({"UNAVAILABLE", "INTERNAL", "UNKNOWN", "CANCELLED"})


@dataclass(frozen=True)
class RetryPolicy:
    """How many streams one fetch may use, and the pause before each new one (exponential, full jitter)."""

    max_attempts: int = 6  # streams per fetch, the first included; 1 disables resuming
    initial_backoff: float = 0.05  # seconds
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if not 0 <= self.initial_backoff <= self.max_backoff:
            raise ValueError("backoffs must satisfy 0 <= initial_backoff <= max_backoff")

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        return random.uniform(0, ceiling)


def retryable(error: InitServeError) -> bool:
    """Whether another attempt may mend ``error``: a damaged stream that can be resumed or restarted, or a
    status of :data:`RETRYABLE_CODES`."""
    if isinstance(error, IntegrityError):
        return error.recovery != "none"
    return error.code in RETRYABLE_CODES


class Attempts:
    """One fetch's retry budget: the number of attempts, the backoff between them, the whole fetch's deadline."""

    def __init__(self, policy: RetryPolicy, timeout: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.timeout = timeout
        self._clock = clock
        self.deadline = None if timeout is None else clock() + timeout
        self.count = 0

    def start(self, spent: Callable[[], str]) -> float | None:
        """Begin an attempt; the seconds left for it (None: no deadline). Raises DeadlineExceeded, naming what
        was ``spent()``, when none are left."""
        remaining = None if self.deadline is None else self.deadline - self._clock()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded(f"deadline of {self.timeout}s passed after {spent()}")
        self.count += 1
        return remaining

    def failed(self, error: InitServeError, spent: Callable[[], str]) -> float:
        """After a failed attempt: re-raise ``error`` unless it is retryable and attempts remain (its note then
        says what was ``spent()``); otherwise the seconds to pause (the backoff, never past the deadline)."""
        if not retryable(error):
            raise error
        if self.count >= self.policy.max_attempts:
            error.add_note(f"initserve: gave up after {spent()}")
            raise error
        pause = self.policy.backoff(self.count)
        if self.deadline is not None:
            pause = min(pause, max(0.0, self.deadline - self._clock()))
        return pause

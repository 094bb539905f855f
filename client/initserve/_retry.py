"""Resuming a broken Init stream: which failures are worth another stream, backoff with jitter, the deadline.

Generation is deterministic, so a stream that breaks part-way is continued by a new one (to any replica) from
the last verified byte; the whole-tensor checksum then proves the joined bytes. Nothing here returns a tensor
that failed a check: when the attempts or the deadline run out, the last error is raised.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from initserve._codec import StreamAssembler
from initserve._errors import DeadlineExceeded, InitServeError, IntegrityError
from initserve_protocol.v1 import initserve_pb2 as pb

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

    def __init__(self, policy: RetryPolicy, timeout: float | None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.policy = policy
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.count = 0
        self._sleep = sleep

    def start(self, spent: Callable[[], str]) -> float | None:
        """Begin an attempt; the seconds left for it (None: no deadline). Raises DeadlineExceeded, naming what
        was ``spent()``, when none are left."""
        remaining = None if self.deadline is None else self.deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded(f"deadline of {self.timeout}s passed after {spent()}")
        self.count += 1
        return remaining

    def failed(self, error: InitServeError, spent: Callable[[], str]) -> None:
        """After a failed attempt: re-raise ``error`` unless it is retryable and attempts remain (its note then
        says what was ``spent()``); otherwise wait the backoff, never past the deadline."""
        if not retryable(error):
            raise error
        if self.count >= self.policy.max_attempts:
            error.add_note(f"initserve: gave up after {spent()}")
            raise error
        pause = self.policy.backoff(self.count)
        if self.deadline is not None:
            pause = min(pause, max(0.0, self.deadline - time.monotonic()))
        self._sleep(pause)


@dataclass
class FetchOutcome:
    tensor: torch.Tensor
    header: pb.Header  # the first stream's header
    headers: list[pb.Header]  # every stream's header, in order (server_id, offset, cache_hit)
    attempts: int  # streams opened
    resumed_at: list[int]  # byte offsets that later streams started from


OpenStream = Callable[[int, int | None, float | None], Iterator[pb.InitResponse]]


def fetch_resuming(
    open_stream: OpenStream,
    assembler: StreamAssembler,
    policy: RetryPolicy,
    timeout: float | None,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> FetchOutcome:
    """Consume streams from ``open_stream(offset, seed, timeout)`` into ``assembler`` until verified.

    ``seed`` is None for the first stream and the first header's ``seed_used`` for every later one, so a
    request that gave no seed resumes with the seed the server drew.
    """
    attempts = Attempts(policy, timeout, sleep)
    resumed_at: list[int] = []
    while True:
        remaining = attempts.start(lambda: f"{attempts.count} stream(s), {assembler.received} bytes verified")
        offset = assembler.received
        seed = assembler.header.seed_used if assembler.header is not None and assembler.header.seeded else None
        if attempts.count > 1:
            resumed_at.append(offset)
        try:
            stream = open_stream(offset, seed, remaining)
            try:
                tensor, header = assembler.consume(stream)
            finally:
                if hasattr(stream, "close"):  # a stream's generator: closing it cancels the call
                    stream.close()
            return FetchOutcome(tensor, header, assembler.headers, attempts.count, resumed_at)
        except InitServeError as error:
            if isinstance(error, IntegrityError) and error.recovery == "restart":
                assembler.restart()
            attempts.failed(error, lambda: f"{attempts.count} streams; {assembler.received} bytes were verified")

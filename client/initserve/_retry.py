"""Resuming a broken Init stream: which failures are worth another stream, backoff with jitter, the deadline.

Generation is deterministic, so a stream that breaks part-way is continued by a new one (to any replica) from
the last verified byte; the whole-tensor checksum then proves the joined bytes. Nothing here returns a tensor
that failed a check: when the attempts or the deadline run out, the last error is raised.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from initserve._codec import StreamAssembler
from initserve._errors import DeadlineExceeded, InitServeError, IntegrityError
from initserve.v1 import initserve_pb2 as pb

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
    deadline = None if timeout is None else time.monotonic() + timeout
    attempts = 0
    resumed_at: list[int] = []
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded(
                f"deadline of {timeout}s passed after {attempts} stream(s), {assembler.received} bytes verified"
            )
        offset = assembler.received
        seed = assembler.header.seed_used if assembler.header is not None and assembler.header.seeded else None
        if attempts:
            resumed_at.append(offset)
        attempts += 1
        try:
            with contextlib.closing(open_stream(offset, seed, remaining)) as stream:  # closing cancels the call
                tensor, header = assembler.consume(stream)
            return FetchOutcome(tensor, header, assembler.headers, attempts, resumed_at)
        except IntegrityError as error:
            if error.recovery == "none":
                raise
            if error.recovery == "restart":
                assembler.restart()
            last: InitServeError = error
        except InitServeError as error:
            if error.code not in RETRYABLE_CODES:
                raise
            last = error
        if attempts >= policy.max_attempts:
            last.add_note(f"initserve: gave up after {attempts} streams; {assembler.received} bytes were verified")
            raise last
        pause = policy.backoff(attempts)
        if deadline is not None:
            pause = min(pause, max(0.0, deadline - time.monotonic()))
        sleep(pause)

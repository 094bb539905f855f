"""Client processes for the benchmark: concurrent small-request clients and the peak-RSS client.

Each runs in its own spawned process (Python threads would share one GIL) and talks to bench/run.py over a
``multiprocessing`` pipe. Every tensor they fetch is compared byte for byte with local torch.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import torch
from procs import peak_rss_bytes, reset_peak_rss, rss_bytes

import initserve

CLIENT_TIMEOUT_SECONDS = 600.0
WARMUP_SHAPES = ((3, 5), (256, 256), (256, 1024))  # small requests before any baseline is read


@dataclass(frozen=True)
class Request:
    """One initserve request and its local twin: ``torch.nn.init.<scheme>_`` under the contract."""

    scheme: str
    shape: tuple[int, ...]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * 4  # float32 throughout

    @property
    def label(self) -> str:
        return f"{self.scheme} {'x'.join(map(str, self.shape))}"

    def local(self, seed: int) -> torch.Tensor:
        """Local torch.nn.init with the calling thread's torch thread count."""
        generator = torch.Generator().manual_seed(seed)
        return getattr(torch.nn.init, f"{self.scheme}_")(torch.empty(self.shape), **self.params, generator=generator)

    def reference(self, seed: int) -> torch.Tensor:
        """The contract's bytes: local torch with one intra-op thread, as the server runs it."""
        with torch_threads(1):
            return self.local(seed)

    def fetch(self, client: initserve.Client, seed: int) -> initserve.InitResult:
        return client.fetch(self.shape, self.scheme, seed=seed, dtype=torch.float32, **self.params)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block with ``count`` torch intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def same_bytes(result: torch.Tensor, expected: torch.Tensor) -> bool:
    """Bit-for-bit equality: same shape, dtype and every byte (never allclose)."""
    if result.shape != expected.shape or result.dtype != expected.dtype or result.device.type != "cpu":
        return False
    return torch.equal(result.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))


def _warm_up(client: initserve.Client, seed: int) -> None:
    for shape in WARMUP_SHAPES:
        request = Request("normal", shape)
        if not same_bytes(request.fetch(client, seed).tensor, request.reference(seed)):
            raise AssertionError(f"warm-up {request.label} seed {seed}: wrong bytes")


def small_request_client(target: str, connection: Connection) -> None:
    """Serve ``prepare``/``go``/``stop`` commands: cached small requests for a fixed window of time.

    ``("prepare", shape, seed)``: fetch once (so it is cached), verify, answer ``"ready"``.
    ``("go", start_at, duration)``: from ``start_at`` (time.monotonic, one clock for all processes on Linux)
    fetch in a loop until ``start_at + duration``; answer ``(completed_in_window, wrong, cache_misses)``.
    Every result is compared with the reference inside the loop: the rate counts verified requests only.
    """
    # One intra-op thread: with 8 or 32 processes on 2 cores, the verification's torch.equal spun OpenMP
    # threads that starved everything else (measured: 261 req/s of 256x256 with 8 processes, 1201 with this).
    torch.set_num_threads(1)
    with initserve.Client(target, timeout=CLIENT_TIMEOUT_SECONDS) as client:
        request, expected, seed = None, None, 0
        while True:
            command = connection.recv()
            if command[0] == "stop":
                return
            if command[0] == "prepare":
                _, shape, seed = command
                request = Request("normal", tuple(shape))
                expected = request.reference(seed)
                ok = same_bytes(request.fetch(client, seed).tensor, expected)
                connection.send(("ready", ok))
            elif command[0] == "go":
                _, start_at, duration = command
                assert request is not None and expected is not None, "go before prepare"
                time.sleep(max(0.0, start_at - time.monotonic()))
                end = start_at + duration
                completed = wrong = misses = 0
                while time.monotonic() < end:
                    result = request.fetch(client, seed)
                    if time.monotonic() <= end:
                        completed += 1
                    wrong += not same_bytes(result.tensor, expected)
                    misses += not result.header.cache_hit
                connection.send((completed, wrong, misses))


def peak_rss_client(target: str, shape: Sequence[int], seed: int, connection: Connection) -> None:
    """Fetch ``normal(shape, seed)`` once per ``"fetch"`` command, reporting RSS baseline and peak for each.

    Answers ``("ready", rss)`` after imports and a warm-up of small fetches; then for each ``"fetch"``:
    ``{"baseline": RSS before, "peak": VmHWM after, "cache_hit": ..., "verified": ...}``. The reference is
    computed after the peak is read, so it never counts toward it. Memory the client keeps for reuse is given
    back before each baseline, so every fetch counts a destination of its own.
    """
    request = Request("normal", tuple(shape))
    with initserve.Client(target, timeout=CLIENT_TIMEOUT_SECONDS) as client:
        _warm_up(client, seed + 1)
        gc.collect()
        connection.send(("ready", rss_bytes()))
        while connection.recv() == "fetch":
            gc.collect()
            client.release_memory()  # the last fetch's freed tensor: this one must make (and count) its own
            baseline = rss_bytes()
            reset_peak_rss()
            result = request.fetch(client, seed)
            peak = peak_rss_bytes()
            cache_hit = bool(result.header.cache_hit)
            verified = same_bytes(result.tensor, request.reference(seed))
            del result
            gc.collect()
            connection.send({"baseline": baseline, "peak": peak, "cache_hit": cache_hit, "verified": verified})

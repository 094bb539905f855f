"""The same-host transport, client side: a shared-memory region the server fills, verified, returned as a tensor.

The client takes a region of exactly the tensor's size from its pool (``_regions``: a new
``/dev/shm/initserve-<32 hex digits>`` object, mode 0600, or one whose tensor was freed) and asks InitUnary to
fill it; the answer carries the header and the trailer. The client checks the header against its request and
the whole-tensor checksum over the region, as for a stream, and returns a tensor over the region's pages: the
payload never crosses gRPC and is copied once, by the server. A region of a failed attempt is never used again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import torch

from initserve._checksum import tensor_checksum
from initserve._codec import StreamAssembler
from initserve._errors import FailedPrecondition, InitServeError, IntegrityError, ResourceExhausted
from initserve._regions import SHARED_MEMORY_DIR, RegionPool, SharedRegion
from initserve._retry import Attempts, RetryPolicy
from initserve._wire import UnaryPart
from initserve.v1 import initserve_pb2 as pb

VERIFY_THREADS = 2  # the region's block CRCs are computed in this many threads
# How a server says it cannot fill this client's shared memory (off, or another host): the client uses gRPC.
_REFUSALS = ("this server does not write shared memory", "no shared-memory object")
# How it says /dev/shm has no room for this region: this fetch uses gRPC, later ones try shared memory again.
_NO_SPACE = "no space in "
UNAVAILABLE, NO_SPACE = "unavailable", "no space"  # why fetch_shared gave up on shared memory


def available(directory: str = SHARED_MEMORY_DIR) -> bool:
    """Whether this host has a writable shared-memory directory."""
    return os.path.isdir(directory) and os.access(directory, os.W_OK)


def receive(
    pool: RegionPool,
    region: SharedRegion,
    messages: Sequence[UnaryPart],
    assembler: StreamAssembler,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, pb.Header]:
    """The verified tensor over ``region`` from InitUnary's header and trailer (``messages``).

    ``assembler`` checks the header as for a stream (its CRC, and that it answers the request); the checksum is
    computed here over the region, which the server filled.
    """
    if [type(message) for message in messages] != [pb.Header, pb.Trailer]:
        raise IntegrityError("a shared-memory answer must be exactly a header and a trailer", recovery="restart")
    header, trailer = messages
    assembler.check_header(header)
    if header.offset != 0 or header.total_bytes != region.nbytes:
        raise IntegrityError(
            f"the shared-memory answer covers bytes {header.offset}..{header.total_bytes}, not the region's "
            f"0..{region.nbytes}",
            recovery="restart",
        )
    if tensor_checksum(memoryview(region.map), threads=VERIFY_THREADS) != trailer.checksum:
        raise IntegrityError(
            "checksum mismatch: the shared-memory region differs from the bytes the server wrote",
            recovery="restart",
        )
    return pool.lend(region, dtype, shape), header


# (region name, remaining seconds) -> the InitUnary answer as messages
Call = Callable[[str, float | None], Sequence[UnaryPart]]


def fetch_shared(
    pool: RegionPool,
    call: Call,
    assembler: StreamAssembler,
    shape: Sequence[int],
    dtype: torch.dtype,
    nbytes: int,
    policy: RetryPolicy,
    timeout: float | None,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[torch.Tensor, pb.Header, int] | str:
    """(tensor, header, attempts) through shared memory, retried as a stream would be; or why the server
    cannot fill this client's shared memory (:data:`UNAVAILABLE`: at all, :data:`NO_SPACE`: not this tensor):
    the caller then uses gRPC."""
    attempts = Attempts(policy, timeout, sleep)
    while True:
        remaining = attempts.start(lambda: f"{attempts.count} shared-memory attempt(s)")
        region = pool.take(nbytes)
        try:
            try:
                messages = call(region.name, remaining)
            finally:
                if not region.poolable:
                    region.unlink()  # the server has opened it, or never will; nobody opens it again
            tensor, header = receive(pool, region, messages, assembler, shape, dtype)
            return tensor, header, attempts.count
        except BaseException as error:
            pool.discard(region)  # the server may still be writing into it
            if isinstance(error, FailedPrecondition) and str(error).startswith(_REFUSALS):
                return UNAVAILABLE
            if isinstance(error, ResourceExhausted) and str(error).startswith(_NO_SPACE):
                return NO_SPACE
            if not isinstance(error, InitServeError):
                raise
            attempts.failed(error, lambda: f"{attempts.count} shared-memory attempts")

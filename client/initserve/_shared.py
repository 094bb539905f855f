"""The same-host transport, client side: a shared-memory object the server fills, verified, returned as a tensor.

The client creates ``/dev/shm/initserve-<32 hex digits>`` (mode 0600: server and client run as the same user)
of exactly the tensor's size and asks InitUnary to fill it; the answer carries the header and the trailer. The
client checks the header against its request and the whole-tensor checksum over the region, as for a stream,
and returns a tensor over the region's pages: the payload never crosses gRPC and is copied once, by the server.
The object's name is removed as soon as the call returns; its pages live as long as the tensor.
"""

from __future__ import annotations

import mmap
import os
import secrets
import time
from collections.abc import Callable, Sequence

import torch

from initserve._checksum import tensor_checksum
from initserve._codec import StreamAssembler
from initserve._errors import FailedPrecondition, InitServeError, IntegrityError
from initserve._retry import Attempts, RetryPolicy
from initserve._wire import ChunkView
from initserve.v1 import initserve_pb2 as pb

SHARED_MEMORY_DIR = "/dev/shm"
VERIFY_THREADS = 2  # the region's block CRCs are computed in this many threads
# How a server says it cannot fill this client's shared memory (off, or another host): the client uses gRPC.
_REFUSALS = ("this server does not write shared memory", "no shared-memory object")


class SharedRegion:
    """A new shared-memory object of ``nbytes`` (> 0), mapped; :meth:`unlink` removes its name."""

    def __init__(self, nbytes: int, directory: str = SHARED_MEMORY_DIR) -> None:
        self.name = f"initserve-{secrets.token_hex(16)}"
        self.path = os.path.join(directory, self.name)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            self.map = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self.nbytes = nbytes

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def available(directory: str = SHARED_MEMORY_DIR) -> bool:
    """Whether this host has a writable shared-memory directory."""
    return os.path.isdir(directory) and os.access(directory, os.W_OK)


def receive(
    region: SharedRegion,
    messages: Sequence[pb.InitResponse | ChunkView],
    assembler: StreamAssembler,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, pb.Header]:
    """The verified tensor over ``region`` from InitUnary's header and trailer (``messages``).

    ``assembler`` checks the header as for a stream (its CRC, and that it answers the request); the checksum is
    computed here over the region, which the server filled.
    """
    parts = [m.WhichOneof("part") if isinstance(m, pb.InitResponse) else "chunk" for m in messages]
    if parts != ["header", "trailer"]:
        raise IntegrityError("a shared-memory answer must be exactly a header and a trailer", recovery="restart")
    header = messages[0].header
    assembler.check_header(header)
    if header.offset != 0 or header.total_bytes != region.nbytes:
        raise IntegrityError(
            f"the shared-memory answer covers bytes {header.offset}..{header.total_bytes}, not the region's "
            f"0..{region.nbytes}",
            recovery="restart",
        )
    if tensor_checksum(memoryview(region.map), threads=VERIFY_THREADS) != messages[1].trailer.checksum:
        raise IntegrityError(
            "checksum mismatch: the shared-memory region differs from the bytes the server wrote",
            recovery="restart",
        )
    tensor = torch.frombuffer(region.map, dtype=dtype).view(tuple(shape))  # keeps the mapping alive
    return tensor, header


# (region name, remaining seconds) -> the InitUnary answer as messages
Call = Callable[[str, float | None], Sequence[pb.InitResponse | ChunkView]]


def fetch_shared(
    call: Call,
    assembler: StreamAssembler,
    shape: Sequence[int],
    dtype: torch.dtype,
    nbytes: int,
    policy: RetryPolicy,
    timeout: float | None,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[torch.Tensor, pb.Header, int] | None:
    """(tensor, header, attempts) through shared memory, retried as a stream would be; None when the server
    cannot fill this client's shared memory (the caller uses gRPC)."""
    attempts = Attempts(policy, timeout, sleep)
    while True:
        remaining = attempts.start(lambda: f"{attempts.count} shared-memory attempt(s)")
        region = SharedRegion(nbytes)
        try:
            try:
                messages = call(region.name, remaining)
            finally:
                region.unlink()  # the server has opened it, or never will
            tensor, header = receive(region, messages, assembler, shape, dtype)
            return tensor, header, attempts.count
        except FailedPrecondition as error:
            if str(error).startswith(_REFUSALS):
                return None
            raise
        except InitServeError as error:
            attempts.failed(error, lambda: f"{attempts.count} shared-memory attempts")

"""The fetch pipeline's core: one call's tensors over as many streams as it takes, verified, with no I/O.

A :class:`Fetch` decides everything about a call except how bytes move: which request each attempt sends (the
first tensor not yet verified, from its last verified byte, with the seed the server drew for it), whether that
attempt is one InitUnary call or a stream, what every message must be (each tensor's :class:`StreamAssembler`
checks headers, offsets, CRCs and the whole-tensor checksum), when a failure is worth another attempt, how long
to pause first, and when the deadline or the attempts run out. A driver only moves bytes and sleeps:

    fetch = Fetch(...)
    while not fetch.done:
        attempt = fetch.next_attempt()               # raises DeadlineExceeded
        try:
            for index, message in open_call(attempt):
                fetch.receive(message, index)        # raises IntegrityError
            fetch.end()                              # raises IntegrityError if the stream ended short
        except InitServeError as error:
            pause = fetch.failed(error)              # re-raises what no retry mends
            if pause is None:                        # complete after all: the stream's end was lost
                break
            sleep(pause)

The sync client drives it with blocking gRPC calls (``initserve._client``), the asyncio client with grpc.aio
(``initserve.aio``), and the same-host transport with one InitUnary call per region (``initserve._shared``):
the same checks, resumes and errors in each.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from initserve._codec import ChunkView, Response, StreamAssembler, decode_response
from initserve._errors import InitServeError, IntegrityError
from initserve._requests import Prepared
from initserve._retry import Attempts, RetryPolicy
from initserve_protocol.v1 import initserve_pb2 as pb


@dataclass(frozen=True)
class InitResult:
    """A fetched tensor with what the server reported about it."""

    tensor: torch.Tensor
    seed: int  # the seed used (drawn by the server when the request gave none); 0 for unseeded schemes
    seeded: bool
    torch_version: str  # the server's torch: the contract's reference
    device: pb.DeviceInfo  # generation device, with its fingerprint
    header: pb.Header  # the first stream's header
    attempts: int = 1  # streams used: more than one when a broken stream was resumed
    resumed_at: tuple[int, ...] = ()  # the byte offsets that later streams started from
    server_ids: tuple[str, ...] = ()  # the replica behind each stream, in order
    # how the bytes came: "stream", "unary" (InitUnary), "shared_memory", or "local": made by this process's
    # portable generator and verified against the server's checksum-only answer
    transport: str = "stream"
    warnings: tuple[str, ...] = ()  # the UserWarnings torch gave generating it (re-issued when it was returned)


VERIFY_THREADS = 2  # bytes made here are checked in this many threads (the block CRCs release the GIL)
MakeHere = Callable[[int, pb.Header], torch.Tensor]  # (tensor's position, its verified header) -> its bytes


@dataclass(frozen=True)
class Attempt:
    """What one attempt sends: an InitRequest (``unary``: as one InitUnary call) or an InitManyRequest."""

    number: int  # 1 for the first
    request: pb.InitRequest | pb.InitManyRequest
    unary: bool
    timeout: float | None  # seconds left for the whole call (None: no deadline)
    first: int  # the call's first tensor this attempt carries: message index 0 is this tensor


class Fetch:
    """One call's tensors (``many``: on InitMany streams, else one tensor on Init streams), verified.

    ``prepared[i]`` is tensor i's request and ``assemblers[i]`` checks and holds its bytes. An Init attempt asks
    for one InitUnary call when the request names no chunk size and its bytes from the resume offset are at
    most ``unary_max_bytes``. The retry budget (``policy``, ``timeout`` seconds) covers the whole call.
    """

    def __init__(
        self,
        prepared: Sequence[Prepared],
        assemblers: Sequence[StreamAssembler],
        policy: RetryPolicy,
        timeout: float | None,
        *,
        many: bool,
        unary_max_bytes: int = 0,
        clock: Callable[[], float] = time.monotonic,
        make_here: MakeHere | None = None,
    ) -> None:
        if len(prepared) != len(assemblers) or (not many and len(prepared) != 1):
            raise ValueError("one assembler per request, and one request unless many")
        self.prepared = prepared
        self.assemblers = assemblers
        self.many = many
        self.unary_max_bytes = unary_max_bytes
        self.attempts = Attempts(policy, timeout, clock)
        self.resumed_at: list[list[int]] = [[] for _ in prepared]  # per tensor: offsets later attempts resumed
        self.current = 0  # the first tensor not yet verified
        self._first = 0  # the current attempt's first tensor
        # Checksum-only answers: each tensor's bytes made here by make_here(position, header), then verified.
        self.make_here = make_here
        self.made: dict[int, torch.Tensor] = {}
        self._header: pb.Header | None = None

    @property
    def done(self) -> bool:
        return self.current == len(self.assemblers)

    def _spent(self) -> str:
        if self.many:
            count = len(self.assemblers)
            return f"{self.attempts.count} InitMany stream(s); {self.current} of {count} tensors verified"
        return f"{self.attempts.count} stream(s), {self.assemblers[0].received} bytes verified"

    def next_attempt(self) -> Attempt:
        """The next attempt's request (DeadlineExceeded when the call's deadline has passed)."""
        timeout = self.attempts.start(self._spent)
        first = self._first = self.current
        if first == len(self.assemblers):  # InitMany of no tensors: one empty stream, checked for silence
            assert self.many and not self.assemblers, "next_attempt after the call was complete"
            return Attempt(self.attempts.count, pb.InitManyRequest(), False, timeout, first)
        assembler = self.assemblers[first]
        offset = assembler.received
        header = assembler.header
        drawn_seed = header.seed_used if header is not None and header.seeded else None
        if self.attempts.count > 1:
            self.resumed_at[first].append(offset)
        resumed = self.prepared[first].resumed(offset, drawn_seed)
        assembler.begin()
        if self.many:
            rest = [item.request for item in self.prepared[first + 1 :]]
            return Attempt(self.attempts.count, pb.InitManyRequest(tensors=[resumed, *rest]), False, timeout, first)
        total = self.prepared[0].total_bytes
        unary = self.make_here is not None or (resumed.chunk_bytes == 0 and total - offset <= self.unary_max_bytes)
        return Attempt(self.attempts.count, resumed, unary, timeout, first)

    def receive(self, message: Response, index: int = 0) -> None:
        """One message of the current attempt, for its ``index``-th tensor (0 for an Init stream)."""
        position = self._first + index
        if position != self.current:
            if self.current == len(self.assemblers):
                raise IntegrityError("a message after the last tensor's trailer", recovery="none")
            raise IntegrityError(
                f"InitMany sent a message of tensor {position} while tensor {self.current} was incomplete",
                recovery="resume",
            )
        if self.make_here is not None:
            self._receive_checksum_only(message, position)
        elif self.assemblers[position].feed(message):
            self.current += 1
            if self.current < len(self.assemblers):
                self.assemblers[self.current].begin()

    def _receive_checksum_only(self, message: Response, position: int) -> None:
        """A checksum-only answer's message: its header, then its trailer, at which the tensor is made here and
        verified against the trailer's checksum (a chunk, or anything else, is the server's fault)."""
        if type(message) is bytes:
            message = decode_response(message)
        if type(message) is pb.InitResponse and message.WhichOneof("part") in ("header", "trailer"):
            message = getattr(message, message.WhichOneof("part"))
        if type(message) is pb.Header and self._header is None:
            self.assemblers[position].check_header(message)
            self._header = message
            return
        if type(message) is not pb.Trailer or self._header is None:
            kind = "a chunk" if type(message) is ChunkView else type(message).__name__
            raise IntegrityError(
                f"a checksum-only answer must be a header, then a trailer; got {kind}", recovery="none"
            )
        header, self._header = self._header, None
        tensor = self.make_here(position, header)
        if tensor.device.type == "cpu":
            data = memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())
            self.assemblers[position].verify_filled(header, message, data, threads=VERIFY_THREADS, made_here=True)
        else:  # made on a GPU: checksummed a piece at a time on the host
            self.assemblers[position].verify_made_on_device(header, message, tensor)
        self.made[position] = tensor
        self.current += 1

    def end(self) -> None:
        """The current attempt's stream ended: IntegrityError unless every tensor is verified."""
        if not self.done and self.make_here is not None:
            raise IntegrityError("the checksum-only answer ended before its trailer", recovery="resume")
        if not self.done:
            self.assemblers[self.current].finish()

    def failed(self, error: InitServeError) -> float | None:
        """After a failed attempt: the seconds to pause before the next one, or ``error`` raised when no retry
        mends it or the budget is spent; None when the call is complete after all (every tensor was verified,
        whole-tensor checksum included, before the transport failed: the stream's end was lost, not its bytes)."""
        self._header = None  # a checksum-only answer starts again with its header
        if self.done and not isinstance(error, IntegrityError):
            return None
        if isinstance(error, IntegrityError) and error.recovery == "restart" and not self.done:
            self.assemblers[self.current].restart()
        return self.attempts.failed(error, self._spent)

    def fresh(self) -> Fetch:
        """This call again with a retry budget of its own (the same deadline): after the same-host transport gave
        up, for the gRPC fetch that follows."""
        again = Fetch(
            self.prepared,
            self.assemblers,
            self.attempts.policy,
            None,
            many=self.many,
            unary_max_bytes=self.unary_max_bytes,
        )
        again.attempts.timeout, again.attempts.deadline = self.attempts.timeout, self.attempts.deadline
        return again

    def filled(self, parts: Sequence[Response], data: memoryview, *, threads: int = 1) -> None:
        """The current attempt's answer when the server wrote the tensor in place (the same-host transport):
        exactly a header and a trailer, for all of ``data``, whose whole-tensor checksum is the trailer's."""
        if self.many or [type(part) for part in parts] != [pb.Header, pb.Trailer]:
            raise IntegrityError("a shared-memory answer must be exactly a header and a trailer", recovery="restart")
        header, trailer = parts
        assert isinstance(header, pb.Header) and isinstance(trailer, pb.Trailer)
        self.assemblers[0].verify_filled(header, trailer, data, threads=threads)
        self.current = 1

    def result(self, position: int = 0, transport: str = "stream", tensor: torch.Tensor | None = None) -> InitResult:
        """Tensor ``position`` (or ``tensor``, over memory the server filled), verified, with what its headers said."""
        assembler = self.assemblers[position]
        if tensor is None and position in self.made:
            tensor = self.made[position]
            transport = "local"
        if tensor is None:
            tensor, header = assembler.finish()
        else:
            assert assembler.complete and assembler.header is not None
            header = assembler.header
        told = tuple(assembler.trailer.warnings) if assembler.trailer is not None else ()
        for message in told:
            warn_as_torch(message)
        return InitResult(
            tensor=tensor,
            seed=header.seed_used,
            seeded=header.seeded,
            torch_version=header.torch_version,
            device=header.device,
            header=header,
            attempts=self.attempts.count,
            resumed_at=tuple(self.resumed_at[position]),
            server_ids=tuple(h.server_id for h in assembler.headers),
            transport=transport,
            warnings=told,
        )


def warn_as_torch(message: str) -> None:
    """Re-issue a warning torch gave on the server as the UserWarning torch gives, attributed to the first frame
    outside this package (the caller's line, as torch's own warning would be)."""
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "initserve":
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)

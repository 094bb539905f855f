"""Decoding a stream into a tensor, verified, without a second copy.

Decoding writes each chunk straight into one preallocated destination tensor and raises IntegrityError before
returning anything that is short, out of order, oversized, damaged (per-chunk CRC-32) or fails the whole-tensor
checksum. A stream that breaks can be resumed: :class:`StreamAssembler` takes a second stream starting at the
bytes it already holds, checks that its header describes the same tensor, and verifies the whole tensor at the
end. The encoding side, and the header's CRC, are the contract's (:mod:`initserve_protocol.codec`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from initserve._errors import IntegrityError
from initserve_protocol import dtypes
from initserve_protocol.checksum import CHECKSUM_ALGORITHM, TensorChecksum, crc32, tensor_checksum
from initserve_protocol.codec import expected_bytes, header_crc32, writable_bytes
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_protocol.wire import ChunkView, decode_response

DEVICE_PIECE_BYTES = 16 << 20  # a GPU tensor's bytes reach the host this many at a time to be checksummed

Response = pb.InitResponse | ChunkView | bytes | pb.Header | pb.Trailer  # see StreamAssembler.consume
Allocate = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]  # see StreamAssembler


def _new_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


# Header fields that decide the bytes: a resumed stream must agree on all of them with the first.
_SAME_TENSOR_FIELDS = ("shape", "dtype", "total_bytes", "seed_used", "seeded", "torch_version", "checksum_algorithm")


def _check_header(
    header: pb.Header, expected_shape: Sequence[int] | None, expected_dtype: torch.dtype | None
) -> dtypes.DTypeEntry:
    entry = dtypes.from_wire(header.dtype)
    if entry is None:
        raise IntegrityError(f"header names dtype {header.dtype}, which this client does not know")
    shape = list(header.shape)
    if any(size < 0 for size in shape):
        raise IntegrityError(f"header shape {shape} has a negative dimension")
    if expected_shape is not None and shape != list(expected_shape):
        raise IntegrityError(f"header shape {shape} differs from the requested shape {list(expected_shape)}")
    if expected_dtype is not None and entry.torch_dtype != expected_dtype:
        raise IntegrityError(f"header dtype {entry.name} differs from the requested dtype {expected_dtype}")
    if header.total_bytes != expected_bytes(shape, entry.itemsize):
        raise IntegrityError(
            f"header total_bytes {header.total_bytes} does not match shape {shape} of {entry.name} "
            f"({expected_bytes(shape, entry.itemsize)} bytes)"
        )
    if header.checksum_algorithm != CHECKSUM_ALGORITHM:
        raise IntegrityError(f"header checksum algorithm {header.checksum_algorithm!r} is not {CHECKSUM_ALGORITHM!r}")
    return entry


def _same_tensor(first: pb.Header, later: pb.Header) -> str | None:
    """The first field on which a resumed stream's header describes a different tensor, or None."""
    for name in _SAME_TENSOR_FIELDS:
        if getattr(first, name) != getattr(later, name):
            return name
    if first.scheme != later.scheme:
        return "scheme"
    if first.device.fingerprint != later.device.fingerprint:
        return "device.fingerprint"
    return None


class StreamAssembler:
    """Assembles one tensor from one or more Init streams (a first one, then resumptions), verified.

    Every header must carry its own CRC-32 and answer the request: the expected shape, dtype, scheme and,
    when the request gave one, seed (``expected_seed``, as sent: 0 <= seed < 2**64).
    ``out``, when given, must be a contiguous CPU tensor of the header's shape and dtype; the bytes are
    written straight into it. Otherwise one tensor is allocated when the first header arrives, by
    ``allocate(shape, dtype) -> tensor`` when given (the client's memory policy), else ``torch.empty``.
    ``progress(received, total)`` is called after every chunk.
    """

    def __init__(
        self,
        *,
        expected_shape: Sequence[int] | None = None,
        expected_dtype: torch.dtype | None = None,
        expected_scheme: str | None = None,
        expected_seed: int | None = None,
        expected_generator: str = "",
        out: torch.Tensor | None = None,
        allocate: Allocate | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self._allocate = allocate or _new_tensor
        self._expected_shape = expected_shape
        self._expected_dtype = expected_dtype
        self._expected_scheme = expected_scheme
        self._expected_seed = expected_seed
        self._expected_generator = expected_generator
        self._progress = progress
        self.tensor = out
        self.header: pb.Header | None = None
        self.headers: list[pb.Header] = []  # one per stream consumed, in order
        self.received = 0
        self._checksum = TensorChecksum()
        self._destination: memoryview | None = None
        self._awaiting_header = True
        self._complete = False
        self.trailer: pb.Trailer | None = None  # the verified stream's trailer (its warnings)

    @property
    def complete(self) -> bool:
        """Whether every byte arrived and the whole-tensor checksum matched."""
        return self._complete

    def restart(self) -> None:
        """Forget every byte received (after a whole-tensor checksum failure); keep the first header."""
        self.received = 0
        self._checksum = TensorChecksum()
        self._complete = False

    def begin(self) -> None:
        """A new stream starts (at :attr:`received`): its first message must be a header."""
        self._awaiting_header = True

    def feed(self, message: Response) -> bool:
        """Check one message of the stream begun last and write its bytes; True once the tensor is verified.

        Messages may be ``InitResponse`` messages, :class:`ChunkView` (as the client's deserializer makes them),
        serialized bytes (as :func:`encode_stream` yields chunks), or a unary answer's unwrapped parts
        (``Header``, ``ChunkView``, ``Trailer``: :func:`initserve_protocol.wire.decode_unary`). Raises
        IntegrityError at the first message that is out of place, damaged, or fails the checksum; the bytes
        before :attr:`received` stay verified, so the caller may resume there.
        """
        if type(message) is ChunkView:  # the hot path: decoded by initserve_protocol.wire without a copy
            if self._awaiting_header:
                raise self._broken("stream did not start with a header")
            if self._complete:
                raise self._broken("message after the trailer")
            self._chunk(message)
            return False
        if type(message) is bytes:
            message = decode_response(message)
        if self._awaiting_header:
            if type(message) is pb.Header:  # a unary answer's parts come unwrapped
                header = message
            elif type(message) is not pb.InitResponse or message.WhichOneof("part") != "header":
                raise self._broken("stream did not start with a header")
            else:
                header = message.header
            self._start(header)
            self._awaiting_header = False
            return False
        if self._complete:
            raise self._broken("message after the trailer")
        if type(message) is pb.Trailer:
            trailer = message
        else:
            part = message.WhichOneof("part") if type(message) is pb.InitResponse else type(message).__name__
            if part == "chunk":
                chunk = message.chunk
                self._chunk(ChunkView(chunk.offset, memoryview(chunk.data), chunk.crc32))
                return False
            if part != "trailer":
                raise self._broken(f"unexpected {part or 'empty'} message after the header")
            trailer = message.trailer
        assert self.header is not None
        if self.received != self.header.total_bytes:
            raise self._broken(f"trailer after {self.received} of {self.header.total_bytes} bytes")
        if trailer.checksum != self._checksum.digest():
            raise IntegrityError(
                "checksum mismatch: the received bytes differ from the bytes the server sent",
                received=self.received,
                recovery="restart",
            )
        self._complete = True
        self.trailer = trailer
        return True

    def finish(self) -> tuple[torch.Tensor, pb.Header]:
        """The stream ended: (tensor, first header) if verified, else IntegrityError saying what is missing."""
        if self._awaiting_header:
            raise self._broken("stream did not start with a header")
        if not self._complete:
            total = self.header.total_bytes if self.header is not None else 0
            raise self._broken(f"stream ended after {self.received} of {total} bytes without a trailer")
        assert self.tensor is not None and self.header is not None
        return self.tensor, self.header

    def consume(self, responses: Iterable[Response]) -> tuple[torch.Tensor, pb.Header]:
        """Read one whole stream that starts at :attr:`received` (:meth:`begin`, :meth:`feed` each message,
        :meth:`finish`); returns (tensor, first header) once verified."""
        self.begin()
        for message in responses:
            self.feed(message)
        return self.finish()

    def verify_filled(
        self, header: pb.Header, trailer: pb.Trailer, data: memoryview, *, threads: int = 1, made_here: bool = False
    ) -> None:
        """Check a destination the server filled in place (the same-host transport), or bytes this process made
        itself (``made_here``: the portable generator, verified against a checksum-only answer): ``header`` must
        answer the request and cover all of ``data`` from byte 0, and ``data``'s whole-tensor checksum must be the
        trailer's. Raises IntegrityError: ``recovery="restart"`` for a region (never used again); for bytes made
        here, a mismatch is ``"none"``: this machine's generator disagrees with the server's, which no retry mends."""
        self.check_header(header)
        self._verify_covered(header, len(data), made_here)
        self._verify_checksum(trailer, tensor_checksum(data, threads=threads), made_here)
        self._verified(header, trailer)

    def verify_made_on_device(self, header: pb.Header, trailer: pb.Trailer, tensor: torch.Tensor) -> None:
        """:meth:`verify_filled` for bytes this process made on a GPU: their checksum is taken from host copies of
        pieces (:func:`device_checksum`), so the whole tensor never lands in host memory."""
        self.check_header(header)
        self._verify_covered(header, tensor.numel() * tensor.element_size(), True)
        self._verify_checksum(trailer, device_checksum(tensor), True)
        self._verified(header, trailer)

    def _verify_covered(self, header: pb.Header, size: int, made_here: bool) -> None:
        where = "the bytes made here" if made_here else "the shared-memory region"
        if header.offset != 0 or header.total_bytes != size:
            raise IntegrityError(
                f"the answer covers bytes {header.offset}..{header.total_bytes}, not {where}: 0..{size}",
                recovery="restart",
            )

    def _verify_checksum(self, trailer: pb.Trailer, checksum: bytes, made_here: bool) -> None:
        if checksum != trailer.checksum:
            if made_here:
                raise IntegrityError(
                    "checksum mismatch: the bytes generated here differ from the server's (the two sides' "
                    "portable generators disagree: compare their initserve versions)",
                    recovery="none",
                )
            raise IntegrityError(
                "checksum mismatch: the shared-memory region differs from the bytes the server wrote",
                recovery="restart",
            )

    def _verified(self, header: pb.Header, trailer: pb.Trailer) -> None:
        self.headers.append(header)
        if self.header is None:
            self.header = header
        self._complete = True
        self.trailer = trailer

    def _check_request(self, header: pb.Header) -> None:
        """An intact header that answers another request is the server's fault: raise, never retry."""
        if self._expected_scheme is not None and header.scheme != self._expected_scheme:
            raise IntegrityError(
                f"header scheme {header.scheme!r} differs from the requested scheme {self._expected_scheme!r}",
                received=self.received,
                recovery="none",
            )
        if self._expected_seed is not None and header.seeded and header.seed_used != self._expected_seed:
            raise IntegrityError(
                f"header seed_used {header.seed_used} differs from the requested seed {self._expected_seed}",
                received=self.received,
                recovery="none",
            )

        if header.generator != self._expected_generator:
            raise IntegrityError(
                f"header generator {header.generator or 'torch'!r} differs from the requested generator "
                f"{self._expected_generator or 'torch'!r} (a server older than the portable generator answers "
                f"with torch's)",
                received=self.received,
                recovery="none",
            )

    def _broken(self, message: str) -> IntegrityError:
        return IntegrityError(message, received=self.received, recovery="resume")

    def check_header(self, header: pb.Header) -> dtypes.DTypeEntry:
        """Raise unless ``header`` is intact (its CRC) and describes the tensor asked for; its dtype entry."""
        crc = header_crc32(header)
        if crc != header.crc32:
            raise self._broken(f"header is damaged (CRC-32 {crc:#010x}, sent {header.crc32:#010x})")
        self._check_request(header)
        return _check_header(header, self._expected_shape, self._expected_dtype)

    def _start(self, header: pb.Header) -> None:
        entry = self.check_header(header)
        if self.header is None:
            shape = tuple(header.shape)
            if self.tensor is None:
                self.tensor = self._allocate(shape, entry.torch_dtype)
            elif tuple(self.tensor.shape) != shape or self.tensor.dtype != entry.torch_dtype:
                raise IntegrityError(f"header describes {list(shape)} {entry.name}, not the destination's layout")
            self._destination = writable_bytes(self.tensor)
            self.header = header
        else:
            differs = _same_tensor(self.header, header)
            if differs is not None:
                raise IntegrityError(
                    f"the resumed stream describes a different tensor (header field {differs} differs from "
                    "the first stream's); replicas disagree (different torch or device?)"
                )
        if header.offset != self.received:
            raise self._broken(f"stream starts at offset {header.offset}, expected {self.received}")
        self.headers.append(header)

    def _chunk(self, chunk: ChunkView) -> None:
        assert self._destination is not None and self.header is not None
        total = self.header.total_bytes
        size = len(chunk.data)
        if chunk.offset != self.received:
            raise self._broken(f"chunk at offset {chunk.offset}, expected offset {self.received}")
        if size == 0 or self.received + size > total:
            raise self._broken(f"chunk of {size} bytes at offset {self.received} overruns the tensor's {total} bytes")
        crc = crc32(chunk.data)
        if crc != chunk.crc32:
            raise self._broken(
                f"chunk at offset {chunk.offset} is damaged (CRC-32 {crc:#010x}, sent {chunk.crc32:#010x})"
            )
        self._destination[self.received : self.received + size] = chunk.data
        self._checksum.update(chunk.data, crc=crc)
        self.received += size
        if self._progress is not None:
            self._progress(self.received, total)


def decode_stream(
    responses: Iterable[Response],
    *,
    expected_shape: Sequence[int] | None = None,
    expected_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, pb.Header]:
    """Assemble one whole Init stream into a tensor, verified; returns (tensor, header)."""
    assembler = StreamAssembler(expected_shape=expected_shape, expected_dtype=expected_dtype, out=out)
    return assembler.consume(responses)


def device_checksum(tensor: torch.Tensor, piece_bytes: int = DEVICE_PIECE_BYTES) -> bytes:
    """The whole-tensor checksum of a tensor on any device, from its bytes copied to the host ``piece_bytes`` at a
    time into one reused buffer (page-locked for a CUDA tensor), each piece summed as it lands: the host holds
    one piece, never the tensor (a 1 GiB ``.cpu()`` costs its page faults alone about 0.25 s)."""
    flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
    checksum = TensorChecksum()
    if flat.numel() == 0:
        return checksum.digest()
    buffer = torch.empty(min(piece_bytes, flat.numel()), dtype=torch.uint8, pin_memory=flat.is_cuda)
    for start in range(0, flat.numel(), piece_bytes):
        piece = buffer[: min(piece_bytes, flat.numel() - start)]
        piece.copy_(flat[start : start + piece.numel()])
        checksum.update(memoryview(piece.numpy()))
    return checksum.digest()

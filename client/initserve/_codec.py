"""The stream codec: a tensor's bytes to Header/Chunk*/Trailer messages and back, verified, without a second copy.

Used by the server to encode and by the client to decode; it never imports grpc. Decoding writes each chunk
straight into one preallocated destination tensor and raises IntegrityError before returning anything that
is short, out of order, oversized or fails the checksum.
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Iterable, Iterator, Sequence

import torch

from initserve import _dtypes
from initserve._checksum import CHECKSUM_ALGORITHM, TensorChecksum
from initserve._errors import IntegrityError
from initserve.v1 import initserve_pb2 as pb

if sys.byteorder != "little":  # the wire carries little-endian storage; a big-endian host would need a swap
    raise ImportError("initserve supports little-endian hosts only")


def _byte_view(tensor: torch.Tensor) -> memoryview:
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("a byte view needs a contiguous CPU tensor")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    # A ctypes array over the tensor's storage exposes it through the buffer protocol with no copy;
    # the caller keeps the tensor alive for as long as it uses the view.
    storage = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
    return memoryview(storage).cast("B")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A read-only view of a contiguous CPU tensor's bytes (valid while the tensor lives)."""
    return _byte_view(tensor).toreadonly()


def writable_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable view of a contiguous CPU tensor's bytes (valid while the tensor lives)."""
    return _byte_view(tensor)


def expected_bytes(shape: Sequence[int], itemsize: int) -> int:
    return math.prod(shape) * itemsize


def encode_stream(header: pb.Header, payload: memoryview, chunk_bytes: int) -> Iterator[pb.InitResponse]:
    """Header, then chunks of ``chunk_bytes`` (the last may be shorter) in offset order, then the trailer."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    yield pb.InitResponse(header=header)
    checksum = TensorChecksum()
    for offset in range(0, len(payload), chunk_bytes):
        piece = payload[offset : offset + chunk_bytes]
        checksum.update(piece)
        yield pb.InitResponse(chunk=pb.Chunk(offset=offset, data=piece.tobytes()))
    yield pb.InitResponse(trailer=pb.Trailer(checksum=checksum.digest()))


def _check_header(
    header: pb.Header, expected_shape: Sequence[int] | None, expected_dtype: torch.dtype | None
) -> _dtypes.DTypeEntry:
    entry = _dtypes.from_wire(header.dtype)
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


def decode_stream(
    responses: Iterable[pb.InitResponse],
    *,
    expected_shape: Sequence[int] | None = None,
    expected_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, pb.Header]:
    """Assemble one Init stream into a tensor, verified; returns (tensor, header).

    ``out``, when given, must be a contiguous CPU tensor of the header's shape and dtype; the bytes are
    written straight into it. Otherwise one tensor is allocated once the header arrives.
    """
    iterator = iter(responses)
    first = next(iterator, None)
    if first is None or first.WhichOneof("part") != "header":
        raise IntegrityError("stream did not start with a header")
    header = first.header
    entry = _check_header(header, expected_shape, expected_dtype)
    shape = tuple(header.shape)
    if out is None:
        out = torch.empty(shape, dtype=entry.torch_dtype)
    elif tuple(out.shape) != shape or out.dtype != entry.torch_dtype:
        raise IntegrityError(f"header describes {list(shape)} {entry.name}, not the destination's layout")
    destination = writable_bytes(out)
    total = header.total_bytes
    received = 0
    checksum = TensorChecksum()
    for message in iterator:
        part = message.WhichOneof("part")
        if part == "chunk":
            chunk = message.chunk
            size = len(chunk.data)
            if chunk.offset != received:
                raise IntegrityError(f"chunk at offset {chunk.offset}, expected offset {received}")
            if size == 0 or received + size > total:
                raise IntegrityError(f"chunk of {size} bytes at offset {received} overruns the tensor's {total} bytes")
            destination[received : received + size] = chunk.data
            checksum.update(destination[received : received + size])
            received += size
        elif part == "trailer":
            if received != total:
                raise IntegrityError(f"trailer after {received} of {total} bytes")
            if message.trailer.checksum != checksum.digest():
                raise IntegrityError("checksum mismatch: the received bytes differ from the bytes the server sent")
            if next(iterator, None) is not None:
                raise IntegrityError("message after the trailer")
            return out, header
        else:
            raise IntegrityError(f"unexpected {part or 'empty'} message after the header")
    raise IntegrityError(f"stream ended after {received} of {total} bytes without a trailer")

"""Encoding the contract's messages: a tensor's bytes as Header/Chunk*/Trailer, and the header's CRC-32.

The server encodes with it; a client verifies against the same functions (``header_crc32``). It never imports
grpc, and never copies a tensor's bytes: chunks are serialized from views of the tensor's storage.
"""

from __future__ import annotations

import ctypes
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence

import torch

from initserve_protocol.checksum import BLOCK_BYTES, crc32, tensor_checksum
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_protocol.wire import encode_chunk

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


def _chunk_crc(piece: memoryview, start: int, total: int, block_crcs: Sequence[int] | None) -> int:
    """A chunk's CRC-32: its block's, when the chunk is exactly one block (or the tensor's last, shorter one)."""
    if block_crcs is not None and start % BLOCK_BYTES == 0 and len(piece) == min(BLOCK_BYTES, total - start):
        return block_crcs[start // BLOCK_BYTES]
    return crc32(piece)


def encode_chunk_at(payload: memoryview, start: int, end: int, block_crcs: Sequence[int] | None = None) -> bytes:
    """The serialized chunk of ``payload[start:end]``, its CRC reused from ``block_crcs`` when it is one block."""
    piece = payload[start:end]
    return encode_chunk(start, piece, _chunk_crc(piece, start, len(payload), block_crcs))


def encode_stream(
    header: pb.Header,
    payload: memoryview,
    chunk_bytes: int,
    *,
    offset: int = 0,
    checksum: bytes | Callable[[], bytes] | None = None,
    block_crcs: Sequence[int] | None = None,
    ready: Callable[[int], None] | None = None,
) -> Iterator[pb.InitResponse | bytes]:
    """Header, chunks of ``chunk_bytes`` from ``offset`` (the last may be shorter), then the trailer.

    Chunks come already serialized (``bytes``, see :mod:`initserve_protocol.wire`); header and trailer as messages.
    ``checksum`` is the whole payload's, or a function that gives it once every chunk was sent (computed
    here when None); the trailer always carries it, so a stream resumed at ``offset`` verifies the whole
    tensor. ``block_crcs``, the payload's per-block CRC-32s (:class:`~initserve_protocol.checksum.BlockCrcs`), spare
    recomputing the CRC of a chunk that is one block. ``ready(end)``, for a payload still being generated,
    returns once bytes ``[0, end)`` are final (and their block CRCs known).
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    total = len(payload)
    if not 0 <= offset <= total:
        raise ValueError(f"offset {offset} is outside the payload's {total} bytes")
    yield pb.InitResponse(header=header)
    for start in range(offset, total, chunk_bytes):
        end = min(start + chunk_bytes, total)
        if ready is not None:
            ready(end)
        yield encode_chunk_at(payload, start, end, block_crcs)
    if ready is not None:
        ready(total)
    if checksum is None:
        checksum = tensor_checksum(payload)
    elif callable(checksum):
        checksum = checksum()
    yield pb.InitResponse(trailer=pb.Trailer(checksum=checksum))


_CANONICAL_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)  # one encoder: building one costs


def header_crc32(header: pb.Header) -> int:
    """CRC-32 of the header's fields 1-14 and 16-20 in the canonical form the proto documents (Header.crc32)."""
    device = header.device
    fields = [
        list(header.shape),
        header.dtype,
        header.total_bytes,
        header.seed_used,
        header.seeded,
        header.torch_version,
        [device.device, device.name, device.multiprocessor_count, device.capability, device.fingerprint],
        header.checksum_algorithm,
        header.chunk_bytes,
        header.scheme,
        header.server_version,
        header.server_id,
        header.offset,
        header.cache_hit,
        header.name,
        header.base_seed if header.HasField("base_seed") else None,
        list(header.full_shape),
        [[part.dim, part.start, part.length] for part in header.slices],
    ]
    if header.generator:  # torch's headers keep the form that clients older than the field check
        fields.append(header.generator)
    return crc32(_CANONICAL_JSON.encode(fields).encode("ascii"))


def seal_header(header: pb.Header) -> pb.Header:
    """Set ``header.crc32`` (the server calls this once the header is complete); returns the header."""
    header.crc32 = header_crc32(header)
    return header

"""The one hot message, by hand: ``InitResponse{chunk: Chunk{offset, data, crc32}}`` in protobuf wire format.

protobuf's generated code copies a chunk's payload twice on each side (into the message, then out of it).
Encoding it here copies the tensor's bytes once, straight into the message the server hands to gRPC;
decoding returns a :class:`ChunkView` whose ``data`` is a view into the bytes gRPC delivered, so the client
copies them once, into the destination tensor. Every other message goes through protobuf. The bytes are plain
protobuf either way: any protobuf reader parses what this writes, and this parses what any writer produces
(fields in any order, defaults omitted, unknown fields skipped); anything else falls back to protobuf.
"""

from __future__ import annotations

from initserve_protocol.v1 import initserve_pb2 as pb

_CHUNK_TAG = b"\x12"  # InitResponse.chunk: field 2, length-delimited
_OFFSET_TAG = b"\x08"  # Chunk.offset: field 1, varint
_DATA_TAG = b"\x12"  # Chunk.data: field 2, length-delimited
_CRC_TAG = b"\x1d"  # Chunk.crc32: field 3, fixed32


class ChunkView:
    """A decoded Chunk: ``data`` is a read-only view of the received message, valid while the view lives."""

    __slots__ = ("crc32", "data", "offset")

    def __init__(self, offset: int, data: memoryview, crc32: int) -> None:
        self.offset = offset
        self.data = data
        self.crc32 = crc32


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_chunk(offset: int, data: memoryview, crc32: int) -> bytes:
    """The serialized ``InitResponse`` carrying ``data`` at ``offset``: one copy of ``data``."""
    head = _OFFSET_TAG + _varint(offset) + _DATA_TAG + _varint(len(data))
    tail = _CRC_TAG + crc32.to_bytes(4, "little")
    return b"".join((_CHUNK_TAG, _varint(len(head) + len(data) + len(tail)), head, data, tail))


def serialize_response(message: bytes | pb.InitResponse) -> bytes:
    """gRPC's response serializer: chunks arrive already encoded, the rest are protobuf messages."""
    if type(message) is bytes:
        return message
    return message.SerializeToString()


def _read_varint(data: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]  # IndexError past the end: malformed
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _parse_chunk(data: memoryview) -> ChunkView:
    """The fields of a serialized Chunk; ValueError/IndexError when it is not one."""
    offset = crc32 = 0
    payload = data[0:0]
    position = 0
    end = len(data)
    while position < end:
        key, position = _read_varint(data, position)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _read_varint(data, position)
            if field == 1:
                offset = value
        elif wire_type == 2:
            size, position = _read_varint(data, position)
            if position + size > end:
                raise ValueError("length-delimited field overruns the message")
            if field == 2:
                payload = data[position : position + size]
            position += size
        elif wire_type == 5:
            if position + 4 > end:
                raise ValueError("fixed32 field overruns the message")
            if field == 3:
                crc32 = int.from_bytes(data[position : position + 4], "little")
            position += 4
        elif wire_type == 1:
            position += 8
        else:
            raise ValueError(f"wire type {wire_type} in a Chunk")
        if position > end:
            raise ValueError("field overruns the message")
    return ChunkView(offset, payload, crc32)


def encode_unary(messages: list[bytes | pb.InitResponse]) -> bytes:
    """An ``InitUnaryResponse`` from a stream's messages: its header, chunk and trailer are fields 1, 2 and 3,
    as in ``InitResponse``'s oneof, so the serialized stream messages, joined, are the unary response."""
    return b"".join(serialize_response(message) for message in messages)


# Below this size protobuf's parse, which copies the payload, is cheaper than parsing the fields by hand.
SMALL_UNARY_BYTES = 64 << 10


UnaryPart = pb.Header | ChunkView | pb.Trailer


def decode_unary(data: bytes) -> list[UnaryPart]:
    """An ``InitUnaryResponse`` as the stream's parts, unwrapped: its header, its chunk if any, its trailer. Above
    :data:`SMALL_UNARY_BYTES`, the chunk's payload is a view into ``data`` when the fields are exactly those,
    once each in order; anything else is parsed by protobuf (which raises on malformed bytes)."""
    if len(data) > SMALL_UNARY_BYTES:
        parts = _split_unary(data)
        if parts is not None:
            return parts
    response = pb.InitUnaryResponse.FromString(data)
    if not response.HasField("chunk"):
        return [response.header, response.trailer]
    chunk = response.chunk
    return [response.header, ChunkView(chunk.offset, memoryview(chunk.data), chunk.crc32), response.trailer]


def _split_unary(data: bytes) -> list[UnaryPart] | None:
    """Header, chunk (a view into ``data``) and trailer, parsed by hand; None unless the fields are exactly
    those, once each in order."""
    view = memoryview(data)
    parts: list[UnaryPart] = []
    position = 0
    try:
        for tag, field in ((0x0A, "header"), (0x12, "chunk"), (0x1A, "trailer")):
            if position < len(data) and data[position] == tag:
                size, start = _read_varint(view, position + 1)
                end = start + size
                if end > len(data):
                    raise ValueError("field overruns the message")
                if field == "chunk":
                    parts.append(_parse_chunk(view[start:end]))
                elif field == "header":
                    parts.append(pb.Header.FromString(view[start:end]))
                else:
                    parts.append(pb.Trailer.FromString(view[start:end]))
                position = end
    except (ValueError, IndexError):
        return None
    return parts if position == len(data) else None


_TENSOR_TAG = b"\x20"  # InitManyResponse.tensor: field 4, varint


def tensor_tag(position: int) -> bytes:
    """The serialized ``InitManyResponse.tensor`` field: an InitResponse's bytes after it are an
    InitManyResponse of that tensor."""
    return _TENSOR_TAG + _varint(position)


def decode_many_response(data: bytes) -> tuple[int, ChunkView | pb.InitResponse]:
    """gRPC's InitMany deserializer: (tensor index, message). The tensor field first and then exactly one chunk
    is decoded without copying the payload (as :func:`decode_response`); anything else goes to protobuf."""
    if data[:1] == _TENSOR_TAG:
        try:
            position, start = _read_varint(memoryview(data), 1)
            if data[start : start + 1] == _CHUNK_TAG:
                view = memoryview(data)[start:]
                size, offset = _read_varint(view, 1)
                if offset + size == len(view):
                    return position, _parse_chunk(view[offset:])
        except (ValueError, IndexError):
            pass
    message = pb.InitManyResponse.FromString(data)
    part = message.WhichOneof("part")
    response = pb.InitResponse(**{part: getattr(message, part)}) if part else pb.InitResponse()
    return message.tensor, response


def decode_response(data: bytes) -> ChunkView | pb.InitResponse:
    """gRPC's response deserializer: a message that is exactly one chunk becomes a :class:`ChunkView`
    without copying its payload; anything else is parsed by protobuf (which raises on malformed bytes)."""
    view = memoryview(data)
    if data[:1] == _CHUNK_TAG:
        try:
            size, position = _read_varint(view, 1)
            if position + size == len(data):
                return _parse_chunk(view[position:])
        except (ValueError, IndexError):
            pass  # protobuf decides, and names the problem
    return pb.InitResponse.FromString(data)

"""The stream codec and checksum, with real messages and no gRPC: round trips, and every way a stream can lie."""

from __future__ import annotations

import hashlib
import random
import zlib

import pytest
import torch
from google.protobuf.message import DecodeError

from initserve import _codec
from initserve._errors import IntegrityError
from initserve_protocol import codec, wire
from initserve_protocol.checksum import BLOCK_BYTES, CHECKSUM_ALGORITHM, TensorChecksum, tensor_checksum
from initserve_protocol.v1 import initserve_pb2 as pb


def independent_checksum(data: bytes) -> bytes:
    """The documented algorithm written out again: SHA-256 of big-endian per-MiB CRC-32s, then the length."""
    digest = hashlib.sha256()
    for start in range(0, len(data), BLOCK_BYTES):
        digest.update(zlib.crc32(data[start : start + BLOCK_BYTES]).to_bytes(4, "big"))
    digest.update(len(data).to_bytes(8, "big"))
    return digest.digest()


@pytest.mark.parametrize("size", [0, 1, 1000, BLOCK_BYTES - 1, BLOCK_BYTES, BLOCK_BYTES + 1, 3 * BLOCK_BYTES + 17])
def test_checksum_matches_the_documented_algorithm(size: int) -> None:
    data = random.Random(size).randbytes(size)
    assert tensor_checksum(data) == independent_checksum(data)


def test_checksum_does_not_depend_on_how_the_bytes_are_split() -> None:
    rng = random.Random(1)
    data = rng.randbytes(2 * BLOCK_BYTES + 12345)
    for _ in range(5):
        checksum = TensorChecksum()
        position = 0
        while position < len(data):
            step = rng.choice([1, 3, 4096, BLOCK_BYTES - 5, BLOCK_BYTES + 7])
            checksum.update(data[position : position + step])
            position += step
        assert checksum.digest() == tensor_checksum(data)


def test_checksum_with_the_chunks_own_crcs_is_the_same() -> None:
    """``update(piece, crc=crc32(piece))``, as the client feeds each verified chunk: the given CRC stands for a
    whole block or a block's first piece, and is recomputed from the bytes anywhere else."""
    rng = random.Random(4)
    for size in (5, BLOCK_BYTES - 1, BLOCK_BYTES, 2 * BLOCK_BYTES + 12345):
        data = rng.randbytes(size)
        for _ in range(5):
            checksum = TensorChecksum()
            position = 0
            while position < len(data):
                piece = data[position : position + rng.choice([1, 4096, BLOCK_BYTES - 5, BLOCK_BYTES, BLOCK_BYTES + 7])]
                checksum.update(piece, crc=zlib.crc32(piece))
                position += len(piece)
            assert checksum.digest() == independent_checksum(data), size


def test_checksum_sees_a_single_flipped_bit_and_the_length() -> None:
    data = bytearray(random.Random(2).randbytes(BLOCK_BYTES + 100))
    original = tensor_checksum(bytes(data))
    data[BLOCK_BYTES + 50] ^= 0x01
    assert tensor_checksum(bytes(data)) != original
    assert tensor_checksum(b"\x00" * 8) != tensor_checksum(b"\x00" * 16)


def header_for(tensor: torch.Tensor, **overrides) -> pb.Header:
    header = pb.Header(
        shape=list(tensor.shape),
        dtype={torch.float32: pb.DTYPE_FLOAT32, torch.float64: pb.DTYPE_FLOAT64, torch.bfloat16: pb.DTYPE_BFLOAT16}[
            tensor.dtype
        ],
        total_bytes=tensor.numel() * tensor.element_size(),
        checksum_algorithm=CHECKSUM_ALGORITHM,
        chunk_bytes=5,
    )
    for name, value in overrides.items():
        if name == "shape":
            del header.shape[:]
            header.shape.extend(value)
        else:
            setattr(header, name, value)
    return codec.seal_header(header)


def encoded(tensor: torch.Tensor, chunk_bytes: int = 5, **header_overrides) -> list[pb.InitResponse]:
    source = tensor.contiguous()
    messages = codec.encode_stream(header_for(source, **header_overrides), codec.tensor_bytes(source), chunk_bytes)
    # chunks come serialized by hand (initserve_protocol.wire): protobuf itself must parse them
    return [pb.InitResponse.FromString(m) if isinstance(m, bytes) else m for m in messages]


@pytest.mark.parametrize("chunk_bytes", [1, 3, 5, 64, 1 << 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_round_trip_is_bit_exact_for_any_chunk_size(chunk_bytes: int, dtype: torch.dtype) -> None:
    source = torch.randn(7, 13, generator=torch.Generator().manual_seed(0)).to(dtype)
    source[0, 0] = float("nan")
    source[0, 1] = -0.0
    messages = encoded(source, chunk_bytes)
    chunks = [m.chunk for m in messages if m.WhichOneof("part") == "chunk"]
    assert all(len(c.data) == chunk_bytes for c in chunks[:-1])
    assert sum(len(c.data) for c in chunks) == source.numel() * source.element_size()
    tensor, header = _codec.decode_stream(messages, expected_shape=(7, 13), expected_dtype=dtype)
    assert bytes(tensor.untyped_storage()) == bytes(source.untyped_storage())
    assert header.total_bytes == source.numel() * source.element_size()


@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0), ()])
def test_zero_size_and_scalar_tensors(shape: tuple[int, ...]) -> None:
    source = torch.full(shape, 2.5)
    messages = encoded(source)
    assert [m.WhichOneof("part") for m in messages][0] == "header"
    tensor, _ = _codec.decode_stream(messages, expected_shape=shape, expected_dtype=torch.float32)
    assert tensor.shape == shape
    assert bytes(tensor.untyped_storage()) == bytes(source.untyped_storage())


def test_decode_writes_into_the_given_tensor_without_a_second_tensor() -> None:
    source = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    out = torch.zeros(4, 6)
    tensor, _ = _codec.decode_stream(encoded(source), out=out)
    assert tensor is out
    assert torch.equal(out, source)


def corrupt(messages: list[pb.InitResponse], index: int, mutate) -> list[pb.InitResponse]:
    copies = [pb.InitResponse.FromString(m.SerializeToString()) for m in messages]
    mutate(copies[index])
    return copies


def resealed(mutate):
    """Change the header, then seal it again: a server that sends an intact but wrong header."""

    def apply(message: pb.InitResponse) -> None:
        mutate(message.header)
        codec.seal_header(message.header)

    return apply


def flip_first_byte(message: pb.InitResponse) -> None:
    data = bytearray(message.chunk.data)
    data[0] ^= 0xFF
    message.chunk.data = bytes(data)


def flip_first_byte_and_its_crc(message: pb.InitResponse) -> None:
    flip_first_byte(message)
    message.chunk.crc32 = zlib.crc32(message.chunk.data)


SOURCE = torch.arange(12, dtype=torch.float32)  # 48 bytes: header, 10 chunks of 5 bytes (last 3), trailer


@pytest.mark.parametrize(
    "make_stream, message",
    [
        (lambda m: [], "did not start with a header"),
        (lambda m: m[1:], "did not start with a header"),
        (lambda m: m[:-1], "stream ended after 48 of 48 bytes without a trailer"),
        (lambda m: m[:4] + m[-1:], "trailer after 15 of 48 bytes"),
        (lambda m: m[:2] + m[3:], "chunk at offset 10, expected offset 5"),
        (lambda m: m[:3] + m[2:], "chunk at offset 5, expected offset 10"),
        (lambda m: corrupt(m, 3, flip_first_byte), "chunk at offset 10 is damaged (CRC-32"),
        (lambda m: corrupt(m, 3, flip_first_byte_and_its_crc), "checksum mismatch"),
        (lambda m: corrupt(m, -1, lambda t: setattr(t.trailer, "checksum", b"\x00" * 32)), "checksum mismatch"),
        (lambda m: m + m[-1:], "message after the trailer"),
        (lambda m: m[:1] + m[:1] + m[1:], "unexpected header message after the header"),
        (lambda m: m[:1] + [pb.InitResponse()] + m[1:], "unexpected empty message after the header"),
        (lambda m: corrupt(m, 1, lambda c: setattr(c.chunk, "data", b"")), "chunk of 0 bytes at offset 0"),
        (lambda m: corrupt(m, 10, lambda c: setattr(c.chunk, "data", b"123456")), "overruns the tensor's 48 bytes"),
        (lambda m: corrupt(m, 0, lambda h: setattr(h.header, "seed_used", 1)), "header is damaged (CRC-32"),
        (lambda m: corrupt(m, 0, lambda h: setattr(h.header, "crc32", h.header.crc32 ^ 1)), "header is damaged"),
        (lambda m: corrupt(m, 0, resealed(lambda h: setattr(h, "total_bytes", 44))), "does not match shape [12]"),
        (lambda m: corrupt(m, 0, resealed(lambda h: setattr(h, "dtype", 99))), "dtype 99"),
        (lambda m: corrupt(m, 0, resealed(lambda h: setattr(h, "checksum_algorithm", "md5"))), "checksum algorithm"),
        (lambda m: corrupt(m, 0, resealed(lambda h: h.shape.append(-1))), "negative dimension"),
    ],
)
def test_every_malformed_stream_raises_integrity_error(make_stream, message: str) -> None:
    stream = make_stream(encoded(SOURCE))
    with pytest.raises(IntegrityError, match=None) as raised:
        _codec.decode_stream(stream, expected_shape=(12,), expected_dtype=torch.float32)
    assert message in str(raised.value)


def test_header_must_match_the_request() -> None:
    with pytest.raises(IntegrityError, match=r"differs from the requested shape \[3, 4\]"):
        _codec.decode_stream(encoded(SOURCE), expected_shape=(3, 4))
    with pytest.raises(IntegrityError, match="differs from the requested dtype"):
        _codec.decode_stream(encoded(SOURCE), expected_dtype=torch.float64)
    with pytest.raises(IntegrityError, match="not the destination's layout"):
        _codec.decode_stream(encoded(SOURCE), out=torch.empty(12, dtype=torch.float64))


def test_every_header_field_is_under_its_crc() -> None:
    """Changing any field but the CRC (one at a time) without resealing is caught as a damaged header."""
    sealed = header_for(SOURCE, seed_used=7, seeded=True, scheme="normal", torch_version="2.13.0")
    sealed.device.fingerprint = "cpu|x86_64|AVX2"
    changes = {
        "dtype": lambda h: setattr(h, "dtype", pb.DTYPE_FLOAT64),
        "total_bytes": lambda h: setattr(h, "total_bytes", 47),
        "seed_used": lambda h: setattr(h, "seed_used", 6),
        "seeded": lambda h: setattr(h, "seeded", False),
        "torch_version": lambda h: setattr(h, "torch_version", "2.13.1"),
        "device": lambda h: setattr(h.device, "fingerprint", "cpu|x86_64|AVX512"),
        "checksum_algorithm": lambda h: setattr(h, "checksum_algorithm", "x"),
        "chunk_bytes": lambda h: setattr(h, "chunk_bytes", 6),
        "scheme": lambda h: setattr(h, "scheme", "uniform"),
        "server_version": lambda h: setattr(h, "server_version", "9"),
        "server_id": lambda h: setattr(h, "server_id", "other:1"),
        "offset": lambda h: setattr(h, "offset", 5),
        "cache_hit": lambda h: setattr(h, "cache_hit", True),
        "shape": lambda h: h.shape.append(1),
        "name": lambda h: setattr(h, "name", "w"),
        "base_seed": lambda h: setattr(h, "base_seed", 0),  # present, even as 0, differs from absent
        "full_shape": lambda h: h.full_shape.append(48),
        "slices": lambda h: h.slices.add(dim=0, start=0, length=1),
        "generator": lambda h: setattr(h, "generator", "philox4x32-10/v1"),
    }
    assert set(changes) == {f.name for f in pb.Header.DESCRIPTOR.fields} - {"crc32"}
    for name, change in changes.items():
        header = pb.Header()
        header.CopyFrom(sealed)
        change(header)
        assert codec.header_crc32(header) != header.crc32, name


def test_a_torch_header_keeps_the_crc_form_older_clients_check() -> None:
    """Header.generator joins the CRC only when set: torch's headers are sealed as before the field existed."""
    header = encoded(SOURCE)[0].header
    assert header.generator == ""
    with_generator = pb.Header()
    with_generator.CopyFrom(header)
    with_generator.generator = "philox4x32-10/v1"
    assert codec.header_crc32(with_generator) != codec.header_crc32(header)
    device = header.device
    old_form = codec._CANONICAL_JSON.encode(
        [
            list(header.shape), header.dtype, header.total_bytes, header.seed_used, header.seeded,
            header.torch_version,
            [device.device, device.name, device.multiprocessor_count, device.capability, device.fingerprint],
            header.checksum_algorithm, header.chunk_bytes, header.scheme, header.server_version, header.server_id,
            header.offset, header.cache_hit, header.name, None, [], [],
        ]
    )  # fmt: skip
    assert codec.header_crc32(header) == zlib.crc32(old_form.encode("ascii"))


def test_an_intact_header_must_answer_the_requested_generator() -> None:
    stream = encoded(SOURCE)
    with pytest.raises(
        IntegrityError, match="header generator 'torch' differs from the requested generator 'philox4x32-10/v1'"
    ):
        assemble(stream, expected_generator="philox4x32-10/v1")
    resealed_stream = encoded(SOURCE)
    resealed_stream[0].header.generator = "philox4x32-10/v1"
    codec.seal_header(resealed_stream[0].header)
    assert torch.equal(assemble(resealed_stream, expected_generator="philox4x32-10/v1"), SOURCE)
    with pytest.raises(
        IntegrityError, match="header generator 'philox4x32-10/v1' differs from the requested generator 'torch'"
    ):
        assemble(resealed_stream)


def assemble(messages: list[pb.InitResponse], **expected) -> torch.Tensor:
    return _codec.StreamAssembler(**expected).consume(messages)[0]


def test_an_intact_header_must_answer_the_requested_scheme_and_seed() -> None:
    stream = encoded(SOURCE, seed_used=2**64 - 1, seeded=True, scheme="normal")
    assert torch.equal(assemble(stream, expected_scheme="normal", expected_seed=2**64 - 1), SOURCE)
    with pytest.raises(IntegrityError, match="header seed_used 18446744073709551615 differs from the requested seed 5"):
        assemble(stream, expected_seed=5)
    with pytest.raises(IntegrityError, match="header scheme 'normal' differs from the requested scheme 'uniform'") as e:
        assemble(stream, expected_scheme="uniform")
    assert e.value.recovery == "none"  # the server answered another request: retrying cannot help
    # an unseeded scheme reports seed 0 whatever was asked
    assert torch.equal(assemble(encoded(SOURCE, scheme="ones"), expected_scheme="ones", expected_seed=5), SOURCE)


def test_byte_views_refuse_what_they_cannot_view() -> None:
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        codec.tensor_bytes(torch.empty(4, 6).t())
    view = codec.tensor_bytes(torch.ones(2))
    assert view.readonly and len(view) == 8
    with pytest.raises(ValueError, match="chunk_bytes must be positive"):
        list(codec.encode_stream(header_for(SOURCE), codec.tensor_bytes(SOURCE), 0))


# --- the hand-written Chunk wire format (initserve_protocol.wire) -----------------------------------------------------


def test_a_hand_encoded_chunk_is_the_message_protobuf_reads() -> None:
    data = bytes(range(256)) * 5
    encoded = wire.encode_chunk(300, memoryview(data), 0xDEADBEEF)
    parsed = pb.InitResponse.FromString(encoded)
    assert parsed.WhichOneof("part") == "chunk"
    assert (parsed.chunk.offset, parsed.chunk.data, parsed.chunk.crc32) == (300, data, 0xDEADBEEF)
    assert encoded == parsed.SerializeToString()  # byte for byte what protobuf writes, field order included


@pytest.mark.parametrize(
    "message",
    [
        pb.InitResponse(chunk=pb.Chunk(offset=0, data=b"abc", crc32=0)),  # defaults omitted by protobuf
        pb.InitResponse(chunk=pb.Chunk(offset=2**63, data=b"x" * 200, crc32=1)),  # 10-byte varint
        pb.InitResponse(chunk=pb.Chunk(offset=7, data=b"", crc32=5)),
    ],
)
def test_the_chunk_decoder_reads_what_protobuf_writes(message: pb.InitResponse) -> None:
    view = wire.decode_response(message.SerializeToString())
    assert isinstance(view, wire.ChunkView)
    assert (view.offset, bytes(view.data), view.crc32) == (
        message.chunk.offset,
        message.chunk.data,
        message.chunk.crc32,
    )


def test_the_chunk_decoder_takes_fields_in_any_order_and_skips_unknown_ones() -> None:
    inner = (
        b"\x1d\x04\x03\x02\x01" + b"\x12\x02hi" + b"\x08\x05" + b"\x20\x63" + b"\x2a\x01z"
    )  # crc, data, offset, 2 unknown
    view = wire.decode_response(b"\x12" + bytes([len(inner)]) + inner)
    assert isinstance(view, wire.ChunkView)
    assert (view.offset, bytes(view.data), view.crc32) == (5, b"hi", 0x01020304)


def test_other_messages_and_malformed_bytes_go_to_protobuf() -> None:
    header = pb.InitResponse(header=pb.Header(shape=[2], total_bytes=8))
    assert wire.decode_response(header.SerializeToString()) == header
    for malformed in (b"\x12\x05\x08", b"\x12\x03\x12\x09ab", b"\x12\x02\x0f\x00"):  # short, overrun, bad wire type
        with pytest.raises(DecodeError):
            wire.decode_response(malformed)


@pytest.mark.parametrize("size", [0, 5, BLOCK_BYTES * 4, BLOCK_BYTES * 5 + 17])
def test_the_checksum_in_threads_equals_the_serial_one(size: int) -> None:
    data = random.Random(size).randbytes(size)
    assert tensor_checksum(data, threads=2) == tensor_checksum(data) == tensor_checksum(data, threads=3)


def test_the_unary_response_is_the_stream_messages_joined() -> None:
    header = pb.InitResponse(header=pb.Header(shape=[3], total_bytes=3, scheme="normal"))
    chunk = wire.encode_chunk(0, memoryview(b"abc"), 7)
    trailer = pb.InitResponse(trailer=pb.Trailer(checksum=b"\x01" * 32))
    encoded = wire.encode_unary([header, chunk, trailer])
    parsed = pb.InitUnaryResponse.FromString(encoded)  # what any protobuf reader sees
    assert parsed.header == header.header and parsed.trailer == trailer.trailer
    assert (parsed.chunk.offset, parsed.chunk.data, parsed.chunk.crc32) == (0, b"abc", 7)
    decoded = wire.decode_unary(parsed.SerializeToString())
    assert decoded[0] == header.header and decoded[2] == trailer.trailer  # unwrapped: Header, ChunkView, Trailer
    assert isinstance(decoded[1], wire.ChunkView) and bytes(decoded[1].data) == b"abc"
    no_chunk = wire.decode_unary(wire.encode_unary([header, trailer]))
    assert no_chunk == [header.header, trailer.trailer]
    reordered = wire.decode_unary(trailer.SerializeToString() + header.SerializeToString())  # protobuf's way
    assert reordered == [header.header, trailer.trailer]
    with pytest.raises(DecodeError):
        wire.decode_unary(b"\x0a\x05\x08")


def test_a_large_unary_answer_is_split_by_hand_with_its_payload_a_view() -> None:
    payload = random.Random(3).randbytes(wire.SMALL_UNARY_BYTES + 5)
    header = pb.InitResponse(header=pb.Header(shape=[len(payload)], total_bytes=len(payload), scheme="normal"))
    trailer = pb.InitResponse(trailer=pb.Trailer(checksum=b"\x02" * 32))
    data = wire.encode_unary([header, wire.encode_chunk(0, memoryview(payload), 9), trailer])
    decoded = wire.decode_unary(data)
    assert decoded[0] == header.header and decoded[2] == trailer.trailer
    chunk = decoded[1]
    assert isinstance(chunk, wire.ChunkView) and (chunk.offset, chunk.crc32) == (0, 9)
    assert chunk.data.obj is data and bytes(chunk.data) == payload  # a view into the received bytes

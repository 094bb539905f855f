"""The room every message limit keeps for a header: computed from the largest header a client can cause."""

from __future__ import annotations

import pytest

from initserve_protocol.seeds import MAX_NAME_CHARS
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_server import engine
from initserve_server.config import (
    SERVER_STRINGS_BYTES,
    ServerConfig,
    header_bytes_bound,
    header_room_bytes,
)
from initserve_server.validation import validate_request

# The header fields whose values the server sets itself, whatever the request.
SERVER_STRING_FIELDS = ("torch_version", "device", "checksum_algorithm", "scheme", "server_version", "server_id")
LONGEST_NAME = "\U0001f600" * MAX_NAME_CHARS  # 4 bytes each in UTF-8
MAX_SLICES = 16  # a request's slices, whatever max_dims


def largest_header(dims: int) -> pb.Header:
    """The header this server sends for the widest request it admits: the longest name, every dim sliced."""
    config = ServerConfig(max_dims=dims, max_tensor_bytes=1 << 62)
    elements = (1 << 62) // 4
    slices = [pb.Slice(dim=0, start=1, length=elements - 1)]
    slices += [pb.Slice(dim=dim, start=0, length=1) for dim in range(1, min(dims, MAX_SLICES))]
    request = pb.InitRequest(
        scheme="kaiming_uniform", shape=[elements] + [1] * (dims - 1), seed=(1 << 64) - 1, name=LONGEST_NAME,
        derive_seed=True, offset=1 << 40, chunk_bytes=1 << 20, slices=slices,
    )  # fmt: skip
    spec = validate_request(request, config, engine.draw_seed)
    return engine.header(spec, cache_hit=True)


@pytest.mark.parametrize("dims", [1, 4, 16, 64])
def test_the_largest_header_the_server_sends_fits_the_bound(dims: int) -> None:
    header = largest_header(dims)
    assert len(header.name.encode()) == 4 * MAX_NAME_CHARS and len(header.slices) == min(dims, MAX_SLICES)
    sent = pb.InitManyResponse(header=header, tensor=(1 << 32) - 1).ByteSize()
    assert sent <= header_bytes_bound(dims)
    # The bound is the widest header with this server's own strings, plus the room kept for any server's.
    own = pb.Header(**{field: getattr(header, field) for field in SERVER_STRING_FIELDS})
    assert sent <= header_bytes_bound(dims) - SERVER_STRINGS_BYTES + own.ByteSize() < header_bytes_bound(dims)


def test_any_servers_own_strings_fit_their_room() -> None:
    """The longest each could be: a CUDA device name is at most 256 bytes, a Linux hostname at most 64."""
    name = "N" * 256
    widest = pb.Header(
        torch_version="2.13.0+cu130.dev20261203", checksum_algorithm="sha256-of-crc32-per-1MiB-block",
        scheme="kaiming_uniform", server_version="0.1.0.dev123+g0123456789", server_id="h" * 64 + ":4194304",
        device=pb.DeviceInfo(
            device="cuda:15", name=name, multiprocessor_count=132, capability="sm_100",
            fingerprint=f"cuda/{name}/sm_100/132mp/torch-2.13.0+cu130.dev20261203",
        ),
    )  # fmt: skip
    assert set(SERVER_STRING_FIELDS) == {field.name for field, _ in widest.ListFields()}
    assert widest.ByteSize() <= SERVER_STRINGS_BYTES


def test_the_room_kept_is_the_header_bound_with_a_trailer_and_a_chunks_framing() -> None:
    assert header_bytes_bound(16) == 6036  # 4,096 of it the name
    assert header_room_bytes(16) == 7205  # and 1,037 for a trailer of 4 warnings of 256 bytes
    assert ServerConfig().max_unary_bytes == 1 << 20
    assert ServerConfig(max_message_bytes=1 << 20, chunk_bytes=4096).max_unary_bytes == (1 << 20) - 7205
    assert ServerConfig(max_message_bytes=7205, chunk_bytes=4096).max_unary_bytes == 0


@pytest.mark.parametrize(("dims", "least"), [(16, 7205), (0, 6382), (64, 9653)])
def test_a_message_limit_below_the_room_is_refused_naming_the_least(dims: int, least: int) -> None:
    assert header_room_bytes(dims) == least
    with pytest.raises(ValueError) as refused:
        ServerConfig(max_dims=dims, max_message_bytes=least - 1, chunk_bytes=1024)
    assert str(refused.value) == (
        f"max_message_bytes must be at least {least} (the largest header, trailer and chunk framing with "
        f"max_dims={dims}), got {least - 1}"
    )

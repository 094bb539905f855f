"""The same-host transport: the server writes the tensor into the client's /dev/shm object, verified the same way."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest
import torch

import initserve
from initserve import _shared
from initserve._codec import StreamAssembler
from initserve._errors import IntegrityError
from initserve.v1 import initserve_pb2 as pb
from tests.conftest import ServerProcess, reference, same_bytes, start_server

pytestmark = pytest.mark.skipif(not _shared.available(), reason="needs a writable /dev/shm")
SERVICE = "initserve.v1.InitService"
CALL_TIMEOUT_SECONDS = 60.0


def leftovers() -> set[str]:
    return {name for name in os.listdir(_shared.SHARED_MEMORY_DIR) if name.startswith("initserve-")}


@pytest.fixture(scope="module")
def shm_server() -> Iterator[ServerProcess]:
    running = start_server("--shared-memory")
    yield running
    running.stop()


def unary_call(target: str):
    channel = grpc.insecure_channel(target)
    call = channel.unary_unary(
        f"/{SERVICE}/InitUnary",
        request_serializer=pb.InitRequest.SerializeToString,
        response_deserializer=pb.InitUnaryResponse.FromString,
    )
    return channel, call


@pytest.mark.parametrize(
    "scheme, shape, dtype, params",
    [
        ("normal", (2048, 1024), torch.float32, {"std": 0.02}),  # 8 MiB: generated in pieces, copied as they land
        ("kaiming_uniform", (300, 70), torch.bfloat16, {"a": 5**0.5}),
        ("orthogonal", (96, 64), torch.float64, {}),
        ("trunc_normal", (3, 5), torch.float16, {"a": -1.0, "b": 1.0}),
        ("eye", (5, 7), torch.float32, {}),
    ],
)
def test_a_shared_memory_fetch_is_the_contract_tensor(shm_server, scheme, shape, dtype, params) -> None:
    before = leftovers()
    with shm_server.client(shared_memory=True) as client:
        for _ in range(2):  # generated, then from the cache
            result = client.fetch(shape, scheme, seed=17, dtype=dtype, **params)
            assert result.transport == "shared_memory"
            assert same_bytes(result.tensor, reference(scheme, shape, dtype=dtype, seed=17, **params))
    assert leftovers() == before  # every object's name was removed


def test_shared_memory_into_out_and_unseeded(shm_server) -> None:
    with shm_server.client(shared_memory=True) as client:
        out = torch.empty(64, 32)
        result = client.fetch((64, 32), "xavier_normal", seed=3, out=out)
        assert result.tensor is out and same_bytes(out, reference("xavier_normal", (64, 32), seed=3))
        drawn = client.fetch((40, 40), "uniform")  # the server draws the seed and reports it
        assert drawn.transport == "shared_memory"
        assert same_bytes(drawn.tensor, reference("uniform", (40, 40), seed=drawn.seed))
        assert client.describe().shared_memory_dir == "/dev/shm"
        zero = client.fetch((0, 4), "normal", seed=1)  # nothing to share: an ordinary unary call
        assert zero.transport == "unary" and zero.tensor.shape == (0, 4)


def test_a_server_without_shared_memory_is_used_over_grpc(server) -> None:
    with server.client(shared_memory=True) as client:
        assert client.describe().shared_memory_dir == ""
        result = client.fetch((1024, 512), "normal", seed=5)  # 2 MiB: streamed
        assert result.transport == "stream"
        assert same_bytes(result.tensor, reference("normal", (1024, 512), seed=5))
        assert client.fetch((8, 8), "normal", seed=5).transport == "unary"


def raw_error(target: str, request: pb.InitRequest) -> grpc.RpcError:
    channel, call = unary_call(target)
    with channel, pytest.raises(grpc.RpcError) as raised:
        call(request, timeout=CALL_TIMEOUT_SECONDS)
    return raised.value


NAME = "initserve-" + "0123456789abcdef" * 2


def test_what_the_server_refuses_to_open(shm_server, server, tmp_path) -> None:
    request = pb.InitRequest(scheme="normal", shape=[4, 4], seed=1, shared_memory=NAME)
    off = raw_error(server.target, request)
    assert off.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert off.details() == "this server does not write shared memory (start it with --shared-memory)"
    missing = raw_error(shm_server.target, request)
    assert missing.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert missing.details().startswith(f"no shared-memory object {NAME} in /dev/shm on this server's host")
    for bad in ("../../etc/passwd", "initserve-XYZ", NAME.upper(), NAME + "0"):
        error = raw_error(shm_server.target, pb.InitRequest(scheme="normal", shape=[4, 4], seed=1, shared_memory=bad))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "is not of the form initserve-<32 lowercase hex digits>" in error.details()
    # the wrong size, and a link (never followed: its target stays untouched)
    path = os.path.join("/dev/shm", NAME)
    try:
        with open(path, "wb") as region:
            region.write(b"\0" * 63)
        wrong = raw_error(shm_server.target, request)
        assert wrong.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert wrong.details() == f"shared-memory object {NAME} is 63 bytes; the tensor is 64 bytes"
        os.unlink(path)
        target = tmp_path / "victim"
        target.write_bytes(b"\0" * 64)
        os.symlink(target, path)
        link = raw_error(shm_server.target, request)
        assert link.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert link.details().startswith(f"cannot open shared-memory object {NAME}")
        assert target.read_bytes() == b"\0" * 64
    finally:
        if os.path.lexists(path):
            os.unlink(path)
    stream = initserve.Client(shm_server.target)._transport  # the Init stream does not take it
    with pytest.raises(initserve.InvalidArgument, match="shared_memory is answered by InitUnary"):
        list(stream.init_stream(request, CALL_TIMEOUT_SECONDS))


def test_a_region_that_differs_from_the_trailer_raises(shm_server) -> None:
    """The checksum is computed over the region: a byte changed after the server wrote it is caught."""
    shape = (16, 16)
    region = _shared.SharedRegion(16 * 16 * 4)
    try:
        with initserve.Client(shm_server.target) as client:
            request = pb.InitRequest(scheme="normal", shape=shape, seed=9)
            messages = client._transport.init_shared(request, region.name, CALL_TIMEOUT_SECONDS)
    finally:
        region.unlink()
    assembler = StreamAssembler(expected_shape=shape, expected_dtype=torch.float32, expected_seed=9)
    tensor, _ = _shared.receive(region, messages, assembler, shape, torch.float32)
    assert same_bytes(tensor, reference("normal", shape, seed=9))
    region.map[100] ^= 0x01
    with pytest.raises(IntegrityError, match="checksum mismatch: the shared-memory region differs") as raised:
        _shared.receive(region, messages, assembler, shape, torch.float32)
    assert raised.value.recovery == "restart"
    with pytest.raises(IntegrityError, match="exactly a header and a trailer"):
        _shared.receive(region, messages[:1], assembler, shape, torch.float32)

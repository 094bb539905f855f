"""The same-host transport: the server writes the tensor into the client's /dev/shm object, verified the same way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
import torch

import initserve
from initserve import _regions, _shared
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
    pool = _regions.RegionPool(0)
    region = pool.take(16 * 16 * 4)
    try:
        with initserve.Client(shm_server.target) as client:
            request = pb.InitRequest(scheme="normal", shape=shape, seed=9)
            messages = client._transport.init_shared(request, region.name, CALL_TIMEOUT_SECONDS)
    finally:
        region.unlink()
    assembler = StreamAssembler(expected_shape=shape, expected_dtype=torch.float32, expected_seed=9)
    tensor, _ = _shared.receive(pool, region, messages, assembler, shape, torch.float32)
    assert same_bytes(tensor, reference("normal", shape, seed=9))
    region.map[100] ^= 0x01
    with pytest.raises(IntegrityError, match="checksum mismatch: the shared-memory region differs") as raised:
        _shared.receive(pool, region, messages, assembler, shape, torch.float32)
    assert raised.value.recovery == "restart"
    with pytest.raises(IntegrityError, match="exactly a header and a trailer"):
        _shared.receive(pool, region, messages[:1], assembler, shape, torch.float32)


def test_freed_regions_are_reused_and_a_failed_attempt_s_region_is_not(shm_server) -> None:
    before = leftovers()
    shape = (256, 512)  # 512 KiB
    with shm_server.client(shared_memory=True, shared_memory_pool_bytes=4 << 20) as client:
        first = client.fetch(shape, "normal", seed=1).tensor
        second = client.fetch(shape, "normal", seed=2).tensor  # the first is alive: its region is not reused
        created = leftovers() - before
        assert len(created) == 2
        assert same_bytes(first, reference("normal", shape, seed=1))
        assert same_bytes(second, reference("normal", shape, seed=2))
        del first, second
        assert client._regions is not None and client._regions.free_bytes() == 2 * 512 * 1024
        for seed in (3, 4, 1):  # each into a region that held other bytes
            result = client.fetch(shape, "normal", seed=seed)
            assert result.transport == "shared_memory"
            assert same_bytes(result.tensor, reference("normal", shape, seed=seed))
            del result
        out = torch.empty(shape)
        assert client.fetch(shape, "normal", seed=5, out=out).tensor is out  # copied out: the region goes back
        assert same_bytes(out, reference("normal", shape, seed=5))
        assert leftovers() - before == created  # no region made after the first two
        with pytest.raises(RuntimeError, match="normal expects std >= 0.0"):
            client.fetch(shape, "normal", seed=6, std=-1.0)
        remaining = leftovers() - before
        assert len(remaining) == 1 and remaining < created
        assert client._regions.free_bytes() == 512 * 1024  # the failed attempt's region was removed, not pooled
    assert leftovers() == before


NO_SPACE_SCRIPT = """
import json, os, subprocess, sys
import grpc
import initserve
from initserve.v1 import initserve_pb2 as pb
from tests.conftest import reference, same_bytes, start_server

subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", "/dev/shm"], check=True)
server = start_server("--shared-memory")
found = {}
try:
    with server.client(shared_memory=True) as client:
        big = client.fetch((1024, 1024), "normal", seed=4)  # 4 MiB: /dev/shm holds 1
        found["big"] = [big.transport, same_bytes(big.tensor, reference("normal", (1024, 1024), seed=4))]
        small = client.fetch((64, 64), "normal", seed=4)
        found["small"] = [small.transport, same_bytes(small.tensor, reference("normal", (64, 64), seed=4))]
    name = "initserve-" + "ab" * 16
    with open(os.path.join("/dev/shm", name), "wb") as region:
        region.truncate(4 << 20)  # sparse: its pages do not fit
    channel = grpc.insecure_channel(server.target)
    call = channel.unary_unary(
        "/initserve.v1.InitService/InitUnary",
        request_serializer=pb.InitRequest.SerializeToString,
        response_deserializer=pb.InitUnaryResponse.FromString,
    )
    try:
        call(pb.InitRequest(scheme="normal", shape=[1024, 1024], seed=1, shared_memory=name), timeout=60)
    except grpc.RpcError as error:
        found["raw"] = [error.code().name, error.details()]
    channel.close()
    os.unlink(os.path.join("/dev/shm", name))
    found["alive"] = server.alive()
finally:
    server.stop()
print(json.dumps(found))
"""


def test_a_full_dev_shm_is_resource_exhausted_and_that_fetch_uses_grpc() -> None:
    """/dev/shm of 1 MiB in a private mount namespace (Docker's default is 64 MiB): before the server allocated
    the pages, its write into a sparse object there died of SIGBUS."""
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.decode().strip()}")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", NO_SPACE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": repo},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["big"] == ["stream", True]  # this fetch over gRPC...
    assert found["small"] == ["shared_memory", True]  # ...and shared memory still used where it fits
    name = "initserve-" + "ab" * 16
    assert found["raw"] == [
        "RESOURCE_EXHAUSTED",
        f"no space in /dev/shm for shared-memory object {name} (4194304 bytes): No space left on device",
    ]
    assert found["alive"] is True

"""The server process: Describe, health, reflection, flags and environment variables, signals."""

from __future__ import annotations

import importlib.util
import inspect
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

import initserve
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_server.config import DEFAULT_MAX_DIMS, header_room_bytes
from tests.conftest import ServerProcess, reference, same_bytes, start_server

SERVICE = "initserve.v1.InitService"


def test_describe_lists_every_scheme_with_torchs_own_defaults(client: initserve.Client) -> None:
    info = client.describe()
    assert info.api_version == "initserve.v1"
    assert info.torch_version == torch.__version__
    assert [s.name for s in info.schemes] == list(initserve.SCHEMES)
    for scheme in info.schemes:
        torch_params = inspect.signature(getattr(torch.nn.init, f"{scheme.name}_")).parameters
        expected = [p for name, p in torch_params.items() if name not in ("tensor", "generator")]
        assert [p.name for p in scheme.params] == [p.name for p in expected], scheme.name
        for described, torch_param in zip(scheme.params, expected, strict=True):
            if torch_param.default is inspect.Parameter.empty:
                assert described.required and described.default == ""
            else:
                assert not described.required
                assert described.default == repr(torch_param.default), (scheme.name, described.name)
        assert scheme.seeded == ("generator" in torch_params)
        assert scheme.torch_function == f"torch.nn.init.{scheme.name}_"
    assert "global RNG" in next(s.note for s in info.schemes if s.name == "sparse")
    assert list(info.dtypes) == [pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16]
    cpu = info.devices[0]
    assert cpu.device == "cpu"
    assert cpu.capability == torch.backends.cpu.get_cpu_capability()
    assert cpu.fingerprint.startswith("cpu/") and torch.__version__ in cpu.fingerprint
    assert info.checksum_algorithm == initserve.CHECKSUM_ALGORITHM


def test_health_and_reflection_are_served(server) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as raised:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
        descriptor = database.FindFileContainingSymbol(SERVICE)
        assert descriptor.package == "initserve.v1"


def test_flags_set_the_limits_that_describe_reports_and_requests_meet() -> None:
    running = start_server("--chunk-bytes", "1000", "--max-tensor-bytes", "64K", "--max-dims", "3")
    try:
        with running.client(unary_max_bytes=0) as client:  # streamed, in the default chunks
            limits = client.describe().limits
            assert (limits.default_chunk_bytes, limits.max_tensor_bytes, limits.max_dims) == (1000, 65536, 3)
            result = client.fetch((100, 50), "uniform", seed=1)
            assert result.header.chunk_bytes == 1000
            assert same_bytes(result.tensor, reference("uniform", (100, 50), seed=1))
            with pytest.raises(initserve.InvalidArgument, match=r"the limit is 65536 bytes \(max_tensor_bytes\)"):
                client.normal((129, 128))
            with pytest.raises(initserve.InvalidArgument, match=r"shape has 4 dims; the limit is 3 \(max_dims\)"):
                client.normal((1, 1, 1, 1))
    finally:
        assert running.stop() == 0


def test_environment_variables_configure_the_server() -> None:
    running = start_server(env={"INITSERVE_CHUNK_BYTES": "333", "INITSERVE_MAX_DIMS": "5"})
    try:
        with running.client(unary_max_bytes=0) as client:
            limits = client.describe().limits
            assert (limits.default_chunk_bytes, limits.max_dims) == (333, 5)
            assert client.fetch((10, 10), "normal", seed=0).header.chunk_bytes == 333
    finally:
        running.stop()


def test_a_flag_wins_over_its_environment_variable() -> None:
    running = start_server("--chunk-bytes", "444", env={"INITSERVE_CHUNK_BYTES": "333"})
    try:
        with running.client() as client:
            assert client.describe().limits.default_chunk_bytes == 444
    finally:
        running.stop()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "initserve_server", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_help_documents_every_flag_with_its_environment_twin() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    flags = re.findall(r"--([a-z][a-z-]+)", text)
    for flag in set(flags) - {"help", "version"}:
        assert f"INITSERVE_{flag.upper().replace('-', '_')}" in text, flag
    assert "50051" in text


@pytest.mark.parametrize(
    "args, env, message",
    [
        (("--port", "70000"), None, "port must be in 0..65535"),
        (("--chunk-bytes", "8M"), None, "chunk_bytes must be in 1..4194240"),
        (
            ("--cache-bytes", "1M", "--max-inflight-bytes", "2M", "--preallocate-bytes", "4M"),
            None,
            "preallocate_bytes must be in 0..cache_bytes + max_inflight_bytes (3145728), got 4194304",
        ),
        ((), {"INITSERVE_WORKERS": "many"}, "INITSERVE_WORKERS='many' is not a valid value"),
        pytest.param(
            ("--port", "0", "--triton-modules", "/nonexistent/triton-modules"),
            None,
            "initserve-server: /nonexistent/triton-modules holds no Triton modules (manifest.json: [Errno 2]",
            marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="without Triton it is ignored"),
        ),
    ],
)
def test_bad_configuration_exits_with_a_message(args, env, message: str) -> None:
    result = run_cli(*args, env=env)
    assert result.returncode != 0
    assert message in result.stderr


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "initserve-server"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "initserve-server 0.1.0"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_the_server_with_exit_status_zero(sig: int) -> None:
    running = start_server("--grace-seconds", "2")
    with running.client() as client:
        assert client.ones((2, 2)).sum().item() == 4
    assert running.stop(sig) == 0
    assert not running.alive()


# --- InitUnary: small tensors in one call ------------------------------------------------------------------------


def unary_request(shape: tuple[int, ...], seed: int = 3, offset: int = 0) -> pb.InitRequest:
    return pb.InitRequest(scheme="normal", shape=shape, seed=seed, offset=offset)


def test_init_unary_answers_the_streams_bytes_in_one_message(server) -> None:
    with grpc.insecure_channel(server.target) as channel:
        unary = channel.unary_unary(
            f"/{SERVICE}/InitUnary",
            request_serializer=pb.InitRequest.SerializeToString,
            response_deserializer=pb.InitUnaryResponse.FromString,
        )
        response = unary(unary_request((256, 256)), timeout=30)
        expected = reference("normal", (256, 256), seed=3)
        assert response.header.total_bytes == 256 * 256 * 4 and response.header.chunk_bytes == 256 * 256 * 4
        assert response.chunk.offset == 0 and response.chunk.data == expected.numpy().tobytes()
        assert response.trailer.checksum == initserve.tensor_checksum(response.chunk.data)
        # from an offset: the rest of the tensor, header and trailer of the whole
        rest = unary(unary_request((256, 256), offset=1000), timeout=30)
        assert rest.chunk.offset == 1000 and rest.chunk.data == response.chunk.data[1000:]
        assert (rest.header.offset, rest.trailer.checksum) == (1000, response.trailer.checksum)
        # zero bytes: no chunk at all
        empty = unary(unary_request((0, 5)), timeout=30)
        assert not empty.HasField("chunk") and empty.header.total_bytes == 0
        # past the limit: INVALID_ARGUMENT (as the proto says), naming it, marked so that a client streams instead
        limit = initserve.Client(server.target).describe().limits.max_unary_bytes
        assert limit == 1 << 20
        with pytest.raises(grpc.RpcError) as raised:
            unary(unary_request((513, 512)), timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ("initserve-refusal", "unary-too-large") in raised.value.trailing_metadata()
        mapped = initserve.from_grpc_error(raised.value)  # what the SDK raises: the reason kept, machine-readable
        assert isinstance(mapped, initserve.InvalidArgument) and mapped.refusal == "unary-too-large"
        assert raised.value.details() == (
            f"InitUnary answers at most {limit} bytes (max_unary_bytes); this request is {513 * 512 * 4} bytes "
            "from its offset: use Init, which streams"
        )


def test_the_client_streams_when_a_servers_messages_are_too_small_for_unary() -> None:
    small_messages = start_server("--max-message-bytes", "256K", "--chunk-bytes", "64K")
    try:
        with small_messages.client() as client:
            assert client.describe().limits.max_unary_bytes == (256 << 10) - header_room_bytes(DEFAULT_MAX_DIMS)
            shape = (200, 1000)  # 800,000 bytes: under the client's 1 MiB, over this server's unary limit
            result = client.fetch(shape, "normal", seed=4)
            assert same_bytes(result.tensor, reference("normal", shape, seed=4))
            assert result.header.chunk_bytes == 64 << 10  # streamed, in the server's default chunks
            small = client.fetch((8, 8), "normal", seed=4)  # from now on this client streams
            assert small.header.chunk_bytes == 64 << 10
    finally:
        small_messages.stop()


def test_unary_max_bytes_is_checked() -> None:
    with pytest.raises(ValueError, match=r"unary_max_bytes must be in 0\.\.1048576, got 1048577"):
        initserve.Client("127.0.0.1:1", unary_max_bytes=(1 << 20) + 1)


def test_the_manual_names_every_flag_and_its_environment_twin() -> None:
    from initserve_server.cli import build_parser

    manual = (Path(__file__).resolve().parents[2] / "docs" / "server.md").read_text()
    rows = [line for line in manual.splitlines() if line.startswith("| `--")]
    for action in build_parser()._actions:
        flag = next((option for option in action.option_strings if option.startswith("--")), None)
        if flag in (None, "--help", "--version"):
            continue
        env = "INITSERVE_" + flag[2:].upper().replace("-", "_")
        assert any(f"`{flag}`" in row and f"`{env}`" in row for row in rows), f"docs/server.md lacks {flag} / {env}"


def test_connections_are_closed_at_their_maximum_age_and_their_streams_finish() -> None:
    """--max-connection-age-seconds: the client's next calls come over a new connection (a new peer port, so a
    DNS name would be resolved again), while a stream that outlives the age still completes, unresumed."""
    running = start_server("--max-connection-age-seconds", "0.5")
    try:
        with running.client() as client:
            held = threading.Event()

            def hold_once(received: int, total: int) -> None:
                if not held.is_set():
                    held.set()
                    time.sleep(1.5)  # the stream is open past the connection's age (0.5 s and gRPC's jitter)

            long = client.fetch((512, 256), "normal", seed=3, chunk_bytes=4096, progress=hold_once)
            assert same_bytes(long.tensor, reference("normal", (512, 256), seed=3))
            assert long.attempts == 1 and long.transport == "stream"
            first_peer = peers(running)[-1]
            deadline = time.monotonic() + 20
            while peers(running)[-1] == first_peer and time.monotonic() < deadline:
                client.fetch((2, 2), "ones")
                time.sleep(0.05)
            assert peers(running)[-1] != first_peer  # the same client, reconnected
    finally:
        running.stop()


def peers(server: ServerProcess) -> list[str]:
    """The peer of every access line the server wrote so far (its access log is written by a thread)."""
    return [line.rsplit(" peer=", 1)[1].strip().strip('"') for line in list(server.output) if " peer=" in line]

"""Errors end to end: torch's exceptions through the service, validation statuses, a server that survives them."""

from __future__ import annotations

import math
import socket
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

import initserve
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_protocol.v1 import initserve_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess, reference, same_bytes

SEED = 20240917
SERVICE = "initserve.v1.InitService"
INIT_METHOD = f"/{SERVICE}/Init"
# The trailing-metadata key is wire contract, so it is spelled out here rather than imported.
TORCH_EXCEPTION_KEY = "initserve-torch-exception"
RPC_TIMEOUT_SECONDS = 30.0
MAX_REQUEST_BYTES = 4 << 20  # initserve_server.config.MAX_REQUEST_BYTES, as Describe reports it
DEFAULT_MAX_TENSOR_BYTES = 4 << 30
SCHEME_LIST = ", ".join(initserve.SCHEMES)
DTYPE_LIST = "float32, float64, float16, bfloat16"
DEVICE_FORMS = "is not one of 'cpu', 'cuda', 'cuda:N'"
NON_FINITE = "initserve refuses non-finite parameters (only trunc_normal's bounds a and b may be infinite)"
nan, inf = math.nan, math.inf


# --- fixtures and helpers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as opened:
        yield opened


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.InitServiceStub:
    return pb_grpc.InitServiceStub(channel)


@pytest.fixture(scope="module")
def cpu_fingerprint(stub: pb_grpc.InitServiceStub) -> str:
    info = stub.Describe(pb.DescribeRequest(), timeout=RPC_TIMEOUT_SECONDS)
    assert info.devices[0].device == "cpu"
    return info.devices[0].fingerprint


@pytest.fixture(autouse=True)
def server_still_serves(server: ServerProcess, channel: grpc.Channel) -> Iterator[None]:
    """After every test, however bad its requests: health says SERVING and a real request gives exact bytes."""
    yield
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_SECONDS)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    with server.client() as client:
        tensor = client.normal((16, 8), seed=SEED, mean=0.5, std=2.0)
    assert same_bytes(tensor, reference("normal", (16, 8), seed=SEED, mean=0.5, std=2.0))
    assert server.alive()


def rpc_error(stub: pb_grpc.InitServiceStub, request: pb.InitRequest) -> grpc.RpcError:
    """The RpcError an Init stream ends with (the test fails if the stream completes)."""
    with pytest.raises(grpc.RpcError) as raised:
        for _ in stub.Init(request, timeout=RPC_TIMEOUT_SECONDS):
            pass
    return raised.value


def torch_exception_names(error: grpc.RpcError) -> list[str]:
    return [value for key, value in error.trailing_metadata() or () if key == TORCH_EXCEPTION_KEY]


def init_request(scheme: str, shape: tuple[int, ...], dtype: torch.dtype, params: dict[str, Any]) -> pb.InitRequest:
    wire_dtype = {
        torch.float32: pb.DTYPE_FLOAT32,
        torch.float64: pb.DTYPE_FLOAT64,
        torch.float16: pb.DTYPE_FLOAT16,
        torch.bfloat16: pb.DTYPE_BFLOAT16,
    }[dtype]
    return pb.InitRequest(scheme=scheme, shape=shape, dtype=wire_dtype, params=pb.InitParams(**params), seed=SEED)


def local_torch_error(scheme: str, shape: tuple[int, ...], dtype: torch.dtype, params: dict[str, Any]) -> Exception:
    """What torch.nn.init.<scheme>_ on torch.empty(shape, dtype) with a seeded generator raises here."""
    kwargs = dict(params)
    if initserve.SCHEMES[scheme].seeded:
        kwargs["generator"] = torch.Generator().manual_seed(SEED)
    try:
        getattr(torch.nn.init, f"{scheme}_")(torch.empty(shape, dtype=dtype), **kwargs)
    except Exception as error:  # noqa: BLE001 - whatever torch raises is the expectation
        return error
    raise AssertionError(f"torch accepted {scheme}{shape} {dtype} {params}; not an error case")


# --- what torch rejects comes back as torch raised it ------------------------------------------------------------

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (id, scheme, shape, dtype, params): every one raises in local torch.
TORCH_ERRORS: list[tuple[str, str, tuple[int, ...], torch.dtype, dict[str, Any]]] = [
    ("xavier_uniform-1d", "xavier_uniform", (5,), F32, {}),
    ("xavier_normal-0d", "xavier_normal", (), F32, {}),
    ("kaiming_uniform-1d", "kaiming_uniform", (5,), F32, {}),
    ("kaiming_normal-1d", "kaiming_normal", (5,), F32, {}),
    ("eye-3d", "eye", (2, 2, 2), F32, {}),
    ("eye-1d", "eye", (4,), F32, {}),
    ("dirac-2d", "dirac", (2, 2), F32, {}),
    ("dirac-6d", "dirac", (1, 1, 1, 1, 1, 1), F32, {}),
    ("dirac-groups-not-dividing-dim0", "dirac", (3, 2, 2), F32, {"groups": 2}),
    ("dirac-groups-0-zero-division", "dirac", (3, 2, 2), F32, {"groups": 0}),
    ("sparse-3d", "sparse", (2, 2, 2), F32, {"sparsity": 0.1}),
    ("sparse-sparsity-nan", "sparse", (4, 3), F32, {"sparsity": nan}),
    ("orthogonal-1d", "orthogonal", (4,), F32, {}),
    ("unknown-nonlinearity", "kaiming_uniform", (3, 3), F32, {"nonlinearity": "swish"}),
    ("empty-nonlinearity-is-sent", "kaiming_normal", (3, 3), F32, {"nonlinearity": ""}),
    ("mode-fan_x", "kaiming_normal", (3, 3), F32, {"mode": "fan_x"}),
    ("empty-mode-is-sent", "kaiming_uniform", (3, 3), F32, {"mode": ""}),
    ("mode-of-64-chars-reaches-torch", "kaiming_uniform", (3, 3), F32, {"mode": "f" * 64}),
    ("leaky_relu-with-bad-mode", "kaiming_uniform", (3, 3), F32, {"a": 0.2, "mode": "fan_avg"}),
    ("orthogonal-float16", "orthogonal", (4, 4), F16, {}),
    ("orthogonal-bfloat16", "orthogonal", (4, 4), BF16, {}),
    ("normal-std-negative", "normal", (3, 3), F32, {"std": -1.0}),
    ("normal-std-nan-torch-raises-first", "normal", (3, 3), F32, {"std": nan}),
    ("xavier_uniform-gain-inf-torch-raises-first", "xavier_uniform", (3, 3), F32, {"gain": inf}),
    ("uniform-a-above-b", "uniform", (3, 3), F32, {"a": 2.0, "b": 1.0}),
    ("uniform-a-minus-inf", "uniform", (3, 3), F32, {"a": -inf}),
    ("trunc_normal-std-0-zero-division", "trunc_normal", (3, 3), F32, {"std": 0.0}),
    ("trunc_normal-b-minus-inf", "trunc_normal", (3, 3), F32, {"b": -inf}),
    ("constant-1e300-float16", "constant", (3, 3), F16, {"val": 1e300}),
    ("constant-1e300-bfloat16", "constant", (3, 3), BF16, {"val": 1e300}),
    ("constant-1e300-float32", "constant", (3, 3), F32, {"val": 1e300}),
    # Zero elements pass the service's byte limit; torch.empty itself refuses the strides.
    ("zero-numel-stride-overflow", "normal", (0, 1 << 62, 1 << 62), F32, {}),
    # torch raises OverflowError for these (Python float arithmetic inside torch.nn.init).
    ("kaiming_normal-a-1e200-overflow", "kaiming_normal", (3, 3), F32, {"a": 1e200}),
    ("trunc_normal-mean-1e200-overflow", "trunc_normal", (3, 3), F32, {"mean": 1e200}),
    ("sparse-sparsity-inf-overflow", "sparse", (4, 3), F32, {"sparsity": inf}),
]
TORCH_ERROR_PARAMS = [pytest.param(*case[1:], id=case[0]) for case in TORCH_ERRORS]


@pytest.mark.parametrize(
    ("scheme", "shape", "dtype", "params"),
    TORCH_ERROR_PARAMS,
)
def test_client_raises_the_exception_torch_raises(
    client: initserve.Client, scheme: str, shape: tuple[int, ...], dtype: torch.dtype, params: dict[str, Any]
) -> None:
    expected = local_torch_error(scheme, shape, dtype, params)
    with pytest.raises(type(expected)) as raised:
        client.fetch(shape, scheme, seed=SEED, dtype=dtype, **params)
    assert type(raised.value) is type(expected)
    assert str(raised.value) == str(expected)
    assert isinstance(raised.value.__cause__, grpc.RpcError)


@pytest.mark.parametrize(
    ("scheme", "shape", "dtype", "params"),
    TORCH_ERROR_PARAMS,
)
def test_torch_errors_are_invalid_argument_naming_the_exception_in_trailing_metadata(
    stub: pb_grpc.InitServiceStub, scheme: str, shape: tuple[int, ...], dtype: torch.dtype, params: dict[str, Any]
) -> None:
    expected = local_torch_error(scheme, shape, dtype, params)
    error = rpc_error(stub, init_request(scheme, shape, dtype, params))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == str(expected)
    assert torch_exception_names(error) == [type(expected).__name__]


def test_in_place_drop_ins_raise_what_torch_raises(client: initserve.Client) -> None:
    for scheme, shape, kwargs in (("eye", (2, 2, 2), {}), ("xavier_uniform", (5,), {"gain": 2.0})):
        expected = local_torch_error(scheme, shape, torch.float32, kwargs)
        with pytest.raises(type(expected)) as raised:
            getattr(client, f"{scheme}_")(torch.empty(shape), **kwargs)
        assert type(raised.value) is type(expected)
        assert str(raised.value) == str(expected)


# --- service-level validation: exact statuses and messages --------------------------------------------------------


def request(scheme: str = "normal", shape: tuple[int, ...] = (2, 3), **fields: Any) -> pb.InitRequest:
    params = fields.pop("params", {})
    return pb.InitRequest(scheme=scheme, shape=shape, params=pb.InitParams(**params), **fields)


INVALID = grpc.StatusCode.INVALID_ARGUMENT
# (id, request, exact details)
VALIDATION_ERRORS: list[tuple[str, pb.InitRequest, str]] = [
    ("empty-scheme", request(""), f"scheme is empty; use one of: {SCHEME_LIST}"),
    ("unknown-scheme", request("xavier"), f"unknown scheme 'xavier'; use one of: {SCHEME_LIST}"),
    ("trailing-underscore-scheme", request("normal_"), f"unknown scheme 'normal_'; use one of: {SCHEME_LIST}"),
    (
        "long-scheme-is-not-echoed-whole",
        request("x" * 1000),
        f"unknown scheme '{'x' * 64}...'; use one of: {SCHEME_LIST}",
    ),
    ("dtype-99", request(dtype=99), f"dtype 99 is not served; use one of: {DTYPE_LIST}"),
    ("dtype-minus-1", request(dtype=-1), f"dtype -1 is not served; use one of: {DTYPE_LIST}"),
    ("negative-dim", request(shape=(3, -1)), "shape[1] is -1; dimensions must be >= 0"),
    ("17-dims", request(shape=(1,) * 17), "shape has 17 dims; the limit is 16 (max_dims)"),
    (
        "numel-past-int64",
        request(shape=(1 << 40, 1 << 40)),
        f"shape [{1 << 40}, {1 << 40}] is {1 << 80} elements, {1 << 82} bytes of float32; "
        f"the limit is {DEFAULT_MAX_TENSOR_BYTES} bytes (max_tensor_bytes)",
    ),
    (
        # 2**64 elements is 0 in wrapped int64 arithmetic: the check must not wrap.
        "numel-wrapping-to-zero-in-int64",
        request(shape=(1 << 32, 1 << 32)),
        f"shape [{1 << 32}, {1 << 32}] is {1 << 64} elements, {1 << 66} bytes of float32; "
        f"the limit is {DEFAULT_MAX_TENSOR_BYTES} bytes (max_tensor_bytes)",
    ),
    (
        "one-element-over-max-tensor-bytes",
        request(shape=((1 << 30) + 1,)),
        f"shape [{(1 << 30) + 1}] is {(1 << 30) + 1} elements, {DEFAULT_MAX_TENSOR_BYTES + 4} bytes of float32; "
        f"the limit is {DEFAULT_MAX_TENSOR_BYTES} bytes (max_tensor_bytes)",
    ),
    (
        "float64-counts-8-bytes",
        request(shape=((1 << 29) + 1,), dtype=pb.DTYPE_FLOAT64),
        f"shape [{(1 << 29) + 1}] is {(1 << 29) + 1} elements, {DEFAULT_MAX_TENSOR_BYTES + 8} bytes of float64; "
        f"the limit is {DEFAULT_MAX_TENSOR_BYTES} bytes (max_tensor_bytes)",
    ),
    (
        "normal-with-gain",
        request(params={"gain": 1.0}),
        "scheme 'normal' does not take parameter 'gain' (it takes: mean, std)",
    ),
    (
        "ones-with-val",
        request("ones", params={"val": 1.0}),
        "scheme 'ones' does not take parameter 'val' (it takes: no parameters)",
    ),
    ("constant-without-val", request("constant"), "scheme 'constant' requires parameter 'val'"),
    (
        "sparse-without-sparsity",
        request("sparse", params={"std": 0.1}),
        "scheme 'sparse' requires parameter 'sparsity'",
    ),
    (
        "mode-of-65-chars",
        request("kaiming_uniform", params={"mode": "f" * 65}),
        "parameter 'mode' is 65 characters; the limit is 64",
    ),
    (
        "nonlinearity-of-1000-chars",
        request("kaiming_normal", params={"nonlinearity": "r" * 1000}),
        "parameter 'nonlinearity' is 1000 characters; the limit is 64",
    ),
    ("device-gpu", request(device="gpu"), f"device 'gpu' {DEVICE_FORMS}"),
    ("device-cuda-x", request(device="cuda:x"), f"device 'cuda:x' {DEVICE_FORMS}"),
    ("device-cuda-minus-1", request(device="cuda:-1"), f"device 'cuda:-1' {DEVICE_FORMS}"),
    ("device-CPU", request(device="CPU"), f"device 'CPU' {DEVICE_FORMS}"),
    ("device-cuda-colon", request(device="cuda:"), f"device 'cuda:' {DEVICE_FORMS}"),
    ("device-padded", request(device=" cpu"), f"device ' cpu' {DEVICE_FORMS}"),
    ("device-1000-chars", request(device="c" * 1000), f"device '{'c' * 32}...' {DEVICE_FORMS}"),
    ("normal-mean-nan", request(params={"mean": nan}), f"parameter 'mean' is nan; {NON_FINITE}"),
    ("normal-std-inf", request(params={"std": inf}), f"parameter 'std' is inf; {NON_FINITE}"),
    ("constant-val-inf", request("constant", params={"val": inf}), f"parameter 'val' is inf; {NON_FINITE}"),
    ("constant-val-minus-inf", request("constant", params={"val": -inf}), f"parameter 'val' is -inf; {NON_FINITE}"),
    ("orthogonal-gain-nan", request("orthogonal", params={"gain": nan}), f"parameter 'gain' is nan; {NON_FINITE}"),
    ("trunc_normal-mean-nan", request("trunc_normal", params={"mean": nan}), f"parameter 'mean' is nan; {NON_FINITE}"),
    ("kaiming_normal-a-inf", request("kaiming_normal", params={"a": inf}), f"parameter 'a' is inf; {NON_FINITE}"),
    (
        "xavier_normal-gain-inf",
        request("xavier_normal", params={"gain": inf}),
        f"parameter 'gain' is inf; {NON_FINITE}",
    ),
]


@pytest.mark.parametrize(
    ("bad_request", "message"), [pytest.param(case[1], case[2], id=case[0]) for case in VALIDATION_ERRORS]
)
def test_validation_errors_are_invalid_argument_naming_the_field_and_limit(
    stub: pb_grpc.InitServiceStub, bad_request: pb.InitRequest, message: str
) -> None:
    error = rpc_error(stub, bad_request)
    assert error.code() == INVALID
    assert error.details() == message
    assert torch_exception_names(error) == []


def test_non_finite_params_torch_accepts_really_are_accepted_by_torch() -> None:
    """The NaN/inf cases above reach check_finite only because torch itself does not raise for them."""
    for _, bad_request, message in VALIDATION_ERRORS:
        if NON_FINITE not in message:
            continue
        params = {field.name: value for field, value in bad_request.params.ListFields()}
        tensor = reference(bad_request.scheme, tuple(bad_request.shape), seed=SEED, **params)
        assert tensor.shape == tuple(bad_request.shape)


def test_trunc_normal_accepts_infinite_bounds(client: initserve.Client) -> None:
    tensor = client.trunc_normal((64, 32), a=-inf, b=inf, mean=1.0, std=3.0, seed=SEED)
    assert same_bytes(tensor, reference("trunc_normal", (64, 32), seed=SEED, a=-inf, b=inf, mean=1.0, std=3.0))
    assert torch.isfinite(tensor).all()


def test_chunk_bytes_over_the_limit_is_invalid_and_the_limit_itself_is_served(
    client: initserve.Client, stub: pb_grpc.InitServiceStub
) -> None:
    limits = client.describe().limits
    assert limits.max_chunk_bytes == limits.max_message_bytes - 64
    over = limits.max_chunk_bytes + 1
    error = rpc_error(stub, request(chunk_bytes=over))
    assert error.code() == INVALID
    assert error.details() == (
        f"chunk_bytes {over} exceeds the limit {limits.max_chunk_bytes} "
        f"(max_message_bytes {limits.max_message_bytes} less framing)"
    )
    assert torch_exception_names(error) == []
    result = client.fetch((8, 8), "normal", seed=SEED, chunk_bytes=limits.max_chunk_bytes)
    assert result.header.chunk_bytes == limits.max_chunk_bytes
    assert same_bytes(result.tensor, reference("normal", (8, 8), seed=SEED))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this server has CUDA")
@pytest.mark.parametrize(
    "device",
    [
        "cuda",
        "cuda:0",
        "cuda:1",
        "cuda:0000",
        "cuda:127",
        "cuda:128",
        "cuda:256",
        "cuda:9999",
    ],
)
def test_cuda_device_on_a_cpu_only_server_is_failed_precondition(stub: pb_grpc.InitServiceStub, device: str) -> None:
    error = rpc_error(stub, request(device=device))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    index = int(device.partition(":")[2] or 0)
    assert error.details() == (
        f"device 'cuda:{index}' requested but this server has no CUDA (torch {torch.__version__}, "
        f"cuda available: False); generating elsewhere would give different bytes"
    )
    assert torch_exception_names(error) == []


def test_device_fingerprint_mismatch_is_failed_precondition(
    stub: pb_grpc.InitServiceStub, cpu_fingerprint: str
) -> None:
    for required in ("cpu/other/AVX2/torch-0.0", cpu_fingerprint + " ", cpu_fingerprint.upper()):
        error = rpc_error(stub, request(require_device_fingerprint=required, seed=SEED))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error.details() == (
            f"device fingerprint mismatch: the request requires {required!r}, this server's cpu is {cpu_fingerprint!r}"
        )
        assert torch_exception_names(error) == []
    long_required = "f" * 1000
    error = rpc_error(stub, request(require_device_fingerprint=long_required))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"requires '{'f' * 200}...'" in error.details()
    assert len(error.details()) < 400


def test_device_fingerprint_match_generates(server: ServerProcess, cpu_fingerprint: str) -> None:
    with server.client(require_device_fingerprint=cpu_fingerprint) as client:
        result = client.fetch((32, 16), "kaiming_uniform", seed=SEED, mode="fan_out")
        assert result.device.fingerprint == cpu_fingerprint
        assert same_bytes(result.tensor, reference("kaiming_uniform", (32, 16), seed=SEED, mode="fan_out"))
    with server.client() as client:
        tensor = client.fetch((4, 4), "eye", require_device_fingerprint=cpu_fingerprint).tensor
        assert same_bytes(tensor, reference("eye", (4, 4)))


# --- requests that never reach the servicer ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\xff\xff\xff", id="truncated-varint-tag"),
        pytest.param(b"\x0a\x05ab", id="length-past-the-end"),
        pytest.param(b"\x0a\x01\xff", id="scheme-not-utf8"),
    ],
)
def test_bytes_that_are_not_an_init_request_are_refused(channel: grpc.Channel, payload: bytes) -> None:
    with pytest.raises(DecodeError):  # the payloads really are not InitRequests
        pb.InitRequest.FromString(payload)
    raw_init = channel.unary_stream(INIT_METHOD, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as raised:
        list(raw_init(payload, timeout=RPC_TIMEOUT_SECONDS))
    # The server parses the bytes itself, so garbage is the client's error, not grpc's INTERNAL.
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(f"request is not a valid initserve.v1 message ({len(payload)} bytes): ")
    assert torch_exception_names(raised.value) == []


def test_raw_bytes_that_parse_reach_the_servicer(channel: grpc.Channel) -> None:
    """The control for the garbage test: the same raw call path with valid (empty) bytes is validated normally."""
    raw_init = channel.unary_stream(INIT_METHOD, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as raised:
        list(raw_init(b"", timeout=RPC_TIMEOUT_SECONDS))
    assert raised.value.code() == INVALID
    assert raised.value.details() == f"scheme is empty; use one of: {SCHEME_LIST}"


def test_a_request_over_the_request_limit_is_resource_exhausted(channel: grpc.Channel) -> None:
    oversized = pb.InitRequest(scheme="normal", shape=[1 << 62] * 500_000).SerializeToString()
    assert len(oversized) > MAX_REQUEST_BYTES
    raw_init = channel.unary_stream(INIT_METHOD, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as raised:
        list(raw_init(oversized, timeout=RPC_TIMEOUT_SECONDS))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(MAX_REQUEST_BYTES) in raised.value.details()
    # Just under the limit, the request is parsed and refused by validation instead.
    just_under = pb.InitRequest(scheme="normal", shape=[1] * 2_000_000).SerializeToString()
    assert len(just_under) < MAX_REQUEST_BYTES
    with pytest.raises(grpc.RpcError) as raised:
        list(raw_init(just_under, timeout=RPC_TIMEOUT_SECONDS))
    assert raised.value.code() == INVALID
    assert raised.value.details() == "shape has 2000000 dims; the limit is 16 (max_dims)"


# --- the client's error types ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda c: c.normal((1,) * 17), "shape has 17 dims; the limit is 16 (max_dims)", id="max-dims"),
        pytest.param(lambda c: c.normal((4, -2)), "shape[1] is -2; dimensions must be >= 0", id="negative-dim"),
        pytest.param(lambda c: c.normal((2, 2), device="gpu"), f"device 'gpu' {DEVICE_FORMS}", id="device"),
        pytest.param(
            lambda c: c.constant((2, 2), val=inf), f"parameter 'val' is inf; {NON_FINITE}", id="constant-val-inf"
        ),
        pytest.param(
            lambda c: c.kaiming_normal((2, 2), nonlinearity="n" * 65),
            "parameter 'nonlinearity' is 65 characters; the limit is 64",
            id="string-param-limit",
        ),
    ],
)
def test_client_maps_validation_errors_to_invalid_argument(client: initserve.Client, call: Any, message: str) -> None:
    with pytest.raises(initserve.InvalidArgument) as raised:
        call(client)
    error = raised.value
    assert isinstance(error, ValueError) and isinstance(error, initserve.InitServeError)
    assert error.code == "INVALID_ARGUMENT"
    assert str(error) == error.message == message
    assert isinstance(error.__cause__, grpc.RpcError)
    assert error.__cause__.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_client_maps_failed_precondition(server: ServerProcess, cpu_fingerprint: str) -> None:
    with server.client(require_device_fingerprint="cpu/elsewhere") as client:
        with pytest.raises(initserve.FailedPrecondition) as raised:
            client.normal((2, 2), seed=SEED)
    error = raised.value
    assert not isinstance(error, ValueError)
    assert error.code == "FAILED_PRECONDITION"
    assert str(error) == (
        f"device fingerprint mismatch: the request requires 'cpu/elsewhere', this server's cpu is {cpu_fingerprint!r}"
    )
    if not torch.cuda.is_available():
        with server.client() as client:
            with pytest.raises(
                initserve.FailedPrecondition, match=r"^device 'cuda:0' requested but this server has no"
            ):
                client.normal((2, 2), seed=SEED, device="cuda")


@pytest.fixture()
def silent_listener() -> Iterator[socket.socket]:
    """A TCP port that accepts connections and never answers: any connection attempt can be seen."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(0.5)
        yield listener


def connection_arrived(listener: socket.socket) -> bool:
    try:
        connection, _ = listener.accept()
    except TimeoutError:
        return False
    connection.close()
    return True


LOCAL_ERRORS = [
    pytest.param(
        lambda c: c.normal((2, 3.0)), TypeError, "shape must contain ints, got 3.0 in (2, 3.0)", id="float-dim"
    ),
    pytest.param(
        lambda c: c.normal(2.0), TypeError, "shape must be an int or a sequence of ints, not float", id="float"
    ),
    pytest.param(lambda c: c.normal((2, True)), TypeError, "shape must contain ints, got True in (2, True)", id="bool"),
    pytest.param(lambda c: c.normal((2, 3), mean="0"), TypeError, "normal(): mean must be a number, not str", id="str"),
    pytest.param(
        lambda c: c.kaiming_normal((2, 3), mode=1), TypeError, "kaiming_normal(): mode must be a str, not int", id="int"
    ),
    pytest.param(
        lambda c: c.dirac((2, 2, 2), groups=1.0), TypeError, "dirac(): groups must be an int, not float", id="groups"
    ),
    pytest.param(
        lambda c: c.normal((2, 3), gain=1.0), TypeError, "got an unexpected keyword argument 'gain'", id="keyword"
    ),
    pytest.param(
        lambda c: c.fetch((2, 3), "normal", gain=1.0),
        TypeError,
        "normal() got an unexpected parameter 'gain' (it takes: mean, std)",
        id="fetch-keyword",
    ),
    # Python 3.11 says "missing a required argument: 'val'", 3.12 "missing a required keyword-only argument: 'val'"
    pytest.param(lambda c: c.constant((2, 2)), TypeError, "argument: 'val'", id="missing-val"),
    pytest.param(lambda c: c.normal((2,), seed=1.5), TypeError, "seed must be an int, not float", id="seed-float"),
    pytest.param(
        lambda c: c.normal((2,), seed=1 << 64),
        ValueError,
        f"seed must be in [-2**63, 2**64), got {1 << 64}",
        id="2**64",
    ),
    pytest.param(
        lambda c: c.normal((2,), seed=-(1 << 63) - 1),
        ValueError,
        f"seed must be in [-2**63, 2**64), got {-(1 << 63) - 1}",
        id="-2**63-1",
    ),
    pytest.param(
        lambda c: c.fetch((2,), "normal_"), ValueError, "unknown scheme 'normal_'; use one of: ", id="unknown-scheme"
    ),
    pytest.param(lambda c: c.normal((1 << 63,)), ValueError, str(1 << 63), id="dim-past-int64"),
]


@pytest.mark.parametrize(("call", "error_type", "message"), LOCAL_ERRORS)
def test_client_side_errors_never_contact_the_server(
    silent_listener: socket.socket, call: Any, error_type: type[Exception], message: str
) -> None:
    host, port = silent_listener.getsockname()
    with initserve.Client(f"{host}:{port}", timeout=2.0) as client:
        with pytest.raises(error_type) as raised:
            call(client)
    assert type(raised.value) is error_type
    assert message in str(raised.value)
    assert not connection_arrived(silent_listener)


def test_the_silent_listener_sees_a_real_call(silent_listener: socket.socket) -> None:
    """The control for the test above: a valid call to the same listener does connect (and then times out)."""
    host, port = silent_listener.getsockname()
    with initserve.Client(f"{host}:{port}", timeout=0.5) as client:
        with pytest.raises(initserve.InitServeError):
            client.normal((2,), seed=1)
    assert connection_arrived(silent_listener)


@pytest.mark.parametrize("seed", [0, (1 << 64) - 1, -(1 << 63), -1, 1 << 63])
def test_seeds_at_the_edges_of_the_range_are_served(client: initserve.Client, seed: int) -> None:
    result = client.fetch((8, 4), "uniform", seed=seed)
    assert result.seed == seed % (1 << 64)
    assert same_bytes(result.tensor, reference("uniform", (8, 4), seed=seed))

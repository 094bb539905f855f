"""Property-based fuzzing of Init against one real server, through raw gRPC.

(a) Structured InitRequests from strategies (valid and invalid schemes, shapes with negative, huge and too many
    dimensions, unknown dtype values, parameters that are NaN, infinite, huge or the wrong kind, seeds, device
    strings, chunk sizes, offsets): the status is never INTERNAL or UNKNOWN; an OK stream is well formed and its
    bytes equal the local torch reference; where the server reports the exception torch raised, local torch
    raises it too.
(b) Raw bytes that are not an InitRequest: the server parses requests itself (servicer.add_to_server), so bytes
    that do not parse are answered INVALID_ARGUMENT with "request is not a valid initserve.v1 message (N bytes):
    <the parser's error>", never grpc's own INTERNAL for a deserializer failure. Bytes that do parse are treated
    as the request they parse to, and meet (a)'s properties.
(c) Afterwards the server is healthy, logged no unexpected error, and still returns exact bytes.

The server runs with a 16 KiB tensor limit, so every valid request is small (a 1-byte chunk size still means at
most 16384 messages) and its reference cheap, and with no cache: sequential examples then never share a
generation, and every OK result is generated for its own request (the cache is covered by test_cache.py and
test_limits.py).
"""

from __future__ import annotations

import builtins
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import initserve
from initserve._errors import TORCH_EXCEPTION_TYPES
from initserve._schemes import PARAM_NAMES, SCHEMES
from initserve.v1 import initserve_pb2 as pb
from tests.conftest import ServerProcess, reference, same_bytes, start_server

INIT_METHOD = "/initserve.v1.InitService/Init"
RPC_TIMEOUT_SECONDS = 60.0
MAX_TENSOR_BYTES = 16 << 10
TORCH_EXCEPTION_KEY = "initserve-torch-exception"
INT64_MIN, INT64_MAX, UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1
# What the server may answer a request it cannot serve: nothing else, and never INTERNAL or UNKNOWN.
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,  # validation, or torch's own error
    grpc.StatusCode.OUT_OF_RANGE,  # a resume offset past the end
    grpc.StatusCode.FAILED_PRECONDITION,  # a CUDA device this server lacks, a fingerprint it does not have
}
DTYPES = {
    pb.DTYPE_UNSPECIFIED: torch.float32,
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT64: torch.float64,
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
}
# The local reference runs torch, which warns about some fuzzed trunc_normal bounds; the server's answer is the point.
pytestmark = pytest.mark.filterwarnings("ignore:mean is more than 2 std:UserWarning")
FUZZ_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- strategies -----------------------------------------------------------------------------------------------------


def mostly(usual: st.SearchStrategy, unusual: st.SearchStrategy, weight: int = 5) -> st.SearchStrategy:
    """``usual`` about ``weight`` times as often as ``unusual``: enough valid requests to check exactness on."""
    return st.sampled_from([True] * weight + [False]).flatmap(lambda common: usual if common else unusual)


EDGE_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-300, 5e-324, 1e308, -1e308, math.inf, -math.inf, math.nan]
floats = st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(-10, 10), st.floats(allow_nan=True, allow_infinity=True))
ints64 = st.one_of(st.integers(-2, 4), st.sampled_from([INT64_MIN, INT64_MAX]), st.integers(INT64_MIN, INT64_MAX))
NONLINEARITIES = ["relu", "leaky_relu", "tanh", "linear", "sigmoid", "selu", "conv2d", "conv_transpose3d"]
strings = {
    "mode": mostly(st.sampled_from(["fan_in", "fan_out"]), st.one_of(st.sampled_from(["", "FAN_IN"]), st.text())),
    "nonlinearity": mostly(st.sampled_from(NONLINEARITIES), st.text(max_size=80), weight=3),
}
PARAM_VALUES = {name: strings.get(name, ints64 if name == "groups" else floats) for name in PARAM_NAMES}
scheme_names = mostly(
    st.sampled_from(list(SCHEMES)),
    st.one_of(
        st.sampled_from(["", "normal_", "Normal", " normal", "kaiming", "eye\x00", "torch.nn.init.normal_", "é" * 70]),
        st.text(max_size=80),
    ),
)
small_dims = st.integers(0, 8)
dims = st.one_of(
    small_dims,
    st.integers(9, 300),
    st.integers(INT64_MIN, -1),
    st.sampled_from([1 << 31, 1 << 32, 1 << 62, INT64_MAX]),
)
shapes = mostly(st.lists(st.integers(1, 8), min_size=2, max_size=4), st.lists(dims, max_size=20), weight=3)
dtypes = mostly(st.sampled_from(list(DTYPES)), st.integers(-(1 << 31), (1 << 31) - 1))
devices = mostly(
    st.sampled_from(["", "cpu"]),
    st.one_of(
        st.sampled_from(["cuda", "cuda:0", "cuda:1", "cuda:127", "cuda:128", "cuda:9999", "cuda:99999", "CPU"]),
        st.sampled_from(["cpu:0", "meta", "mps", "cuda:-1", "cuda:", " cpu", "cuda:00", "cuda:\u0661"]),
        st.text(max_size=40),
    ),
)
chunk_sizes = mostly(
    st.one_of(st.just(0), st.integers(1, 4096)),
    st.one_of(st.integers(1, 64), st.integers(4096, 5 << 20), st.integers(0, UINT64_MAX)),
)
offsets = mostly(st.one_of(st.just(0), st.integers(0, 64)), st.integers(0, UINT64_MAX))


@st.composite
def init_requests(draw: st.DrawFn) -> pb.InitRequest:
    scheme = draw(scheme_names)
    request = pb.InitRequest(scheme=scheme, dtype=draw(dtypes), device=draw(devices))
    request.shape.extend(draw(shapes))
    # Mostly the scheme's own parameters (so many requests are valid), sometimes any at all.
    own = list(SCHEMES[scheme].param_names) if scheme in SCHEMES else []
    names = draw(st.one_of(st.lists(st.sampled_from(own), unique=True) if own else st.just([]), st.just([])))
    names += draw(st.lists(st.sampled_from(PARAM_NAMES), unique=True, max_size=2)) if draw(st.booleans()) else []
    for name in dict.fromkeys(names):
        setattr(request.params, name, draw(PARAM_VALUES[name]))
    seed = draw(st.one_of(st.none(), st.integers(0, 3), st.integers(0, UINT64_MAX)))
    if seed is not None:
        request.seed = seed
    request.chunk_bytes = draw(chunk_sizes)
    request.offset = draw(offsets)
    if draw(st.integers(0, 9)) == 0:
        request.require_device_fingerprint = draw(st.text(max_size=40))
    return request


def mutated(data: bytes, draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "append"]))
    if kind == "truncate" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flip" and data:
        index = draw(st.integers(0, len(data) - 1))
        return data[:index] + bytes([data[index] ^ draw(st.integers(1, 255))]) + data[index + 1 :]
    if kind == "insert":
        index = draw(st.integers(0, len(data)))
        return data[:index] + draw(st.binary(min_size=1, max_size=8)) + data[index:]
    return data + draw(st.binary(min_size=1, max_size=16))


@st.composite
def raw_payloads(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    data = draw(init_requests()).SerializeToString()
    for _ in range(draw(st.integers(1, 3))):
        data = mutated(data, draw)
    return data


# --- the server, the calls and the oracle ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerProcess]:
    # The cache is on (1 MiB): fuzzed requests repeat keys, so hits must return the exact bytes too.
    running = start_server("--max-tensor-bytes", "16K", "--cache-bytes", "1M", "--workers", "4")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def channel(fuzz_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_server.target) as opened:
        yield opened


@pytest.fixture(autouse=True)
def still_serving(fuzz_server: ServerProcess, channel: grpc.Channel) -> Iterator[None]:
    yield
    check_still_serving(fuzz_server, channel)


def check_still_serving(server: ServerProcess, channel: grpc.Channel) -> None:
    assert server.alive()
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "initserve.v1.InitService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_SECONDS)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    exact = outcome_of(channel, pb.InitRequest(scheme="kaiming_normal", shape=[17, 9], seed=5))
    assert exact.error is None
    assert same_bytes(tensor_of(exact, (17, 9), torch.float32), reference("kaiming_normal", (17, 9), seed=5))
    logged = "".join(server.output)
    assert "Traceback" not in logged and "unexpected error" not in logged, logged[-3000:]


@dataclass
class Outcome:
    messages: list[pb.InitResponse]
    error: grpc.RpcError | None


def outcome_of(channel: grpc.Channel, request: pb.InitRequest | bytes) -> Outcome:
    """Send ``request`` (a message, or raw bytes as they are) and collect the stream or its status."""
    payload = request if isinstance(request, bytes) else request.SerializeToString()
    init = channel.unary_stream(INIT_METHOD, request_serializer=None, response_deserializer=None)
    messages: list[pb.InitResponse] = []
    try:
        for raw in init(payload, timeout=RPC_TIMEOUT_SECONDS):
            messages.append(pb.InitResponse.FromString(raw))
    except grpc.RpcError as error:
        return Outcome(messages, error)
    return Outcome(messages, None)


def tensor_of(outcome: Outcome, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    data = b"".join(message.chunk.data for message in outcome.messages if message.WhichOneof("part") == "chunk")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def given_params(request: pb.InitRequest) -> dict[str, object]:
    return {name: getattr(request.params, name) for name in PARAM_NAMES if request.params.HasField(name)}


def check_outcome(request: pb.InitRequest, outcome: Outcome) -> None:
    """(a)'s properties for one request and what the server answered it."""
    error = outcome.error
    event(f"status {error.code().name if error is not None else 'OK'}")
    if error is not None:
        assert error.code() in REFUSALS, (error.code(), error.details(), request)
        assert error.details()
        assert outcome.messages == []  # refused before anything was streamed
        if error.code() == grpc.StatusCode.FAILED_PRECONDITION:  # no CUDA here; no fingerprint but the CPU's
            assert request.device.startswith("cuda") or request.require_device_fingerprint, request
        if error.code() == grpc.StatusCode.OUT_OF_RANGE:
            assert request.offset > 0
            assert error.details().startswith(f"offset {request.offset} is past the tensor's end")
        torch_exception = dict(error.trailing_metadata() or ()).get(TORCH_EXCEPTION_KEY)
        if torch_exception is not None:
            # The server says torch raised it: local torch, given the same call, raises it too.
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert torch_exception in TORCH_EXCEPTION_TYPES
            expected_type = getattr(builtins, torch_exception)
            with pytest.raises(expected_type):
                reference(
                    request.scheme,
                    tuple(request.shape),
                    dtype=DTYPES[request.dtype],
                    seed=request.seed,
                    **given_params(request),
                )
        return
    check_stream(request, outcome)


def check_stream(request: pb.InitRequest, outcome: Outcome) -> None:
    messages = outcome.messages
    assert len(messages) >= 2 and messages[0].WhichOneof("part") == "header"
    assert messages[-1].WhichOneof("part") == "trailer"
    header = messages[0].header
    scheme = SCHEMES[request.scheme]
    shape, dtype = tuple(request.shape), DTYPES[request.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert (tuple(header.shape), header.scheme, header.seeded) == (shape, scheme.name, scheme.seeded)
    assert DTYPES[header.dtype] == dtype and header.dtype != pb.DTYPE_UNSPECIFIED
    assert header.total_bytes == math.prod(shape) * itemsize <= MAX_TENSOR_BYTES
    assert header.device.device == "cpu" and header.offset == request.offset <= header.total_bytes
    if not scheme.seeded:
        assert header.seed_used == 0
    elif request.HasField("seed"):
        assert header.seed_used == request.seed
    assert header.chunk_bytes >= 1 and (request.chunk_bytes == 0 or header.chunk_bytes == request.chunk_bytes)
    # The contract: the bytes are torch's, for the seed the header reports.
    expected = reference(request.scheme, shape, dtype=dtype, seed=header.seed_used, **given_params(request))
    expected_bytes = expected.contiguous().reshape(-1).view(torch.uint8).tolist()
    position = header.offset
    for message in messages[1:-1]:
        assert message.WhichOneof("part") == "chunk"
        chunk = message.chunk
        assert chunk.offset == position
        assert zlib.crc32(chunk.data) == chunk.crc32
        assert len(chunk.data) == min(header.chunk_bytes, header.total_bytes - position)
        assert list(chunk.data) == expected_bytes[position : position + len(chunk.data)]
        position += len(chunk.data)
    assert position == header.total_bytes
    assert messages[-1].trailer.checksum == initserve.tensor_checksum(bytes(expected_bytes))


# --- (a) structured requests ----------------------------------------------------------------------------------------


@FUZZ_SETTINGS
@given(request=init_requests())
def test_fuzzed_requests_are_refused_cleanly_or_served_exactly(channel: grpc.Channel, request: pb.InitRequest) -> None:
    check_outcome(request, outcome_of(channel, request))


@FUZZ_SETTINGS
@given(
    scheme=st.sampled_from(list(SCHEMES)),
    shape=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    dtype=st.sampled_from(list(DTYPES)),
    seed=st.integers(0, UINT64_MAX),
    chunk_bytes=st.one_of(st.just(0), st.integers(1, 200)),
    offset_fraction=st.floats(0, 1),
)
def test_fuzzed_valid_requests_are_exact_at_every_chunk_size_and_offset(
    channel: grpc.Channel,
    scheme: str,
    shape: list[int],
    dtype: int,
    seed: int,
    chunk_bytes: int,
    offset_fraction: float,
) -> None:
    """Valid by construction: every one is served, so the exactness half of (a) is exercised every time."""
    if scheme == "eye" or scheme == "sparse":
        shape = shape[:2]
    if scheme == "dirac":
        shape = [*shape, 3][:5] if len(shape) < 3 else shape
    if scheme == "orthogonal" and dtype in (pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16):
        dtype = pb.DTYPE_FLOAT64  # torch has no half-precision QR on the CPU ("geqrf_cpu" not implemented)
    params = {"constant": {"val": -0.0}, "sparse": {"sparsity": 0.5}, "dirac": {"groups": 1}}.get(scheme, {})
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    total = math.prod(shape) * itemsize
    request = pb.InitRequest(
        scheme=scheme,
        shape=shape,
        dtype=dtype,
        params=pb.InitParams(**params),
        seed=seed,
        chunk_bytes=chunk_bytes,
        offset=int(offset_fraction * total),
    )
    outcome = outcome_of(channel, request)
    assert outcome.error is None, (outcome.error.code(), outcome.error.details(), request)
    check_stream(request, outcome)


# --- (b) raw bytes --------------------------------------------------------------------------------------------------


def check_raw(channel: grpc.Channel, payload: bytes) -> None:
    outcome = outcome_of(channel, payload)
    try:
        parsed = pb.InitRequest.FromString(payload)
    except DecodeError as parse_error:
        event("unparseable")
        # The whole accepted set for bytes that are not an InitRequest: INVALID_ARGUMENT, naming the size and
        # the parser's own error (the server runs the same protobuf).
        assert outcome.error is not None and outcome.messages == []
        assert outcome.error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert outcome.error.details() == (
            f"request is not a valid initserve.v1 message ({len(payload)} bytes): {parse_error}"
        )
        assert TORCH_EXCEPTION_KEY not in dict(outcome.error.trailing_metadata() or ())
        return
    check_outcome(parsed, outcome)


@FUZZ_SETTINGS
@given(payload=raw_payloads())
def test_fuzzed_bytes_are_invalid_argument_unless_they_parse(channel: grpc.Channel, payload: bytes) -> None:
    check_raw(channel, payload)


@pytest.mark.slow
@settings(FUZZ_SETTINGS, max_examples=2000)
@given(request=init_requests(), payload=raw_payloads())
def test_longer_fuzz_of_requests_and_bytes(channel: grpc.Channel, request: pb.InitRequest, payload: bytes) -> None:
    check_outcome(request, outcome_of(channel, request))
    check_raw(channel, payload)


# --- (c) afterwards -------------------------------------------------------------------------------------------------


def test_after_the_fuzz_the_server_is_healthy_and_exact(fuzz_server: ServerProcess, channel: grpc.Channel) -> None:
    check_still_serving(fuzz_server, channel)
    with fuzz_server.client() as client:
        info = client.describe()
        assert (info.stats.inflight_requests, info.stats.inflight_bytes) == (0, 0)
        assert info.limits.max_tensor_bytes == MAX_TENSOR_BYTES
        result = client.fetch((32, 32), "orthogonal", seed=77, dtype=torch.float64)
    assert same_bytes(result.tensor, reference("orthogonal", (32, 32), seed=77, dtype=torch.float64))

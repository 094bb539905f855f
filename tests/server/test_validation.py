"""validate_request and check_finite on real InitRequests: defaults, seeds, params, and every limit's message."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from initserve_protocol.schemes import PARAM_NAMES, SCHEMES
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_server import devices
from initserve_server.config import MAX_CHUNKS_PER_STREAM, MAX_STRING_PARAM_CHARS, ServerConfig
from initserve_server.spec import InitSpec
from initserve_server.validation import InvalidRequest, check_finite, validate_request

DEFAULT_CONFIG = ServerConfig()
# Small limits, each distinct, so a message that quotes the wrong one cannot pass.
SMALL_CONFIG = ServerConfig(max_dims=3, max_tensor_bytes=64, chunk_bytes=16, max_message_bytes=8192)
SCHEME_LIST = ", ".join(SCHEMES)
DTYPE_LIST = "float32, float64, float16, bfloat16"
DEVICE_FORMS = "is not one of 'cpu', 'cuda', 'cuda:N'"
NON_FINITE = "initserve refuses non-finite parameters (only trunc_normal's bounds a and b may be infinite)"
DRAWN_SEED = 0xDEADBEEF_CAFEF00D
# A value for every parameter, valid for every scheme that takes it.
PARAM_VALUES: dict[str, Any] = {
    "a": -0.5,
    "b": 0.5,
    "mean": 0.25,
    "std": 0.125,
    "gain": 2.0,
    "val": 3.0,
    "sparsity": 0.5,
    "groups": 1,
    "mode": "fan_out",
    "nonlinearity": "relu",
}
UNSEEDED = [name for name, scheme in SCHEMES.items() if not scheme.seeded]
SEEDED = [name for name, scheme in SCHEMES.items() if scheme.seeded]


class SeedSource:
    """A draw_seed stand-in that counts its calls."""

    def __init__(self, value: int = DRAWN_SEED) -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        return self.value


def never_draw() -> int:
    raise AssertionError("draw_seed must not be called for this request")


def request(scheme: str = "normal", shape: tuple[int, ...] = (2, 3), **fields: Any) -> pb.InitRequest:
    params = fields.pop("params", {})
    return pb.InitRequest(scheme=scheme, shape=shape, params=pb.InitParams(**params), **fields)


def required_params(scheme: str) -> dict[str, Any]:
    return {param.name: PARAM_VALUES[param.name] for param in SCHEMES[scheme].params if param.required}


def valid_request(scheme: str, **fields: Any) -> pb.InitRequest:
    shape = (2, 2, 3) if scheme == "dirac" else (4, 4)
    params = {**required_params(scheme), **fields.pop("params", {})}
    return request(scheme, shape, params=params, **fields)


def validate(message: pb.InitRequest, config: ServerConfig = DEFAULT_CONFIG) -> InitSpec:
    return validate_request(message, config, SeedSource())


# --- defaults ---------------------------------------------------------------------------------------------------


def test_an_empty_request_body_takes_the_documented_defaults() -> None:
    config = ServerConfig(chunk_bytes=1000)
    spec = validate_request(pb.InitRequest(scheme="normal", shape=[3, 4]), config, SeedSource())
    assert spec.scheme is SCHEMES["normal"]
    assert spec.shape == (3, 4)
    assert (spec.dtype.wire, spec.dtype.name, spec.dtype.torch_dtype, spec.dtype.itemsize) == (
        pb.DTYPE_FLOAT32,
        "float32",
        torch.float32,
        4,
    )
    assert spec.device == torch.device("cpu")
    assert spec.chunk_bytes == 1000
    assert spec.params == ()
    assert spec.total_bytes == 48


@pytest.mark.parametrize(
    ("wire", "torch_dtype", "itemsize"),
    [
        (pb.DTYPE_UNSPECIFIED, torch.float32, 4),
        (pb.DTYPE_FLOAT32, torch.float32, 4),
        (pb.DTYPE_FLOAT64, torch.float64, 8),
        (pb.DTYPE_FLOAT16, torch.float16, 2),
        (pb.DTYPE_BFLOAT16, torch.bfloat16, 2),
    ],
)
def test_dtypes(wire: int, torch_dtype: torch.dtype, itemsize: int) -> None:
    spec = validate(request(shape=(5,), dtype=wire))
    assert spec.dtype.torch_dtype == torch_dtype
    assert spec.total_bytes == 5 * itemsize


def test_a_scalar_and_zero_sized_shapes_are_valid() -> None:
    assert validate(request(shape=())).shape == ()
    assert validate(request(shape=())).total_bytes == 4
    assert validate(request(shape=(0, 1 << 62, 1 << 62))).total_bytes == 0


@pytest.mark.parametrize("text", ["", "cpu"])
def test_cpu_device_spellings(text: str) -> None:
    assert validate(request(device=text)).device == torch.device("cpu")


# --- chunk size -------------------------------------------------------------------------------------------------


def test_a_requested_chunk_size_is_kept_and_zero_takes_the_config_default() -> None:
    assert validate(request(chunk_bytes=7), SMALL_CONFIG).chunk_bytes == 7
    assert validate(request(chunk_bytes=0), SMALL_CONFIG).chunk_bytes == 16
    assert validate(request(chunk_bytes=8128), SMALL_CONFIG).chunk_bytes == SMALL_CONFIG.max_chunk_bytes


@pytest.mark.parametrize(
    ("shape", "dtype", "requested", "config"),
    [
        pytest.param((1 << 30,), pb.DTYPE_FLOAT32, 7, DEFAULT_CONFIG, id="4GiB-at-7-bytes"),
        pytest.param((1 << 29,), pb.DTYPE_FLOAT64, 1, DEFAULT_CONFIG, id="4GiB-float64-at-1-byte"),
        pytest.param((3 * (1 << 20) + 1,), pb.DTYPE_FLOAT32, 1, DEFAULT_CONFIG, id="uneven"),
        pytest.param((1 << 21,), pb.DTYPE_FLOAT32, 0, ServerConfig(chunk_bytes=1), id="config-default-of-1"),
        pytest.param((1 << 21,), pb.DTYPE_FLOAT32, 8, DEFAULT_CONFIG, id="exactly-max-chunks-kept"),
        pytest.param(((1 << 21) + 1,), pb.DTYPE_FLOAT32, 8, DEFAULT_CONFIG, id="one-element-past-max-chunks"),
    ],
)
def test_the_chunk_size_is_raised_so_a_stream_never_exceeds_max_chunks(
    shape: tuple[int, ...], dtype: int, requested: int, config: ServerConfig
) -> None:
    spec = validate(request(shape=shape, dtype=dtype, chunk_bytes=requested), config)
    preferred = requested or config.chunk_bytes
    assert spec.chunk_bytes >= preferred
    assert math.ceil(spec.total_bytes / spec.chunk_bytes) <= MAX_CHUNKS_PER_STREAM
    assert spec.chunk_bytes <= config.max_chunk_bytes
    if math.ceil(spec.total_bytes / preferred) <= MAX_CHUNKS_PER_STREAM:
        assert spec.chunk_bytes == preferred  # raised only when needed
    else:
        assert spec.chunk_bytes > preferred


def test_the_raise_is_the_smallest_chunk_that_fits() -> None:
    spec = validate(request(shape=(1 << 30,), chunk_bytes=7))
    assert spec.chunk_bytes == (4 << 30) // MAX_CHUNKS_PER_STREAM == 4096
    spec = validate(request(shape=((1 << 21) + 1,), chunk_bytes=8))
    assert spec.chunk_bytes == 9


# --- seeds ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", UNSEEDED)
def test_unseeded_schemes_get_seed_0_and_ignore_a_given_seed(scheme: str) -> None:
    assert validate_request(valid_request(scheme, seed=12345), DEFAULT_CONFIG, never_draw).seed == 0
    assert validate_request(valid_request(scheme), DEFAULT_CONFIG, never_draw).seed == 0


@pytest.mark.parametrize("scheme", SEEDED)
@pytest.mark.parametrize("seed", [0, 1, (1 << 63), (1 << 64) - 1])
def test_a_given_seed_is_kept(scheme: str, seed: int) -> None:
    assert validate_request(valid_request(scheme, seed=seed), DEFAULT_CONFIG, never_draw).seed == seed


@pytest.mark.parametrize("scheme", SEEDED)
def test_draw_seed_is_used_once_when_the_seed_is_absent(scheme: str) -> None:
    source = SeedSource()
    spec = validate_request(valid_request(scheme), DEFAULT_CONFIG, source)
    assert spec.seed == DRAWN_SEED
    assert source.calls == 1


def test_a_given_seed_of_0_is_present_not_absent() -> None:
    source = SeedSource()
    message = request()
    message.seed = 0
    assert validate_request(message, DEFAULT_CONFIG, source).seed == 0
    assert source.calls == 0


# --- params -----------------------------------------------------------------------------------------------------


def test_only_set_params_appear_in_wire_order_with_their_types() -> None:
    spec = validate(request("trunc_normal", params={"b": 1.5, "mean": 0.25}))
    assert spec.params == (("b", 1.5), ("mean", 0.25))
    assert spec.kwargs() == {"b": 1.5, "mean": 0.25}
    # Presence, not value: torch's own defaults and zero values, set explicitly, are still sent.
    spec = validate(request("trunc_normal", params={"std": 1.0, "a": 0.0}))
    assert spec.params == (("a", 0.0), ("std", 1.0))
    spec = validate(request("kaiming_normal", params={"nonlinearity": "", "mode": ""}))
    assert spec.params == (("mode", ""), ("nonlinearity", ""))
    spec = validate(request("dirac", (2, 2, 2), params={"groups": 0}))
    assert spec.params == (("groups", 0),)
    assert type(spec.params[0][1]) is int
    assert type(validate(request(params={"mean": 1})).params[0][1]) is float


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_every_param_a_scheme_takes_is_passed_through(scheme: str) -> None:
    takes = SCHEMES[scheme].param_names
    spec = validate(valid_request(scheme, params={name: PARAM_VALUES[name] for name in takes}))
    assert spec.params == tuple((name, PARAM_VALUES[name]) for name in PARAM_NAMES if name in takes)


def test_a_string_param_of_exactly_the_limit_is_accepted() -> None:
    assert MAX_STRING_PARAM_CHARS == 64
    spec = validate(request("kaiming_uniform", params={"mode": "m" * 64}))
    assert spec.params == (("mode", "m" * 64),)
    spec = validate(request("kaiming_uniform", params={"nonlinearity": "é" * 64}))  # 128 UTF-8 bytes
    assert spec.params == (("nonlinearity", "é" * 64),)


# --- every refusal names the field and the limit ----------------------------------------------------------------

INVALID_REQUESTS: list[Any] = [
    pytest.param(request(""), f"scheme is empty; use one of: {SCHEME_LIST}", id="empty-scheme"),
    pytest.param(request("Normal"), f"unknown scheme 'Normal'; use one of: {SCHEME_LIST}", id="unknown-scheme"),
    pytest.param(
        request("s" * 65), f"unknown scheme '{'s' * 64}...'; use one of: {SCHEME_LIST}", id="long-unknown-scheme"
    ),
    pytest.param(request(dtype=5), f"dtype 5 is not served; use one of: {DTYPE_LIST}", id="dtype-5"),
    pytest.param(request(dtype=99), f"dtype 99 is not served; use one of: {DTYPE_LIST}", id="dtype-99"),
    pytest.param(request(shape=(1, 1, 1, 1)), "shape has 4 dims; the limit is 3 (max_dims)", id="max-dims"),
    pytest.param(request(shape=(2, -3)), "shape[1] is -3; dimensions must be >= 0", id="negative-dim"),
    pytest.param(request(shape=(-1, 0)), "shape[0] is -1; dimensions must be >= 0", id="negative-dim-with-zero"),
    pytest.param(
        request(shape=(17,)),
        "shape [17] is 17 elements, 68 bytes of float32; the limit is 64 bytes (max_tensor_bytes)",
        id="max-tensor-bytes-float32",
    ),
    pytest.param(
        request(shape=(3, 3), dtype=pb.DTYPE_FLOAT64),
        "shape [3, 3] is 9 elements, 72 bytes of float64; the limit is 64 bytes (max_tensor_bytes)",
        id="max-tensor-bytes-float64",
    ),
    pytest.param(
        request(shape=(33,), dtype=pb.DTYPE_BFLOAT16),
        "shape [33] is 33 elements, 66 bytes of bfloat16; the limit is 64 bytes (max_tensor_bytes)",
        id="max-tensor-bytes-bfloat16",
    ),
    pytest.param(
        request(shape=(1 << 32, 1 << 32)),
        f"shape [{1 << 32}, {1 << 32}] is {1 << 64} elements, {1 << 66} bytes of float32; "
        "the limit is 64 bytes (max_tensor_bytes)",
        id="numel-wrapping-to-zero-in-int64",
    ),
    pytest.param(
        request(params={"gain": 1.0}),
        "scheme 'normal' does not take parameter 'gain' (it takes: mean, std)",
        id="param-not-taken",
    ),
    pytest.param(
        request("zeros", params={"val": 0.0}),
        "scheme 'zeros' does not take parameter 'val' (it takes: no parameters)",
        id="param-for-a-scheme-without-params",
    ),
    pytest.param(
        request("kaiming_uniform", params={"groups": 1}),
        "scheme 'kaiming_uniform' does not take parameter 'groups' (it takes: a, mode, nonlinearity)",
        id="int-param-not-taken",
    ),
    pytest.param(request("constant"), "scheme 'constant' requires parameter 'val'", id="constant-without-val"),
    pytest.param(
        request("sparse", params={"std": 0.1}), "scheme 'sparse' requires parameter 'sparsity'", id="sparse-no-sparsity"
    ),
    pytest.param(
        request("kaiming_uniform", params={"mode": "m" * 65}),
        "parameter 'mode' is 65 characters; the limit is 64",
        id="string-param-limit",
    ),
    pytest.param(
        request("kaiming_normal", params={"nonlinearity": "é" * 65}),
        "parameter 'nonlinearity' is 65 characters; the limit is 64",
        id="string-param-limit-counts-characters",
    ),
    pytest.param(request(device="gpu"), f"device 'gpu' {DEVICE_FORMS}", id="device-gpu"),
    pytest.param(request(device="cuda:x"), f"device 'cuda:x' {DEVICE_FORMS}", id="device-cuda-x"),
    pytest.param(request(device="cuda:-1"), f"device 'cuda:-1' {DEVICE_FORMS}", id="device-cuda-minus-1"),
    pytest.param(request(device="cuda:12345"), f"device 'cuda:12345' {DEVICE_FORMS}", id="device-5-digits"),
    pytest.param(request(device="CPU"), f"device 'CPU' {DEVICE_FORMS}", id="device-CPU"),
    pytest.param(request(device="cpu:0"), f"device 'cpu:0' {DEVICE_FORMS}", id="device-cpu-0"),
    pytest.param(request(device="d" * 1000), f"device '{'d' * 32}...' {DEVICE_FORMS}", id="device-1000-chars"),
    pytest.param(
        request(chunk_bytes=8129),
        "chunk_bytes 8129 exceeds the limit 8128 (max_message_bytes 8192 less framing)",
        id="chunk-bytes",
    ),
    pytest.param(
        request(chunk_bytes=(1 << 64) - 1),
        f"chunk_bytes {(1 << 64) - 1} exceeds the limit 8128 (max_message_bytes 8192 less framing)",
        id="chunk-bytes-uint64-max",
    ),
]


@pytest.mark.parametrize(("message", "error"), INVALID_REQUESTS)
def test_invalid_requests_name_the_field_and_the_limit(message: pb.InitRequest, error: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        validate(message, SMALL_CONFIG)
    assert str(raised.value) == error


def test_the_small_config_accepts_everything_up_to_its_limits() -> None:
    """The twin of the table above: one step inside each limit is valid."""
    assert validate(request(shape=(1, 1, 16)), SMALL_CONFIG).total_bytes == 64
    assert validate(request(shape=(8,), dtype=pb.DTYPE_FLOAT64), SMALL_CONFIG).total_bytes == 64
    assert validate(request(shape=(32,), dtype=pb.DTYPE_FLOAT16), SMALL_CONFIG).total_bytes == 64
    assert validate(request(shape=(2, 2, 2)), SMALL_CONFIG).shape == (2, 2, 2)


@pytest.mark.parametrize(
    ("config", "accepted", "refused", "error"),
    [
        pytest.param(
            ServerConfig(max_tensor_bytes=0),
            [(0,), (5, 0)],
            (),
            "shape [] is 1 elements, 4 bytes of float32; the limit is 0 bytes (max_tensor_bytes)",
            id="max-tensor-bytes-0",
        ),
        pytest.param(
            ServerConfig(max_dims=0), [()], (1,), "shape has 1 dims; the limit is 0 (max_dims)", id="max-dims-0"
        ),
        pytest.param(
            DEFAULT_CONFIG, [(1,) * 16], (1,) * 17, "shape has 17 dims; the limit is 16 (max_dims)", id="default-dims"
        ),
        pytest.param(
            DEFAULT_CONFIG,
            [(1 << 30,), (1 << 15, 1 << 15)],
            ((1 << 30) + 1,),
            f"shape [{(1 << 30) + 1}] is {(1 << 30) + 1} elements, {(4 << 30) + 4} bytes of float32; "
            f"the limit is {4 << 30} bytes (max_tensor_bytes)",
            id="default-bytes",
        ),
        pytest.param(
            ServerConfig(max_tensor_bytes=1 << 50, max_dims=40),
            [(1 << 48,), (1,) * 40],
            (1,) * 41,
            "shape has 41 dims; the limit is 40 (max_dims)",
            id="raised-limits",
        ),
    ],
)
def test_limits_come_from_the_config(
    config: ServerConfig, accepted: list[tuple[int, ...]], refused: tuple[int, ...], error: str
) -> None:
    for shape in accepted:
        assert validate(request(shape=shape), config).shape == shape
    with pytest.raises(InvalidRequest) as raised:
        validate(request(shape=refused), config)
    assert str(raised.value) == error


# --- devices ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("text", ["cuda", "cuda:0", "cuda:3", "cuda:127"])
def test_cuda_without_cuda_is_device_unavailable(text: str) -> None:
    with pytest.raises(devices.DeviceUnavailable) as raised:
        validate(request(device=text))
    index = int(text.partition(":")[2] or 0)
    assert str(raised.value).startswith(f"device 'cuda:{index}' requested but this server has no CUDA (torch ")


@pytest.mark.parametrize("text", ["cuda:128", "cuda:255", "cuda:256", "cuda:9999"])
def test_a_device_index_past_torchs_range_is_refused_by_its_own_name(text: str) -> None:
    with pytest.raises((InvalidRequest, devices.DeviceUnavailable)) as raised:
        validate(request(device=text))
    assert f"'{text}'" in str(raised.value)


def test_device_fingerprint() -> None:
    fingerprint = devices.device_info(torch.device("cpu")).fingerprint
    assert validate(request(require_device_fingerprint=fingerprint)).device == torch.device("cpu")
    with pytest.raises(devices.DeviceUnavailable) as raised:
        validate(request(require_device_fingerprint="cpu/elsewhere"))
    assert str(raised.value) == (
        f"device fingerprint mismatch: the request requires 'cpu/elsewhere', this server's cpu is {fingerprint!r}"
    )


# --- check_finite -----------------------------------------------------------------------------------------------

nan, inf = math.nan, math.inf


@pytest.mark.parametrize(
    ("scheme", "params", "name", "shown"),
    [
        ("normal", {"mean": nan}, "mean", "nan"),
        ("normal", {"std": inf}, "std", "inf"),
        ("constant", {"val": -inf}, "val", "-inf"),
        ("orthogonal", {"gain": nan}, "gain", "nan"),
        ("uniform", {"a": -inf}, "a", "-inf"),
        ("kaiming_normal", {"a": inf}, "a", "inf"),
        ("trunc_normal", {"a": nan}, "a", "nan"),
        ("trunc_normal", {"b": nan, "a": -inf}, "b", "nan"),
        ("trunc_normal", {"mean": inf, "a": -inf, "b": inf}, "mean", "inf"),
        ("sparse", {"sparsity": 0.5, "std": nan}, "std", "nan"),
    ],
)
def test_check_finite_refuses_non_finite_params_naming_them(
    scheme: str, params: dict[str, float], name: str, shown: str
) -> None:
    spec = validate(request(scheme, params=params))  # validation leaves them to torch first
    with pytest.raises(InvalidRequest) as raised:
        check_finite(spec)
    assert str(raised.value) == f"parameter {name!r} is {shown}; {NON_FINITE}"


@pytest.mark.parametrize(
    ("scheme", "params"),
    [
        ("trunc_normal", {"a": -inf, "b": inf}),
        ("trunc_normal", {"a": inf, "b": -inf}),
        ("trunc_normal", {"mean": 1e300, "std": 1e-300}),
        ("normal", {"mean": -1e308, "std": 0.0}),
        ("dirac", {"groups": 1}),
        ("kaiming_uniform", {"mode": "nan", "nonlinearity": "inf"}),
        ("ones", {}),
    ],
)
def test_check_finite_passes_finite_params_and_trunc_normal_infinite_bounds(
    scheme: str, params: dict[str, Any]
) -> None:
    shape = (2, 2, 2) if scheme == "dirac" else (2, 3)
    spec = validate(request(scheme, shape, params=params))
    assert check_finite(spec) is None

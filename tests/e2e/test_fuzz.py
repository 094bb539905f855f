"""Property-based fuzzing of every call of the service against one real server, through raw gRPC.

(a) Structured InitRequests from strategies (valid and invalid schemes, shapes with negative, huge and too many
    dimensions, unknown dtype values, parameters that are NaN, infinite, huge or the wrong kind, seeds, device
    strings, chunk sizes, offsets, names, derive_seed, slices, the same-host fields), sent to ``Init`` and to
    ``InitUnary``: the status is never INTERNAL or UNKNOWN; an OK answer is well formed and its bytes equal the
    local torch reference (``reference(...)[slices]``, for the seed ``initserve.derive_seed(seed, name)`` when
    derived), byte for byte; where the server reports the exception torch raised, local torch raises it too; a
    request that breaks a rule the test knows (a name over 1024 characters, an invalid slice, derive_seed without
    a seed, the same-host fields on a stream, more than ``max_unary_bytes`` for InitUnary) is never served.
    Valid requests are all served; a request with one known defect is refused with that defect's status and
    message.
(b) Raw bytes for every method (``Describe`` included): bytes that do not parse are answered INVALID_ARGUMENT
    "request is not a valid initserve.v1 message (N bytes): <the parser's error>", never grpc's INTERNAL for a
    deserializer failure; bytes that parse are the request they parse to, and meet (a)'s properties (an InitMany
    call's: each tensor sent is exact, and an error names a tensor that Init alone refuses with the same status).
(c) InitMany lists with long, unicode and repeated names and defects anywhere: the error names the first
    invalid tensor (``tensors[i] ('name'): ``, the name shortened to 64 characters): the first that validation
    refuses, before anything is sent, else the first whose generation fails, after every tensor before it was
    sent whole and exact.
(d) The same-host fields: names (``shared_memory``, field 10) are never opened, whatever they look like;
    region tokens malformed, well formed but unknown, registered with the wrong size, or registered and right
    (then the region holds the exact bytes from the offset on, and nothing before it is touched).
(e) Concurrency and cancellation: batches of fuzzed calls from several threads at once, some cancelled
    mid-stream or given tiny deadlines; every answer or prefix of one that arrives is exact, a call ends CANCELLED
    or DEADLINE_EXCEEDED only when its client asked for it, and the server settles: nothing in flight, no
    generation left running, within a bounded wait.
After each test the server is healthy, logged no traceback, and still returns exact bytes.

The server's limits make every request cheap and every limit reachable: tensors of at most 16 KiB, messages of
at most 8 KiB more than the largest header (so InitUnary answers at most 8 KiB and refuses larger tensors as too
large for it), 4 KiB chunks by default, a cache of 1 MiB (repeated keys must return the exact bytes too),
generations estimated above 2 s of work refused, and the same-host socket on.

`make test` replays a fixed set of examples (derandomized, the same every run). INITSERVE_FUZZ=soak (`make soak`)
draws fresh examples, SOAK_EXAMPLES_FACTOR times as many, and prints what reproduces a failure.
"""

from __future__ import annotations

import builtins
import contextlib
import glob
import math
import operator
import os
import re
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

import initserve
from initserve._regions import SharedRegion
from initserve._shared import Connection
from initserve_protocol.codec import header_crc32
from initserve_protocol.errors import (
    NO_SUCH_REGION,
    REFUSAL_KEY,
    SHARED_MEMORY_OFF,
    TORCH_EXCEPTION_TYPES,
    UNARY_TOO_LARGE,
)
from initserve_protocol.schemes import PARAM_NAMES, SCHEMES
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_protocol.wire import decode_unary
from initserve_server.config import header_room_bytes
from tests.conftest import ServerProcess, reference, same_bytes, start_server

SERVICE = "/initserve.v1.InitService/"
RPC_TIMEOUT_SECONDS = 60.0
SETTLE_SECONDS = 10.0  # a cancelled call's lease and generation are released well within this
MAX_TENSOR_BYTES = 16 << 10
MAX_UNARY_BYTES = 8 << 10
MAX_MESSAGE_BYTES = MAX_UNARY_BYTES + header_room_bytes(16)  # the room the server keeps for the header and trailer
DEFAULT_CHUNK_BYTES = 4 << 10
MAX_WORK_SECONDS = 2.0
MAX_NAME_CHARS = 1024
MAX_LABEL_NAME_CHARS = 64
MAX_SLICES = 16
TORCH_EXCEPTION_KEY = "initserve-torch-exception"
INT64_MIN, INT64_MAX, UINT32_MAX, UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 32) - 1, (1 << 64) - 1
TOKEN_PATTERN = re.compile(r"region-[0-9a-f]{32}")
# What the server may answer a request it cannot serve: nothing else, and never INTERNAL or UNKNOWN.
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,  # validation, the cost model, or torch's own error
    grpc.StatusCode.OUT_OF_RANGE,  # a resume offset past the end
    grpc.StatusCode.FAILED_PRECONDITION,  # a CUDA device or fingerprint this server lacks; shared memory by name
}
# Under concurrent load a budget may refuse too (in-flight bytes, stream buffers, max_concurrent_calls).
LOADED_REFUSALS = REFUSALS | {grpc.StatusCode.RESOURCE_EXHAUSTED}
DTYPES = {
    pb.DTYPE_UNSPECIFIED: torch.float32,
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT64: torch.float64,
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
}
# Names that look like paths or like this run's files: the server must treat every one as a label. Nothing named
# with MARK may exist anywhere afterwards.
MARK = f"initserve-fuzz-{os.getpid()}"
PATH_NAMES = [
    MARK,
    f"/dev/shm/{MARK}",
    f"{tempfile.gettempdir()}/{MARK}",
    f"../../../../dev/shm/{MARK}",
    f"./{MARK}",
    "/etc/passwd",
    "../../etc/passwd",
    "/proc/self/mem",
    "/dev/zero",
    "initserve-" + "0" * 32,
]
# The local reference runs torch, which warns about some fuzzed trunc_normal bounds; the server's answer is the point.
pytestmark = pytest.mark.filterwarnings("ignore:mean is more than 2 std:UserWarning")

SOAK = os.environ.get("INITSERVE_FUZZ") == "soak"
SOAK_EXAMPLES_FACTOR = 10


def fuzz_settings(max_examples: int) -> settings:
    """Derandomized with ``max_examples`` for `make test`; fresh and SOAK_EXAMPLES_FACTOR times as many for soak."""
    return settings(
        max_examples=max_examples * (SOAK_EXAMPLES_FACTOR if SOAK else 1),
        deadline=None,
        derandomize=not SOAK,
        database=None,
        print_blob=SOAK,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


FUZZ_SETTINGS = fuzz_settings(150)

# --- strategies -----------------------------------------------------------------------------------------------------


def note(what: str) -> None:
    """Count ``what`` in hypothesis' statistics: only the test's own thread may (concurrent calls' checks run in
    others, uncounted), and only inside a fuzzed test (the regression tests share the checks)."""
    if threading.current_thread() is threading.main_thread() and currently_in_test_context():
        event(what)


def mostly(usual: st.SearchStrategy, unusual: st.SearchStrategy, weight: int = 5) -> st.SearchStrategy:
    """``usual`` about ``weight`` times as often as ``unusual``: enough valid requests to check exactness on."""
    return st.sampled_from([True] * weight + [False]).flatmap(lambda common: usual if common else unusual)


EDGE_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-300, 5e-324, 1e308, -1e308, math.inf, -math.inf, math.nan]
floats = st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(-10, 10), st.floats(allow_nan=True, allow_infinity=True))
ints64 = st.one_of(st.integers(-2, 4), st.sampled_from([INT64_MIN, INT64_MAX]), st.integers(INT64_MIN, INT64_MAX))
uints32 = st.one_of(st.integers(0, 5), st.sampled_from([1 << 31, UINT32_MAX]), st.integers(0, UINT32_MAX))
uints64 = st.one_of(st.integers(0, 9), st.sampled_from([1 << 63, UINT64_MAX]), st.integers(0, UINT64_MAX))
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
seeds = st.one_of(st.integers(0, 3), st.integers(0, UINT64_MAX))

# Names: the usual dotted ones; names that look like paths; unicode, control characters, and the lengths around
# the limit (in characters: 4-byte characters make a 1024-character name 4 KiB on the wire).
LONG_NAME_CHARACTERS = ["x", "é", "\U0001f600", "\x00", "\u202e"]
usual_names = st.sampled_from(["", "w", "layer.0.weight", "model.layers.17.self_attn.q_proj.weight"])
unusual_short_names = st.one_of(
    st.sampled_from([*PATH_NAMES, "a\x00b", "\n\r\t", "\x7f", "é" * 64, "'\"\\", "tensors[0] ('x'): "]),
    st.text(max_size=80),
    st.text(st.characters(categories=["Cc", "Cf", "Zl", "Zp"]), min_size=1, max_size=20),
)


def repeated(lengths: st.SearchStrategy[int]) -> st.SearchStrategy[str]:
    return st.builds(operator.mul, st.sampled_from(LONG_NAME_CHARACTERS), lengths)


valid_names = mostly(usual_names, st.one_of(unusual_short_names, repeated(st.integers(1000, MAX_NAME_CHARS))))
too_long_names = repeated(st.one_of(st.integers(MAX_NAME_CHARS + 1, 1100), st.just(20_000)))
names = mostly(usual_names, st.one_of(unusual_short_names, repeated(st.integers(1000, 1100)), too_long_names))

# Same-host fields: a name (field 10, deprecated: never opened) and a region token (field 14).
shared_memory_names = st.one_of(st.sampled_from(PATH_NAMES), st.text(min_size=1, max_size=80))
well_formed_tokens = st.binary(min_size=16, max_size=16).map(lambda random: "region-" + random.hex())
malformed_tokens = st.one_of(
    st.sampled_from(
        [
            "region-" + "0" * 31,
            "region-" + "0" * 33,
            "REGION-" + "0" * 32,
            "region-" + "A" * 32,
            "region-" + "0" * 32 + "\n",
            " region-" + "0" * 32,
            "region_" + "0" * 32,
            "region-" + "\u0660" * 32,
            *PATH_NAMES,
        ]
    ),
    st.text(min_size=1, max_size=100),
).filter(lambda token: not TOKEN_PATTERN.fullmatch(token))
region_tokens = st.one_of(well_formed_tokens, malformed_tokens)


@st.composite
def valid_slices(draw: st.DrawFn, shape: tuple[int, ...]) -> list[pb.Slice]:
    """At most one slice per dim of ``shape``, each a range that fits or a shard that exists."""
    slices = []
    for dim in draw(st.lists(st.integers(0, len(shape) - 1), unique=True, max_size=len(shape))) if shape else []:
        size = shape[dim]
        if draw(st.booleans()):
            start = draw(st.integers(0, size))
            slices.append(pb.Slice(dim=dim, start=start, length=draw(st.integers(0, size - start))))
        else:
            count = draw(st.one_of(st.integers(1, size + 2), st.sampled_from([1 << 31, UINT32_MAX])))
            index = draw(st.one_of(st.integers(0, min(count, size + 2) - 1), st.just(count - 1)))
            slices.append(pb.Slice(dim=dim, shard_index=index, shard_count=count))
    return slices


@st.composite
def any_slice(draw: st.DrawFn, ndims: int) -> pb.Slice:
    """One Slice as a client could write it: a range, a shard, a shard_index alone, or both forms at once."""
    part = pb.Slice(dim=draw(mostly(st.integers(0, max(ndims - 1, 0)), st.one_of(st.integers(ndims, 20), uints32))))
    form = draw(st.sampled_from(["range", "shard", "index alone", "both"]))
    if form in ("range", "both"):
        part.start, part.length = draw(uints64), draw(uints64)
    if form in ("shard", "both"):
        part.shard_index, part.shard_count = draw(uints32), draw(uints32)
    if form == "index alone":
        part.shard_index = draw(st.integers(1, UINT32_MAX))
    return part


@st.composite
def invalid_slices(draw: st.DrawFn, shape: tuple[int, ...]) -> list[pb.Slice]:
    """Valid slices of ``shape`` and one that the proto rules out, anywhere in the list: a dim out of range or
    sliced twice, a range past the end (huge starts and lengths too), a shard_index without shard_count or not
    below it, both forms in one slice; or more than 16 slices."""
    slices = draw(valid_slices(shape))
    ndims = len(shape)
    defect = draw(st.sampled_from(["range past the end", "shard_index without shard_count",
                                   "shard_index not below shard_count", "dim out of range", "dim twice",
                                   "both forms", "more than 16"]))  # fmt: skip
    note(f"invalid slices: {defect}")
    dim = draw(st.integers(0, ndims - 1)) if ndims else 0
    size = shape[dim] if ndims else 0
    if defect == "more than 16":
        return [pb.Slice(dim=dim, length=size)] * draw(st.integers(MAX_SLICES + 1, MAX_SLICES + 4))
    if defect == "dim out of range" or not ndims:
        bad = pb.Slice(dim=draw(st.one_of(st.integers(ndims, ndims + 2), st.sampled_from([1 << 31, UINT32_MAX]))))
    elif defect == "range past the end":
        start = draw(st.one_of(st.integers(0, size + 1), st.sampled_from([1 << 63, UINT64_MAX])))
        length = draw(st.one_of(st.integers(max(size - start + 1, 0), UINT64_MAX), st.just(UINT64_MAX)))
        bad = pb.Slice(dim=dim, start=start, length=length)
    elif defect == "shard_index without shard_count":
        bad = pb.Slice(dim=dim, shard_index=draw(st.one_of(st.integers(1, 5), st.just(UINT32_MAX))))
    elif defect == "shard_index not below shard_count":
        count = draw(st.one_of(st.integers(1, 5), st.just(UINT32_MAX - 1)))
        bad = pb.Slice(dim=dim, shard_index=draw(st.one_of(st.just(count), st.integers(count, UINT32_MAX))),
                       shard_count=count)  # fmt: skip
    elif defect == "dim twice":
        bad = pb.Slice(dim=dim, start=0, length=draw(st.integers(0, size)))
        slices.append(pb.Slice(dim=dim, shard_index=0, shard_count=1))
    else:
        bad = pb.Slice(dim=dim, start=draw(st.integers(0, size)), length=1, shard_count=draw(st.integers(1, 4)))
    slices.insert(draw(st.integers(0, len(slices))), bad)
    assert expected_slices(shape, slices) is None, (shape, slices)
    return slices


def any_slices(ndims: int) -> st.SearchStrategy[list[pb.Slice]]:
    return mostly(
        st.lists(any_slice(ndims), min_size=1, max_size=4),
        st.lists(any_slice(ndims), min_size=MAX_SLICES + 1, max_size=MAX_SLICES + 3),
    )


def sliceable(shape: list[int]) -> bool:
    return len(shape) <= MAX_SLICES and all(0 <= size <= 300 for size in shape)


@st.composite
def init_requests(draw: st.DrawFn) -> pb.InitRequest:
    scheme = draw(scheme_names)
    request = pb.InitRequest(scheme=scheme, dtype=draw(dtypes), device=draw(devices))
    request.shape.extend(draw(shapes))
    # Mostly the scheme's own parameters (so many requests are valid), sometimes any at all.
    own = list(SCHEMES[scheme].param_names) if scheme in SCHEMES else []
    names_given = draw(st.one_of(st.lists(st.sampled_from(own), unique=True) if own else st.just([]), st.just([])))
    names_given += draw(st.lists(st.sampled_from(PARAM_NAMES), unique=True, max_size=2)) if draw(st.booleans()) else []
    for name in dict.fromkeys(names_given):
        setattr(request.params, name, draw(PARAM_VALUES[name]))
    seed = draw(st.one_of(st.none(), seeds))
    if seed is not None:
        request.seed = seed
    request.chunk_bytes = draw(chunk_sizes)
    request.offset = draw(offsets)
    if draw(st.integers(0, 9)) == 0:
        request.require_device_fingerprint = draw(st.text(max_size=40))
    request.name = draw(names)
    request.derive_seed = draw(st.integers(0, 3)) == 0
    if draw(st.integers(0, 3)) == 0:
        shape = list(request.shape)
        usable = sliceable(shape)
        request.slices.extend(
            draw(mostly(valid_slices(tuple(shape)), any_slices(len(shape))) if usable else any_slices(4))
        )
    if draw(st.integers(0, 14)) == 0:
        request.shared_memory = draw(shared_memory_names)
    if draw(st.integers(0, 14)) == 0:
        request.shared_memory_region = draw(region_tokens)
    return request


def set_torch_shape(scheme: str, shape: list[int], dtype: int) -> tuple[list[int], int]:
    """``shape`` and ``dtype`` made acceptable to ``scheme``'s torch function."""
    if scheme in ("eye", "sparse"):
        shape = shape[:2]
    if scheme == "dirac":
        shape = [*shape, 3][:5] if len(shape) < 3 else shape
    if scheme == "orthogonal" and dtype in (pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16):
        dtype = pb.DTYPE_FLOAT64  # torch has no half-precision QR on the CPU ("geqrf_cpu" not implemented)
    return shape, dtype


MAX_FUZZED_CHUNKS = 256  # a large tensor's tiny chunk size is raised: 16384 one-byte messages tell nothing more
FILL_SCHEMES = ("uniform", "normal", "constant", "ones", "zeros")  # torch fills zero-element tensors of any shape


@st.composite
def valid_requests(draw: st.DrawFn) -> pb.InitRequest:
    """A request every rule accepts: the scheme's shapes and parameters, a name within the limit, slices that
    fit, derive_seed with a seed, an offset within the (sliced) tensor, a chunk size within the limit."""
    scheme = draw(st.sampled_from(list(SCHEMES)))
    sizes = st.integers(0, 6) if scheme in FILL_SCHEMES else st.integers(1, 6)
    # Sometimes as large as the server allows, so InitUnary's limit (8 KiB) is crossed.
    large = st.lists(st.integers(1, 128), min_size=2, max_size=3)
    shape, dtype = set_torch_shape(
        scheme,
        draw(mostly(st.lists(sizes, min_size=2, max_size=4), large, weight=3)),
        draw(st.sampled_from(list(DTYPES))),
    )
    while math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size() > MAX_TENSOR_BYTES:
        shape[shape.index(max(shape))] //= 2
    params = {"constant": {"val": -0.0}, "sparse": {"sparsity": 0.5}, "dirac": {"groups": 1}}.get(scheme, {})
    request = pb.InitRequest(scheme=scheme, shape=shape, dtype=dtype, params=pb.InitParams(**params))
    request.name = draw(valid_names)
    seeding = draw(st.sampled_from(["seed", "derive", "drawn"]))
    if seeding != "drawn":
        request.seed = draw(seeds)
    request.derive_seed = seeding == "derive" or (not SCHEMES[scheme].seeded and draw(st.booleans()))
    request.slices.extend(draw(mostly(st.just([]), valid_slices(tuple(shape)), weight=2)))
    request.chunk_bytes = draw(mostly(st.integers(1, 200), st.one_of(st.just(0), st.integers(1, 12_000)), weight=2))
    total = served_bytes(request)
    if request.chunk_bytes and total // request.chunk_bytes > MAX_FUZZED_CHUNKS:
        request.chunk_bytes = -(-total // MAX_FUZZED_CHUNKS)
    request.offset = draw(mostly(st.just(0), st.integers(0, total), weight=2))
    return request


@dataclass(frozen=True)
class Refusal:
    """What the server must answer a request with one known defect: the status, a regular expression the whole
    details match, whether generation (not validation) finds it, and the exception torch raised if torch did."""

    code: grpc.StatusCode
    details: str
    generation: bool = False
    torch_exception: str | None = None


INVALID = grpc.StatusCode.INVALID_ARGUMENT
# Requests torch itself refuses when it generates (scheme, shape, parameters).
TORCH_REFUSED = [
    ("kaiming_normal", [4, 4], {"mode": "fan_x"}),
    ("kaiming_uniform", [3, 5], {"nonlinearity": "softmax"}),
    ("orthogonal", [5], {}),
    ("eye", [2, 2, 2], {}),
    ("xavier_uniform", [7], {}),
    ("sparse", [3], {"sparsity": 0.1}),
    ("dirac", [2, 2], {}),
]
ANOTHER_SCHEME_S_PARAM = {"a": 0.5, "b": 0.5, "mean": 0.5, "std": 0.5, "gain": 0.5, "val": 0.5, "sparsity": 0.5,
                          "groups": 1, "mode": "fan_in", "nonlinearity": "relu"}  # fmt: skip


def torch_refusal(scheme: str, shape: list[int], params: dict[str, object]) -> Refusal:
    try:
        reference(scheme, tuple(shape), **params)
    except Exception as error:  # noqa: BLE001 - which one torch raises is the expectation
        return Refusal(INVALID, re.escape(str(error)), generation=True, torch_exception=type(error).__name__)
    raise AssertionError(f"torch accepts {scheme} {shape} {params}")


@st.composite
def defective_requests(draw: st.DrawFn, method: str) -> tuple[pb.InitRequest, Refusal]:
    """A valid request given exactly one defect, and how ``method`` must refuse it."""
    request = draw(valid_requests())
    scheme = SCHEMES[request.scheme]
    # The first kinds are drawn most often: hypothesis leans to the start of a list.
    kinds = ["slices", "name", "offset", "torch", "non-finite"]
    kinds += ["derive without seed"] if scheme.seeded else []
    kinds += ["shared memory"] if method != "InitUnary" else []  # InitUnary's answers are test (d)'s
    kinds += ["scheme", "shape", "dtype", "device"]
    kinds += ["param"] if set(PARAM_NAMES) - set(scheme.param_names) else []
    kind = draw(st.sampled_from(kinds))
    note(f"defect: {kind}")
    if kind == "scheme":
        request.scheme = draw(st.sampled_from(["", "bogus", "Normal", "normal_", " normal", "é" * 70]))
        return request, Refusal(INVALID, r"(scheme is empty|unknown scheme '.*'); use one of: .*")
    if kind == "shape":
        del request.shape[:]
        request.shape.extend([1 << 20, 1 << 20])
        return request, Refusal(INVALID, r"shape \[1048576, 1048576\] is 1099511627776 elements, \d+ bytes of \w+; "
                                         r"the limit is 16384 bytes \(max_tensor_bytes\)")  # fmt: skip
    if kind == "dtype":
        request.dtype = draw(st.one_of(st.integers(5, (1 << 31) - 1), st.integers(-(1 << 31), -1)))
        return request, Refusal(INVALID, rf"dtype {request.dtype} is not served; use one of: .*")
    if kind == "device":
        request.device = "cuda:9999"
        return request, Refusal(grpc.StatusCode.FAILED_PRECONDITION, r"device 'cuda:9999' requested but .*")
    if kind == "name":
        request.name = draw(too_long_names)
        return request, Refusal(INVALID, re.escape(f"name is {len(request.name)} characters; the limit is 1024"))
    if kind == "slices":
        del request.slices[:]
        request.slices.extend(draw(invalid_slices(tuple(request.shape))))
        return request, Refusal(INVALID, r"(\d+ slices; the limit is 16 \(one per dim\)|slices\[\d+\].*)")
    if kind == "offset":
        total = served_bytes(request)
        request.offset = draw(st.integers(total + 1, UINT64_MAX))
        return request, Refusal(
            grpc.StatusCode.OUT_OF_RANGE, re.escape(f"offset {request.offset} is past the tensor's end ({total} bytes)")
        )
    if kind == "derive without seed":
        request.derive_seed = True
        request.ClearField("seed")
        return request, Refusal(INVALID, re.escape(
            "derive_seed needs seed: the job's base seed, from which the name's seed is derived"))  # fmt: skip
    if kind == "param":
        name = draw(st.sampled_from(sorted(set(PARAM_NAMES) - set(scheme.param_names))))
        setattr(request.params, name, ANOTHER_SCHEME_S_PARAM[name])
        return request, Refusal(INVALID, re.escape(f"scheme {scheme.name!r} does not take parameter {name!r}") + ".*")
    if kind == "shared memory":
        if draw(st.booleans()):
            request.shared_memory = draw(shared_memory_names)
        if not request.shared_memory or draw(st.booleans()):
            request.shared_memory_region = draw(region_tokens)
        where = "the Init stream" if method == "Init" else "InitMany"
        return request, Refusal(INVALID, re.escape(f"shared_memory is answered by InitUnary, not by {where}"))
    # Found by generating: torch's own errors, and non-finite parameters torch accepted.
    request.ClearField("slices")
    request.offset, request.derive_seed = 0, False
    request.ClearField("params")
    if kind == "torch":
        request.scheme, shape, params = draw(st.sampled_from(TORCH_REFUSED))
        del request.shape[:]
        request.shape.extend(shape)
        request.dtype = pb.DTYPE_FLOAT32
        request.params.CopyFrom(pb.InitParams(**params))
        return request, torch_refusal(request.scheme, shape, params)
    request.scheme = "normal"
    del request.shape[:]
    request.shape.extend([3, 5])  # small enough for InitUnary, whose size limit is checked before generating
    request.params.mean = draw(st.sampled_from([math.inf, -math.inf]))
    return request, Refusal(INVALID, re.escape(f"parameter 'mean' is {request.params.mean}; initserve refuses "
                                               "non-finite parameters (only trunc_normal's bounds a and b may be "
                                               "infinite)"), generation=True)  # fmt: skip


@st.composite
def many_lists(draw: st.DrawFn) -> list[tuple[pb.InitRequest, Refusal | None]]:
    """InitMany's tensors: mostly valid, some with a defect anywhere; repeated names and repeated tensors."""
    entries: list[tuple[pb.InitRequest, Refusal | None]] = []
    for _ in range(draw(st.integers(0, 7))):
        if draw(st.integers(0, 4)) == 0:
            entries.append(draw(defective_requests("InitMany")))
            continue
        request = draw(valid_requests())
        earlier = [entry for entry, refusal in entries if refusal is None]
        if earlier and draw(st.integers(0, 3)) == 0:
            request = pb.InitRequest()
            request.CopyFrom(draw(st.sampled_from(earlier)))  # the same tensor twice
        elif entries and draw(st.integers(0, 3)) == 0:
            request.name = draw(st.sampled_from([entry.name for entry, _ in entries]))  # the same name twice
            if len(request.name) > MAX_NAME_CHARS:
                request.name = ""
        entries.append((request, None))
    return entries


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


REQUEST_TYPES = {
    "Init": pb.InitRequest,
    "InitUnary": pb.InitRequest,
    "InitMany": pb.InitManyRequest,
    "Describe": pb.DescribeRequest,
}


@st.composite
def raw_payloads(draw: st.DrawFn, method: str = "Init") -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    if method == "InitMany":
        data = pb.InitManyRequest(tensors=draw(st.lists(init_requests(), max_size=3))).SerializeToString()
    elif method == "Describe":
        data = draw(st.sampled_from([b"", b"\x08\x01", b"\x12\x03abc", b"\x1d\x00\x00\x00\x00"]))
    else:
        data = draw(init_requests()).SerializeToString()
    for _ in range(draw(st.integers(1, 3))):
        data = mutated(data, draw)
    return data


# --- the oracle -----------------------------------------------------------------------------------------------------


def expected_slices(shape: tuple[int, ...], slices) -> tuple[tuple[int, int, int], ...] | None:  # noqa: ANN001
    """(dim, start, length) per sliced dim, in dim order, as the proto defines Slice; None where it is invalid.
    Shards as torch.chunk splits (missing shards are empty, at the end); written from the proto, not the server."""
    if len(slices) > MAX_SLICES:
        return None
    resolved: dict[int, tuple[int, int]] = {}
    for part in slices:
        if part.shard_count and (part.start or part.length) or not part.shard_count and part.shard_index:
            return None
        if part.dim >= len(shape) or part.dim in resolved:
            return None
        size = shape[part.dim]
        if part.shard_count:
            if part.shard_index >= part.shard_count:
                return None
            # (torch.chunk of an empty dim returns shard_count empty pieces: up to 2**32 of them, so not asked)
            pieces = torch.arange(size).chunk(part.shard_count) if size else ()
            piece = pieces[part.shard_index] if part.shard_index < len(pieces) else torch.arange(0)
            resolved[part.dim] = (int(piece[0]) if len(piece) else size, len(piece))
        else:
            if part.start + part.length > size:
                return None
            resolved[part.dim] = (part.start, part.length)
    return tuple((dim, *resolved[dim]) for dim in sorted(resolved))


def sliced_shape(shape: tuple[int, ...], resolved: tuple[tuple[int, int, int], ...]) -> tuple[int, ...]:
    sizes = list(shape)
    for dim, _, length in resolved:
        sizes[dim] = length
    return tuple(sizes)


def itemsize_of(request: pb.InitRequest) -> int:
    return torch.empty((), dtype=DTYPES[request.dtype]).element_size()


def served_bytes(request: pb.InitRequest) -> int:
    """The bytes of a valid request's (sliced) tensor."""
    resolved = expected_slices(tuple(request.shape), request.slices)
    assert resolved is not None
    return math.prod(sliced_shape(tuple(request.shape), resolved)) * itemsize_of(request)


def given_params(request: pb.InitRequest) -> dict[str, object]:
    return {name: getattr(request.params, name) for name in PARAM_NAMES if request.params.HasField(name)}


def expected_bytes(request: pb.InitRequest, seed: int, resolved: tuple[tuple[int, int, int], ...]) -> bytes:
    """The contract: torch's tensor of the whole shape for ``seed``, then the slice, in C order."""
    whole = reference(request.scheme, tuple(request.shape), dtype=DTYPES[request.dtype], seed=seed,
                      **given_params(request))  # fmt: skip
    index = [slice(None)] * len(request.shape)
    for dim, start, length in resolved:
        index[dim] = slice(start, start + length)
    return bytes(whole[tuple(index)].contiguous().reshape(-1).view(torch.uint8).tolist())


def uses_shared_memory(request: pb.InitRequest) -> bool:
    return bool(request.shared_memory or request.shared_memory_region)


@dataclass
class Answer:
    """One tensor's answer as it arrived: its header, chunks as (offset, data, crc32), trailer; the end missing
    from a stream cut short."""

    header: pb.Header | None = None
    chunks: list[tuple[int, bytes, int]] = field(default_factory=list)
    trailer: pb.Trailer | None = None


def stream_answer(messages: list[pb.InitResponse]) -> Answer:
    """Init's messages (or one InitMany tensor's) in the only order allowed: header, chunks, trailer."""
    answer = Answer()
    for position, message in enumerate(messages):
        part = message.WhichOneof("part")
        assert answer.trailer is None, "a message after the trailer"
        if part == "header":
            assert position == 0, "a second header"
            answer.header = message.header
        elif part == "chunk":
            assert answer.header is not None, "a chunk before the header"
            answer.chunks.append((message.chunk.offset, message.chunk.data, message.chunk.crc32))
        else:
            assert part == "trailer" and answer.header is not None, f"{part} in place of a trailer"
            answer.trailer = message.trailer
    return answer


def unary_answer(data: bytes) -> Answer:
    """InitUnary's one message, read as clients read it (initserve_protocol.wire.decode_unary)."""
    header, *middle, trailer = decode_unary(data)
    assert isinstance(header, pb.Header) and isinstance(trailer, pb.Trailer) and len(middle) <= 1
    return Answer(header, [(chunk.offset, bytes(chunk.data), chunk.crc32) for chunk in middle], trailer)


def many_answers(messages: list[pb.InitManyResponse]) -> list[Answer]:
    """InitMany's stream as one answer per tensor: every message tagged, tensors one after another in order."""
    groups: list[list[pb.InitResponse]] = []
    for message in messages:
        assert message.tensor in (len(groups) - 1, len(groups)), f"tensor {message.tensor} after {len(groups) - 1}"
        if message.tensor == len(groups):
            groups.append([])
        part = message.WhichOneof("part")
        assert part is not None, "an InitMany message with no part"
        groups[message.tensor].append(pb.InitResponse(**{part: getattr(message, part)}))
    answers = [stream_answer(group) for group in groups]
    assert all(answer.trailer is not None for answer in answers[:-1]), "a tensor left before its trailer"
    return answers


def check_answer(
    request: pb.InitRequest, answer: Answer, kind: str = "stream", region: SharedRegion | None = None
) -> None:
    """An answer (``kind``: "stream" for Init and InitMany, "unary", or "region" for a same-host write) to
    ``request``: nothing is served that a rule forbids; the header answers the request; every byte is torch's.
    A stream cut short (cancelled) is checked as far as it came."""
    header = answer.header
    if header is None:
        return
    assert len(request.name) <= MAX_NAME_CHARS, f"a name of {len(request.name)} characters was served"
    full_shape, dtype, scheme = tuple(request.shape), DTYPES[request.dtype], SCHEMES[request.scheme]
    resolved = expected_slices(full_shape, request.slices)
    assert resolved is not None, f"invalid slices were served: {list(request.slices)}"
    assert uses_shared_memory(request) == (kind == "region"), "the same-host fields were ignored"
    shape = sliced_shape(full_shape, resolved)
    total = math.prod(shape) * itemsize_of(request)
    assert header.crc32 == header_crc32(header)
    assert (tuple(header.shape), header.scheme, header.seeded, header.name) == (shape, scheme.name, scheme.seeded,
                                                                                request.name)  # fmt: skip
    assert tuple(header.full_shape) == (full_shape if resolved else ())
    assert [(part.dim, part.start, part.length) for part in header.slices] == list(resolved)
    assert DTYPES[header.dtype] == dtype and header.dtype != pb.DTYPE_UNSPECIFIED
    assert header.total_bytes == total <= MAX_TENSOR_BYTES
    assert header.device.device == "cpu" and header.offset == request.offset <= total
    if not scheme.seeded:
        assert header.seed_used == 0 and not header.HasField("base_seed")
    elif request.derive_seed:
        assert request.HasField("seed"), "derive_seed without a seed was served"
        assert header.base_seed == request.seed
        assert header.seed_used == initserve.derive_seed(request.seed, request.name)
    else:
        assert not header.HasField("base_seed")
        assert not request.HasField("seed") or header.seed_used == request.seed
    if kind == "unary":
        assert total - request.offset <= MAX_UNARY_BYTES, "InitUnary answered more than max_unary_bytes"
        assert header.chunk_bytes == max(total - request.offset, 1)
    else:
        assert header.chunk_bytes == (request.chunk_bytes or DEFAULT_CHUNK_BYTES)
    # The contract: the bytes are torch's, for the seed the header reports.
    expected = expected_bytes(request, header.seed_used, resolved)
    position = header.offset
    if kind == "region":
        assert region is not None and not answer.chunks
        written = bytes(region.map[:])
        assert written[position:] == expected[position:]
        assert written[:position] == REGION_FILL * position, "the server wrote before the offset"
        position = total
    for offset, data, crc in answer.chunks:
        assert offset == position
        assert zlib.crc32(data) == crc
        assert len(data) == min(header.chunk_bytes, total - position)
        assert data == expected[position : position + len(data)]
        position += len(data)
    if answer.trailer is not None:
        assert position == total
        assert answer.trailer.checksum == initserve.tensor_checksum(expected)
    note(f"served ({kind})")


def check_refusal(request: pb.InitRequest, error: grpc.RpcError, method: str, allowed=REFUSALS) -> None:  # noqa: ANN001
    """A refusal of an arbitrary request: an allowed status, and each status only for what can cause it."""
    code, details = error.code(), error.details()
    metadata = dict(error.trailing_metadata() or ())
    note(f"{method}: {code.name}")
    assert code in allowed, (code, details, request)
    assert details
    if metadata.get(REFUSAL_KEY) in (SHARED_MEMORY_OFF, NO_SUCH_REGION):
        # The same-host refusals: FAILED_PRECONDITION on an InitUnary that asked for shared memory (below).
        assert (method, code) == ("InitUnary", grpc.StatusCode.FAILED_PRECONDITION), (details, metadata)
        prefix = (
            "this server does not write shared memory by name"
            if metadata[REFUSAL_KEY] == SHARED_MEMORY_OFF
            else ("no shared-memory region")
        )
        assert details.startswith(prefix), (details, metadata)
    elif REFUSAL_KEY in metadata:
        assert (metadata[REFUSAL_KEY], method, code) == (UNARY_TOO_LARGE, "InitUnary", INVALID), (details, metadata)
        too_large = re.fullmatch(
            rf"InitUnary answers at most {MAX_UNARY_BYTES} bytes \(max_unary_bytes\); this request is (\d+) bytes "
            r"from its offset: use Init, which streams",
            details,
        )
        assert too_large is not None and int(too_large[1]) > MAX_UNARY_BYTES, details
        assert not uses_shared_memory(request)
    if code == grpc.StatusCode.FAILED_PRECONDITION:  # no CUDA here; no fingerprint but the CPU's; shared memory
        assert (
            request.device.startswith("cuda")
            or request.require_device_fingerprint
            or (method == "InitUnary" and uses_shared_memory(request))
        ), details
        if not request.device.startswith("cuda") and not request.require_device_fingerprint:
            assert metadata.get(REFUSAL_KEY) in (SHARED_MEMORY_OFF, NO_SUCH_REGION), (details, metadata)
    if code == grpc.StatusCode.OUT_OF_RANGE:
        assert request.offset > 0
        assert details.startswith(f"offset {request.offset} is past the tensor's end")
    torch_exception = metadata.get(TORCH_EXCEPTION_KEY)
    if torch_exception is not None:
        # The server says torch raised it: local torch, given the same call, raises it too.
        assert code == INVALID
        assert torch_exception in TORCH_EXCEPTION_TYPES
        with pytest.raises(getattr(builtins, torch_exception)):
            reference(request.scheme, tuple(request.shape), dtype=DTYPES[request.dtype], seed=request.seed,
                      **given_params(request))  # fmt: skip


def check_refused_as(error: grpc.RpcError | None, refusal: Refusal, label: str = "") -> None:
    """``error`` is exactly ``refusal`` (its details after ``label``, InitMany's name for the tensor)."""
    assert error is not None, f"served, but must be refused: {refusal}"
    assert error.code() == refusal.code, (error.code(), error.details(), refusal)
    assert re.fullmatch(re.escape(label) + refusal.details, error.details(), re.DOTALL), (error.details(), refusal)
    assert dict(error.trailing_metadata() or ()).get(TORCH_EXCEPTION_KEY) == refusal.torch_exception


def many_label(position: int, name: str) -> str:
    """How an InitMany error names its tensor (proto: "tensors[i] ('name'): "), a long name shortened."""
    if not name:
        return f"tensors[{position}]: "
    shown = name if len(name) <= MAX_LABEL_NAME_CHARS else name[:MAX_LABEL_NAME_CHARS] + "..."
    return f"tensors[{position}] ({shown!r}): "


# --- the server and the calls ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    socket_dir = tmp_path_factory.mktemp("fuzz-shm")
    running = start_server(
        "--max-tensor-bytes", "16K", "--max-message-bytes", str(MAX_MESSAGE_BYTES), "--chunk-bytes", "4K",
        "--cache-bytes", "1M",
        "--workers", "4", "--max-work-seconds", str(MAX_WORK_SECONDS),
        "--shared-memory-socket", str(socket_dir / "shm.sock"),
    )  # fmt: skip
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def channel(fuzz_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_server.target) as opened:
        yield opened


@pytest.fixture(scope="module")
def registration(fuzz_server: ServerProcess, channel: grpc.Channel) -> Iterator[Connection]:
    """This test's connection to the server's registration socket (the same-host transport)."""
    info = describe(channel)
    connection = Connection(info.shared_memory_socket, RPC_TIMEOUT_SECONDS)
    connection.expected_server_id = info.server_id
    try:
        yield connection
    finally:
        connection.close()


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
    data = b"".join(message.chunk.data for message in exact.messages if message.WhichOneof("part") == "chunk")
    tensor = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(17, 9)
    assert same_bytes(tensor, reference("kaiming_normal", (17, 9), seed=5))
    logged = "".join(server.output)
    assert "Traceback" not in logged and "unexpected error" not in logged, logged[-3000:]


@dataclass
class Outcome:
    """What a call returned: Init's and InitMany's messages (parsed), InitUnary's and Describe's one message (its
    bytes), and the status it ended with (None: OK)."""

    messages: list
    error: grpc.RpcError | None


PARSERS = {"Init": pb.InitResponse.FromString, "InitMany": pb.InitManyResponse.FromString}


def outcome_of(
    channel: grpc.Channel, request: object, method: str = "Init", timeout: float = RPC_TIMEOUT_SECONDS
) -> Outcome:
    """Send ``request`` (a message, or raw bytes as they are) to ``method`` and collect its answer or status."""
    payload = request if isinstance(request, bytes) else request.SerializeToString()
    messages: list = []
    try:
        if method in PARSERS:
            call = channel.unary_stream(SERVICE + method, request_serializer=None, response_deserializer=None)
            for raw in call(payload, timeout=timeout):
                messages.append(PARSERS[method](raw))
        else:
            call = channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
            messages.append(call(payload, timeout=timeout))
    except grpc.RpcError as error:
        return Outcome(messages, error)
    return Outcome(messages, None)


def describe(channel: grpc.Channel) -> pb.ServerInfo:
    outcome = outcome_of(channel, pb.DescribeRequest(), "Describe")
    assert outcome.error is None, outcome.error
    return pb.ServerInfo.FromString(outcome.messages[0])


def settled(channel: grpc.Channel) -> pb.ServerStats:
    """The server's stats once nothing is in flight (no call, no byte, no generation), or the last seen after
    SETTLE_SECONDS."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        stats = describe(channel).stats
        busy = (stats.inflight_requests, stats.inflight_bytes, stats.running_generations, stats.queued_generations)
        if busy == (0, 0, 0, 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def check_settled(channel: grpc.Channel) -> None:
    stats = settled(channel)
    assert (stats.inflight_requests, stats.inflight_bytes) == (0, 0), stats
    assert (stats.running_generations, stats.queued_generations) == (0, 0), stats


def check_info(info: pb.ServerInfo) -> None:
    assert info.api_version == "initserve.v1"
    assert [scheme.name for scheme in info.schemes] == list(SCHEMES)
    assert info.limits.max_tensor_bytes == MAX_TENSOR_BYTES
    assert (info.limits.max_message_bytes, info.limits.max_unary_bytes) == (MAX_MESSAGE_BYTES, MAX_UNARY_BYTES)
    assert info.limits.default_chunk_bytes == DEFAULT_CHUNK_BYTES
    assert info.shared_memory_socket and not info.shared_memory_dir


def check_outcome(request: pb.InitRequest, outcome: Outcome, method: str = "Init") -> None:
    """(a)'s properties for one arbitrary request to Init or InitUnary and what the server answered it."""
    if outcome.error is not None:
        assert outcome.messages == []  # refused before anything was streamed
        check_refusal(request, outcome.error, method)
        return
    note(f"{method}: OK")
    if method == "InitUnary":
        check_answer(request, unary_answer(outcome.messages[0]), "unary")
        return
    answer = stream_answer(outcome.messages)
    assert answer.trailer is not None
    check_answer(request, answer)


def check_many_outcome(channel: grpc.Channel, request: pb.InitManyRequest, outcome: Outcome) -> None:
    """(b)'s properties for an arbitrary InitMany call: each tensor sent is exact and complete, in order; an error
    names a tensor after the last one sent, which Init alone refuses with the same status."""
    answers = many_answers(outcome.messages)
    tensors = request.tensors
    if outcome.error is None:
        note("InitMany: OK")
        for tensor, answer in zip(tensors, answers, strict=True):
            assert answer.trailer is not None
            check_answer(tensor, answer)
        return
    error = outcome.error
    note(f"InitMany: {error.code().name}")
    assert error.code() in REFUSALS, (error.code(), error.details())
    named = re.match(r"tensors\[(\d+)\]", error.details())
    assert named is not None, error.details()
    position = int(named[1])
    label = many_label(position, tensors[position].name)
    assert error.details().startswith(label), (error.details(), label)
    assert len(answers) <= position + 1
    for tensor, answer in zip(tensors, answers, strict=False):  # those that came
        check_answer(tensor, answer)
    assert all(answer.trailer is not None for answer in answers[:position])
    if uses_shared_memory(tensors[position]):
        assert error.details() == label + "shared_memory is answered by InitUnary, not by InitMany"
        return
    alone = outcome_of(channel, tensors[position]).error
    assert alone is not None and alone.code() == error.code(), (alone, error.details())
    shown = min(len(alone.details()), len(error.details()) - len(label), 1000)
    assert error.details()[len(label) : len(label) + shown] == alone.details()[:shown]


# --- (a) structured requests ----------------------------------------------------------------------------------------


@FUZZ_SETTINGS
@given(request=init_requests())
def test_fuzzed_requests_are_refused_cleanly_or_served_exactly(channel: grpc.Channel, request: pb.InitRequest) -> None:
    check_outcome(request, outcome_of(channel, request))


@FUZZ_SETTINGS
@given(request=init_requests())
def test_fuzzed_unary_requests_are_refused_cleanly_or_answered_exactly(
    channel: grpc.Channel, request: pb.InitRequest
) -> None:
    check_outcome(request, outcome_of(channel, request, "InitUnary"), "InitUnary")


@fuzz_settings(300)
@given(request=valid_requests(), method=st.sampled_from(["Init", "InitUnary"]))
def test_fuzzed_valid_requests_are_exact_with_every_name_slice_seed_chunk_size_and_offset(
    channel: grpc.Channel, request: pb.InitRequest, method: str
) -> None:
    """Valid by construction: every one is served (InitUnary: unless larger than it answers), so the exactness
    half of (a) is exercised every time."""
    outcome = outcome_of(channel, request, method)
    if method == "InitUnary" and served_bytes(request) - request.offset > MAX_UNARY_BYTES:
        assert outcome.error is not None, "InitUnary answered more than max_unary_bytes"
        check_refusal(request, outcome.error, method)
        assert dict(outcome.error.trailing_metadata() or ()).get(REFUSAL_KEY) == UNARY_TOO_LARGE
        return
    assert outcome.error is None, (outcome.error.code(), outcome.error.details(), request)
    check_outcome(request, outcome, method)


@fuzz_settings(300)
@given(method=st.sampled_from(["Init", "InitUnary"]), data=st.data())
def test_fuzzed_requests_with_one_defect_are_refused_with_its_status(
    channel: grpc.Channel, method: str, data: st.DataObject
) -> None:
    """Invalid slices (dims out of range or twice, ranges past the end, shard_index without shard_count or past
    it, more than 16), names over 1024 characters, derive_seed without a seed and the rest: never served."""
    request, refusal = data.draw(defective_requests(method))
    outcome = outcome_of(channel, request, method)
    assert outcome.messages == []
    check_refused_as(outcome.error, refusal)


# Found by this fuzz: the largest header (a name of 1024 four-byte characters is 4 KiB of it) was counted nowhere.
LONGEST_NAME = "\U0001f600" * MAX_NAME_CHARS


def test_an_init_unary_answer_with_the_longest_name_fits_the_message_limit(channel: grpc.Channel) -> None:
    """A tensor of max_unary_bytes named with the longest name (a 4.3 KiB header) must still be answered, or
    refused as too large for InitUnary (the client then streams it). When the server kept a fixed 4 KiB, it answered
    RESOURCE_EXHAUSTED "Sent message larger than max (12504 vs. 12288)", which no retry mends (the SDK's fetch
    raised ResourceExhausted; so with --max-message-bytes 1M)."""
    request = pb.InitRequest(scheme="normal", shape=[MAX_UNARY_BYTES // 4], seed=1, name=LONGEST_NAME)
    outcome = outcome_of(channel, request, "InitUnary")
    if outcome.error is not None:
        assert outcome.error.code() == INVALID, (outcome.error.code(), outcome.error.details())
        assert dict(outcome.error.trailing_metadata() or ()).get(REFUSAL_KEY) == UNARY_TOO_LARGE
        return
    check_outcome(request, outcome, "InitUnary")


def test_every_message_limit_the_server_accepts_fits_the_longest_header() -> None:
    """With --max-message-bytes 2K (once accepted: it only required more than a chunk's 64 bytes of framing), no
    Init stream of a request with the longest name could be sent: its header alone is 4.2 KiB (RESOURCE_EXHAUSTED
    "Sent message larger than max (4262 vs. 2048)"). Such a limit is refused at start, naming the least it takes."""
    with pytest.raises(RuntimeError) as refused:
        start_server("--max-message-bytes", "2K", "--chunk-bytes", "1K", "--max-tensor-bytes", "16K")
    assert (
        f"initserve-server: max_message_bytes must be at least {header_room_bytes(16)} (the largest header, trailer "
        "and chunk framing with max_dims=16), got 2048"
    ) in str(refused.value)
    least = start_server("--max-message-bytes", str(header_room_bytes(16)), "--max-tensor-bytes", "16K",
                         "--chunk-bytes", str(DEFAULT_CHUNK_BYTES))  # fmt: skip
    try:
        request = pb.InitRequest(scheme="normal", shape=[4], seed=1, name=LONGEST_NAME)
        with grpc.insecure_channel(least.target) as opened:
            outcome = outcome_of(opened, request)
        assert outcome.error is None, (outcome.error.code(), outcome.error.details())
        check_outcome(request, outcome)
    finally:
        least.stop()


# --- (b) raw bytes --------------------------------------------------------------------------------------------------


def check_raw(channel: grpc.Channel, payload: bytes, method: str = "Init") -> None:
    outcome = outcome_of(channel, payload, method)
    try:
        parsed = REQUEST_TYPES[method].FromString(payload)
    except (DecodeError, RuntimeError, ValueError) as parse_error:  # as the server's parser: RuntimeError too deep
        note(f"{method}: unparseable")
        # The whole accepted set for bytes that are not a request: INVALID_ARGUMENT, naming the size and the
        # parser's own error (the server runs the same protobuf).
        assert outcome.error is not None and outcome.messages == []
        assert outcome.error.code() == INVALID
        assert outcome.error.details() == (
            f"request is not a valid initserve.v1 message ({len(payload)} bytes): {parse_error}"
        )
        assert TORCH_EXCEPTION_KEY not in dict(outcome.error.trailing_metadata() or ())
        return
    if method == "InitMany":
        check_many_outcome(channel, parsed, outcome)
    elif method == "Describe":
        note("Describe: OK")
        assert outcome.error is None, (outcome.error.code(), outcome.error.details())
        check_info(pb.ServerInfo.FromString(outcome.messages[0]))
    else:
        check_outcome(parsed, outcome, method)


@fuzz_settings(300)
@given(data=st.data(), method=st.sampled_from(list(REQUEST_TYPES)))
def test_fuzzed_bytes_are_invalid_argument_unless_they_parse(
    channel: grpc.Channel, data: st.DataObject, method: str
) -> None:
    check_raw(channel, data.draw(raw_payloads(method)), method)


@pytest.mark.slow
@settings(FUZZ_SETTINGS, max_examples=2000)
@given(request=init_requests(), payload=raw_payloads(), method=st.sampled_from(["Init", "InitUnary"]))
def test_longer_fuzz_of_requests_and_bytes(
    channel: grpc.Channel, request: pb.InitRequest, payload: bytes, method: str
) -> None:
    check_outcome(request, outcome_of(channel, request, method), method)
    check_raw(channel, payload, method)


# --- (c) InitMany ---------------------------------------------------------------------------------------------------


@fuzz_settings(250)
@given(entries=many_lists())
def test_fuzzed_init_many_serves_every_tensor_or_names_the_first_invalid_one(
    channel: grpc.Channel, entries: list[tuple[pb.InitRequest, Refusal | None]]
) -> None:
    tensors = [request for request, _ in entries]
    outcome = outcome_of(channel, pb.InitManyRequest(tensors=tensors), "InitMany")
    answers = many_answers(outcome.messages)
    refused_by_validation = [position for position, (_, refusal) in enumerate(entries) if refusal and not
                             refusal.generation]  # fmt: skip
    refused_at_all = [position for position, (_, refusal) in enumerate(entries) if refusal]
    if not refused_at_all:
        note(f"InitMany: OK, {len(tensors)} tensors")
        assert outcome.error is None, (outcome.error.code(), outcome.error.details())
        for request, answer in zip(tensors, answers, strict=True):
            assert answer.trailer is not None
            check_answer(request, answer)
        return
    # Validation refuses before anything is sent; a generation's failure after the tensors before it.
    first = refused_by_validation[0] if refused_by_validation else refused_at_all[0]
    note("InitMany: refused by " + ("validation" if refused_by_validation else "generation"))
    request, refusal = entries[first]
    check_refused_as(outcome.error, refusal, many_label(first, request.name))
    assert len(answers) == (0 if refused_by_validation else first)
    for request, answer in zip(tensors, answers, strict=False):  # those before the one refused
        assert answer.trailer is not None
        check_answer(request, answer)


@fuzz_settings(100)
@given(tensors=st.lists(init_requests(), max_size=4))
def test_fuzzed_init_many_of_arbitrary_requests_agrees_with_init(
    channel: grpc.Channel, tensors: list[pb.InitRequest]
) -> None:
    request = pb.InitManyRequest(tensors=tensors)
    check_many_outcome(channel, request, outcome_of(channel, request, "InitMany"))


# --- (d) the same-host fields ---------------------------------------------------------------------------------------

REGION_FILL = b"\xa5"  # what a region holds before the server writes: bytes before the offset must keep it
SAME_HOST_CASES = ["registered", "wrong size", "unknown token", "malformed token", "name", "name and token"]


@contextlib.contextmanager
def registered_region(registration: Connection, nbytes: int) -> Iterator[SharedRegion]:
    """A sealed memfd of ``nbytes`` filled with REGION_FILL and registered; released afterwards."""
    region = SharedRegion(nbytes)
    try:
        region.map[:] = REGION_FILL * nbytes
        reply = registration.register(region, RPC_TIMEOUT_SECONDS)
        assert reply.region and not reply.error and not reply.closed, reply
        region.token = reply.region
        region.close_fd()
        yield region
    finally:
        registration.release(region)
        region.close()


@fuzz_settings(200)
@given(
    request=valid_requests(),
    case=st.sampled_from(SAME_HOST_CASES),
    method=st.sampled_from(["InitUnary", "Init", "InitUnary", "InitMany"]),
    data=st.data(),
)
def test_fuzzed_same_host_fields_write_only_a_registered_region_of_the_right_size(
    channel: grpc.Channel, registration: Connection, request: pb.InitRequest, case: str, method: str,
    data: st.DataObject,
) -> None:  # fmt: skip
    total = served_bytes(request)
    if case == "registered" and total == 0:
        case = "wrong size"  # a region has at least one byte
    note(f"same host: {case} on {method}")
    with contextlib.ExitStack() as stack:
        if case in ("name", "name and token"):
            request.shared_memory = data.draw(shared_memory_names)
        if case == "name and token":
            request.shared_memory_region = data.draw(region_tokens)
        if case == "malformed token":
            request.shared_memory_region = data.draw(malformed_tokens)
        if case == "unknown token":
            request.shared_memory_region = data.draw(well_formed_tokens)
        region = None
        if case in ("registered", "wrong size"):
            size = total if case == "registered" else data.draw(st.integers(1, MAX_TENSOR_BYTES).filter(
                lambda nbytes: nbytes != total))  # fmt: skip
            region = stack.enter_context(registered_region(registration, size))
            request.shared_memory_region = region.token
        if method == "InitMany":
            outcome = outcome_of(channel, pb.InitManyRequest(tensors=[request]), method)
            refusal = Refusal(INVALID, re.escape("shared_memory is answered by InitUnary, not by InitMany"))
            check_refused_as(outcome.error, refusal, many_label(0, request.name))
            return
        outcome = outcome_of(channel, request, method)
        if method == "Init":
            check_refused_as(outcome.error, Refusal(INVALID, re.escape(
                "shared_memory is answered by InitUnary, not by the Init stream")))  # fmt: skip
            assert region is None or bytes(region.map[:]) == REGION_FILL * region.nbytes, "a refused call wrote"
            return
        if case in ("name", "name and token"):
            refusal = Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                              re.escape("this server does not write shared memory by name") + ".*")  # fmt: skip
        elif case == "malformed token":
            token = request.shared_memory_region
            refusal = Refusal(
                INVALID,
                re.escape(
                    f"shared_memory_region {token[:80]!r} is not a region token (region- and 32 lowercase hex digits)"
                ),
            )
        elif case == "unknown token":
            refusal = Refusal(grpc.StatusCode.FAILED_PRECONDITION, re.escape(
                f"no shared-memory region {request.shared_memory_region} on this server") + ".*")  # fmt: skip
        elif case == "wrong size":
            refusal = Refusal(
                INVALID,
                re.escape(f"shared-memory region {region.token} is {region.nbytes} bytes; the tensor is {total} bytes"),
            )
        else:
            assert outcome.error is None, (outcome.error.code(), outcome.error.details(), request)
            check_answer(request, unary_answer(outcome.messages[0]), "region", region)
            return
        check_refused_as(outcome.error, refusal)
        assert region is None or bytes(region.map[:]) == REGION_FILL * region.nbytes, "a refused call wrote"


# --- (e) concurrency and cancellation -------------------------------------------------------------------------------

CONCURRENT_THREADS = 8
STREAM_METHODS = ("Init", "InitMany")


@dataclass
class Plan:
    """One call of a concurrent batch and how its client ends it: "none" (reads it all), "cancel" (after
    ``after`` messages of a stream, or ``after`` seconds of a unary call), "cancel later" (another thread
    cancels it ``after`` seconds in) or "deadline" (of ``after`` seconds)."""

    method: str
    request: pb.InitRequest | pb.InitManyRequest | pb.DescribeRequest
    stop: str = "none"
    after: float = 0.0
    valid: bool = True  # valid by construction: refused only for load (or InitUnary: as too large for it)


# Work without bytes: a sparse [0, N] loops over N columns (about 10 us each) and is 0 bytes, admitted below
# max_work_seconds. Such generations are what a cancelled call must stop.
heavy_requests = st.builds(
    lambda columns, seed: pb.InitRequest(
        scheme="sparse", shape=[0, columns], params=pb.InitParams(sparsity=0.1), seed=seed
    ),
    st.integers(20_000, 120_000),
    st.integers(0, 3),
)


@st.composite
def call_plans(draw: st.DrawFn, pool: list[pb.InitRequest]) -> Plan:
    """A call on a request of ``pool`` (so concurrent calls share generations and cache entries), an arbitrary
    one, or a heavy one; heavy calls are always ended early."""
    method = draw(st.sampled_from(["Init", "Init", "InitUnary", "InitMany", "Describe"]))
    stop = draw(st.sampled_from(["none", "none", "cancel", "cancel later", "deadline"]))
    valid = True
    if method == "Describe":
        request = pb.DescribeRequest()
    elif method == "InitMany":
        request = pb.InitManyRequest(tensors=draw(st.lists(st.sampled_from(pool), min_size=1, max_size=4)))
    else:
        kind = draw(st.sampled_from(["pool", "pool", "arbitrary", "heavy"]))
        request = draw({"pool": st.sampled_from(pool), "arbitrary": init_requests(), "heavy": heavy_requests}[kind])
        valid = kind != "arbitrary"
        if kind == "heavy" and stop == "none":
            stop = "deadline"
    if stop == "cancel" and method in STREAM_METHODS:
        after = draw(st.integers(0, 8))
    elif stop == "deadline":
        after = draw(st.sampled_from([0.0005, 0.001, 0.003, 0.01, 0.05, 0.3]))
    else:
        after = draw(st.sampled_from([0.0, 0.0005, 0.002, 0.01, 0.05]))
    return Plan(method, request, stop, after, valid)


@st.composite
def batches(draw: st.DrawFn) -> list[Plan]:
    pool = draw(st.lists(valid_requests(), min_size=1, max_size=4))
    return draw(st.lists(call_plans(pool), min_size=CONCURRENT_THREADS, max_size=3 * CONCURRENT_THREADS))


def run_plan(channel: grpc.Channel, plan: Plan) -> str:
    """Make ``plan``'s call, end it as planned, and check what arrived: exact as far as it came, and an end the
    client asked for or a clean refusal."""
    payload = plan.request.SerializeToString()
    timeout = plan.after if plan.stop == "deadline" else RPC_TIMEOUT_SECONDS
    messages: list = []
    error: grpc.RpcError | None = None
    if plan.method in STREAM_METHODS:
        call = channel.unary_stream(SERVICE + plan.method, request_serializer=None, response_deserializer=None)
        stream = call(payload, timeout=timeout)
        timer = threading.Timer(plan.after, stream.cancel) if plan.stop == "cancel later" else None
        if timer is not None:
            timer.start()
        try:
            if plan.stop == "cancel" and plan.after == 0:
                stream.cancel()
            for raw in stream:
                messages.append(PARSERS[plan.method](raw))
                if plan.stop == "cancel" and len(messages) >= plan.after:
                    stream.cancel()
        except grpc.RpcError as raised:
            error = raised
        finally:
            if timer is not None:
                timer.cancel()
    else:
        call = channel.unary_unary(SERVICE + plan.method, request_serializer=None, response_deserializer=None)
        future = call.future(payload, timeout=timeout)
        if plan.stop in ("cancel", "cancel later"):
            time.sleep(plan.after)
            future.cancel()
        try:
            messages.append(future.result())
        except grpc.FutureCancelledError:
            return f"{plan.method}, {plan.stop}: cancelled before an answer"
        except grpc.RpcError as raised:
            error = raised
    ended_early = {
        "none": set(),
        "cancel": {grpc.StatusCode.CANCELLED},
        "cancel later": {grpc.StatusCode.CANCELLED},
        # The server may notice the expiry first, and end the call as cancelled before the client's deadline.
        "deadline": {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED},
    }[plan.stop]
    if error is not None:
        assert error.code() in LOADED_REFUSALS | ended_early, (error.code(), error.details(), plan)
    # Whatever arrived is exact, however the call ended.
    if plan.method == "Init":
        answer = stream_answer(messages)
        assert error is not None or answer.trailer is not None
        check_answer(plan.request, answer)
    elif plan.method == "InitMany":
        answers = many_answers(messages)
        assert error is not None or len(answers) == len(plan.request.tensors)
        for request, answer in zip(plan.request.tensors, answers, strict=False):  # those that came
            check_answer(request, answer)
        assert error is not None or all(answer.trailer is not None for answer in answers)
    elif plan.method == "InitUnary" and messages:
        check_answer(plan.request, unary_answer(messages[0]), "unary")
    elif messages:
        check_info(pb.ServerInfo.FromString(messages[0]))
    if error is not None and error.code() in REFUSALS:
        if plan.valid:
            too_large = dict(error.trailing_metadata() or ()).get(REFUSAL_KEY) == UNARY_TOO_LARGE
            assert plan.method == "InitUnary" and too_large, (error.code(), error.details(), plan)
        if plan.method in ("Init", "InitUnary"):
            check_refusal(plan.request, error, plan.method)
    return f"{plan.method}, {plan.stop}: {error.code().name if error is not None else 'OK'}"


# Not shrunk: each try of a failing batch waits SETTLE_SECONDS, and a smaller batch rarely races the same way.
@settings(fuzz_settings(20), phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(plans=batches())
def test_fuzzed_concurrent_calls_some_cancelled_stay_exact_and_leave_nothing_in_flight(
    fuzz_server: ServerProcess, channel: grpc.Channel, plans: list[Plan]
) -> None:
    with grpc.insecure_channel(fuzz_server.target) as second, ThreadPoolExecutor(CONCURRENT_THREADS) as threads:
        calls = [threads.submit(run_plan, (channel, second)[number % 2], plan) for number, plan in enumerate(plans)]
        for call in calls:
            note(call.result())  # re-raises a failed check
    check_settled(channel)


# --- afterwards -----------------------------------------------------------------------------------------------------


def test_after_the_fuzz_the_server_is_healthy_exact_settled_and_opened_no_name(
    fuzz_server: ServerProcess, channel: grpc.Channel
) -> None:
    check_still_serving(fuzz_server, channel)
    check_settled(channel)
    check_info(describe(channel))
    with fuzz_server.client() as client:
        result = client.fetch((32, 32), "orthogonal", seed=77, dtype=torch.float64)
    assert same_bytes(result.tensor, reference("orthogonal", (32, 32), seed=77, dtype=torch.float64))
    server_cwd = os.readlink(f"/proc/{fuzz_server.process.pid}/cwd")
    for directory in ("/dev/shm", tempfile.gettempdir(), server_cwd, os.getcwd()):
        assert glob.glob(os.path.join(directory, f"{MARK}*")) == [], f"a name was opened as a path in {directory}"

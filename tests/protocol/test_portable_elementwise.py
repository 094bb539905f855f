"""The portable generator from torch elementwise operations (portable/elementwise.py): byte for byte the bytes of
tensors.fill (the Numba kernel, itself held to the reference) on the CPU device, for every scheme it makes, every
dtype, random shapes, slices, windows, seeds and chunk sizes, and the known-answer file; the same known answers on
CUDA where there is a GPU."""

from __future__ import annotations

import hashlib
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from initserve_protocol import slices
from initserve_protocol.portable import elementwise, scales, tensors
from initserve_protocol.slices import Resolved
from tests.protocol.portable_known_answers import TORCH_DTYPES, load
from tests.protocol.test_portable import SCALES, SEEDS, _sliced_shapes

SUPPORTED = tuple(sorted(scales.SERVED - {"sparse"}))  # every drawn scheme but sparse
DTYPES = tuple(TORCH_DTYPES.values())


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.cpu().view(torch.uint8).numpy().tobytes()


def _assert_equal(
    scheme: str,
    params: dict,
    shape: tuple[int, ...],
    resolved: Resolved,
    seed: int,
    window: tuple[int, int] | None = None,
    chunk_elements: int = elementwise.DEFAULT_CHUNK_ELEMENTS,
) -> None:
    """elementwise.fill == tensors.fill, byte for byte, in every dtype, for positions [first, first + count)."""
    first, count = window if window is not None else (0, slices.numel(shape, resolved))
    for dtype in DTYPES:
        expected, got = torch.empty(count, dtype=dtype), torch.full((count,), math.nan, dtype=dtype)
        tensors.fill(expected, scheme, params, shape, seed, resolved, first)
        elementwise.fill(got, scheme, params, shape, seed, resolved, first, chunk_elements=chunk_elements)
        if _bytes(got) != _bytes(expected):
            at = next(i for i in range(count) if _bytes(got[i : i + 1]) != _bytes(expected[i : i + 1]))
            raise AssertionError(
                f"elementwise != tensors.fill: {scheme} {params} shape={shape} resolved={resolved} seed={seed} "
                f"window={window} chunk={chunk_elements} {dtype}, first at position {at}: "
                f"{_bytes(got[at : at + 1]).hex()} != {_bytes(expected[at : at + 1]).hex()}"
            )


# Parameters: torch's accepted ranges, with tails, narrow intervals and infinite bounds for trunc_normal.
FINITE = st.floats(-6, 6)
BOUNDS = st.one_of(FINITE, st.sampled_from([-math.inf, math.inf, -45.0, 45.0, 38.0, 2.0, 3.0]))
NONLINEARITIES = ("linear", "conv2d", "sigmoid", "tanh", "relu", "leaky_relu", "selu")


@st.composite
def _requests(draw) -> tuple[str, dict, tuple[int, ...], Resolved]:
    scheme = draw(st.sampled_from(SUPPORTED))
    if scheme.startswith(("xavier", "kaiming")):  # fans: at least 2 dims, none empty
        shape = tuple(draw(st.lists(st.integers(1, 7), min_size=2, max_size=4)))
        ranges = []
        for dim, size in enumerate(shape):
            if draw(st.booleans()):
                start = draw(st.integers(0, size))
                ranges.append(slices.Range(dim, start, draw(st.integers(0, size - start))))
        sliced = shape, slices.resolve(shape, ranges)
    else:
        sliced = draw(_sliced_shapes())
    if scheme == "uniform":
        params = {"a": draw(SCALES), "b": draw(SCALES)}
    elif scheme == "normal":
        params = {"mean": draw(SCALES), "std": draw(st.floats(0, 3e38))}
    elif scheme == "trunc_normal":
        mean, std = draw(FINITE), draw(st.one_of(st.floats(0.01, 5), st.sampled_from([1.0, 1e-8, 1e3, 0.02])))
        a = draw(BOUNDS)
        b = draw(st.one_of(BOUNDS, st.just(a), st.just(math.nextafter(a, math.inf))))
        params = {"mean": mean, "std": std, "a": min(a, b), "b": max(a, b)}
    elif scheme.startswith("xavier"):
        params = {"gain": draw(st.floats(0, 10))}
    else:
        params = {
            "a": draw(st.floats(-3, 3)),
            "mode": draw(st.sampled_from(["fan_in", "fan_out"])),
            "nonlinearity": draw(st.sampled_from(NONLINEARITIES)),
        }
    return (scheme, params, *sliced)


@settings(max_examples=60, deadline=None)
@given(request=_requests(), seed=SEEDS, data=st.data())
def test_elementwise_equals_the_kernel_byte_for_byte(request, seed, data) -> None:
    """Random requests, windows [first, first + count) of their slices, and chunks of 1 to about a sixth of the
    window, so chunks start and end on odd elements, inside rows and across them."""
    scheme, params, shape, resolved = request
    total = slices.numel(shape, resolved)
    first = data.draw(st.integers(0, total))
    count = data.draw(st.integers(0, total - first))
    chunk = data.draw(st.integers(max(1, count // 6), max(1, count + 1)))
    _assert_equal(scheme, params, shape, resolved, seed, (first, count), chunk)


LONG_CASES = [
    # (shape, ranges, chunk_elements): chunks within one run, across runs, and a chunk holding many runs
    ((2051,), [slices.Range(0, 3, 2047)], 333),
    ((3, 1031), [slices.Range(1, 1, 1029)], 500),
    ((5, 3, 221), [slices.Range(0, 1, 3), slices.Range(2, 7, 193)], 1000),
    ((7, 503), [slices.Range(0, 1, 6), slices.Range(1, 1, 501)], 1 << 22),
    ((64, 9, 3), [slices.Range(1, 2, 1)], 77),
]


@pytest.mark.parametrize(("shape", "ranges", "chunk"), LONG_CASES, ids=[str(case[0]) for case in LONG_CASES])
@pytest.mark.parametrize(
    ("scheme", "params"),
    [
        ("normal", {"mean": 0.5, "std": 3.0}),
        ("uniform", {"a": -2.0, "b": 1.0}),
        ("trunc_normal", {"mean": -1.0, "a": -3.0, "b": 0.5}),
    ],
    ids=["normal", "uniform", "trunc_normal"],
)
def test_elementwise_equals_the_kernel_across_chunks(shape, ranges, chunk, scheme, params) -> None:
    resolved = slices.resolve(shape, ranges)
    seed = math.prod(shape) * 0x9E3779B97F4A7C15 % (1 << 64) - (1 << 63)
    _assert_equal(scheme, params, shape, resolved, seed, chunk_elements=chunk)


TRUNCATED = [
    {},  # torch's defaults: (-2, 2)
    {"a": 2.0, "b": 3.0},  # the upper tail: flipped
    {"a": -3.0, "b": -2.0},  # the lower tail
    {"mean": 0.5, "std": 2.0, "a": -math.inf, "b": 1.0},  # one infinite bound
    {"a": -math.inf, "b": math.inf},  # both
    {"mean": 0.1, "std": 0.02, "a": 0.1, "b": 0.1000001},  # narrow
    {"a": 1.0, "b": 1.0},  # a == b: width 0
    {"a": -41.0, "b": -40.0},  # beyond 37.5 std: both CDF values 0
    {"a": 6.0, "b": 9.0},  # far in the upper tail: AS241's r > 5 region
    {"a": 30.0, "b": math.inf},  # deeper: subnormal CDF values
]


@pytest.mark.parametrize("params", TRUNCATED, ids=[str(params) for params in TRUNCATED])
def test_trunc_normal_in_its_tails_and_at_its_edges(params) -> None:
    _assert_equal("trunc_normal", params, (3, 347), (), 0x5EED, chunk_elements=400)
    _assert_equal("trunc_normal", params, (3, 347), ((1, 5, 300),), -3, chunk_elements=299)


def test_sqrt_is_correctly_rounded_over_its_arguments() -> None:
    """torch.sqrt on the CPU (MKL's VML) is 1 ulp off for some arguments; the corrected one is never."""
    rng = random.Random(20)
    values = [rng.uniform(0.0, 80.0) for _ in range(50_000)]  # Box-Muller's -2 ln v: [0, 73.6]
    values += [rng.random() * 2.0 ** rng.randint(-53, 10) for _ in range(50_000)]  # small ones, AS241's -ln p
    values += [float(k * k) for k in range(1, 500)] + [math.nextafter(float(k * k), 0.0) for k in range(1, 500)]
    values += [0.0, -0.0, 2.0**-53, 745.0, 1.0, 2.0, 4.0]
    got = elementwise._sqrt(torch.tensor(values, dtype=torch.float64)).tolist()
    wrong = [
        (x, y)
        for x, y in zip(values, got, strict=True)
        if y != math.sqrt(x) or math.copysign(1, y) != math.copysign(1, x)
    ]
    assert not wrong, wrong[:5]


def _known_answers() -> list[dict]:
    return [case for case in load()["cases"] if case["scheme"] in SUPPORTED]


def _known_bytes(case: dict, device: torch.device, chunk_elements: int) -> bytes:
    resolved = tuple(tuple(item) for item in case["slices"])
    shape = tuple(case["shape"])
    out = torch.empty(slices.numel(shape, resolved), dtype=TORCH_DTYPES[case["dtype"]], device=device)
    elementwise.fill(out, case["scheme"], case["params"], shape, case["seed"], resolved, chunk_elements=chunk_elements)
    return _bytes(out)


KNOWN = _known_answers()
KNOWN_IDS = [f"{number}-{case['scheme']}-{case['dtype']}" for number, case in enumerate(KNOWN)]


def test_every_supported_scheme_has_known_answers() -> None:
    assert {case["scheme"] for case in KNOWN} == set(SUPPORTED)
    assert len(KNOWN) >= 45


@pytest.mark.parametrize("case", KNOWN, ids=KNOWN_IDS)
def test_elementwise_gives_the_known_answers(case) -> None:
    for chunk_elements in (elementwise.DEFAULT_CHUNK_ELEMENTS, 1000):
        data = _known_bytes(case, torch.device("cpu"), chunk_elements)
        assert data[:16].hex() == case["head"]
        assert hashlib.sha256(data).hexdigest() == case["sha256"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_elementwise_gives_the_known_answers_on_cuda() -> None:
    """The exactness of torch's CUDA double kernels (add, sub, mul, div, sqrt; no contraction across kernels; no
    division by a scalar) is the module's claim: this checks it on whatever GPU runs the tests."""
    wrong = []
    for number, case in zip(KNOWN_IDS, KNOWN, strict=True):
        for chunk_elements in (elementwise.DEFAULT_CHUNK_ELEMENTS, 1000):
            data = _known_bytes(case, torch.device("cuda"), chunk_elements)
            if hashlib.sha256(data).hexdigest() != case["sha256"]:
                wrong.append((number, chunk_elements))
    assert not wrong


@pytest.mark.parametrize("scheme", sorted({"sparse", *scales.FILLS}))
def test_sparse_and_the_fills_are_not_made_here(scheme) -> None:
    with pytest.raises(NotImplementedError, match=scheme):
        elementwise.fill(torch.empty(4, 4), scheme, {}, (4, 4), 0)


def test_what_it_refuses() -> None:
    with pytest.raises(ValueError, match="LAPACK"):
        elementwise.fill(torch.empty(4, 4), "orthogonal", {}, (4, 4), 0)
    with pytest.raises(ValueError, match="contiguous"):
        elementwise.fill(torch.empty(4, 4).t(), "normal", {}, (4, 4), 0)
    with pytest.raises(ValueError, match="float32, float64"):
        elementwise.fill(torch.empty(4, dtype=torch.int32), "normal", {}, (4,), 0)
    with pytest.raises(ValueError, match="chunk_elements"):
        elementwise.fill(torch.empty(4), "normal", {}, (4,), 0, chunk_elements=0)


def test_out_keeps_its_shape_and_an_empty_one_is_untouched() -> None:
    out = torch.empty(3, 4, dtype=torch.float64)
    elementwise.fill(out, "normal", {}, (3, 4), 7)
    expected = torch.empty(3, 4, dtype=torch.float64)
    tensors.fill(expected, "normal", {}, (3, 4), 7)
    assert torch.equal(out, expected)
    elementwise.fill(torch.empty(0), "normal", {}, (0, 5), 7)

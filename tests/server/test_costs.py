"""The cost model: pathological requests are refused, model-scale ones are not, torch's errors come first, and
working memory is an upper bound of what generations measurably use."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

from initserve_protocol.schemes import SCHEMES
from initserve_server import costs
from initserve_server.config import DEFAULT_MAX_TENSOR_BYTES, DEFAULT_MAX_WORK_SECONDS
from initserve_server.initializers import generate
from initserve_server.validation import InvalidRequest
from tests.conftest import REPO

# bench/costs.py measures working memory (a fresh interpreter, the server's allocator setting); the test runs it.
_bench_spec = importlib.util.spec_from_file_location("bench_costs", os.path.join(REPO, "bench", "costs.py"))
bench_costs = importlib.util.module_from_spec(_bench_spec)
_bench_spec.loader.exec_module(bench_costs)
make_spec = bench_costs.make_spec

MIB = 1 << 20
LIMIT = DEFAULT_MAX_WORK_SECONDS
SLACK_BYTES = 16 * MIB  # interpreter and heap noise around one generation
LOOSENESS = 1.5  # working_bytes may exceed the measured extra by this factor (plus the slack), no more
INF = math.inf
NAN = math.nan


# --- (a) the issue's reproductions ------------------------------------------------------------------------------

ISSUE_REPRODUCTIONS = [
    ("sparse", [0, 2**62], "float32", {"sparsity": 0.1}),  # 0 bytes, 2**62 columns
    ("trunc_normal", [1], "float32", {"a": 10.0, "b": 1e9}),  # the rejection loop practically never accepts
    ("sparse", [1, 2**30], "float16", {"sparsity": 0.1}),  # 2**30 columns
]


@pytest.mark.parametrize("scheme, shape, dtype, params", ISSUE_REPRODUCTIONS)
def test_the_issues_reproductions_are_refused_naming_the_estimate_and_the_limit(scheme, shape, dtype, params) -> None:
    spec = make_spec(scheme, shape, dtype, params)
    assert spec.full_bytes <= DEFAULT_MAX_TENSOR_BYTES  # byte admission lets each through
    cost = costs.estimate(spec)
    assert cost.work_seconds > LIMIT and not cost.light
    with pytest.raises(costs.WorkRefused) as refused:
        costs.check(spec, LIMIT)
    message = str(refused.value)
    assert isinstance(refused.value, InvalidRequest)  # the server's INVALID_ARGUMENT
    assert f"{cost.work_seconds:.3g} s" in message and "the limit is 60 s (max_work_seconds)" in message
    assert cost.explain in message and refused.value.cost == cost and refused.value.limit_seconds == LIMIT


def test_each_reproduction_is_refused_for_its_own_reason() -> None:
    sparse_columns = costs.estimate(make_spec("sparse", [0, 2**62], params={"sparsity": 0.1}))
    assert sparse_columns.work_seconds >= 2**62 * costs.SPARSE_SECONDS_PER_COLUMN
    assert sparse_columns.working_bytes == 0 and "4611686018427387904 columns" in sparse_columns.explain
    far_tail = costs.estimate(make_spec("trunc_normal", [1], params={"a": 10.0, "b": 1e9}))
    assert "uniform branch" in far_tail.explain


def test_the_issues_dirac_is_no_longer_hours_but_a_minute_at_most() -> None:
    """dirac [2**30, 1, 1] groups=2**30 (2 GiB of float16): torch's Python loop would take ~3.6 h (12 us a write);
    initializers.dirac_ sets the diagonal by indexed assignments, so it is admitted, bounded, and its index memory
    bounded too."""
    dirac = costs.check(make_spec("dirac", [2**30, 1, 1], "float16", {"groups": 2**30}), LIMIT)
    assert f"{2**30} diagonal writes" in dirac.explain and dirac.work_seconds <= LIMIT
    assert dirac.working_bytes == costs.DIRAC_WRITES_PER_CALL * costs.DIRAC_INDEX_BYTES_PER_WRITE
    depthwise = costs.estimate(make_spec("dirac", [1024, 1, 3, 3], "float32", {"groups": 1024}))
    assert depthwise.light


def test_a_zero_acceptance_is_infinite_work_and_refused() -> None:
    assert costs.expected_rounds(10, 0.0) == INF
    assert costs.expected_rounds(10, 1e-320) == INF or costs.expected_rounds(10, 1e-320) > 1e300
    spec = make_spec("trunc_normal", [1], "float64", {"a": 40.0, "b": 1e300})
    branch, q = costs.trunc_normal_plan(0.0, 1.0, 40.0, 1e300, "float64")
    assert branch == "uniform" and q == costs.EXACT_ZERO_PROBABILITY["float64"]  # the true q underflows to 0
    with pytest.raises(costs.WorkRefused):
        costs.check(spec, LIMIT)


# --- trunc_normal's acceptance ----------------------------------------------------------------------------------


def test_far_tail_acceptance_is_computed_in_scaled_form() -> None:
    # Mills ratio: integral over [10, inf) of exp(-(z^2 - 100)/2) ~ (1/10)(1 - 1/100 + 3/10^4 - 15/10^6).
    expected = 0.1 * (1 - 1e-2 + 3e-4 - 1.5e-5) / (1e9 - 10)
    assert costs.uniform_acceptance(0.0, 1.0, 10.0, 1e9) == pytest.approx(expected, rel=1e-4)
    assert costs.uniform_acceptance(0.0, 1.0, -1e9, -10.0) == pytest.approx(expected, rel=1e-4)  # mirrored
    # alpha = 1e6: the density falls by e per 1e-6, so a width of 1e-3 accepts ~1/(alpha * width).
    assert costs.uniform_acceptance(0.0, 1.0, 1e6, 1e6 + 1e-3) == pytest.approx(1e-3, rel=1e-3)
    assert 0 <= costs.uniform_acceptance(0.0, 1.0, 1e150, 1e300) < 1e-290  # no overflow, no division by zero
    assert costs.uniform_acceptance(0.0, 1.0, 3.0, 3.0) == 1.0  # every candidate is the mode
    assert costs.uniform_acceptance(0.0, 1.0, -1e-12, 1e-12) == pytest.approx(1.0)


def test_acceptance_is_continuous_where_the_method_changes() -> None:
    # The nearly flat interval (Simpson) meets the closed form at alpha * width + width^2 / 2 = 0.5.
    for alpha in (0.01, 0.5, 3.0, 40.0):
        width = -alpha + math.sqrt(alpha * alpha + 1.0)  # exactly on the switch
        below = costs.uniform_acceptance(0.0, 1.0, alpha, alpha + width * (1 - 1e-9))
        above = costs.uniform_acceptance(0.0, 1.0, alpha, alpha + width * (1 + 1e-9))
        assert below == pytest.approx(above, rel=1e-6)


@pytest.mark.parametrize(
    "mean, std, a, b",
    [
        (0.0, 1.0, 0.5, 0.6),
        (0.0, 1.0, 2.0, 3.0),
        (0.0, 1.0, -3.0, -2.5),
        (1.0, 0.5, -1.0, 0.2),
        (0.0, 1.0, -0.1, 0.1),
        (0.0, -1.0, 1.0, 2.5),
        (0.0, 1.0, 1.0, 9.0),
        (0.0, 1.0, 4.0, 4.05),
    ],
)
def test_acceptance_matches_torchs_own_test_on_a_million_candidates(mean, std, a, b) -> None:
    branch, q = costs.trunc_normal_plan(mean, std, a, b, "float64")
    assert branch == "uniform"
    generator = torch.Generator().manual_seed(0)
    # torch 2.13's first round of the uniform branch, verbatim but for the names.
    mode = max(a, min(mean, b))
    log_peak = -0.5 * ((mode - mean) / std) ** 2
    candidates = torch.empty(1 << 20, dtype=torch.float64).uniform_(a, b, generator=generator)
    candidates.sub_(mean).div_(std).pow_(2).mul_(-0.5).sub_(log_peak)
    pending = torch.empty_like(candidates).uniform_(generator=generator).log_().gt(candidates)
    accepted = 1.0 - pending.double().mean().item()
    assert accepted == pytest.approx(q, abs=0.004)


def test_the_normal_branch_accepts_with_the_intervals_mass() -> None:
    branch, q = costs.trunc_normal_plan(0.0, 1.0, -2.0, 2.0, "float32")
    assert branch == "normal" and q == pytest.approx(0.9545, abs=1e-4)
    assert costs.trunc_normal_plan(0.0, 1.0, -INF, INF, "float32") == ("normal", 1.0)


def test_rounds_bound_the_rejection_loops_rounds_as_torch_runs_them() -> None:
    elements = 1 << 16
    for params in ({}, {"a": 0.5, "b": 0.6}, {"a": 2.0, "b": 3.0}):
        rounds = [bench_costs.trunc_normal_rounds(elements, "float32", params, seed)[0] for seed in range(4)]
        spec = make_spec("trunc_normal", [elements], params=params)
        _, q = costs.trunc_normal_plan(*costs.trunc_normal_arguments(spec), "float32")
        bound = costs.expected_rounds(elements, q)
        assert sum(rounds) / len(rounds) <= bound <= sum(rounds) / len(rounds) + 4, (params, rounds, bound)


def test_expected_rounds_limits() -> None:
    assert costs.expected_rounds(0, 0.0) == 1.0  # one empty round, whatever the acceptance
    assert costs.expected_rounds(10**9, 1.0) == 1.0
    assert costs.expected_rounds(1, 0.25) == 4.0  # one geometric: exactly 1/q


# --- (b) model-scale requests are accepted; light ones are light ---------------------------------------------

MODEL_SCALE = [  # 256 MiB unless said otherwise
    ("uniform", [65536, 1024], "float32", {}),
    ("normal", [65536, 1024], "float32", {}),
    ("normal", [262144, 1024], "float32", {}),  # 1 GiB
    ("normal", [128256, 4096], "bfloat16", {"std": 0.02}),  # an LLM's embedding, 1 GiB
    ("trunc_normal", [262144, 1024], "float32", {}),  # default, 1 GiB
    ("trunc_normal", [128256, 4096], "float32", {"std": 0.02}),  # 2 GiB: accepted in the first round
    ("trunc_normal", [65536, 1024], "float32", {"a": 0.5, "b": 0.6}),  # the uniform branch
    ("trunc_normal", [65536, 1024], "bfloat16", {"mean": 0.0, "std": 0.02, "a": -0.04, "b": 0.04}),
    ("constant", [8192, 8192], "float32", {"val": 0.1}),
    ("ones", [65536, 1024], "float16", {}),
    ("zeros", [8192, 8192], "float32", {}),
    ("eye", [8192, 8192], "float32", {}),
    ("dirac", [512, 512, 16, 16], "float32", {}),
    ("xavier_uniform", [65536, 1024], "float32", {}),
    ("xavier_normal", [16384, 4096], "bfloat16", {"gain": 2.0}),
    ("kaiming_uniform", [512, 512, 16, 16], "float32", {"a": 5**0.5}),
    ("kaiming_normal", [65536, 1024], "float64", {"mode": "fan_out", "nonlinearity": "relu"}),
    ("orthogonal", [4096, 4096], "float32", {}),
    ("orthogonal", [4 * 2048, 2048], "float32", {}),  # an LSTM's stacked gates
    ("orthogonal", [2048, 2048], "float64", {}),
    ("orthogonal", [64, 1 << 20], "float32", {}),  # wide
    ("sparse", [1024, 65536], "float32", {"sparsity": 0.1}),
    ("sparse", [16, 1 << 20], "float32", {"sparsity": 0.9}),
    ("sparse", [1 << 24, 4], "float32", {"sparsity": 0.5}),
]


@pytest.mark.parametrize("scheme, shape, dtype, params", MODEL_SCALE)
def test_model_scale_requests_are_accepted_under_the_default_limit(scheme, shape, dtype, params) -> None:
    spec = make_spec(scheme, shape, dtype, params)
    cost = costs.check(spec, LIMIT)
    assert 0 < cost.work_seconds <= LIMIT and not cost.light


def test_every_scheme_has_a_cost() -> None:
    for name in SCHEMES:
        params = {"val": 1.0} if name == "constant" else {"sparsity": 0.5} if name == "sparse" else {}
        shape = [4, 4, 3] if name == "dirac" else [4, 4]
        cost = costs.estimate(make_spec(name, shape, "float32", params))
        assert cost.light and cost.work_seconds >= costs.CALL_SECONDS and cost.explain.startswith(name)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_small_generations_are_light_and_large_ones_are_not(dtype) -> None:
    itemsize = make_spec("normal", [1], dtype).dtype.itemsize
    assert costs.estimate(make_spec("normal", [4, 4], dtype)).light
    assert costs.estimate(make_spec("normal", [MIB // itemsize], dtype)).light
    assert costs.estimate(make_spec("uniform", [MIB // itemsize], dtype)).light
    assert not costs.estimate(make_spec("normal", [256 * MIB // itemsize], dtype)).light
    assert not costs.estimate(make_spec("trunc_normal", [256 * MIB // itemsize], dtype)).light


def test_a_cuda_generation_takes_no_host_working_memory_and_the_cpus_time() -> None:
    cpu = costs.estimate(make_spec("orthogonal", [4096, 4096]))
    cuda = costs.estimate(make_spec("orthogonal", [4096, 4096], device="cuda"))
    assert cuda.working_bytes == 0 < cpu.working_bytes and cuda.work_seconds == cpu.work_seconds
    assert "GPU" in cuda.explain


def test_the_limit_is_the_callers() -> None:
    spec = make_spec("normal", [65536, 1024])
    work = costs.estimate(spec).work_seconds
    assert costs.check(spec, work).work_seconds == work
    with pytest.raises(costs.WorkRefused, match=r"the limit is 0.1 s"):
        costs.check(spec, 0.1)
    assert costs.check(make_spec("sparse", [0, 2**62], params={"sparsity": 0.1}), INF)


# --- (c) torch's own errors come first ------------------------------------------------------------------------

# Requests torch rejects quickly that the model alone would refuse (at the default limit, or for float16's
# orthogonal a lower one): check() lets them through, and the generation raises torch's own error.
TORCH_REJECTS_EXPENSIVE = [
    ("dirac", [2**30, 1, 0], "float32", {"groups": 2**30}, IndexError),  # the first write is out of bounds
    ("sparse", [1, 2**30], "float16", {"sparsity": 0.1, "std": -1.0}, RuntimeError),  # normal_ before the loop
    ("trunc_normal", [1 << 20], "float16", {"a": 10.0, "b": 1e9}, RuntimeError),  # b is out of float16's range
    ("trunc_normal", [1], "float32", {"a": -INF, "b": -10.0}, RuntimeError),  # uniform_ refuses -inf
    ("trunc_normal", [1], "float32", {"a": 1.0, "b": 2.0, "std": 1e-300}, OverflowError),  # log_peak overflows
    ("trunc_normal", [1 << 20], "float32", {"a": 1e9, "b": 10.0}, RuntimeError),  # a > b
    ("orthogonal", [32768, 32768], "float16", {}, NotImplementedError),  # torch's CPU QR has no float16
]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("scheme, shape, dtype, params, error", TORCH_REJECTS_EXPENSIVE)
def test_torch_rejected_requests_are_not_refused_and_torch_then_raises(scheme, shape, dtype, params, error) -> None:
    spec = make_spec(scheme, shape, dtype, params)
    limit = min(LIMIT, costs.estimate(spec).work_seconds / 2)  # the model alone would refuse it
    cost = costs.check(spec, limit)
    assert cost.light and "torch rejects the request" in cost.explain
    torch_message = costs.torch_error(spec)
    assert torch_message is not None and torch_message.startswith(error.__name__)
    if scheme == "orthogonal":
        spec = make_spec(scheme, [64, 64], dtype, params)  # the same error without 2 GiB of normal fill
    with pytest.raises(error):
        generate(spec)


def test_negative_std_is_accepted_by_torch_and_priced_like_its_absolute_value() -> None:
    # torch squares (x - mean) / std, so std = -1 takes the uniform branch with |std|'s acceptance.
    negative = make_spec("trunc_normal", [1], "float32", {"a": 10.0, "b": 1e9, "std": -1.0})
    assert costs.torch_error(negative) is None
    with pytest.raises(costs.WorkRefused):
        costs.check(negative, LIMIT)
    assert costs.uniform_acceptance(0.0, -1.0, 0.5, 0.6) == costs.uniform_acceptance(0.0, 1.0, 0.5, 0.6)


def _grid() -> list[tuple]:
    """Small requests, valid and not, of every scheme: wrong dims, zero-element shapes, bad modes, values torch
    refuses for a dtype, infinite and NaN parameters, negative groups and sparsities."""
    cases: list[tuple] = []
    for dtype in ("float32", "float16"):
        for a, b in ((0.0, 1.0), (1.0, 0.0), (-INF, 0.0), (NAN, 1.0), (0.0, 1e9), (-3e38, 3e38), (2.0, 2.0)):
            for shape in ([3, 5], [0, 5]):
                cases.append(("uniform", shape, dtype, {"a": a, "b": b}))
        for mean, std in ((0.0, 1.0), (0.0, -1.0), (0.0, NAN), (0.0, INF), (INF, 1.0)):
            for shape in ([3, 5], [0]):
                cases.append(("normal", shape, dtype, {"mean": mean, "std": std}))
        for val in (0.5, 1e9, INF, NAN, 1e39):
            cases.append(("constant", [2, 3], dtype, {"val": val}))
        for gain in (1.0, -1.0, 1e300):
            for shape in ([3, 5], [0, 0], [3], [2, 3, 4], [0, 4, 0]):
                cases.append(("xavier_uniform", shape, dtype, {"gain": gain}))
                cases.append(("xavier_normal", shape, dtype, {"gain": gain}))
        for mode in ("fan_in", "fan_out", "fan_x"):
            for nonlinearity in ("relu", "leaky_relu", "tanh", "selu", "cosine"):
                for a in (0.0, NAN, 1e300):
                    for shape in ([3, 5], [0, 5], [3]):
                        for name in ("kaiming_uniform", "kaiming_normal"):
                            cases.append((name, shape, dtype, {"a": a, "mode": mode, "nonlinearity": nonlinearity}))
    for name in ("ones", "zeros", "eye"):
        for shape in ([3, 5], [3], [2, 3, 4], [0, 5], [5, 0]):
            cases.append((name, shape, "float32", {}))
    for shape in (
        [4, 2, 3],
        [4, 2, 3, 3],
        [4, 2],
        [4, 2, 0],
        [4, 2, 3, 0, 3],
        [0, 2, 3],
        [4, 0, 3],
        [4, 2, 3, 3, 3, 3],
    ):
        for groups in (1, 2, 3, 4, 0, -1, -2):
            cases.append(("dirac", shape, "float32", {"groups": groups}))
    for dtype in ("float32", "float64", "float16", "bfloat16"):
        for shape in ([3, 5], [5, 3], [3], [0, 3], [2, 3, 4], [1, 1]):
            cases.append(("orthogonal", shape, dtype, {"gain": 2.0}))
    for shape in ([5, 3], [0, 3], [5, 0], [3], [2, 3, 4]):
        for sparsity in (0.1, -0.5, 2.0, NAN, INF):
            for std in (0.01, -1.0, NAN):
                cases.append(("sparse", shape, "float32", {"sparsity": sparsity, "std": std}))
    for dtype in ("float32", "float16", "bfloat16", "float64"):
        for params in (
            {},
            {"std": 0.0},
            {"std": -1.0},
            {"a": 1.0, "b": 0.0},
            {"a": -INF, "b": INF},
            {"a": -INF, "b": -1.5},
            {"a": 10.0, "b": 1e9},
            {"mean": INF},
            {"mean": NAN},
            {"std": INF},
            {"std": 1e-300, "a": 1.0, "b": 2.0},
            {"a": 3.0, "b": 3.0},
            {"a": 0.5, "b": 0.6},
            {"a": -1e39, "b": 0.0},
            {"mean": 1.0, "std": -0.5, "a": 2.0, "b": 0.0},
        ):
            if params.get("a") == 10.0 and dtype in ("float32", "float64"):
                continue  # torch accepts, and would loop for minutes: the refusal tests cover it
            for shape in ([3], [0]):
                cases.append(("trunc_normal", shape, dtype, params))
    return cases


@pytest.mark.filterwarnings("ignore")
def test_torch_error_predicts_exactly_which_requests_torch_rejects() -> None:
    """Both ways: a missed rejection would refuse what torch rejects; a false one would let expensive work in."""
    wrong = []
    cases = _grid()
    for scheme, shape, dtype, params in cases:
        spec = make_spec(scheme, shape, dtype, params)
        costs.estimate(spec)  # never raises, whatever the parameters
        try:
            generate(spec)
            raised = None
        except Exception as error:  # noqa: BLE001 - whatever torch raises
            raised = f"{type(error).__name__}: {error}"
        predicted = costs.torch_error(spec)
        if (predicted is None) != (raised is None):
            wrong.append((scheme, shape, dtype, params, predicted, raised))
    assert not wrong, wrong[:10]
    assert len(cases) > 500


@pytest.mark.filterwarnings("ignore")
def test_check_refuses_only_what_torch_accepts() -> None:
    """At a limit every estimate exceeds, check() refuses exactly the requests torch accepts."""
    for scheme, shape, dtype, params in _grid():
        spec = make_spec(scheme, shape, dtype, params)
        accepted = costs.torch_error(spec) is None
        try:
            costs.check(spec, 1e-12)
            refused = False
        except costs.WorkRefused:
            refused = True
        assert refused == accepted, (scheme, shape, dtype, params)


# --- (d) working memory, measured ------------------------------------------------------------------------------

QUICK_MEMORY_CASES = [  # ~64 MiB each (orthogonal square: 16 MiB); about 15 s of generation in one interpreter
    ["normal", [16384, 1024], "float32", {}],
    ["uniform", [16384, 1024], "bfloat16", {}],
    ["constant", [16384, 1024], "float16", {"val": 0.5}],
    ["ones", [16384, 1024], "float32", {}],
    ["zeros", [16384, 1024], "float64", {}],
    ["eye", [4096, 4096], "float32", {}],
    ["dirac", [64, 64, 64, 64], "float32", {}],
    ["xavier_uniform", [16384, 1024], "float32", {}],
    ["xavier_normal", [16384, 1024], "float16", {}],
    ["kaiming_uniform", [16384, 1024], "float32", {}],
    ["kaiming_normal", [16384, 1024], "bfloat16", {}],
    ["trunc_normal", [16384, 1024], "float32", {}],
    ["trunc_normal", [16384, 1024], "float16", {"a": 0.5, "b": 0.6}],
    ["trunc_normal", [16384, 1024], "bfloat16", {"std": 0.02}],  # accepted in the first round: masks only
    ["orthogonal", [2048, 2048], "float32", {}],
    ["orthogonal", [65536, 256], "float32", {}],
    ["orthogonal", [256, 65536], "float32", {}],
    ["orthogonal", [4096, 1024], "bfloat16", {}],
    ["sparse", [1 << 22, 4], "float32", {"sparsity": 0.1}],
    ["sparse", [1024, 16384], "float32", {"sparsity": 0.5}],
]


def _assert_memory_bounded(results: list[dict]) -> None:
    for result in results:
        cost = costs.estimate(make_spec(*result["case"]))
        extra = result["extra_bytes"]
        assert extra <= cost.working_bytes + SLACK_BYTES, (result, cost)  # an upper bound...
        assert cost.working_bytes <= LOOSENESS * max(extra, 0) + SLACK_BYTES, (result, cost)  # ...not a loose one
        # Not a time measurement (one run, on a machine that may be shared): a check that no term is missing.
        assert result["seconds"] <= 5 * cost.work_seconds + 0.05, (result, cost)


def test_working_memory_bounds_what_each_scheme_measurably_uses() -> None:
    _assert_memory_bounded(bench_costs.run_probe(QUICK_MEMORY_CASES, timeout=170))


@pytest.mark.slow
def test_working_memory_bounds_every_scheme_dtype_and_shape_at_64_mib() -> None:
    cases = bench_costs.memory_cases(64)
    _assert_memory_bounded(bench_costs.run_probe(cases[: len(cases) // 2], timeout=170))
    _assert_memory_bounded(bench_costs.run_probe(cases[len(cases) // 2 :], timeout=170))

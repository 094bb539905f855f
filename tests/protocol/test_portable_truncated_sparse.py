"""The portable generator's trunc_normal and sparse (docs/portable.md 4.5, 4.6, 5.1): the float64 functions they
use (exp, ln, Phi, Phi^{-1}) against mpmath and their published coefficients, the kernel and tensors.fill against
the reference byte for byte on random requests, slices and windows, and tensors.check against torch's errors."""

from __future__ import annotations

import math
import random
import warnings
from decimal import Decimal

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from initserve_protocol import slices
from initserve_protocol.portable import draws, floats, gauss, reference, scales, tensors
from tests.protocol.portable_known_answers import kernel_bytes
from tests.protocol.test_portable import DTYPE_NAMES, SEEDS, _assert_kernel_equals_reference, _sliced_shapes

mpmath.mp.prec = 200

# The decimals the papers print (Cody's ANORM in netlib specfun; Wichura's AS241): each coefficient is the float64
# nearest to one.
CODY = {
    "CODY_A": "2.2352520354606839287 161.02823106855587881 1067.6894854603709582 18154.981253343561249 "
    "0.065682337918207449113",
    "CODY_B": "47.20258190468824187 976.09855173777669322 10260.932208618978205 45507.789335026729956",
    "CODY_C": "0.39894151208813466764 8.8831497943883759412 93.506656132177855979 597.27027639480026226 "
    "2494.5375852903726711 6848.1904505362823326 11602.651437647350124 9842.7148383839780218 "
    "1.0765576773720192317e-8",
    "CODY_D": "22.266688044328115691 235.38790178262499861 1519.377599407554805 6485.558298266760755 "
    "18615.571640885098091 34900.952721145977266 38912.003286093271411 19685.429676859990727",
    "CODY_P": "0.21589853405795699 0.1274011611602473639 0.022235277870649807 0.001421619193227893466 "
    "2.9112874951168792e-5 0.02307344176494017303",
    "CODY_Q": "1.28426009614491121 0.468238212480865118 0.0659881378689285515 0.00378239633202758244 "
    "7.29751555083966205e-5",
    "AS241_A": "3.3871328727963666080 1.3314166789178437745E+2 1.9715909503065514427E+3 1.3731693765509461125E+4 "
    "4.5921953931549871457E+4 6.7265770927008700853E+4 3.3430575583588128105E+4 2.5090809287301226727E+3",
    "AS241_B": "1.0 4.2313330701600911252E+1 6.8718700749205790830E+2 5.3941960214247511077E+3 "
    "2.1213794301586595867E+4 3.9307895800092710610E+4 2.8729085735721942674E+4 5.2264952788528545610E+3",
    "AS241_C": "1.42343711074968357734 4.63033784615654529590 5.76949722146069140550 3.64784832476320460504 "
    "1.27045825245236838258 2.41780725177450611770E-1 2.27238449892691845833E-2 7.74545014278341407640E-4",
    "AS241_D": "1.0 2.05319162663775882187 1.67638483018380384940 6.89767334985100004550E-1 "
    "1.48103976427480074590E-1 1.51986665636164571966E-2 5.47593808499534494600E-4 1.05075007164441684324E-9",
    "AS241_E": "6.65790464350110377720 5.46378491116411436990 1.78482653991729133580 2.96560571828504891230E-1 "
    "2.65321895265761230930E-2 1.24266094738807843860E-3 2.71155556874348757815E-5 2.01033439929228813265E-7",
    "AS241_F": "1.0 5.99832206555887937690E-1 1.36929880922735805310E-1 1.48753612908506148525E-2 "
    "7.86869131145613259100E-4 1.84631831751005468180E-5 1.42151175831644588870E-7 2.04426310338993978564E-15",
}
SCALARS = {
    "SQRPI": "0.39894228040143267794",
    "THRSH": "0.66291",
    "ROOT32": "5.656854248",
    "XLOW": "-37.519",
    "XUPPR": "8.572",
    "EPS": "1.11e-16",
    "SPLIT1": "0.425",
    "CONST1": "0.180625",
    "CONST2": "1.6",
}


def _nearest(decimal: str) -> float:
    return float(Decimal(decimal))  # Decimal -> float rounds correctly


def test_the_coefficients_are_the_nearest_float64_values_of_the_published_decimals() -> None:
    for name, decimals in CODY.items():
        assert getattr(gauss, name) == tuple(_nearest(d) for d in decimals.split()), name
    for name, decimal in SCALARS.items():
        assert getattr(gauss, name) == _nearest(decimal), name
    assert gauss.SQRPI == float(1 / mpmath.sqrt(2 * mpmath.pi))
    assert gauss.INV_LN2 == float(1 / mpmath.log(2))
    assert gauss.EXP == tuple(float(mpmath.mpf(1) / mpmath.factorial(k)) for k in range(14))


def _ulps(got: float, exact) -> float:
    return float(abs(mpmath.mpf(got) - exact) / mpmath.mpf(math.ulp(float(exact))))


def _relative(got: float, exact) -> float:
    return float(abs(mpmath.mpf(got) - exact) / abs(exact))


def test_exp_and_ln_are_within_2_ulp() -> None:
    rng = random.Random(30)
    for x in [rng.uniform(gauss.EXP_MIN, 0.0) for _ in range(1500)] + [0.0, -1e-300, gauss.EXP_MIN, -0.5 * 37.5**2]:
        assert _ulps(gauss.exp_negative(x), mpmath.exp(x)) <= 1.5, x
    for x in [2.0 ** rng.uniform(-1074, 0) for _ in range(1500)] + [5e-324, 2.0**-1022, 0.5, 1.0, 0.7071067811865476]:
        assert _ulps(floats.ln(x), mpmath.log(x)) <= 2.0, x
    assert floats.ln(1.0) == 0.0


def _exact_quantile(p: float, start: float):
    z = mpmath.mpf(start)
    for _ in range(5):  # Newton from a value already good to 1e-15
        z -= (mpmath.ncdf(z) - p) / mpmath.npdf(z)
    return z


def test_phi_and_its_inverse_are_within_1e_15_relative() -> None:
    """Measured: Phi within 7.5e-16 relative on [-37.5, 8.5]; Phi^{-1} within 7.1e-16 on [1e-320, 1 - 1e-16]."""
    rng = random.Random(31)
    xs = [rng.uniform(-0.66291, 0.66291) for _ in range(400)] + [rng.uniform(-37.5, 8.5) for _ in range(800)]
    for x in xs:
        assert _relative(gauss.normal_cdf(x), mpmath.ncdf(x)) < 1e-15, x
    ps = [rng.random() for _ in range(400)] + [10.0 ** rng.uniform(-320, -1) for _ in range(600)]
    for p in ps:
        got = gauss.normal_quantile(p)
        assert _relative(got, _exact_quantile(p, got)) < 1e-15, p
    assert gauss.normal_cdf(-math.inf) == 0.0 and gauss.normal_cdf(math.inf) == 1.0 and gauss.normal_cdf(0.0) == 0.5
    assert gauss.normal_cdf(-40.0) == 0.0 and gauss.normal_cdf(9.0) == 1.0
    assert gauss.normal_quantile(0.0) == -math.inf and gauss.normal_quantile(1.0) == math.inf
    assert math.isnan(gauss.normal_cdf(math.nan)) and math.isnan(gauss.normal_quantile(math.nan))
    assert gauss.normal_quantile(0.5) == 0.0


def test_the_open_uniform_is_exact_and_never_0_or_1() -> None:
    assert draws.open_uniform(0) == 2.0**-53
    assert draws.open_uniform((1 << 64) - 1) == 1.0 - 2.0**-53
    assert draws.open_uniform(1 << 63) == 0.5 + 2.0**-53
    word = 0x77F5493B9CEAF053
    assert draws.open_uniform(word) == ((word >> 12) + 0.5) / 2**52  # exact either way


def test_the_flip_rule() -> None:
    assert draws.truncation(0.0, 1.0, -2.0, 2.0)[0] is False  # symmetric: no flip
    assert draws.truncation(0.0, 1.0, 2.0, 3.0)[0] is True  # the upper tail runs mirrored
    assert draws.truncation(0.0, 1.0, -1.0, 6.0)[:2] == (True, gauss.normal_cdf(-6.0))
    assert draws.truncation(0.0, 1.0, -math.inf, 1.0)[0] is False
    assert draws.truncation(0.0, 1.0, 0.0, math.inf)[:2] == (True, 0.0)
    assert draws.truncation(0.0, 1.0, -math.inf, math.inf)[:3] == (False, 0.0, 1.0)  # nan > 0 is false


# The kernel against the reference.

FINITE = st.floats(-6, 6)
BOUNDS = st.one_of(FINITE, st.sampled_from([-math.inf, math.inf, -45.0, 45.0, 38.0]))


@st.composite
def _truncated(draw) -> dict:
    mean, std = draw(st.floats(-3, 3)), draw(st.one_of(st.floats(0.01, 5), st.sampled_from([1.0, 1e-8, 1e3, -1.0])))
    a, b = sorted((draw(BOUNDS), draw(BOUNDS)))
    return {"mean": mean, "std": std, "a": a, "b": b}


@settings(max_examples=60, deadline=None)
@given(sliced=_sliced_shapes(max_size=6), params=_truncated(), seed=SEEDS)
def test_trunc_normal_kernel_equals_the_reference(sliced, params, seed) -> None:
    shape, resolved = sliced
    _assert_kernel_equals_reference("trunc_normal", params, shape, resolved, seed)


@st.composite
def _sparse_requests(draw):
    rows, cols = draw(st.integers(0, 9)), draw(st.integers(0, 9))
    shape = (rows, cols)
    ranges = []
    for dim, size in enumerate(shape):
        if draw(st.booleans()):
            start = draw(st.integers(0, size))
            ranges.append(slices.Range(dim, start, draw(st.integers(0, size - start))))
    sparsity = draw(st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0, 0.5, -0.3, 1.7])))
    return shape, slices.resolve(shape, ranges), {"sparsity": sparsity, "std": draw(st.floats(0, 3))}


@settings(max_examples=60, deadline=None)
@given(request=_sparse_requests(), seed=SEEDS)
def test_sparse_kernel_equals_the_reference(request, seed) -> None:
    shape, resolved, params = request
    _assert_kernel_equals_reference("sparse", params, shape, resolved, seed)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_windows_of_a_sparse_slice_concatenate_to_the_slice(dtype) -> None:
    """tensors.fill's ``first``, as the server's pieces: windows within one row, across rows, and the whole."""
    shape, resolved = (37, 53), ((0, 2, 33), (1, 3, 47))
    params = {"sparsity": 0.4, "std": 1.0}
    whole = kernel_bytes("sparse", params, shape, dtype, 11, resolved)
    assert whole == reference.generate("sparse", params, shape, dtype, 11, resolved)
    torch_dtype = {"float32": torch.float32, "float64": torch.float64}.get(dtype) or getattr(torch, dtype)
    count = slices.numel(shape, resolved)
    for window in (5, 47, 100, 700):
        parts = []
        for first in range(0, count, window):
            out = torch.empty(min(window, count - first), dtype=torch_dtype)
            tensors.fill(out, "sparse", params, shape, 11, resolved, first=first)
            parts.append(out.view(torch.uint8).numpy().tobytes())
        assert b"".join(parts) == whole, window


def test_sparse_over_many_key_blocks_and_staging_pieces(monkeypatch) -> None:
    """Column blocks of thresholds and staging pieces smaller than the tensor: the same bytes as one block."""
    from initserve_protocol.portable import sparse

    shape, params = (301, 29), {"sparsity": 0.3, "std": 1.0}
    expected = kernel_bytes("sparse", params, shape, "bfloat16", 5)
    monkeypatch.setattr(sparse, "KEY_BLOCK_ELEMENTS", 1000)
    monkeypatch.setattr(tensors, "STAGING_ELEMENTS", 777)
    sparse._cached_thresholds.cache_clear()
    assert kernel_bytes("sparse", params, shape, "bfloat16", 5) == expected
    assert expected == reference.generate("sparse", params, shape, "bfloat16", 5)


def test_sparse_ties_go_to_the_smaller_row() -> None:
    """Keys tie with probability 2**-53: force them, and the thresholds still pick the smaller rows."""
    from initserve_protocol.portable import sparse

    keys = np.array([0.5, 0.25, 0.5, 0.5, 0.75, 0.25, 0.5])
    for zeros in range(len(keys) + 1):
        expected = {r for _, r in sorted((k, r) for r, k in enumerate(keys))[:zeros]}
        order = np.argsort(keys, kind="stable")[:zeros]
        assert expected == set(order.tolist())
        kth = np.sort(keys)[zeros - 1] if zeros else sparse.NO_ZEROS
        below = int(np.count_nonzero(keys < kth))
        last = int(np.argmax(np.cumsum(keys == kth) >= zeros - below)) if zeros else -1
        mask = sparse.zero_mask(
            keys, np.arange(len(keys)), np.zeros(len(keys), np.int64), (np.array([kth]), np.array([last]))
        )
        assert set(np.flatnonzero(mask).tolist()) == expected, zeros


def test_sparse_zero_counts_are_torchs() -> None:
    for sparsity, rows, expected in [(0.1, 10, 1), (0.0, 7, 0), (1.0, 7, 7), (0.5, 5, 3), (-0.25, 8, 6), (2.0, 4, 4)]:
        assert scales.sparse_zeros(sparsity, rows) == expected
        assert len(torch.randperm(rows)[: math.ceil(sparsity * rows)]) == expected


# tensors.check: torch's errors and warnings.


def _check_error(scheme: str, params: dict, shape: tuple[int, ...], dtype=torch.float32) -> str:
    with pytest.raises(Exception) as portable:
        tensors.check(scheme, params, shape, dtype)
    with pytest.raises(Exception) as torchs:
        getattr(torch.nn.init, f"{scheme}_")(torch.empty(shape, dtype=dtype), **params)
    assert type(portable.value) is type(torchs.value) and str(portable.value) == str(torchs.value)
    return str(portable.value)


def test_check_raises_torchs_errors() -> None:
    assert _check_error("sparse", {"sparsity": 0.1}, (3, 4, 5)) == "Only tensors with 2 dimensions are supported"
    _check_error("sparse", {"sparsity": 0.1}, (7,))
    _check_error("sparse", {"sparsity": math.nan}, (3, 4))
    _check_error("sparse", {"sparsity": math.inf}, (3, 4))
    _check_error("sparse", {"sparsity": 0.5, "std": -1.0}, (3, 4))
    _check_error("trunc_normal", {"std": 0.0}, (3, 4))
    _check_error("trunc_normal", {"a": 2.0, "b": 1.0}, (3, 4))
    _check_error("trunc_normal", {"a": 3.0, "b": math.inf}, (3, 4))
    _check_error("trunc_normal", {"a": 3.0, "b": math.inf}, (0, 4))
    with pytest.raises(tensors.NotPortable, match="LAPACK"):
        tensors.check("orthogonal", {}, (3, 3), torch.float32)
    assert set(scales.NOT_PORTABLE) == {"orthogonal"}


def test_check_accepts_what_torch_accepts_at_no_cost() -> None:
    tensors.check("sparse", {"sparsity": 0.3}, (0, 1 << 62), torch.float32)  # torch would loop over 2**62 columns
    tensors.check("trunc_normal", {"a": 100.0, "b": 1e9}, (1 << 40,), torch.float32)  # its acceptance is ~1e-11
    tensors.check("trunc_normal", {"a": -math.inf, "b": 1.0}, (3,), torch.float16)
    tensors.check("trunc_normal", {"std": -1.0}, (3,), torch.float64)  # torch's uniform branch takes it


@pytest.mark.parametrize("shape", [(3, 4), (0,), ()], ids=str)
def test_check_warns_torchs_trunc_normal_warning(shape) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tensors.check("trunc_normal", {"mean": 5.0}, shape, torch.float32)
    assert [str(w.message) for w in caught] == [
        "mean is more than 2 std from [a, b] in nn.init.trunc_normal_. The distribution of values may be incorrect."
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensors.check("trunc_normal", {}, shape, torch.float32)


def test_generate_gives_the_references_bytes() -> None:
    params = {"mean": -4.0, "std": 2.0, "a": 3.0, "b": 4.0}
    with pytest.warns(UserWarning, match="mean is more than 2 std"):
        got = tensors.generate("trunc_normal", params, (4, 5), torch.float64, 9)
    assert got.numpy().tobytes() == reference.generate("trunc_normal", params, (4, 5), "float64", 9)
    assert float(got.min()) >= 3.0 and float(got.max()) <= 4.0
    got = tensors.generate("sparse", {"sparsity": 0.5}, (6, 5), torch.float32, 9)
    assert got.numpy().tobytes() == reference.generate("sparse", {"sparsity": 0.5, "std": 0.01}, (6, 5), "float32", 9)
    assert (got == 0).sum(0).tolist() == [3] * 5


@pytest.mark.parametrize("scheme", ["kaiming_uniform", "xavier_normal", "sparse", "trunc_normal", "normal"])
def test_a_zero_element_tensor_is_empty_and_warns_as_torch_does(scheme: str) -> None:
    params = {"sparsity": 0.5} if scheme == "sparse" else {}
    with warnings.catch_warnings(record=True) as torchs:
        warnings.simplefilter("always")
        getattr(torch.nn.init, f"{scheme}_")(torch.empty(4, 0), **params)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        made = tensors.generate(scheme, params, (4, 0), torch.float32, 7)
    assert made.shape == (4, 0)
    assert [str(w.message) for w in ours] == [str(w.message) for w in torchs]

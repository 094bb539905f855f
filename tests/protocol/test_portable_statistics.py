"""Statistical quality of the portable generator's kernel (cpu.fill): moments, Kolmogorov-Smirnov and
Anderson-Darling against the standard normal, chi-square of the uniform bits, correlations between neighbours and
between seeds, and the normal's tails.

Every check compares a statistic with its critical value at ALPHA = 1e-6, so a sound generator fails one only once
in a million runs, while a broken one (a biased bit, a wrong constant, pairs that share bits, seeds that share
streams) fails it; the seeds are fixed, so the outcome is deterministic anyway.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from initserve_protocol import slices
from initserve_protocol.portable import cpu

ALPHA = 1e-6  # the probability that a check fails for a sound generator
Z_TWO_SIDED = NormalDist().inv_cdf(1 - ALPHA / 2)  # 4.89
SAMPLES = 10**7
TAIL_SAMPLES = 10**8  # the 5-sigma tail holds only 6 of 10**7 normals: too few to see one missing
SEED = 0x5EED_0F_1A7E57


def _draw(kind: int, count: int, seed: int, shape: tuple[int, ...] | None = None, start: int = 0) -> np.ndarray:
    """Standard values (uniform U or normal Z, float64) of elements [start, start + count) of a 1-D tensor."""
    shape = shape or (start + count,)
    out = np.empty(count, dtype=np.float64)
    cpu.fill(out, shape, slices.resolve(shape, [slices.Range(0, start, count)]), kind, 0.0, 1.0, seed)
    return out


@pytest.fixture(scope="module")
def normals() -> np.ndarray:
    return _draw(cpu.NORMAL, SAMPLES, SEED)


@pytest.fixture(scope="module")
def sorted_normals(normals) -> torch.Tensor:
    return torch.from_numpy(normals).sort().values


@pytest.fixture(scope="module")
def uniforms() -> np.ndarray:
    return _draw(cpu.UNIFORM, SAMPLES, SEED)


def moments(x: np.ndarray) -> tuple[float, float, float, float]:
    """(mean, variance, skewness, kurtosis) of a sample."""
    mean = float(x.mean())
    centred = x - mean
    square = centred * centred
    variance = float(square.mean())
    skewness = float((square * centred).mean()) / variance**1.5
    kurtosis = float((square * square).mean()) / variance**2
    return mean, variance, skewness, kurtosis


def kolmogorov_smirnov(ordered: torch.Tensor) -> float:
    """sqrt(n) * D_n of a sorted sample against the standard normal CDF."""
    n = ordered.numel()
    cdf = torch.special.ndtr(ordered)
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    d = max(float((ranks / n - cdf).max()), float((cdf - (ranks - 1) / n).max()))
    return math.sqrt(n) * d


def anderson_darling(ordered: torch.Tensor) -> float:
    """A^2 of a sorted sample against the standard normal CDF F:
    -n - sum_i [(2i - 1) ln F(x_i) + (2(n - i) + 1) ln(1 - F(x_i))] / n, with ln(1 - F(x)) = ln F(-x)."""
    n = ordered.numel()
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    terms = (2 * ranks - 1) / n * torch.special.log_ndtr(ordered)
    terms += (2 * (n - ranks) + 1) / n * torch.special.log_ndtr(-ordered)
    return -n - float(terms.sum())


def anderson_darling_critical(alpha: float) -> float:
    """The A^2 exceeded with probability alpha, from the limit law's tail. A^2 -> sum_j Y_j / (j (j + 1)) with Y_j
    independent chi-square(1); the j = 1 term (weight 1/2) dominates, and E[exp(rest)] = prod_{j >= 2}
    (1 - 2 / (j (j + 1)))^(-1/2) = sqrt(3), so P(A^2 > z) ~ sqrt(3 / (pi z)) exp(-z) (0.0105 at 3.857, the
    tabulated 1% point)."""
    low, high = 1.0, 100.0
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if math.sqrt(3 / (math.pi * middle)) * math.exp(-middle) > alpha else (low, middle)
    return high


def chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2).sum() / expected)


def chi_square_bounds(degrees: int) -> tuple[float, float]:
    """The chi-square values below and above which a sound generator falls with probability ALPHA / 2 each
    (Wilson-Hilferty). Too small a statistic fails too: uniforms spread more evenly than chance are not random."""
    centre, spread = 1 - 2 / (9 * degrees), math.sqrt(2 / (9 * degrees))
    return degrees * (centre - Z_TWO_SIDED * spread) ** 3, degrees * (centre + Z_TWO_SIDED * spread) ** 3


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float(np.dot(a, b) / math.sqrt(np.dot(a, a) * np.dot(b, b)))


def poisson_tails(observed: int, expected: float) -> tuple[float, float]:
    """(P(X <= observed), P(X >= observed)) for X ~ Poisson(expected)."""

    def pmf(k: int) -> float:
        return math.exp(k * math.log(expected) - expected - math.lgamma(k + 1))

    below = math.fsum(pmf(k) for k in range(observed + 1))
    above = math.fsum(pmf(k) for k in range(observed, observed + 20 * int(expected + 50)))
    return below, above


def test_the_moments_are_the_standard_normals(normals) -> None:
    mean, variance, skewness, kurtosis = moments(normals)
    n = normals.size
    # Standard errors of the sample moments of n standard normals: 1, sqrt(2), sqrt(6), sqrt(24) over sqrt(n).
    assert abs(mean) < Z_TWO_SIDED / math.sqrt(n), mean
    assert abs(variance - 1) < Z_TWO_SIDED * math.sqrt(2 / n), variance
    assert abs(skewness) < Z_TWO_SIDED * math.sqrt(6 / n), skewness
    assert abs(kurtosis - 3) < Z_TWO_SIDED * math.sqrt(24 / n), kurtosis


def test_kolmogorov_smirnov_against_the_standard_normal(sorted_normals) -> None:
    statistic = kolmogorov_smirnov(sorted_normals)
    critical = math.sqrt(-math.log(ALPHA / 2) / 2)  # P(sqrt(n) D_n > x) ~ 2 exp(-2 x^2): 2.69
    assert statistic < critical, statistic


def test_anderson_darling_against_the_standard_normal(sorted_normals) -> None:
    statistic = anderson_darling(sorted_normals)
    assert statistic < anderson_darling_critical(ALPHA), statistic  # 12.5


@pytest.mark.parametrize(
    "bits",
    [
        pytest.param(lambda count: count >> 43, id="top-10-bits"),
        pytest.param(lambda count: count & 1023, id="low-10-bits"),
        pytest.param(lambda count: (count >> 21) & 1023, id="middle-10-bits"),
    ],
)
def test_the_uniform_bits_are_uniform(uniforms, bits) -> None:
    counts = (uniforms * 2.0**53).astype(np.int64)  # the 53-bit counts, exactly
    statistic = chi_square(np.bincount(bits(counts), minlength=1024))
    low, high = chi_square_bounds(1023)
    assert low < statistic < high, (statistic, low, high)


@pytest.mark.parametrize("offset", [0, 1], ids=["within-pairs", "across-pairs"])
def test_neighbouring_uniforms_are_uniform_in_the_square(uniforms, offset) -> None:
    """32 x 32 cells of (u[i], u[i + 1]): i = 2j (one Philox block's two words), i = 2j + 1 (two blocks)."""
    first = (uniforms[offset:-1:2] * 32).astype(np.int64)
    second = (uniforms[offset + 1 :: 2] * 32).astype(np.int64)
    cells = np.bincount(first[: second.size] * 32 + second, minlength=1024)
    low, high = chi_square_bounds(1023)
    assert low < chi_square(cells) < high


@pytest.mark.parametrize("what", ["normals", "squared normals", "uniforms"])
@pytest.mark.parametrize("offset", [0, 1], ids=["within-pairs", "across-pairs"])
def test_neighbours_are_uncorrelated(normals, uniforms, what, offset) -> None:
    """Element 2j with 2j + 1 (a Box-Muller pair: r cos and r sin of one radius, independent for true normals, so
    their squares are uncorrelated too) and element 2j + 1 with 2j + 2 (two Philox blocks)."""
    x = {"normals": normals, "squared normals": normals * normals, "uniforms": uniforms}[what]
    first, second = x[offset:-1:2], x[offset + 1 :: 2]
    size = min(first.size, second.size)
    r = correlation(first[:size], second[:size])
    assert abs(r) < Z_TWO_SIDED / math.sqrt(size), r


STREAM_PAIRS = {
    "seeds 1 and 2": ((1, 0), (2, 0)),
    "adjacent seeds 2**32 and 2**32 + 1": ((1 << 32, 0), ((1 << 32) + 1, 0)),
    "seeds 0 and 2**32 (the key's high word)": ((0, 0), (1 << 32, 0)),
    "seeds 7 and 7 + 2**63": ((7, 0), (7 + (1 << 63), 0)),
    "seeds -1 and -2": ((-1, 0), (-2, 0)),
    "pairs j and j + 2**32 (the counter's high word)": ((SEED, 0), (SEED, 1 << 33)),
}
STREAM_SAMPLES = 2 * 10**6


@pytest.mark.parametrize("pair", list(STREAM_PAIRS.values()), ids=list(STREAM_PAIRS))
def test_other_seeds_and_counters_give_uncorrelated_streams(pair) -> None:
    (seed_a, start_a), (seed_b, start_b) = pair
    shape = (max(start_a, start_b) + STREAM_SAMPLES,)  # the tensor is never allocated, only its slices
    for kind in (cpu.NORMAL, cpu.UNIFORM):
        a = _draw(kind, STREAM_SAMPLES, seed_a, shape, start_a)
        b = _draw(kind, STREAM_SAMPLES, seed_b, shape, start_b)
        r = correlation(a, b)
        assert abs(r) < Z_TWO_SIDED / math.sqrt(STREAM_SAMPLES), (kind, r)
        assert np.count_nonzero(a == b) == 0  # 2**-53 a coincidence for uniforms; normals likewise


@pytest.mark.parametrize("sigmas", [4, 5])
def test_the_tails_beyond_4_and_5_sigma(sigmas) -> None:
    chunk = 10**7
    beyond = sum(
        int(np.count_nonzero(np.abs(_draw(cpu.NORMAL, chunk, SEED + 1, (TAIL_SAMPLES,), start)) > sigmas))
        for start in range(0, TAIL_SAMPLES, chunk)
    )
    expected = TAIL_SAMPLES * 2 * NormalDist().cdf(-sigmas)  # 6334 beyond 4, 57.3 beyond 5
    below, above = poisson_tails(beyond, expected)
    assert below > ALPHA / 2 and above > ALPHA / 2, (beyond, expected)


# trunc_normal and sparse (docs/portable.md 4.6 and 5.1), through tensors.fill as the server calls it.

TRUNCATED_SAMPLES = 2 * 10**6
TRUNCATIONS = {
    "torch's defaults": (0.0, 1.0, -2.0, 2.0),
    "the upper tail (flipped)": (0.0, 1.0, 2.0, 3.0),
    "one infinite bound": (0.5, 2.0, -math.inf, 1.0),
    "mostly above the mean (flipped)": (0.0, 1.0, -1.0, 6.0),
    "narrow, off centre": (1.0, 0.5, 1.2, 1.3),
}


def _truncated_moments(mean: float, std: float, a: float, b: float) -> tuple[float, float, float]:
    """(mean, variance, fourth central moment) of the truncated normal, by mpmath."""
    import mpmath

    mpmath.mp.prec = 100
    alpha, beta = (mpmath.mpf(a) - mean) / std, (mpmath.mpf(b) - mean) / std
    mass = mpmath.ncdf(beta) - mpmath.ncdf(alpha)

    def moment(function):
        return mpmath.quad(lambda z: function(z) * mpmath.npdf(z), [alpha, beta]) / mass

    centre = moment(lambda z: z)
    variance = moment(lambda z: (z - centre) ** 2)
    fourth = moment(lambda z: (z - centre) ** 4)
    return float(mean + std * centre), float(std**2 * variance), float(std**4 * fourth)


@pytest.mark.parametrize("truncation", list(TRUNCATIONS.values()), ids=list(TRUNCATIONS))
def test_trunc_normal_is_the_truncated_normal(truncation) -> None:
    from initserve_protocol.portable import tensors

    mean, std, a, b = truncation
    out = torch.empty(TRUNCATED_SAMPLES, dtype=torch.float64)
    tensors.fill(out, "trunc_normal", {"mean": mean, "std": std, "a": a, "b": b}, (TRUNCATED_SAMPLES,), SEED)
    x = out.numpy()
    assert float(x.min()) >= a and float(x.max()) <= b and np.isfinite(x).all()
    expected_mean, expected_variance, fourth = _truncated_moments(mean, std, a, b)
    n = x.size
    sample_mean, sample_variance = float(x.mean()), float(x.var())
    assert abs(sample_mean - expected_mean) < Z_TWO_SIDED * math.sqrt(expected_variance / n), sample_mean
    spread = math.sqrt((fourth - expected_variance**2) / n)
    assert abs(sample_variance - expected_variance) < Z_TWO_SIDED * spread, sample_variance
    # Kolmogorov-Smirnov against the truncated CDF (Phi(z) - Phi(alpha)) / (Phi(beta) - Phi(alpha)).
    ordered = torch.from_numpy(np.sort(x))
    alpha, beta = torch.tensor((a - mean) / std), torch.tensor((b - mean) / std)
    low, high = torch.special.ndtr(alpha.double()), torch.special.ndtr(beta.double())
    cdf = (torch.special.ndtr((ordered - mean) / std) - low) / (high - low)
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    d = max(float((ranks / n - cdf).max()), float((cdf - (ranks - 1) / n).max()))
    assert math.sqrt(n) * d < math.sqrt(-math.log(ALPHA / 2) / 2), math.sqrt(n) * d


SPARSE_SHAPE = (200, 20000)  # 4 * 10**6 elements: 20000 columns of 200 rows


def test_sparse_zeros_are_exact_per_column_uniform_over_rows_and_the_rest_is_normal() -> None:
    from initserve_protocol.portable import tensors

    sparsity, std = 0.1, 1.0
    rows, cols = SPARSE_SHAPE
    out = torch.empty(SPARSE_SHAPE, dtype=torch.float64)
    tensors.fill(out, "sparse", {"sparsity": sparsity, "std": std}, SPARSE_SHAPE, SEED)
    normal = torch.empty(SPARSE_SHAPE, dtype=torch.float64)
    tensors.fill(normal, "normal", {"mean": 0.0, "std": std}, SPARSE_SHAPE, SEED)
    zero = (out == 0) & (normal != 0)  # zeros the sparse draw made (a normal draw of exactly 0 aside)
    assert zero.sum(0).eq(math.ceil(sparsity * rows)).all()
    kept = ~zero
    assert torch.equal(out[kept].view(torch.int64), normal[kept].view(torch.int64))  # the normal scheme's bytes
    # Each row is zero in cols * p columns on average (p = zeros / rows). A column's zeros are drawn without
    # replacement, so the counts' covariance is cols p (1 - p) rows / (rows - 1) (I - J / rows), and
    # chi_square * (rows - 1) / (rows (1 - p)) is chi-square with rows - 1 degrees of freedom.
    p = math.ceil(sparsity * rows) / rows
    statistic = chi_square(zero.sum(1).numpy()) * (rows - 1) / (rows * (1 - p))
    low, high = chi_square_bounds(rows - 1)
    assert low < statistic < high, statistic

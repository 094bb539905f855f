"""Statistical quality of the portable generator's kernel (cpu.fill): moments, Kolmogorov-Smirnov and
Anderson-Darling against the standard normal, chi-square of the uniform bits, correlations between neighbours and
between seeds, the normal's tails, trunc_normal and sparse.

Every check is a function of the draws that returns a Verdict: its statistic and the limits a sound generator keeps
it within but with probability ALPHA = 1e-6. Each check runs twice on the same draws: as drawn, where it must pass,
and deliberately broken, where it must fail. The breakage is the smallest the check should catch with near
certainty, missing it with probability MISS = 1e-4: a statistic of standard error s is moved by (Z_TWO_SIDED +
Z_MISS) s, the other sizes are derived where they are made. The seeds are fixed, so every outcome is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pytest
import torch

from initserve_protocol import slices
from initserve_protocol.portable import cpu

ALPHA = 1e-6  # the probability that a check fails for a sound generator
Z_TWO_SIDED = NormalDist().inv_cdf(1 - ALPHA / 2)  # 4.89
MISS = 1e-4  # the probability that a check misses its breakage
Z_MISS = NormalDist().inv_cdf(1 - MISS)  # 3.72
BREAK = Z_TWO_SIDED + Z_MISS  # 8.61: standard errors a breakage moves a normal statistic by
KS_CRITICAL = math.sqrt(-math.log(ALPHA / 2) / 2)  # P(sqrt(n) D_n > x) ~ 2 exp(-2 x^2): 2.69
SAMPLES = 10**7
TAIL_SAMPLES = 10**8  # the 5-sigma tail holds only 6 of 10**7 normals: too few to see one missing
SEED = 0x5EED_0F_1A7E57


@dataclass(frozen=True)
class Verdict:
    """A check's statistic and the open interval (low, high) a sound generator keeps it in but with probability
    ALPHA."""

    statistic: float
    low: float
    high: float

    @property
    def passed(self) -> bool:
        return self.low < self.statistic < self.high


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


@pytest.fixture(scope="module")
def uniform_counts(uniforms) -> np.ndarray:
    return (uniforms * 2.0**53).astype(np.int64)  # the 53-bit counts, exactly


def chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2).sum() / expected)


def chi_square_bounds(degrees: int) -> tuple[float, float]:
    """The chi-square values below and above which a sound generator falls with probability ALPHA / 2 each
    (Wilson-Hilferty). Too small a statistic fails too: uniforms spread more evenly than chance are not random."""
    centre, spread = 1 - 2 / (9 * degrees), math.sqrt(2 / (9 * degrees))
    return degrees * (centre - Z_TWO_SIDED * spread) ** 3, degrees * (centre + Z_TWO_SIDED * spread) ** 3


def chi_square_noncentrality(degrees: int) -> float:
    """The smallest noncentrality lambda that a chi-square check catches but with probability MISS: the statistic
    (mean degrees + lambda, variance 2 (degrees + 2 lambda)) then lies Z_MISS standard deviations above the upper
    bound. 470 for 1023 degrees of freedom, 253 for 199."""
    high = chi_square_bounds(degrees)[1]
    noncentrality = 0.0
    for _ in range(50):
        noncentrality = high - degrees + Z_MISS * math.sqrt(2 * (degrees + 2 * noncentrality))
    return noncentrality


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float(np.dot(a, b) / math.sqrt(np.dot(a, a) * np.dot(b, b)))


def moments(x: np.ndarray) -> tuple[float, float, float, float]:
    """(mean, variance, skewness, kurtosis) of a sample."""
    mean = float(x.mean())
    centred = x - mean
    square = centred * centred
    variance = float(square.mean())
    skewness = float((square * centred).mean()) / variance**1.5
    kurtosis = float((square * square).mean()) / variance**2
    return mean, variance, skewness, kurtosis


def normal_moments(x: np.ndarray) -> dict[str, Verdict]:
    """Mean, variance, skewness and kurtosis against the standard normal's 0, 1, 0 and 3, each within Z_TWO_SIDED of
    its standard error: 1, sqrt(2), sqrt(6) and sqrt(24) over sqrt(n) for n standard normals."""
    values = dict(zip(("mean", "variance", "skewness", "kurtosis"), moments(x), strict=True))
    centres_and_errors = {"mean": (0, 1), "variance": (1, 2), "skewness": (0, 6), "kurtosis": (3, 24)}
    verdicts = {}
    for name, (centre, error_squared) in centres_and_errors.items():
        half = Z_TWO_SIDED * math.sqrt(error_squared / x.size)
        verdicts[name] = Verdict(values[name], centre - half, centre + half)
    return verdicts


def scaled_ks_distance(cdf: torch.Tensor) -> float:
    """sqrt(n) * D_n of a sorted sample, from the CDF at its values."""
    n = cdf.numel()
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    d = max(float((ranks / n - cdf).max()), float((cdf - (ranks - 1) / n).max()))
    return math.sqrt(n) * d


def normal_kolmogorov_smirnov(ordered: torch.Tensor) -> Verdict:
    """Kolmogorov-Smirnov of a sorted sample against the standard normal CDF."""
    return Verdict(scaled_ks_distance(torch.special.ndtr(ordered)), -math.inf, KS_CRITICAL)


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


def normal_anderson_darling(ordered: torch.Tensor) -> Verdict:
    return Verdict(anderson_darling(ordered), -math.inf, anderson_darling_critical(ALPHA))  # 12.5


def test_the_moments_are_the_standard_normals(normals) -> None:
    verdicts = normal_moments(normals)
    assert all(verdict.passed for verdict in verdicts.values()), verdicts


# Each moves its moment by BREAK standard errors, and leaves the other three within a small part of theirs.
MOMENT_BREAKAGES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda x: x + BREAK / math.sqrt(x.size),  # + 2.7e-3
    "variance": lambda x: x * math.sqrt(1 + BREAK * math.sqrt(2 / x.size)),  # variance x 1.0039
    # x + c (x^2 - 1) has skewness 6c + O(c^3) and variance 1 + 2c^2: c = 1.1e-3.
    "skewness": lambda x: x + BREAK * math.sqrt(6 / x.size) / 6 * (x * x - 1),
    # x + c (x^3 - 3x) has kurtosis 3 + 4c (E x^6 - 3 E x^4) = 3 + 24c and variance 1 + O(c^2): c = 5.5e-4.
    "kurtosis": lambda x: x + BREAK * math.sqrt(24 / x.size) / 24 * (x * x - 3) * x,
}


@pytest.mark.parametrize("moment", list(MOMENT_BREAKAGES))
def test_a_moment_off_by_its_smallest_catchable_amount_fails_its_check_alone(normals, moment) -> None:
    verdicts = normal_moments(MOMENT_BREAKAGES[moment](normals))
    assert [name for name, verdict in verdicts.items() if not verdict.passed] == [moment], verdicts


def test_kolmogorov_smirnov_against_the_standard_normal(sorted_normals) -> None:
    verdict = normal_kolmogorov_smirnov(sorted_normals)
    assert verdict.passed, verdict


def test_kolmogorov_smirnov_fails_normals_shifted_by_3_6e_3(sorted_normals) -> None:
    # At 0 the shifted sample's empirical CDF lies Phi(0) - Phi(-shift) ~ phi(0) shift below Phi, give or take
    # 1/2 over sqrt(n): sqrt(n) D_n >= sqrt(n) phi(0) shift - Z / 2, Z standard normal, clears KS_CRITICAL but with
    # probability MISS when sqrt(n) phi(0) shift = KS_CRITICAL + Z_MISS / 2. (The mean's check needs 2.7e-3.)
    n = sorted_normals.numel()
    shift = (KS_CRITICAL + Z_MISS / 2) / (math.sqrt(n) * NormalDist().pdf(0))
    verdict = normal_kolmogorov_smirnov(sorted_normals + shift)
    assert not verdict.passed, (shift, verdict)


def test_anderson_darling_against_the_standard_normal(sorted_normals) -> None:
    verdict = normal_anderson_darling(sorted_normals)
    assert verdict.passed, verdict


def test_anderson_darling_fails_normals_scaled_by_1_0032(sorted_normals) -> None:
    # A^2 = sum_j z_j^2 / (j (j + 1)), z_j = sum_i sqrt(2j + 1) P_j(2 F(x_i) - 1) / sqrt(n) (Legendre P_j) standard
    # normal for a sound sample. Scaling by 1 + eps moves z_2 by sqrt(n) eps 6 sqrt(5) I, where I = integral of
    # (2 Phi(x) - 1) x phi(x)^2 = 0.0918881 (mpmath); A^2 >= z_2^2 / 6 then clears the critical value c but with
    # probability MISS when that is sqrt(6 c) + Z_MISS (the other terms only add). The variance's check catches 1.0019.
    n = sorted_normals.numel()
    critical = anderson_darling_critical(ALPHA)
    scale = 1 + (math.sqrt(6 * critical) + Z_MISS) / (math.sqrt(n) * 6 * math.sqrt(5) * 0.0918881)
    verdict = normal_anderson_darling(sorted_normals * scale)
    assert not verdict.passed, (scale, verdict)


BIT_GROUPS = {"top-10-bits": 43, "low-10-bits": 0, "middle-10-bits": 21}  # the group's lowest bit


def bits_chi_square(values: np.ndarray) -> Verdict:
    """Chi-square of 10-bit values against equal counts in their 1024 cells."""
    low, high = chi_square_bounds(1023)
    return Verdict(chi_square(np.bincount(values, minlength=1024)), low, high)


@pytest.mark.parametrize("shift", list(BIT_GROUPS.values()), ids=list(BIT_GROUPS))
def test_the_uniform_bits_are_uniform(uniform_counts, shift) -> None:
    verdict = bits_chi_square((uniform_counts >> shift) & 1023)
    assert verdict.passed, verdict


@pytest.mark.parametrize("shift", list(BIT_GROUPS.values()), ids=list(BIT_GROUPS))
def test_the_bit_chi_square_fails_a_bit_set_one_draw_in_145_more_than_chance(uniform_counts, shift) -> None:
    # The group's lowest bit forced to 1 in every m-th draw is 1 with probability 1/2 + b, b = 1/(2m): each cell's
    # probability is off by b / 512, a noncentrality of n 1024 (b / 512)^2 / (1 / 1024) = 4 n b^2 = n / m^2.
    values = (uniform_counts >> shift) & 1023
    every = int(math.sqrt(values.size / chi_square_noncentrality(1023)))
    values[::every] |= 1
    verdict = bits_chi_square(values)
    assert not verdict.passed, (every, verdict)


@pytest.mark.parametrize("shift", list(BIT_GROUPS.values()), ids=list(BIT_GROUPS))
def test_the_bit_chi_square_fails_when_31_percent_of_the_draws_are_perfectly_even(uniform_counts, shift) -> None:
    # With a fraction f of the draws stepping evenly through the cells, only the rest deviate from the expected
    # counts: the statistic is (1 - f) chi-square(1023), below the lower bound but with probability MISS when
    # (1 - f) (1023 + Z_MISS sqrt(2 * 1023)) is that bound.
    values = (uniform_counts >> shift) & 1023
    even = math.ceil(values.size * (1 - chi_square_bounds(1023)[0] / (1023 + Z_MISS * math.sqrt(2 * 1023))))
    values[:even] = np.arange(even) % 1024
    verdict = bits_chi_square(values)
    assert not verdict.passed, (even, verdict)


def serial_chi_square(uniforms: np.ndarray, offset: int) -> Verdict:
    """Chi-square of (u[i], u[i + 1]), i = offset, offset + 2, ..., in 32 x 32 cells."""
    first = (uniforms[offset:-1:2] * 32).astype(np.int64)
    second = (uniforms[offset + 1 :: 2] * 32).astype(np.int64)
    low, high = chi_square_bounds(1023)
    return Verdict(chi_square(np.bincount(first[: second.size] * 32 + second, minlength=1024)), low, high)


@pytest.mark.parametrize("offset", [0, 1], ids=["within-pairs", "across-pairs"])
def test_neighbouring_uniforms_are_uniform_in_the_square(uniforms, offset) -> None:
    """i = 2j: one Philox block's two words; i = 2j + 1: two blocks."""
    verdict = serial_chi_square(uniforms, offset)
    assert verdict.passed, verdict


@pytest.mark.parametrize("offset", [0, 1], ids=["within-pairs", "across-pairs"])
def test_the_serial_chi_square_fails_when_one_pair_in_574_repeats_its_first_value(uniforms, offset) -> None:
    # A fraction f of the pairs on the diagonal adds f (1/32 - 1/1024) to its 32 cells and takes f / 1024 from
    # the 992 others: a noncentrality of pairs 1024 (32 (31 f / 1024)^2 + 992 (f / 1024)^2) = 31 pairs f^2.
    pairs = (uniforms.size - offset) // 2
    every = int(math.sqrt(31 * pairs / chi_square_noncentrality(1023)))
    first = np.arange(offset, uniforms.size - 1, 2 * every)
    broken = uniforms.copy()
    broken[first + 1] = broken[first]
    verdict = serial_chi_square(broken, offset)
    assert not verdict.passed, (every, verdict)


def lag_correlation(x: np.ndarray, offset: int) -> Verdict:
    """Correlation of x[i] with x[i + 1], i = offset, offset + 2, ..., within Z_TWO_SIDED / sqrt(pairs) of 0."""
    first, second = x[offset:-1:2], x[offset + 1 :: 2]
    size = min(first.size, second.size)
    limit = Z_TWO_SIDED / math.sqrt(size)
    return Verdict(correlation(first[:size], second[:size]), -limit, limit)


@pytest.mark.parametrize("what", ["normals", "squared normals", "uniforms"])
@pytest.mark.parametrize("offset", [0, 1], ids=["within-pairs", "across-pairs"])
def test_neighbours_are_uncorrelated(normals, uniforms, what, offset) -> None:
    """Element 2j with 2j + 1 (a Box-Muller pair: r cos and r sin of one radius, independent for true normals, so
    their squares are uncorrelated too) and element 2j + 1 with 2j + 2 (two Philox blocks)."""
    x = {"normals": normals, "squared normals": normals * normals, "uniforms": uniforms}[what]
    verdict = lag_correlation(x, offset)
    assert verdict.passed, verdict


@pytest.mark.parametrize("what", ["normals", "squared normals", "uniforms"])
@pytest.mark.parametrize("offset", [0, 1], ids=["within-pairs", "across-pairs"])
def test_the_lag_correlation_fails_when_one_pair_in_259_shares_its_value(normals, uniforms, what, offset) -> None:
    # A fraction f of the pairs with equal values correlates them by f (plus the 1 / sqrt(pairs) of chance): f =
    # BREAK / sqrt(pairs). For the squares the second keeps its own sign: equal squares, uncorrelated values.
    broken = (uniforms if what == "uniforms" else normals).copy()
    every = int(math.sqrt(broken.size // 2) / BREAK)
    first = np.arange(offset, broken.size - 1, 2 * every)
    if what == "squared normals":
        broken[first + 1] = np.copysign(broken[first], broken[first + 1])
    else:
        broken[first + 1] = broken[first]
    verdict = lag_correlation(broken * broken if what == "squared normals" else broken, offset)
    assert not verdict.passed, (every, verdict)


STREAM_PAIRS = {
    "seeds 1 and 2": ((1, 0), (2, 0)),
    "adjacent seeds 2**32 and 2**32 + 1": ((1 << 32, 0), ((1 << 32) + 1, 0)),
    "seeds 0 and 2**32 (the key's high word)": ((0, 0), (1 << 32, 0)),
    "seeds 7 and 7 + 2**63": ((7, 0), (7 + (1 << 63), 0)),
    "seeds -1 and -2": ((-1, 0), (-2, 0)),
    "pairs j and j + 2**32 (the counter's high word)": ((SEED, 0), (SEED, 1 << 33)),
}
STREAM_SAMPLES = 2 * 10**6
STREAM_KINDS = {"normals": cpu.NORMAL, "uniforms": cpu.UNIFORM}


def stream_correlation(a: np.ndarray, b: np.ndarray) -> Verdict:
    limit = Z_TWO_SIDED / math.sqrt(a.size)
    return Verdict(correlation(a, b), -limit, limit)


def coincidences(a: np.ndarray, b: np.ndarray) -> Verdict:
    """Elements equal in both streams: 2**-53 a pair for uniforms, normals likewise, so a single one fails."""
    return Verdict(float(np.count_nonzero(a == b)), -math.inf, 1)


@pytest.mark.parametrize("pair", list(STREAM_PAIRS.values()), ids=list(STREAM_PAIRS))
def test_other_seeds_and_counters_give_uncorrelated_streams(pair) -> None:
    (seed_a, start_a), (seed_b, start_b) = pair
    shape = (max(start_a, start_b) + STREAM_SAMPLES,)  # the tensor is never allocated, only its slices
    for kind in STREAM_KINDS.values():
        a = _draw(kind, STREAM_SAMPLES, seed_a, shape, start_a)
        b = _draw(kind, STREAM_SAMPLES, seed_b, shape, start_b)
        verdicts = stream_correlation(a, b), coincidences(a, b)
        assert all(verdict.passed for verdict in verdicts), (kind, verdicts)


@pytest.mark.parametrize("kind", list(STREAM_KINDS.values()), ids=list(STREAM_KINDS))
def test_the_stream_checks_fail_a_second_seed_that_shares_values_with_the_first(kind) -> None:
    a, b = (_draw(kind, STREAM_SAMPLES, seed) for seed in (1, 2))
    # One value in m taken from the first stream correlates the two by 1/m: m = sqrt(samples) / BREAK = 164.
    every = int(math.sqrt(STREAM_SAMPLES) / BREAK)
    leaky = b.copy()
    leaky[::every] = a[::every]
    verdict = stream_correlation(a, leaky)
    assert not verdict.passed, (every, verdict)
    # One shared value is too few to correlate, but a coincidence.
    b[STREAM_SAMPLES // 2] = a[STREAM_SAMPLES // 2]
    assert stream_correlation(a, b).passed
    verdict = coincidences(a, b)
    assert not verdict.passed, verdict


TAIL_FLOOR = 4  # the fewest sigmas counted


@pytest.fixture(scope="module")
def normal_tails() -> np.ndarray:
    """|Z| of those of TAIL_SAMPLES normals beyond TAIL_FLOOR, in draw order: 6334 expected."""
    chunk = 10**7
    tails = []
    for start in range(0, TAIL_SAMPLES, chunk):
        magnitudes = np.abs(_draw(cpu.NORMAL, chunk, SEED + 1, (TAIL_SAMPLES,), start))
        tails.append(magnitudes[magnitudes > TAIL_FLOOR])
    return np.concatenate(tails)


def poisson_bounds(expected: float) -> tuple[int, int]:
    """The counts at and below, at and above which a Poisson(expected) count falls with probability at most
    ALPHA / 2 each: a count passes strictly between them."""
    top = int(expected + 20 * math.sqrt(expected) + 50)
    pmf = np.array([math.exp(k * math.log(expected) - expected - math.lgamma(k + 1)) for k in range(top)])
    at_most, at_least = np.cumsum(pmf), np.cumsum(pmf[::-1])[::-1]
    low = np.flatnonzero(at_most <= ALPHA / 2)
    return (int(low[-1]) if low.size else -1), int(np.flatnonzero(at_least <= ALPHA / 2)[0])


def tail_count(tails: np.ndarray, sigmas: float) -> Verdict:
    """How many of TAIL_SAMPLES normals lie beyond sigmas, against the Poisson law of that count."""
    expected = TAIL_SAMPLES * 2 * NormalDist().cdf(-sigmas)  # 6334 beyond 4, 57.3 beyond 5
    low, high = poisson_bounds(expected)
    return Verdict(float(np.count_nonzero(tails > sigmas)), low, high)


@pytest.mark.parametrize("sigmas", [4, 5])
def test_the_tails_beyond_4_and_5_sigma(normal_tails, sigmas) -> None:
    verdict = tail_count(normal_tails, sigmas)
    assert verdict.passed, verdict


@pytest.mark.parametrize("sigmas", [4, 5])
def test_the_tail_count_fails_a_tail_thinned_by_10_and_73_percent(normal_tails, sigmas) -> None:
    # Keeping a fraction k of the values beyond `sigmas` leaves k times a Poisson(expected) count: at or below the
    # lower bound but with probability MISS when k (expected + Z_MISS sqrt(expected)) is that bound. k = 0.897
    # beyond 4 (lower bound 5948 of 6334 expected), 0.269 beyond 5 (23 of 57.3).
    expected = TAIL_SAMPLES * 2 * NormalDist().cdf(-sigmas)
    keep = poisson_bounds(expected)[0] / (expected + Z_MISS * math.sqrt(expected))
    beyond = normal_tails[normal_tails > sigmas]
    verdict = tail_count(beyond[np.arange(beyond.size) * keep % 1 < keep], sigmas)
    assert not verdict.passed, (keep, verdict)


# trunc_normal and sparse (docs/portable.md 4.6 and 5.1), through tensors.fill as the server calls it.

TRUNCATED_SAMPLES = 2 * 10**6
TRUNCATIONS = {
    "torch's defaults": (0.0, 1.0, -2.0, 2.0),
    "the upper tail (flipped)": (0.0, 1.0, 2.0, 3.0),
    "one infinite bound": (0.5, 2.0, -math.inf, 1.0),
    "mostly above the mean (flipped)": (0.0, 1.0, -1.0, 6.0),
    "narrow, off centre": (1.0, 0.5, 1.2, 1.3),
}


@dataclass(frozen=True)
class Truncation:
    """trunc_normal(mean, std, a, b) and its law's exact mean, variance and fourth central moment."""

    mean: float
    std: float
    a: float
    b: float
    exact_mean: float
    exact_variance: float
    exact_fourth: float

    @classmethod
    def of(cls, mean: float, std: float, a: float, b: float) -> Truncation:
        import mpmath

        mpmath.mp.prec = 100
        alpha, beta = (mpmath.mpf(a) - mean) / std, (mpmath.mpf(b) - mean) / std
        mass = mpmath.ncdf(beta) - mpmath.ncdf(alpha)

        def moment(function):
            return mpmath.quad(lambda z: function(z) * mpmath.npdf(z), [alpha, beta]) / mass

        centre = moment(lambda z: z)
        variance = moment(lambda z: (z - centre) ** 2)
        fourth = moment(lambda z: (z - centre) ** 4)
        return cls(mean, std, a, b, float(mean + std * centre), float(std**2 * variance), float(std**4 * fourth))

    def cdf(self, x: torch.Tensor) -> torch.Tensor:
        """(Phi(z) - Phi(alpha)) / (Phi(beta) - Phi(alpha)), z = (x - mean) / std, held to [0, 1]."""
        low, high = (torch.special.ndtr(torch.tensor((end - self.mean) / self.std)) for end in (self.a, self.b))
        return ((torch.special.ndtr((x - self.mean) / self.std) - low) / (high - low)).clamp(0, 1)

    def peak_density(self) -> float:
        standard = NormalDist()
        alpha, beta = (self.a - self.mean) / self.std, (self.b - self.mean) / self.std
        mass = standard.cdf(beta) - standard.cdf(alpha)
        return standard.pdf(min(max(0.0, alpha), beta)) / (self.std * mass)


@dataclass(frozen=True)
class TruncatedDraw:
    law: Truncation
    values: np.ndarray
    ordered: torch.Tensor


@pytest.fixture(scope="module", params=list(TRUNCATIONS.values()), ids=list(TRUNCATIONS))
def truncated(request) -> TruncatedDraw:
    from initserve_protocol.portable import tensors

    mean, std, a, b = request.param
    out = torch.empty(TRUNCATED_SAMPLES, dtype=torch.float64)
    tensors.fill(out, "trunc_normal", {"mean": mean, "std": std, "a": a, "b": b}, (TRUNCATED_SAMPLES,), SEED)
    return TruncatedDraw(Truncation.of(mean, std, a, b), out.numpy(), out.sort().values)


def truncated_mean(x: np.ndarray, law: Truncation) -> Verdict:
    half = Z_TWO_SIDED * math.sqrt(law.exact_variance / x.size)
    return Verdict(float(x.mean()), law.exact_mean - half, law.exact_mean + half)


def truncated_variance(x: np.ndarray, law: Truncation) -> Verdict:
    half = Z_TWO_SIDED * math.sqrt((law.exact_fourth - law.exact_variance**2) / x.size)
    return Verdict(float(x.var()), law.exact_variance - half, law.exact_variance + half)


def truncated_kolmogorov_smirnov(ordered: torch.Tensor, law: Truncation) -> Verdict:
    return Verdict(scaled_ks_distance(law.cdf(ordered)), -math.inf, KS_CRITICAL)


def test_trunc_normal_is_the_truncated_normal(truncated) -> None:
    x, law = truncated.values, truncated.law
    assert float(x.min()) >= law.a and float(x.max()) <= law.b and np.isfinite(x).all()
    verdicts = truncated_mean(x, law), truncated_variance(x, law), truncated_kolmogorov_smirnov(truncated.ordered, law)
    assert all(verdict.passed for verdict in verdicts), verdicts


def test_the_trunc_normal_mean_fails_bounds_and_mean_moved_by_break_standard_errors(truncated) -> None:
    x, law = truncated.values, truncated.law
    verdict = truncated_mean(x + BREAK * math.sqrt(law.exact_variance / x.size), law)
    assert not verdict.passed, verdict


def test_the_trunc_normal_variance_fails_a_std_off_by_break_standard_errors(truncated) -> None:
    # Spread about the mean by s: the variance times s^2 = 1 + BREAK standard errors over the variance.
    x, law = truncated.values, truncated.law
    error = math.sqrt((law.exact_fourth - law.exact_variance**2) / x.size)
    scale = math.sqrt(1 + BREAK * error / law.exact_variance)
    verdict = truncated_variance(law.exact_mean + (x - law.exact_mean) * scale, law)
    assert not verdict.passed, (scale, verdict)


def test_the_trunc_normal_kolmogorov_smirnov_fails_values_shifted_by_its_smallest_catchable_amount(truncated) -> None:
    # As for the normal: at the density's peak f the shifted sample's empirical CDF lies f shift below the CDF,
    # give or take at most 1/2 over sqrt(n) (none where the peak is the bound a, below which nothing lies).
    law = truncated.law
    shift = (KS_CRITICAL + Z_MISS / 2) / (math.sqrt(truncated.ordered.numel()) * law.peak_density())
    verdict = truncated_kolmogorov_smirnov(truncated.ordered + shift, law)
    assert not verdict.passed, (shift, verdict)


SPARSE_SHAPE = (200, 20000)  # 4 * 10**6 elements: 20000 columns of 200 rows
SPARSITY = 0.1
SPARSE_ZEROS = math.ceil(SPARSITY * SPARSE_SHAPE[0])  # zeros per column


@dataclass(frozen=True)
class SparseDraw:
    values: torch.Tensor  # sparse(SPARSITY, 1)
    normal: torch.Tensor  # normal(0, 1) of the same seed
    zero: torch.Tensor  # where the sparse draw made a zero (a normal draw of exactly 0 aside)


@pytest.fixture(scope="module")
def sparse_draw() -> SparseDraw:
    from initserve_protocol.portable import tensors

    values = torch.empty(SPARSE_SHAPE, dtype=torch.float64)
    tensors.fill(values, "sparse", {"sparsity": SPARSITY, "std": 1.0}, SPARSE_SHAPE, SEED)
    normal = torch.empty(SPARSE_SHAPE, dtype=torch.float64)
    tensors.fill(normal, "normal", {"mean": 0.0, "std": 1.0}, SPARSE_SHAPE, SEED)
    return SparseDraw(values, normal, (values == 0) & (normal != 0))


def sparse_zero_counts(zero: torch.Tensor) -> Verdict:
    """Columns without exactly SPARSE_ZEROS zeros: a single one fails."""
    return Verdict(float(zero.sum(0).ne(SPARSE_ZEROS).sum()), -math.inf, 1)


def sparse_rows_chi_square(zero: torch.Tensor) -> Verdict:
    """Chi-square of the zeros' count per row. Each row is zero in cols * p columns on average (p = zeros / rows).
    A column's zeros are drawn without replacement, so the counts' covariance is cols p (1 - p) rows / (rows - 1)
    (I - J / rows), and chi_square * (rows - 1) / (rows (1 - p)) is chi-square with rows - 1 degrees of freedom."""
    rows = zero.shape[0]
    p = SPARSE_ZEROS / rows
    low, high = chi_square_bounds(rows - 1)
    return Verdict(chi_square(zero.sum(1).numpy()) * (rows - 1) / (rows * (1 - p)), low, high)


def test_sparse_zeros_are_exact_per_column_uniform_over_rows_and_the_rest_is_normal(sparse_draw) -> None:
    kept = ~sparse_draw.zero
    assert torch.equal(sparse_draw.values[kept].view(torch.int64), sparse_draw.normal[kept].view(torch.int64))
    verdicts = sparse_zero_counts(sparse_draw.zero), sparse_rows_chi_square(sparse_draw.zero)
    assert all(verdict.passed for verdict in verdicts), verdicts


def test_the_sparse_zero_count_fails_one_zero_too_few_in_one_column(sparse_draw) -> None:
    zero = sparse_draw.zero.clone()
    zero[int(zero[:, 0].nonzero()[0]), 0] = False
    verdict = sparse_zero_counts(zero)
    assert not verdict.passed, verdict


def test_the_sparse_chi_square_fails_zeros_moved_to_row_0_in_one_column_in_26(sparse_draw) -> None:
    # In every m-th column where row 0 is not zero, row 0 takes the zero of the column's highest zero row: each
    # column keeps its count, row 0 gains g = (1 - p) cols / m zeros, a noncentrality of g^2 / (cols p) (rows - 1)
    # / (rows (1 - p)) and a little more from the high rows that lose them, spread over a dozen rows or so.
    zero = sparse_draw.zero.clone()
    rows, cols = SPARSE_SHAPE
    p = SPARSE_ZEROS / rows
    gain = math.sqrt(chi_square_noncentrality(rows - 1) * cols * p * rows * (1 - p) / (rows - 1))
    every = int((1 - p) * cols / gain)
    columns = torch.arange(0, cols, every)
    columns = columns[~zero[0, columns]]
    highest = (zero[:, columns] * torch.arange(rows)[:, None]).argmax(0)
    zero[highest, columns] = False
    zero[0, columns] = True
    assert sparse_zero_counts(zero).passed
    verdict = sparse_rows_chi_square(zero)
    assert not verdict.passed, (every, verdict)

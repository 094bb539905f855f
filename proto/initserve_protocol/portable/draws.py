"""From Philox's bits to each element's uniform and normal value: the element-to-counter layout and the
conversions, for the portable generator's reference (docs/portable.md, sections 2 to 4).

Element ``i`` of the full tensor (its C-order index) belongs to pair ``j = i // 2``. Pair ``j`` of stream ``s``
is one Philox4x32-10 block: counter ``(j mod 2**32, j // 2**32, s, 0)``, key from the seed. Its four words make
two 64-bit words, ``W0 = w0 + 2**32 w1`` for the even element and ``W1 = w2 + 2**32 w3`` for the odd one, so an
element's bits depend only on the seed, the stream and its own index: any slice costs only its own elements.
"""

from __future__ import annotations

import math

from initserve_protocol.portable.floats import COUNT_BITS, cos_sin_turn, ln_count
from initserve_protocol.portable.gauss import normal_cdf, normal_quantile
from initserve_protocol.portable.philox import MASK32, key_of, philox4x32

VALUES = 0  # the stream every scheme's values come from
SPARSE = 1  # the stream sparse's zero positions come from
MAX_ELEMENTS = 1 << 63  # element indices are below 2**63, so pair indices fit the counter's two low words


def pair_words(seed: int, pair: int, stream: int = VALUES) -> tuple[int, int]:
    """(W0, W1): the two 64-bit words of pair ``pair`` (elements 2*pair and 2*pair + 1)."""
    w0, w1, w2, w3 = philox4x32((pair & MASK32, pair >> 32, stream, 0), key_of(seed))
    return w0 | w1 << 32, w2 | w3 << 32


def element_word(seed: int, index: int, stream: int = VALUES) -> int:
    """The 64-bit word of element ``index``."""
    return pair_words(seed, index >> 1, stream)[index & 1]


def uniform(word: int) -> float:
    """U = (W >> 11) * 2**-53: the top 53 bits of a word as a float64 in [0, 1), exactly."""
    return (word >> 11) * 2.0**-COUNT_BITS


def normal_pair(w0: int, w1: int) -> tuple[float, float]:
    """Box-Muller: (r cos 2 pi a, r sin 2 pi a) with r = sqrt(-2 ln v), v = ((W0 >> 11) + 1) * 2**-53 in
    (0, 1] and a = (W1 >> 11) * 2**-53 turns; ln, cos and sin from floats (correctly rounded operations only)."""
    r = math.sqrt(-2.0 * ln_count((w0 >> 11) + 1))
    c, s = cos_sin_turn(w1 >> 11)
    return r * c, r * s


def normal(seed: int, index: int) -> float:
    """The standard normal value of element ``index``: its pair's cosine for even indices, sine for odd."""
    return normal_pair(*pair_words(seed, index >> 1))[index & 1]


OPEN_BITS = 52  # an open uniform has 52 bits: (n + 1/2) * 2**-52 is then exact


def open_uniform(word: int) -> float:
    """(n + 1/2) * 2**-52 with n = W >> 12, the top 52 bits of the word: a float64 in [2**-53, 1 - 2**-53],
    never 0 or 1, symmetric about 1/2, and exact (n + 1/2 has 53 significant bits)."""
    return ((word >> 12) + 0.5) * 2.0**-OPEN_BITS


def truncation(mean: float, std: float, a: float, b: float) -> tuple[bool, float, float, float]:
    """(flip, low, width, upper) of a truncated normal draw, once per request (docs/portable.md section 4.6).

    alpha = (a - mean) / std and beta = (b - mean) / std. When alpha + beta > 0 the interval lies more above the
    mean than below it, so the draw runs on the mirrored interval (-beta, -alpha) and negates its result: the CDF
    values that matter are then the small ones, where a float64 keeps its relative precision, instead of values
    near 1, where it does not. low = Phi(lower end), width = Phi(upper end) - low, upper = the upper end."""
    alpha = (a - mean) / std
    beta = (b - mean) / std
    flip = alpha + beta > 0.0
    lower, upper = (-beta, -alpha) if flip else (alpha, beta)
    low = normal_cdf(lower)
    return flip, low, normal_cdf(upper) - low, upper


def truncated_standard(word: int, flip: bool, low: float, width: float, upper: float) -> float:
    """z = Phi^{-1}(low + u * width) for the element's open uniform u, negated when the draw is flipped. A zero
    width (a == b, or an interval so far in the tail that both CDF values are equal, 0 beyond 37.5 std) gives the
    upper end, the one nearer the mean, where the mass is."""
    z = upper if width == 0.0 else normal_quantile(low + open_uniform(word) * width)
    return -z if flip else z


def truncated_normal(word: int, mean: float, std: float, a: float, b: float) -> float:
    """The value of a truncated normal element: mean + std * z, then clamped to [a, b]. (One element at a time:
    callers with many elements compute ``truncation`` once.)"""
    return clamp(mean + std * truncated_standard(word, *truncation(mean, std, a, b)), a, b)


def clamp(value: float, a: float, b: float) -> float:
    """value < a gives a, then value > b gives b (a NaN stays NaN)."""
    if value < a:
        value = a
    if value > b:
        value = b
    return value

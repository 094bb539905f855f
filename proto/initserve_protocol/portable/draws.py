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

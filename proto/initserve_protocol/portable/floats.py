"""The float64 functions of the portable generator, built from correctly rounded IEEE-754 operations alone.

libm's ``log``, ``sin`` and ``cos`` differ between C libraries, CPUs and GPU intrinsics by an ulp here and there,
so a generator that calls them is not portable. These functions use only ``+ - * /`` and ``sqrt`` on float64
(each correctly rounded by IEEE-754, in the order written, never contracted into a fused multiply-add) and exact
operations on integers, so every implementation that follows them gets the same bits. docs/portable.md specifies
them; the constants below are the float64 values written there in hexadecimal, and tests/protocol/test_portable.py
checks that each is the float64 nearest to what its comment says.
"""

from __future__ import annotations

import math

H = float.fromhex

SQRT2 = H("0x1.6a09e667f3bcdp+0")  # sqrt(2)
# ln(2) split as fdlibm splits it: k * LN2_HI is exact for |k| < 2**11 (its
# significand's last 21 bits are zero).
LN2_HI = H("0x1.62e42fee00000p-1")
LN2_LO = H("0x1.a39ef35793c76p-33")
PI_4 = H("0x1.921fb54442d18p-1")  # pi / 4

# ln(m) = 2s(1 + t/3 + t^2/5 + ... + t^11/23) with s = (m - 1)/(m + 1), t = s*s: LOG[k] is 1/(2k+1).
LOG = tuple(
    H(x)
    for x in (
        "0x1.0000000000000p+0",
        "0x1.5555555555555p-2",
        "0x1.999999999999ap-3",
        "0x1.2492492492492p-3",
        "0x1.c71c71c71c71cp-4",
        "0x1.745d1745d1746p-4",
        "0x1.3b13b13b13b14p-4",
        "0x1.1111111111111p-4",
        "0x1.e1e1e1e1e1e1ep-5",
        "0x1.af286bca1af28p-5",
        "0x1.8618618618618p-5",
        "0x1.642c8590b2164p-5",
    )
)
# sin(x) = x + x*t*(SIN[1] + t*(SIN[2] + ... + t*SIN[8])), t = x*x: SIN[k] is (-1)^k / (2k+1)!  (SIN[0] = 1).
SIN = tuple(
    H(x)
    for x in (
        "0x1.0000000000000p+0",
        "-0x1.5555555555555p-3",
        "0x1.1111111111111p-7",
        "-0x1.a01a01a01a01ap-13",
        "0x1.71de3a556c734p-19",
        "-0x1.ae64567f544e4p-26",
        "0x1.6124613a86d09p-33",
        "-0x1.ae7f3e733b81fp-41",
        "0x1.952c77030ad4ap-49",
    )
)
# cos(x) = 1 + t*(COS[1] + t*(COS[2] + ... + t*COS[8])): COS[k] is (-1)^k / (2k)!  (COS[0] = 1).
COS = tuple(
    H(x)
    for x in (
        "0x1.0000000000000p+0",
        "-0x1.0000000000000p-1",
        "0x1.5555555555555p-5",
        "-0x1.6c16c16c16c17p-10",
        "0x1.a01a01a01a01ap-16",
        "-0x1.27e4fb7789f5cp-22",
        "0x1.1eed8eff8d898p-29",
        "-0x1.93974a8c07c9dp-37",
        "0x1.ae7f3e733b81fp-45",
    )
)

COUNT_BITS = 53  # a uniform count n in [1, 2**53] stands for n * 2**-53
OCTANT_BITS = 50  # below the octant's 3 bits, an angle count has 50


def ln_scaled(m: float, e: int) -> float:
    """ln(m * 2**e) for m in [1, 2) and an integer e with |e| < 2**11 - 1 (docs/portable.md 4.1, steps 2 to 6)."""
    if m > SQRT2:
        m = m / 2.0  # exact
        e += 1
    s = (m - 1.0) / (m + 1.0)  # m - 1 is exact (Sterbenz)
    t = s * s
    p = LOG[11]
    for c in reversed(LOG[:11]):
        p = c + t * p
    ln_m = (s + s) * p
    k = float(e)  # exact
    return k * LN2_HI + (k * LN2_LO + ln_m)


def ln_count(n: int) -> float:
    """ln(n * 2**-53) for an integer n in [1, 2**53], so a value in [-36.74, 0]."""
    e = n.bit_length() - 1  # 2**e <= n < 2**(e + 1)
    m = n / (1 << e)  # exact: n has at most 53 significant bits; m in [1, 2)
    return ln_scaled(m, e - COUNT_BITS)


def ln(x: float) -> float:
    """ln(x) for a finite float64 x > 0, subnormals included (section 4.1's steps on x's own exponent)."""
    fraction, exponent = math.frexp(x)  # exact: x = fraction * 2**exponent, fraction in [0.5, 1)
    return ln_scaled(fraction * 2.0, exponent - 1)


def sin_poly(x: float) -> float:
    """sin(x) for x in [0, pi/4]."""
    t = x * x
    p = SIN[8]
    for c in reversed(SIN[1:8]):
        p = c + t * p
    return x + (x * t) * p


def cos_poly(x: float) -> float:
    """cos(x) for x in [0, pi/4]."""
    t = x * x
    p = COS[8]
    for c in reversed(COS[1:8]):
        p = c + t * p
    return 1.0 + t * p


def cos_sin_turn(k: int) -> tuple[float, float]:
    """(cos(2 pi a), sin(2 pi a)) of the angle a = k * 2**-53 turns, for an integer k in [0, 2**53).

    The top 3 bits of k pick the octant; the other 50 give the position f in it, and the polynomials run on
    x = f * pi/4 in even octants and on x = (1 - f) * pi/4 in odd ones, so always on [0, pi/4]. The octant's
    symmetry then gives cos and sin from cos(x) and sin(x) with exact sign changes and swaps.
    """
    octant = k >> OCTANT_BITS
    f = k & ((1 << OCTANT_BITS) - 1)
    if octant & 1:
        f = (1 << OCTANT_BITS) - f
    x = (f * 2.0**-OCTANT_BITS) * PI_4  # f * 2**-50 is exact
    c, s = cos_poly(x), sin_poly(x)
    return _OCTANTS[octant](c, s)


_OCTANTS = (
    lambda c, s: (c, s),
    lambda c, s: (s, c),
    lambda c, s: (-s, c),
    lambda c, s: (-c, s),
    lambda c, s: (-c, -s),
    lambda c, s: (-s, -c),
    lambda c, s: (s, -c),
    lambda c, s: (c, -s),
)

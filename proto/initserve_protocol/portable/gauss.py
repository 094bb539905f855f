"""exp, the standard normal CDF Phi and its inverse, from correctly rounded ``+ - * /`` and ``sqrt`` alone: what
the portable trunc_normal needs (docs/portable.md, section 4.5), with no libm.

- ``exp_negative(x)`` for x in [-708, 0]: k = floor(x / ln 2 + 1/2) (as floor(x * INV_LN2 + 0.5)), the Cody-Waite
  reduction r = (x - k LN2_HI) - k LN2_LO, the Taylor polynomial of degree 13 (EXP[j] = 1/j!), times 2**k, which is
  a normal power of two, so the product is exact.
- ``normal_cdf(x)``: W. J. Cody's ANORM (Algorithm 715, ACM TOMS 19, 1993; netlib specfun), three rational
  approximations, its exp(-x^2/2) split as exp(-xsq^2/2) exp(-del/2) with xsq = x cut to sixteenths, so that the
  large part is exact.
- ``normal_quantile(p)``: M. J. Wichura's AS241 PPND16 (Applied Statistics 37, 1988), three rational
  approximations, with floats.ln and sqrt in the tails.

Every coefficient is the float64 nearest to the decimal its paper prints; the hex values here are those, and the
tests check them against the decimals.
"""

from __future__ import annotations

import math

from initserve_protocol.portable.floats import LN2_HI, LN2_LO, ln

H = float.fromhex

INV_LN2 = H("0x1.71547652b82fep+0")  # 1 / ln 2
EXP_MIN = -708.0  # exp_negative's domain is [EXP_MIN, 0]: every 2**k it scales by is a normal float64
# exp(r) = 1 + r*(EXP[1] + r*(EXP[2] + ... + r*EXP[13])): EXP[j] = 1/j!  (|r| <= ln2/2: the next term is < 2**-56)
EXP = tuple(
    H(x)
    for x in (
        "0x1.0000000000000p+0",
        "0x1.0000000000000p+0",
        "0x1.0000000000000p-1",
        "0x1.5555555555555p-3",
        "0x1.5555555555555p-5",
        "0x1.1111111111111p-7",
        "0x1.6c16c16c16c17p-10",
        "0x1.a01a01a01a01ap-13",
        "0x1.a01a01a01a01ap-16",
        "0x1.71de3a556c734p-19",
        "0x1.27e4fb7789f5cp-22",
        "0x1.ae64567f544e4p-26",
        "0x1.1eed8eff8d898p-29",
        "0x1.6124613a86d09p-33",
    )
)

# Cody's ANORM: its constants (SQRPI = 1/sqrt(2 pi); THRSH, ROOT32, XLOW, XUPPR and EPS as Cody prints them).
SQRPI = H("0x1.9884533d43651p-2")  # 0.39894228040143267794
THRSH = H("0x1.5368f08461f9fp-1")  # 0.66291
ROOT32 = H("0x1.6a09e6665983ep+2")  # 5.656854248
XLOW = H("-0x1.2c26e978d4fdfp+5")  # -37.519
XUPPR = H("0x1.124dd2f1a9fbep+3")  # 8.572
EPS = H("0x1.ffe5ab7e8ad5ep-54")  # 1.11e-16
SIXTEENTHS = 16.0
CODY_A = tuple(
    H(x)
    for x in (
        "0x1.1e1cbd1b4f7f3p+1",
        "0x1.420e744d785b7p+7",
        "0x1.0aec20879fd71p+10",
        "0x1.1babeccdad2ecp+14",
        "0x1.0d08ec54894e1p-4",
    )
)
CODY_B = tuple(
    H(x) for x in ("0x1.799ee342fb2dep+5", "0x1.e80c9d57e55b8p+9", "0x1.40a77529cadc8p+13", "0x1.63879423b87adp+15")
)
CODY_C = tuple(
    H(x)
    for x in (
        "0x1.98841fadbdc66p-2",
        "0x1.1c42c35b8bc02p+3",
        "0x1.7606d0dd78164p+6",
        "0x1.2aa2986aba462p+9",
        "0x1.37d133e6111ecp+11",
        "0x1.ac030c15dc8d7p+12",
        "0x1.6a953624f0f60p+13",
        "0x1.3395b7fd2fc8ep+13",
        "0x1.71e703c5f5815p-27",
    )
)
CODY_D = tuple(
    H(x)
    for x in (
        "0x1.64445aaec9f9bp+4",
        "0x1.d6c69b0ffcde7p+7",
        "0x1.7bd82a96b49bfp+10",
        "0x1.9558eeca29d27p+12",
        "0x1.22de495c3a6a3p+14",
        "0x1.10a9e7cb10e86p+15",
        "0x1.300001aeb6fe4p+15",
        "0x1.3395b7fd35f61p+14",
    )
)
CODY_P = tuple(
    H(x)
    for x in (
        "0x1.ba2902b84421cp-3",
        "0x1.04eae6653ed94p-3",
        "0x1.6c4d83d16707ap-6",
        "0x1.74ab3fc4e4f8bp-10",
        "0x1.e86ed886dc483p-16",
        "0x1.7a090772574dap-6",
    )
)
CODY_Q = tuple(
    H(x)
    for x in (
        "0x1.48c54508800dbp+0",
        "0x1.df79d6855f0adp-2",
        "0x1.0e4993e122c39p-4",
        "0x1.efc42917d7de7p-9",
        "0x1.32147a014bad1p-14",
    )
)

# Wichura's AS241 (PPND16): the numerator's and denominator's coefficients of each region, constant term first.
SPLIT1 = H("0x1.b333333333333p-2")  # 0.425
SPLIT2 = 5.0
CONST1 = H("0x1.71eb851eb851fp-3")  # 0.180625
CONST2 = H("0x1.999999999999ap+0")  # 1.6
AS241_A = tuple(
    H(x)
    for x in (
        "0x1.b18d91e9eef75p+1",
        "0x1.0a4888b1a436ep+7",
        "0x1.ece5d2213c0ccp+10",
        "0x1.ad1d8cd4ee71dp+13",
        "0x1.66c3e869b752ap+15",
        "0x1.06c1c55b78f20p+16",
        "0x1.052d26b2e45e4p+15",
        "0x1.39a296f7d925ep+11",
    )
)
AS241_B = tuple(
    H(x)
    for x in (
        "0x1.0000000000000p+0",
        "0x1.5281b386e1ab5p+5",
        "0x1.5797efdc8b3f7p+9",
        "0x1.512322e75c89fp+12",
        "0x1.4b772d5d65266p+14",
        "0x1.3317caa64f4bep+15",
        "0x1.c0e457cb1ae76p+14",
        "0x1.46a7eca984b69p+12",
    )
)
AS241_C = tuple(
    H(x)
    for x in (
        "0x1.6c665fde9526ap+0",
        "0x1.2857748cab19bp+2",
        "0x1.713f71462256ap+2",
        "0x1.d2ecb1a3d02c4p+1",
        "0x1.453cc085375b2p+0",
        "0x1.ef2abb9b85c37p-3",
        "0x1.744eb6c45ec67p-6",
        "0x1.9615ac0b7ace9p-11",
    )
)
AS241_D = tuple(
    H(x)
    for x in (
        "0x1.0000000000000p+0",
        "0x1.06cefbb46a449p+1",
        "0x1.ad278e6526633p+0",
        "0x1.61292f23385c9p-1",
        "0x1.2f5123394f040p-3",
        "0x1.f207a7eab17bfp-7",
        "0x1.1f18cbfdf2728p-11",
        "0x1.20d3f686439e4p-30",
    )
)
AS241_E = tuple(
    H(x)
    for x in (
        "0x1.aa1b1c13ee526p+2",
        "0x1.5daea6e875003p+2",
        "0x1.c8ea6461fa445p+0",
        "0x1.2fad9315255cfp-2",
        "0x1.b2b41193b4ee7p-6",
        "0x1.45c1908425345p-10",
        "0x1.c6ec6cc59e02ap-16",
        "0x1.afb74d693bf93p-23",
    )
)
AS241_F = tuple(
    H(x)
    for x in (
        "0x1.0000000000000p+0",
        "0x1.331d34fc7d77fp-1",
        "0x1.186eb183443fbp-3",
        "0x1.e76f93215462ap-7",
        "0x1.9c8bc979dc5d7p-11",
        "0x1.35c2c496374bfp-16",
        "0x1.31446f740b9e0p-23",
        "0x1.269bff1f8c190p-49",
    )
)


def exp_negative(x: float) -> float:
    """exp(x) for x in [EXP_MIN, 0]."""
    k = math.floor(x * INV_LN2 + 0.5)  # an integer in [-1021, 0]
    r = (x - k * LN2_HI) - k * LN2_LO  # k * LN2_HI is exact; |r| <= ln2/2 (a hair more)
    p = EXP[13]
    for c in reversed(EXP[1:13]):
        p = c + r * p
    return (1.0 + r * p) * math.ldexp(1.0, k)  # a normal power of two: the product is exact


def _cut_to_sixteenths(y: float) -> tuple[float, float]:
    """(xsq, del): y cut to sixteenths toward zero, and (y - xsq) * (y + xsq), so y^2 = xsq^2 + del."""
    xsq = math.trunc(y * SIXTEENTHS) / SIXTEENTHS  # exact
    return xsq, (y - xsq) * (y + xsq)


def normal_cdf(x: float) -> float:
    """Phi(x) = P(Z <= x) for a standard normal Z: Cody's ANORM, step by step. NaN gives NaN."""
    if x != x:
        return x
    y = abs(x)
    if y <= THRSH:
        xsq = x * x if y > EPS else 0.0
        num, den = CODY_A[4] * xsq, xsq
        for i in range(3):
            num = (num + CODY_A[i]) * xsq
            den = (den + CODY_B[i]) * xsq
        return 0.5 + x * (num + CODY_A[3]) / (den + CODY_B[3])
    if y <= ROOT32:
        num, den = CODY_C[8] * y, y
        for i in range(7):
            num = (num + CODY_C[i]) * y
            den = (den + CODY_D[i]) * y
        result = (num + CODY_C[7]) / (den + CODY_D[7])
        xsq, rest = _cut_to_sixteenths(y)
        result = exp_negative(-xsq * xsq * 0.5) * exp_negative(-rest * 0.5) * result
    else:
        result = 0.0
        if XLOW <= x < XUPPR:
            xsq = 1.0 / (x * x)
            num, den = CODY_P[5] * xsq, xsq
            for i in range(4):
                num = (num + CODY_P[i]) * xsq
                den = (den + CODY_Q[i]) * xsq
            result = xsq * (num + CODY_P[4]) / (den + CODY_Q[4])
            result = (SQRPI - result) / y
            xsq, rest = _cut_to_sixteenths(y)
            result = exp_negative(-xsq * xsq * 0.5) * exp_negative(-rest * 0.5) * result
    return 1.0 - result if x > 0.0 else result


def _horner(coefficients: tuple[float, ...], r: float) -> float:
    """c[7] r^7 + ... + c[0], as AS241 writes it: ((c[7] r + c[6]) r + ...) r + c[0]."""
    value = coefficients[7]
    for c in reversed(coefficients[:7]):
        value = value * r + c
    return value


def normal_quantile(p: float) -> float:
    """Phi^{-1}(p): Wichura's AS241 PPND16, step by step. 0 gives -inf, 1 gives inf, NaN gives NaN."""
    if p != p:
        return p
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    q = p - 0.5
    if abs(q) <= SPLIT1:
        r = CONST1 - q * q
        return q * _horner(AS241_A, r) / _horner(AS241_B, r)
    r = math.sqrt(-ln(p if q < 0.0 else 1.0 - p))  # 1 - p is exact for p >= 1/2
    if r <= SPLIT2:
        r = r - CONST2
        value = _horner(AS241_C, r) / _horner(AS241_D, r)
    else:
        r = r - SPLIT2
        value = _horner(AS241_E, r) / _horner(AS241_F, r)
    return -value if q < 0.0 else value

"""The portable generator's CPU kernel: Numba, multi-threaded, equal to the reference byte for byte.

The same arithmetic as ``draws`` and ``floats`` (docs/portable.md), written for LLVM to vectorize: Philox's
32x32->64 products in uint64, the octant's swaps and signs as selects. Numba compiles without ``fastmath``, so no
multiply-add is contracted and every float64 operation is the correctly rounded one the spec names; the tests
hold it to the reference on the known answers and on random shapes, slices and seeds.

``fill`` writes the values of a box slice of the full tensor (any dims sliced, C order) into a flat float32 or
float64 array; threads split the output in blocks, and each element costs only its own pair's Philox block.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from initserve_protocol.portable import floats, gauss
from initserve_protocol.slices import runs

U64 = np.uint64
MASK32 = U64(0xFFFFFFFF)
M0, M1 = U64(0xD2511F53), U64(0xCD9E8D57)
W0, W1 = U64(0x9E3779B9), U64(0xBB67AE85)
SHIFT32, SHIFT11, ONE = U64(32), U64(11), U64(1)
LN2_HI, LN2_LO, PI_4 = floats.LN2_HI, floats.LN2_LO, floats.PI_4
L0, L1, L2, L3, L4, L5, L6, L7, L8, L9, L10, L11 = floats.LOG
S1, S2, S3, S4, S5, S6, S7, S8 = floats.SIN[1:]
C1, C2, C3, C4, C5, C6, C7, C8 = floats.COS[1:]
FRACTION_MASK = U64((1 << floats.OCTANT_BITS) - 1)
FULL_TURN = U64(1 << floats.OCTANT_BITS)
OCTANT_SHIFT = U64(floats.OCTANT_BITS)
TWO_M50 = 2.0**-floats.OCTANT_BITS
TWO_M53 = 2.0**-floats.COUNT_BITS
UNIFORM, NORMAL, TRUNC_NORMAL = 0, 1, 2
SHIFT12 = U64(12)
TWO_M52 = 2.0**-52
TWO_54 = 2.0**54
SMALLEST_NORMAL = 2.0**-1022
NO_EXTRA = np.zeros(6, dtype=np.float64)  # the extra scales of uniform and normal draws (none; never written)
A0, A1, A2, A3, A4, A5, A6, A7 = gauss.AS241_A
B0, B1, B2, B3, B4, B5, B6, B7 = gauss.AS241_B
Q0, Q1, Q2, Q3, Q4, Q5, Q6, Q7 = gauss.AS241_C
D0, D1, D2, D3, D4, D5, D6, D7 = gauss.AS241_D
E0, E1, E2, E3, E4, E5, E6, E7 = gauss.AS241_E
F0, F1, F2, F3, F4, F5, F6, F7 = gauss.AS241_F
SPLIT1, SPLIT2, CONST1, CONST2 = gauss.SPLIT1, gauss.SPLIT2, gauss.CONST1, gauss.CONST2
BLOCK = 1 << 15  # output elements per unit of parallel work

# Concurrent calls from several threads (the server's generation workers) need a thread-safe layer: OpenMP or TBB,
# never Numba's own workqueue, which aborts the process when two threads enter it at once.
numba.config.THREADING_LAYER = "threadsafe"


def _cache_usable() -> bool:
    """Whether Numba can keep the compiled kernel on disk (beside this file, in NUMBA_CACHE_DIR or the user's
    cache): Numba raises at decoration where none is writable (a read-only container), so the kernel is then
    compiled in each process instead (a few seconds, once)."""

    def probe() -> int:
        return 0

    try:
        numba.njit(cache=True)(probe)
    except RuntimeError:
        return False
    return True


CACHE = _cache_usable()
_jit = numba.njit(cache=CACHE, fastmath=False, error_model="numpy")
_inline = numba.njit(cache=CACHE, fastmath=False, error_model="numpy", inline="always")


@_inline
def _philox(pair, stream, k0, k1):
    c0 = pair & MASK32
    c1 = pair >> SHIFT32
    c2 = stream
    c3 = U64(0)
    for r in range(10):
        if r:
            k0 = (k0 + W0) & MASK32
            k1 = (k1 + W1) & MASK32
        a = M0 * c0
        b = M1 * c2
        c0, c1, c2, c3 = (b >> SHIFT32) ^ c1 ^ k0, b & MASK32, (a >> SHIFT32) ^ c3 ^ k1, a & MASK32
    return c0 | (c1 << SHIFT32), c2 | (c3 << SHIFT32)


EXPONENT_SHIFT = U64(52)
MANTISSA_MASK = U64((1 << 52) - 1)
EXPONENT_ONE = U64(1023 << 52)
SUB = 512  # pairs per vectorized step; its buffers stay in L1


@intrinsic
def _as_float(typingctx, bits):
    """The float64 whose bits are this uint64 (a bitcast, no conversion)."""
    return types.float64(types.uint64), lambda context, builder, sig, args: builder.bitcast(args[0], ir.DoubleType())


@intrinsic
def _as_bits(typingctx, value):
    """The bits of a float64, as a uint64."""
    return types.uint64(types.float64), lambda context, builder, sig, args: builder.bitcast(args[0], ir.IntType(64))


@_inline
def _ln_reduced(m, e):
    """ln(m * 2**e) for m in [1, 2) and an integer e: floats.ln's steps from its reduction on."""
    if m > floats.SQRT2:
        m = m * 0.5
        e = e + 1
    s = (m - 1.0) / (m + 1.0)
    t = s * s
    p = L10 + t * L11
    p = L9 + t * p
    p = L8 + t * p
    p = L7 + t * p
    p = L6 + t * p
    p = L5 + t * p
    p = L4 + t * p
    p = L3 + t * p
    p = L2 + t * p
    p = L1 + t * p
    p = L0 + t * p
    k = np.float64(e)
    return k * LN2_HI + (k * LN2_LO + (s + s) * p)


@_inline
def _ln_of_bits(bits):
    """ln(count * 2**-53) from the float64 bits of count (an integer in [1, 2**53]), as floats.ln_count."""
    e = np.int64(bits >> EXPONENT_SHIFT) - 1023  # 2**e <= count < 2**(e + 1)
    return _ln_reduced(_as_float(bits & MANTISSA_MASK | EXPONENT_ONE), e - 53)  # count / 2**e, in [1, 2)


@_inline
def _ln_positive(x):
    """ln(x) for a finite x > 0, subnormals included, as floats.ln."""
    e = np.int64(0)
    if x < SMALLEST_NORMAL:
        x = x * TWO_54  # exact
        e = np.int64(-54)
    bits = _as_bits(x)
    e += np.int64(bits >> EXPONENT_SHIFT) - 1023
    return _ln_reduced(_as_float(bits & MANTISSA_MASK | EXPONENT_ONE), e)


@_inline
def _quantile(p):
    """Phi^{-1}(p), as gauss.normal_quantile (AS241)."""
    if p != p:
        return p
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    q = p - 0.5
    if abs(q) <= SPLIT1:
        r = CONST1 - q * q
        num = ((((((A7 * r + A6) * r + A5) * r + A4) * r + A3) * r + A2) * r + A1) * r + A0
        den = ((((((B7 * r + B6) * r + B5) * r + B4) * r + B3) * r + B2) * r + B1) * r + B0
        return q * num / den
    r = p if q < 0.0 else 1.0 - p
    r = math.sqrt(-_ln_positive(r))
    if r <= SPLIT2:
        r = r - CONST2
        num = ((((((Q7 * r + Q6) * r + Q5) * r + Q4) * r + Q3) * r + Q2) * r + Q1) * r + Q0
        den = ((((((D7 * r + D6) * r + D5) * r + D4) * r + D3) * r + D2) * r + D1) * r + D0
    else:
        r = r - SPLIT2
        num = ((((((E7 * r + E6) * r + E5) * r + E4) * r + E3) * r + E2) * r + E1) * r + E0
        den = ((((((F7 * r + F6) * r + F5) * r + F4) * r + F3) * r + F2) * r + F1) * r + F0
    value = num / den
    return -value if q < 0.0 else value


@_inline
def _truncated(word, low, width, negate, upper):
    """The standard value z of a truncated normal draw, as draws.truncated_standard."""
    if width == 0.0:
        z = upper
    else:
        u = (np.float64(word >> SHIFT12) + 0.5) * TWO_M52  # exact, in (0, 1)
        z = _quantile(low + u * width)
    return -z if negate else z


@_inline
def _cos_sin(k):
    """(cos, sin) of k * 2**-53 turns, as floats.cos_sin_turn."""
    octant = k >> OCTANT_SHIFT
    f = k & FRACTION_MASK
    if octant & ONE:
        f = FULL_TURN - f
    x = (np.float64(f) * TWO_M50) * PI_4
    t = x * x
    p = S7 + t * S8
    p = S6 + t * p
    p = S5 + t * p
    p = S4 + t * p
    p = S3 + t * p
    p = S2 + t * p
    p = S1 + t * p
    s = x + (x * t) * p
    p = C7 + t * C8
    p = C6 + t * p
    p = C5 + t * p
    p = C4 + t * p
    p = C3 + t * p
    p = C2 + t * p
    p = C1 + t * p
    c = 1.0 + t * p
    if (octant + ONE) & U64(2):
        c, s = s, c
    if (octant + U64(2)) & U64(4):
        c = -c
    if octant & U64(4):
        s = -s
    return c, s


@_jit
def _pairs(x, first, n, kind, stream, k0, k1, extra):
    """x[2i], x[2i + 1] = the standard values (uniform, normal or truncated normal, float64) of pair first + i, for
    i < n."""
    if kind == TRUNC_NORMAL:
        low, width, negate, upper = extra[0], extra[1], extra[2] != 0.0, extra[5]
        for i in range(n):
            wa, wb = _philox(U64(first + i), stream, k0, k1)
            x[2 * i] = _truncated(wa, low, width, negate, upper)
            x[2 * i + 1] = _truncated(wb, low, width, negate, upper)
        return
    if kind == UNIFORM:
        for i in range(n):
            wa, wb = _philox(U64(first + i), stream, k0, k1)
            x[2 * i] = np.float64(wa >> SHIFT11) * TWO_M53
            x[2 * i + 1] = np.float64(wb >> SHIFT11) * TWO_M53
        return
    for i in range(n):
        wa, wb = _philox(U64(first + i), stream, k0, k1)
        r = math.sqrt(-2.0 * _ln_of_bits(_as_bits(np.float64((wa >> SHIFT11) + ONE))))  # the float is exact
        c, s = _cos_sin(wb >> SHIFT11)
        x[2 * i] = r * c
        x[2 * i + 1] = r * s


@_jit
def any_nan(values):
    """Whether a float32 or float64 array holds a NaN: one pass, stopping at the first (torch's isnan().any() is
    a tenth of the kernel's own time on a piece)."""
    for i in range(values.shape[0]):
        if values[i] != values[i]:
            return True
    return False


@_jit
def _run(out, o, element, count, kind, p, q, stream, k0, k1, x, extra):
    """Elements [element, element + count) of the full tensor into out[o : o + count]."""
    done = 0
    while done < count:
        start = element + done
        first = start >> 1
        n = min(SUB, ((element + count - 1) >> 1) - first + 1)
        _pairs(x, first, n, kind, stream, k0, k1, extra)
        skip = start & 1
        take = min(2 * n - skip, count - done)
        if kind == TRUNC_NORMAL:
            low, high = extra[3], extra[4]
            for j in range(take):
                value = p + q * x[skip + j]
                if value < low:
                    value = low
                if value > high:
                    value = high
                out[o + done + j] = value if value == value else math.nan  # the one NaN (section 6)
        else:
            for j in range(take):
                value = p + q * x[skip + j]
                out[o + done + j] = value if value == value else math.nan
        done += take


@numba.njit(cache=CACHE, fastmath=False, error_model="numpy", parallel=True)
def _fill(out, first, starts, lengths, strides, run_start, run_len, kind, p, q, stream, k0, k1, extra):
    total = out.shape[0]
    blocks = (total + BLOCK - 1) // BLOCK
    dims = starts.shape[0]
    for b in numba.prange(blocks):
        o = first + b * BLOCK  # a position in the slice's C order
        end = min(o + BLOCK, first + total)
        x = np.empty(2 * SUB, np.float64)
        while o < end:
            r = o // run_len
            offset = o - r * run_len
            element = run_start + offset
            for d in range(dims - 1, -1, -1):
                element += (starts[d] + r % lengths[d]) * strides[d]
                r = r // lengths[d]
            count = min(end - o, run_len - offset)
            _run(out, o - first, element, count, kind, p, q, stream, k0, k1, x, extra)
            o += count


def fill(out, shape, resolved, kind, p, q, seed, stream=0, first=0, extra=None):
    """Write ``p + q * X`` (X uniform or standard normal, float64, then the out array's dtype) for the elements
    of ``full[slices]`` at positions ``[first, first + len(out))`` of the slice's C order into the flat array
    ``out`` (float32 or float64).

    For ``TRUNC_NORMAL``, X is the truncated standard value and ``extra`` is ``(low, width, flip, a, b, upper)``
    of draws.truncation and the bounds: the value ``p + q * X`` is then clamped to ``[a, b]``."""
    layout = runs(shape, resolved)
    if out.shape[0] == 0:
        return
    seed %= 1 << 64
    # Numba's OpenMP layer shares libgomp with torch: a parallel launch sets the calling thread's OpenMP thread
    # count to Numba's, which is torch's intra-op thread count too (and MKL's QR bits depend on it). Put it back.
    torch_threads = torch.get_num_threads()
    try:
        _fill(
            out,
            first,
            np.array([start for start, _, _ in layout.outer], dtype=np.int64),
            np.array([length for _, length, _ in layout.outer], dtype=np.int64),
            np.array([stride for _, _, stride in layout.outer], dtype=np.int64),
            layout.start,
            layout.length,
            kind,
            float(p),
            float(q),
            U64(stream),
            U64(seed & 0xFFFFFFFF),
            U64(seed >> 32),
            NO_EXTRA if extra is None else np.asarray(extra, dtype=np.float64),
        )
    finally:
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)

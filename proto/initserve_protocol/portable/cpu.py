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
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from initserve_protocol.portable import floats

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
UNIFORM, NORMAL = 0, 1
BLOCK = 1 << 15  # output elements per unit of parallel work

# Concurrent calls from several threads (the server's generation workers) need a thread-safe layer: OpenMP or TBB,
# never Numba's own workqueue, which aborts the process when two threads enter it at once.
numba.config.THREADING_LAYER = "threadsafe"

_jit = numba.njit(cache=True, fastmath=False, error_model="numpy")
_inline = numba.njit(cache=True, fastmath=False, error_model="numpy", inline="always")


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
def _ln_of_bits(bits):
    """ln(count * 2**-53) from the float64 bits of count (an integer in [1, 2**53]), as floats.ln_count."""
    e = np.int64(bits >> EXPONENT_SHIFT) - 1023  # 2**e <= count < 2**(e + 1)
    m = _as_float(bits & MANTISSA_MASK | EXPONENT_ONE)  # count / 2**e, in [1, 2)
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
    k = np.float64(e - 53)
    return k * LN2_HI + (k * LN2_LO + (s + s) * p)


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
def _pairs(x, first, n, kind, stream, k0, k1):
    """x[2i], x[2i + 1] = the standard values (uniform or normal, float64) of pair first + i, for i < n."""
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
def _run(out, o, element, count, kind, p, q, stream, k0, k1, x):
    """Elements [element, element + count) of the full tensor into out[o : o + count]."""
    done = 0
    while done < count:
        start = element + done
        first = start >> 1
        n = min(SUB, ((element + count - 1) >> 1) - first + 1)
        _pairs(x, first, n, kind, stream, k0, k1)
        skip = start & 1
        take = min(2 * n - skip, count - done)
        for j in range(take):
            out[o + done + j] = p + q * x[skip + j]
        done += take


@numba.njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _fill(out, first, starts, lengths, strides, run_start, run_len, kind, p, q, stream, k0, k1):
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
            _run(out, o - first, element, count, kind, p, q, stream, k0, k1, x)
            o += count


def fill(out, shape, resolved, kind, p, q, seed, stream=0, first=0):
    """Write ``p + q * X`` (X uniform or standard normal, float64, then the out array's dtype) for the elements
    of ``full[slices]`` at positions ``[first, first + len(out))`` of the slice's C order into the flat array
    ``out`` (float32 or float64)."""
    box = [(0, size) for size in shape]
    for dim, start, length in resolved:
        box[dim] = (start, length)
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    # The run: the innermost sliced-or-partial dim and all full dims after it are contiguous in the full tensor.
    k = len(shape) - 1
    while k > 0 and box[k] == (0, shape[k]):
        k -= 1
    run_start = box[k][0] * strides[k] if shape else 0
    run_len = box[k][1] * strides[k] if shape else 1
    outer = box[:k] if shape else []
    if out.shape[0] == 0:
        return
    seed %= 1 << 64
    _fill(
        out,
        first,
        np.array([start for start, _ in outer], dtype=np.int64),
        np.array([length for _, length in outer], dtype=np.int64),
        np.array(strides[:k], dtype=np.int64),
        run_start,
        run_len,
        kind,
        float(p),
        float(q),
        U64(stream),
        U64(seed & 0xFFFFFFFF),
        U64(seed >> 32),
    )

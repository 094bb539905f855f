"""The portable generator's GPU kernel: one Triton kernel per draw, each element's value in registers, written once.

The elementwise path (``elementwise``) runs the spec as whole-tensor torch operations: every one of its ~150
float64 steps is a pass over memory, so on a GPU it moves hundreds of bytes per element it writes. This kernel
does the same arithmetic (``draws``, ``floats``, ``gauss``, as ``cpu`` does on the CPU) in one pass: each lane
computes one Philox block, both values of its pair, and stores them, so the kernel writes each output byte once
and reads nothing but a few scalars.

Why its bits are the spec's:

- **Integers**: Philox in uint32 (``*`` wraps modulo 2**32, ``tl.umulhi`` is the product's high word); element,
  pair and count arithmetic in int64, every value below 2**63.
- **Floats**: float64 ``+ - * /`` and ``tl.sqrt`` (PTX ``add/sub/mul/div.rn.f64`` and ``sqrt.rn.f64``: correctly
  rounded), in the reference's order. The kernel is compiled with ``enable_fp_fusion=False``, so no multiply and
  add are contracted into a fused multiply-add. Python float constants in float64 arithmetic are materialized
  as float64 (Triton's scalar rule), but its comparisons round them to float32 first, so every comparison with a
  named constant goes through ``_f64`` (the first GPU run found ``m > SQRT2`` comparing with sqrt(2) in float32;
  the literals compared with, 0.0 and 1.0, are exact in float32); the
  scales and bounds of the request come in a float64 tensor, never as kernel arguments (which Triton types
  float32).
- **Rounding to the dtype**: float64 -> float32 by ``.to`` (``cvt.rn.f32.f64``), then float16/bfloat16 from that
  float32 value (``cvt.rn``), as docs/portable.md section 6.
- **Branches** (the octant's swaps and signs, ln's SQRT2 step, AS241's regions) are selects: each lane computes
  every region it might need and keeps its own.

None of this is taken on trust: ``placement`` runs the kernel for each kind and dtype on each device against
the CPU kernel's bytes before it makes any tensor there, and tests/protocol/test_portable_gpu.py holds it to the
CPU kernel under Triton's interpreter (where numpy does the float64 operations), compiles it for sm_90 and sm_80
and reads the PTX (only ``.rn`` float operations, no ``fma``, ``.approx`` or ``.ftz``), and, where CUDA is
present, holds it to the known answers there.

Layout: a box slice is rows of ``run_len`` consecutive elements of the full tensor (``slices.runs``). Program
``pid`` takes row ``pid // blocks_per_row`` and BLOCK pairs of it; it stores the pairs' values interleaved
(even, odd, even, ...), masked to the row's elements. A row's first and last pair may hold an element outside the
row, which is computed and not stored (at most one block of the spec per row end, as on the CPU).
"""

from __future__ import annotations

import contextlib
import math
import struct
from collections.abc import Mapping, Sequence

import torch
import triton
import triton.language as tl

from initserve_protocol.portable import floats, gauss, tensors
from initserve_protocol.portable.philox import key_of
from initserve_protocol.slices import Resolved, numel, runs

BLOCK = 512  # pairs per program: 1024 output elements
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)  # the kernel's DTYPE is the position
KINDS = ("uniform", "normal", "trunc_normal")  # the kernel's KIND is the position
MAX_PROGRAMS = (1 << 31) - 1  # CUDA's grid x limit
COMPILE_OPTIONS = {"enable_fp_fusion": False}  # no multiply-add contracted into an FMA (LLVM, and ptxas --fmad)

_C = tl.constexpr
LN2_HI, LN2_LO, PI_4, SQRT2 = _C(floats.LN2_HI), _C(floats.LN2_LO), _C(floats.PI_4), _C(floats.SQRT2)
L0, L1, L2, L3, L4, L5, L6, L7, L8, L9, L10, L11 = (_C(c) for c in floats.LOG)
S1, S2, S3, S4, S5, S6, S7, S8 = (_C(c) for c in floats.SIN[1:])
C1, C2, C3, C4, C5, C6, C7, C8 = (_C(c) for c in floats.COS[1:])
A0, A1, A2, A3, A4, A5, A6, A7 = (_C(c) for c in gauss.AS241_A)
B0, B1, B2, B3, B4, B5, B6, B7 = (_C(c) for c in gauss.AS241_B)
Q0, Q1, Q2, Q3, Q4, Q5, Q6, Q7 = (_C(c) for c in gauss.AS241_C)
D0, D1, D2, D3, D4, D5, D6, D7 = (_C(c) for c in gauss.AS241_D)
E0, E1, E2, E3, E4, E5, E6, E7 = (_C(c) for c in gauss.AS241_E)
F0, F1, F2, F3, F4, F5, F6, F7 = (_C(c) for c in gauss.AS241_F)
SPLIT1, SPLIT2, CONST1, CONST2 = _C(gauss.SPLIT1), _C(gauss.SPLIT2), _C(gauss.CONST1), _C(gauss.CONST2)
TWO_M53, TWO_M52, TWO_M50 = _C(2.0**-53), _C(2.0**-52), _C(2.0**-floats.OCTANT_BITS)
TWO_54, SMALLEST_NORMAL = _C(2.0**54), _C(2.0**-1022)
FRACTION_MASK = _C((1 << floats.OCTANT_BITS) - 1)
FULL_TURN = _C(1 << floats.OCTANT_BITS)
OCTANT_BITS = _C(floats.OCTANT_BITS)
MANTISSA_MASK = _C((1 << 52) - 1)
EXPONENT_ONE = _C(1023 << 52)
INF = _C(float("inf"))


@triton.jit
def _philox(pairs, k0, k1):
    """The four uint32 words of counter (pair mod 2**32, pair >> 32, 0, 0) under key (k0, k1): philox.philox4x32."""
    c0 = (pairs & 0xFFFFFFFF).to(tl.uint32)
    c1 = (pairs >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        high0 = tl.umulhi(c0, 0xD2511F53)
        low0 = c0 * 0xD2511F53
        high1 = tl.umulhi(c2, 0xCD9E8D57)
        low1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = high1 ^ c1 ^ k0, low1, high0 ^ c3 ^ k1, low0
    return c0, c1, c2, c3


@triton.jit
def _f64(value: tl.constexpr):
    """A float constant as a float64 scalar, for a comparison: Triton's comparisons (``tensor.__lt__`` and the
    like) turn a Python float in float32's range into a float32 constant first, so ``m > SQRT2`` would compare
    with sqrt(2) rounded to float32. (Its arithmetic takes the tensor's type, float64, and needs no help.)"""
    return tl.full((), value, tl.float64)


@triton.jit
def _counts(low, high, SHIFT: tl.constexpr):
    """W >> SHIFT (an int64 below 2**53) of the 64-bit word W = low + 2**32 high (uint32 words)."""
    return (high.to(tl.int64) << (32 - SHIFT)) | (low.to(tl.int64) >> SHIFT)


@triton.jit
def _ln_reduced(m, e):
    """ln(m * 2**e) for m in [1, 2) and int64 e: floats.ln_scaled, the SQRT2 step as a select."""
    above = m > _f64(SQRT2)
    m = tl.where(above, m * 0.5, m)
    k = tl.where(above, e + 1, e).to(tl.float64)
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
    return k * LN2_HI + (k * LN2_LO + (s + s) * p)


@triton.jit
def _split(x):
    """(m, e) with x = m * 2**e, m in [1, 2), from the bits of a positive normal float64."""
    bits = x.to(tl.int64, bitcast=True)
    e = (bits >> 52) - 1023
    m = ((bits & MANTISSA_MASK) | EXPONENT_ONE).to(tl.float64, bitcast=True)
    return m, e


@triton.jit
def _ln_positive(x):
    """ln(x) for finite x > 0, subnormals included: floats.ln."""
    small = x < _f64(SMALLEST_NORMAL)
    m, e = _split(tl.where(small, x * TWO_54, x))
    return _ln_reduced(m, tl.where(small, e - 54, e))


@triton.jit
def _cos_sin(angle):
    """(cos, sin) of int64 counts in [0, 2**53) of 2**-53 turns: floats.cos_sin_turn."""
    octant = angle >> OCTANT_BITS
    fraction = angle & FRACTION_MASK
    fraction = tl.where((octant & 1) != 0, FULL_TURN - fraction, fraction)
    x = (fraction.to(tl.float64) * TWO_M50) * PI_4
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
    swap = ((octant + 1) & 2) != 0
    cos_ = tl.where(swap, s, c)
    sin_ = tl.where(swap, c, s)
    cos_ = tl.where(((octant + 2) & 4) != 0, -cos_, cos_)
    sin_ = tl.where((octant & 4) != 0, -sin_, sin_)
    return cos_, sin_


@triton.jit
def _quantile(p):
    """Phi^{-1}(p): gauss.normal_quantile (AS241), its regions computed and selected."""
    q = p - 0.5
    r = CONST1 - q * q
    num = ((((((A7 * r + A6) * r + A5) * r + A4) * r + A3) * r + A2) * r + A1) * r + A0
    den = ((((((B7 * r + B6) * r + B5) * r + B4) * r + B3) * r + B2) * r + B1) * r + B0
    central = q * num / den
    negative = q < 0.0
    tail = tl.where(negative, p, 1.0 - p)
    tail = tl.where(tail > 0.0, tail, 1.0)  # lanes that p <= 0, p >= 1 or NaN select away: keep ln finite
    r = tl.sqrt(-_ln_positive(tail))
    near = r - CONST2
    num = ((((((Q7 * near + Q6) * near + Q5) * near + Q4) * near + Q3) * near + Q2) * near + Q1) * near + Q0
    den = ((((((D7 * near + D6) * near + D5) * near + D4) * near + D3) * near + D2) * near + D1) * near + D0
    near_value = num / den
    far = r - SPLIT2
    num = ((((((E7 * far + E6) * far + E5) * far + E4) * far + E3) * far + E2) * far + E1) * far + E0
    den = ((((((F7 * far + F6) * far + F5) * far + F4) * far + F3) * far + F2) * far + F1) * far + F0
    value = tl.where(r <= _f64(SPLIT2), near_value, num / den)
    value = tl.where(negative, -value, value)
    value = tl.where(tl.abs(q) <= _f64(SPLIT1), central, value)
    value = tl.where(p >= 1.0, INF, value)
    value = tl.where(p <= 0.0, -INF, value)
    return tl.where(p != p, p, value)


@triton.jit
def _truncated(counts, low, width, upper, flip):
    """z of draws.truncated_standard from 52-bit counts W >> 12."""
    u = (counts.to(tl.float64) + 0.5) * TWO_M52  # the open uniform, exact
    z = tl.where(width == 0.0, upper, _quantile(low + u * width))
    return tl.where(flip != 0, -z, z)


@triton.jit
def _fill(out_ptr, scalars_ptr, ints_ptr, KIND: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    k0 = tl.load(ints_ptr).to(tl.uint32)
    k1 = tl.load(ints_ptr + 1).to(tl.uint32)
    run_start = tl.load(ints_ptr + 2)
    run_len = tl.load(ints_ptr + 3)
    blocks_per_row = tl.load(ints_ptr + 4)
    flip = tl.load(ints_ptr + 5)
    outer = tl.load(ints_ptr + 6)
    pid = tl.program_id(0).to(tl.int64)
    row = pid // blocks_per_row
    block = pid - row * blocks_per_row
    element = run_start  # the full tensor's index of the row's first element
    rest = row
    for d in range(outer):  # the outer dims, innermost first: (start, length, stride) each
        at = ints_ptr + 7 + 3 * (outer - 1 - d)
        length = tl.load(at + 1)
        element += (rest % length + tl.load(at)) * tl.load(at + 2)
        rest = rest // length
    first_pair = (element >> 1) + block * BLOCK
    pairs = first_pair + tl.arange(0, BLOCK)
    w0, w1, w2, w3 = _philox(pairs, k0, k1)
    p = tl.load(scalars_ptr)
    q = tl.load(scalars_ptr + 1)
    if KIND == 2:  # trunc_normal
        low = tl.load(scalars_ptr + 2)
        width = tl.load(scalars_ptr + 3)
        upper = tl.load(scalars_ptr + 4)
        a = tl.load(scalars_ptr + 5)
        b = tl.load(scalars_ptr + 6)
        even = p + q * _truncated(_counts(w0, w1, 12), low, width, upper, flip)
        odd = p + q * _truncated(_counts(w2, w3, 12), low, width, upper, flip)
        even = tl.where(even < a, a, even)
        even = tl.where(even > b, b, even)
        odd = tl.where(odd < a, a, odd)
        odd = tl.where(odd > b, b, odd)
    elif KIND == 0:  # uniform
        even = p + q * (_counts(w0, w1, 11).to(tl.float64) * TWO_M53)
        odd = p + q * (_counts(w2, w3, 11).to(tl.float64) * TWO_M53)
    else:  # normal: Box-Muller
        m, e = _split((_counts(w0, w1, 11) + 1).to(tl.float64))
        r = tl.sqrt(-2.0 * _ln_reduced(m, e - 53))
        c, s = _cos_sin(_counts(w2, w3, 11))
        even = p + q * (r * c)
        odd = p + q * (r * s)
    values = tl.interleave(even, odd)  # (even, odd) of each pair in turn: elements 2 * first_pair onwards
    offsets = 2 * first_pair - element + tl.arange(0, 2 * BLOCK)  # positions in the row
    mask = (offsets >= 0) & (offsets < run_len)
    tl.store(out_ptr + row * run_len + offsets, _encode(values, DTYPE), mask=mask)


@triton.jit
def _encode(values, DTYPE: tl.constexpr):
    """The bits of float64 values in the output dtype (docs/portable.md section 6), as integers of its width:
    float32 by the hardware's nearest-even conversion, float16 from that float32 likewise, bfloat16 from it by
    nearest-even on its bits (as torch's CPU conversion: Triton's interpreter truncates); a NaN as the dtype's
    quiet NaN with no sign or payload, whatever NaN the device's operations made."""
    nan = values != values
    if DTYPE == 0:  # float64
        bits = tl.where(nan, 0x7FF8000000000000, values.to(tl.int64, bitcast=True))
    else:
        single = values.to(tl.float32).to(tl.int32, bitcast=True)
        if DTYPE == 1:  # float32
            bits = tl.where(nan, 0x7FC00000, single)
        elif DTYPE == 2:  # float16
            half = values.to(tl.float32).to(tl.float16).to(tl.int16, bitcast=True)
            bits = tl.where(nan, 0x7E00, half)
        else:  # bfloat16
            rounded = ((single + 0x7FFF + ((single >> 16) & 1)) >> 16) & 0xFFFF
            bits = tl.where(nan, 0x7FC0, rounded).to(tl.int16)
    return bits


@triton.jit
def _functions(x_ptr, ln_ptr, quantile_ptr, N: tl.constexpr):
    at = tl.arange(0, N)
    x = tl.load(x_ptr + at)
    tl.store(ln_ptr + at, _ln_positive(x))
    tl.store(quantile_ptr + at, _quantile(x))


def _float32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _around(x: float, steps: int = 2) -> list[float]:
    """x and its float64 neighbours, ``steps`` each way."""
    below, above = [x], [x]
    for _ in range(steps):
        below.append(math.nextafter(below[-1], -math.inf))
        above.append(math.nextafter(above[-1], math.inf))
    return below[::-1] + above[1:]


def boundary_inputs() -> list[float]:
    """Where the kernel compares a float64 with a constant: the constant, its float32 rounding (what Triton's
    comparisons made of a Python float) and their neighbours. ln's SQRT2 step (x = m in [1, 2), and scaled by
    2**-40), its subnormal step, AS241's central region (|p - 1/2| against SPLIT1, both sides of 1/2) and its far
    region (sqrt(-ln p) against SPLIT2). A draw lands in such a window about once in 10**8 elements, too rarely
    for whole-tensor checks to see."""
    inputs: list[float] = []
    for edge in (floats.SQRT2, _float32(floats.SQRT2)):
        inputs += _around(edge) + [x * 2.0**-40 for x in _around(edge)]
    inputs += _around(2.0**-1022)
    for edge in (gauss.SPLIT1, _float32(gauss.SPLIT1)):
        inputs += _around(0.5 - edge, 3) + _around(0.5 + edge, 3)
    inputs += _around(math.exp(-(gauss.SPLIT2**2)), 3)
    return inputs


def function_differences(device: torch.device) -> list[str]:
    """The kernel's ln and quantile, compiled for ``device`` (or interpreted), at :func:`boundary_inputs` against
    floats.ln and gauss.normal_quantile, bit for bit: one line per difference (placement's check runs it)."""
    inputs = boundary_inputs()
    size = triton.next_power_of_2(len(inputs))
    x = torch.tensor(inputs + [1.0] * (size - len(inputs)), dtype=torch.float64, device=device)
    ln, quantile = torch.empty_like(x), torch.empty_like(x)
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        _functions[(1,)](x, ln, quantile, N=size, **COMPILE_OPTIONS)
    differences = []
    for value, got_ln, got_quantile in zip(inputs, ln.tolist(), quantile.tolist(), strict=False):
        for name, got, expected in (
            ("ln", got_ln, floats.ln(value)),
            ("quantile", got_quantile, gauss.normal_quantile(value)),
        ):
            if struct.pack("<d", got) != struct.pack("<d", expected):
                differences.append(f"{name}({value.hex()}) = {got.hex()}, the spec's {expected.hex()}")
    return differences


def fill(
    out: torch.Tensor,
    scheme: str,
    params: Mapping[str, object],
    shape: Sequence[int],
    seed: int,
    resolved: Resolved = (),
    *,
    block: int = BLOCK,
    num_warps: int = 4,
) -> None:
    """Write ``full[slices]`` (C order) into the contiguous tensor ``out`` (float32, float64, float16 or bfloat16,
    on a device Triton compiles for, or any under its interpreter): the bytes of ``tensors.fill`` for the same
    arguments, for a drawn scheme whose request ``tensors.check`` accepted. ``block`` (pairs per program, a power
    of two) and ``num_warps`` tune the launch (bench/portable_gpu.py), never the bytes.

    NotImplementedError for sparse and the fills (callers make those elsewhere); ValueError for a scheme with no
    portable form, as ``tensors.fill``."""
    tensors.check_device_out(out, scheme, "GPU portable kernel")
    if out.numel() != numel(shape, resolved):
        raise ValueError(f"out has {out.numel()} elements; the slice has {numel(shape, resolved)}")
    if out.numel() == 0:
        return
    layout = runs(shape, resolved)
    request = tensors.plan(scheme, params, shape)
    flip, low, width, upper = request.truncation or (False, 0.0, 0.0, 0.0)
    a, b = request.more if request.kind == "trunc_normal" else (0.0, 0.0)
    scalars = [request.p, request.q, low, width, upper, a, b]
    rows = out.numel() // layout.length
    blocks_per_row = triton.cdiv(layout.length // 2 + 2, block)  # a row of n elements spans at most n // 2 + 2 pairs
    if rows * blocks_per_row > MAX_PROGRAMS:
        raise NotImplementedError("the GPU portable kernel takes at most 2**31 - 1 programs")
    k0, k1 = key_of(seed)
    ints = [k0, k1, layout.start, layout.length, blocks_per_row, int(flip), len(layout.outer)]
    for start, length, stride in layout.outer:
        ints += [start, length, stride]
    device = out.device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():  # Triton launches there
        _fill[(rows * blocks_per_row,)](
            out.view(-1).view(tensors.BITS[out.dtype]),
            torch.tensor(scalars, dtype=torch.float64, device=device),
            torch.tensor(ints, dtype=torch.int64, device=device),
            KIND=KINDS.index(request.kind),
            DTYPE=DTYPES.index(out.dtype),
            BLOCK=block,
            num_warps=num_warps,
            **COMPILE_OPTIONS,
        )

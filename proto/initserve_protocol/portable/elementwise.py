"""The portable generator from torch elementwise operations alone, so that it runs on any device torch runs on.

The goal is CUDA tensors: a GPU rank makes its own shard of a portable tensor on its own device, with the bytes
of docs/portable.md. It is the arithmetic of ``draws``, ``floats`` and ``gauss`` (and of the Numba kernel,
``cpu``) written as whole-tensor operations; the tests hold it to ``tensors.fill`` byte for byte on the CPU
device. The CPU device here is the only one it has been checked on: the exactness argument below must be
re-verified on a GPU (the CUDA test of tests/protocol/test_portable_elementwise.py runs the known answers).

Why the bits are the same on every device:

- **Integers** (Philox's words, the 53- and 52-bit counts, octants, exponents, mantissa fields) live in int64
  tensors: ``+ - * & | ^ >> <<`` on int64 are exact, and a 32x32-bit product wraps modulo 2**64 in torch's CPU
  and CUDA kernels (two's complement), so its high word is ``(p >> 32) & 0xFFFFFFFF`` (an arithmetic shift,
  then the mask drops the sign copies) and its low word ``p & 0xFFFFFFFF``.
- **Conversions**: int64 -> float64 (``.to(torch.float64)``) only of integers below 2**53 + 1, which is exact;
  ``.view(torch.int64)`` / ``.view(torch.float64)`` reinterpret bits (the Numba kernel's bitcasts).
- **Floats**: every step is one torch op on float64 tensors, in the reference's order: ``torch.add``,
  ``torch.sub``, ``torch.mul``, ``torch.div``, ``torch.neg``, ``torch.abs`` (exact), comparisons and
  ``torch.where`` (a select, no arithmetic), and ``torch.sqrt`` as a first guess only (below). IEEE-754 binary64
  ``+ - * /`` are correctly rounded in torch's CPU kernels (checked here on 200,000 random pairs each) and in
  CUDA double arithmetic (CUDA's ``-prec-div``/``-prec-sqrt`` switches concern float32 only). Each op is its own
  kernel, so nothing can be contracted into a fused multiply-add across ops; within one, ``add`` and ``sub``
  compute ``a + alpha * b`` with ``alpha = 1`` (never passed here), and ``1 * b`` is exact, so even a contracted
  form rounds once, as ``a + b``. ``a - b`` is written ``neg(b) + a`` where ``a`` is a scalar (the same IEEE
  result). Scalars are Python floats (float64). No ``alpha=``/``value=`` arguments, ``addcmul``, ``lerp``, or
  library ``log``/``exp``/``sin``/``cos``/``erf``.
- **sqrt is corrected**: ``torch.sqrt`` on float64 is *not* correctly rounded on every CPU build (torch 2.13 with
  MKL calls VML's vdSqrt: 1.3% of random arguments come back one ulp off). ``_sqrt`` takes it as a guess within
  one ulp and picks the nearest float by Tuckerman's test, with Dekker's exact products from plain multiplies and
  adds; on CUDA (``::sqrt``, correctly rounded) the correction changes nothing.
- **No division by a Python scalar**: CUDA's ``div`` turns ``tensor / cpu_scalar`` into a multiplication by the
  reciprocal (one bit lost), so every division here is tensor by tensor (and the spec needs no other).
- **Rounding to the dtype** (docs/portable.md section 6): float64 -> ``.to(torch.float32)`` (nearest-even, a C
  cast on the CPU, ``__double2float_rn`` on CUDA), then ``.to(float16/bfloat16)`` from that float32 value.

Branches become selects: both octant swaps and signs of 4.2, the SQRT2 reduction of ln, and every region of
AS241 (central, tail r <= 5, tail r > 5, p <= 0, p >= 1, NaN) are computed on all elements of the chunk and
picked with ``torch.where``, whose unselected lanes never reach a result (each element's values depend only on
its own lanes, and no mask is applied by multiplication, so a NaN or inf of an unused branch stays in its lane).

Work goes in chunks of ``chunk_elements`` output positions (bounded temporaries whatever the slice's size).
Within one run of consecutive elements (the whole tensor, or a chunk inside one row of a box slice) the chunk's
pairs are a range computed in Python; otherwise each position's element index is computed from the slice's box
(int64 divisions, as cpu.fill's runs) and its distinct pairs by ``unique_consecutive`` (element indices
increase). Each pair's Philox block is computed once, its two values (uniform, normal) or its two counts
(trunc_normal) interleaved, and each position gathers its own. Peak temporaries per chunk, measured on the CPU
(peak RSS, one thread, a contiguous chunk of 2**22): about 55 bytes per position for uniform, 95 for normal and
185 to 275 for trunc_normal (AS241's regions all run on every element), so about 230 MiB, 400 MiB and 0.75 to
1.1 GiB at the default 2**22; a chunk of a box slice that spans rows adds its index tensors (up to 32 bytes per
position while its pairs are found, then 8 for the gather indices). A smaller
``chunk_elements`` bounds them proportionally.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from initserve_protocol.portable import draws, floats, gauss, tensors
from initserve_protocol.portable.philox import MASK32, MULTIPLIERS, ROUNDS, WEYL, key_of
from initserve_protocol.slices import Resolved, runs

DEFAULT_CHUNK_ELEMENTS = 1 << 22  # output positions per chunk (see the module's docstring for the memory)
COUNT_SHIFT = 64 - floats.COUNT_BITS  # W >> 11: a 53-bit count
OPEN_SHIFT = 64 - draws.OPEN_BITS  # W >> 12: a 52-bit count, for the open uniform
TWO_M53 = 2.0**-floats.COUNT_BITS
TWO_M52 = 2.0**-draws.OPEN_BITS
TWO_M50 = 2.0**-floats.OCTANT_BITS
TWO_54 = 2.0**54
SMALLEST_NORMAL = 2.0**-1022
FRACTION_MASK = (1 << floats.OCTANT_BITS) - 1
FULL_TURN = 1 << floats.OCTANT_BITS
EXPONENT_SHIFT = 52
EXPONENT_BIAS = 1023
MANTISSA_MASK = (1 << 52) - 1
EXPONENT_ONE = EXPONENT_BIAS << 52  # the bits of 1.0
SPLITTER = float((1 << 27) + 1)  # Veltkamp's constant: splits a float64 into two halves of 26 bits


@dataclass(frozen=True)
class _Layout:
    """Where the positions of ``full[slices]`` (C order) lie in the full tensor, as cpu.fill's runs: the innermost
    sliced-or-partial dim and every full dim after it are one contiguous run of ``run_len`` elements starting at
    ``run_start`` (plus the outer dims' offsets); ``outer`` holds (start, length, stride) of each dim before it."""

    run_start: int
    run_len: int
    outer: tuple[tuple[int, int, int], ...]

    @classmethod
    def of(cls, shape: Sequence[int], resolved: Resolved) -> _Layout:
        found = runs(shape, resolved)
        return cls(found.start, found.length, found.outer)

    def elements(self, positions: torch.Tensor) -> torch.Tensor:
        """The full tensor's C-order index of each position (an int64 tensor) of the slice."""
        if not self.outer:
            return positions + self.run_start
        rest = torch.div(positions, self.run_len, rounding_mode="floor")
        index = positions - rest * self.run_len + self.run_start
        for start, length, stride in reversed(self.outer):
            quotient = torch.div(rest, length, rounding_mode="floor")
            index += (rest - quotient * length + start) * stride
            rest = quotient
        return index

    def element(self, position: int) -> int:
        """The full tensor's C-order index of one position of the slice (``elements`` in Python integers)."""
        rest, offset = divmod(position, self.run_len)
        index = offset + self.run_start
        for start, length, stride in reversed(self.outer):
            rest, coordinate = divmod(rest, length)
            index += (coordinate + start) * stride
        return index

    def within_one_run(self, first: int, count: int) -> bool:
        """Whether positions [first, first + count) are consecutive elements of the full tensor."""
        return not self.outer or first // self.run_len == (first + count - 1) // self.run_len


def _philox(pairs: torch.Tensor, stream: int, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10's four output words (int64 tensors in [0, 2**32)) of counter (pair mod 2**32, pair >> 32,
    stream, 0): philox.philox4x32 on tensors. The words start as Python ints where they are constants (the stream,
    0), so the first round's constant products are computed once, exactly, in Python."""
    c0, c1, c2, c3 = pairs & MASK32, pairs >> 32, stream, 0
    k0, k1 = key
    for round_number in range(ROUNDS):
        if round_number:
            k0, k1 = (k0 + WEYL[0]) & MASK32, (k1 + WEYL[1]) & MASK32
        product0 = c0 * MULTIPLIERS[0]  # < 2**64: wraps modulo 2**64 in int64, the same bits as a uint64
        product1 = c2 * MULTIPLIERS[1]
        del c0, c2  # (in-place steps below: fewer temporaries live at once)
        high1 = product1 >> 32
        high1 &= MASK32
        high1 ^= c1
        high1 ^= k0
        high0 = product0 >> 32
        high0 &= MASK32
        high0 ^= c3
        high0 ^= k1
        c0, c1, c2, c3 = high1, product1 & MASK32, high0, product0 & MASK32
        del product0, product1, high0, high1
    words = (c0, c1, c2, c3)
    return words  # type: ignore[return-value]


def _exceeds_product(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whether x > a * b exactly (not the rounded product), for a * b within a factor 2 of x: Dekker's exact
    product a * b = product + error (Veltkamp's split, plain multiplies and adds, exact without underflow or
    overflow), and x - product is exact (Sterbenz)."""
    product = torch.mul(a, b)
    a_high, a_low = _veltkamp(a)
    b_high, b_low = _veltkamp(b)
    error = torch.sub(torch.mul(a_high, b_high), product)
    error = torch.add(error, torch.mul(a_high, b_low))
    error = torch.add(error, torch.mul(a_low, b_high))
    error = torch.add(error, torch.mul(a_low, b_low))
    return torch.sub(x, product) > error


def _veltkamp(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) with a = high + low exactly, each of at most 26 significant bits (|a| < 2**995)."""
    scaled = torch.mul(a, SPLITTER)
    high = torch.sub(scaled, torch.sub(scaled, a))
    return high, torch.sub(a, high)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded sqrt of x = +-0 or x in [2**-969, 2**995] (Dekker's products exact): this module's
    arguments are 0 or at least 2**-53 (Box-Muller's -2 ln v) and at most 745 (AS241's -ln p).

    torch.sqrt is correctly rounded on CUDA, but not on every CPU build: with MKL, torch's CPU kernels call VML's
    vdSqrt, whose results are within 1 ulp, not always the nearest (measured: 1.3% of random float64 arguments
    one ulp off, torch 2.13). So its result y is taken as a first guess and corrected by Tuckerman's test: y is
    the nearest float to sqrt(x) exactly when y * prev(y) < x <= y * next(y) (x is a multiple of ulp(y)**2, so
    comparing with these products decides against the midpoints y +- ulp / 2, and sqrt never ties); else the
    neighbour on the side x lies. Where torch.sqrt is already exact, this changes nothing."""
    guess = torch.sqrt(x)
    bits = guess.view(torch.int64)
    above, below = (bits + 1).view(torch.float64), (bits - 1).view(torch.float64)
    value = torch.where(_exceeds_product(x, guess, below), guess, below)  # x <= y * prev(y): y is too large
    value = torch.where(_exceeds_product(x, guess, above), above, value)  # x > y * next(y): y is too small
    return torch.where(x > 0.0, value, x)  # sqrt(+-0) = +-0


def _counts(low: torch.Tensor, high: torch.Tensor, shift: int) -> torch.Tensor:
    """W >> shift of the 64-bit word W = low + 2**32 high (shift >= 11), as a non-negative int64."""
    return (high << (32 - shift)) | (low >> shift)


def _series(t: torch.Tensor, coefficients: Sequence[float]) -> torch.Tensor:
    """c[0] + t * (c[1] + t * (... + t * c[-1])), innermost first: p = c[-1], then p = c[k] + t * p, each step a
    multiply, then an add (floats' and gauss's Horner loops; AS241's ``v * r + c`` is the same two operations)."""
    p = torch.mul(t, coefficients[-1])
    p.add_(coefficients[-2])
    for c in reversed(coefficients[:-2]):
        p.mul_(t)
        p.add_(c)
    return p


def _ln_reduced(m: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """ln(m * 2**e) for m in [1, 2) and integers e (int64): floats.ln_scaled, the SQRT2 step as a select."""
    above = m > floats.SQRT2
    m = torch.where(above, torch.mul(m, 0.5), m)  # exact (the reference's m / 2.0)
    k = torch.where(above, e + 1, e).to(torch.float64)  # exact: |e| < 2**11
    s = torch.div(torch.sub(m, 1.0), torch.add(m, 1.0))  # m - 1 is exact
    p = _series(torch.mul(s, s), floats.LOG)
    p.mul_(torch.add(s, s))  # (s + s) * p
    p.add_(torch.mul(k, floats.LN2_LO))  # k * LN2_LO + (s + s) * p
    return torch.add(torch.mul(k, floats.LN2_HI), p)  # k * LN2_HI (exact) + (...)


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, e) with x = m * 2**e and m in [1, 2), from the bits of a positive normal float64 x."""
    bits = x.view(torch.int64)
    exponent = (bits >> EXPONENT_SHIFT) - EXPONENT_BIAS
    return ((bits & MANTISSA_MASK) | EXPONENT_ONE).view(torch.float64), exponent


def _ln_count(n: torch.Tensor) -> torch.Tensor:
    """ln(n * 2**-53) for int64 counts n in [1, 2**53]: floats.ln_count (float64(n) is exact)."""
    m, e = _split(n.to(torch.float64))
    return _ln_reduced(m, e - floats.COUNT_BITS)


def _ln_positive(x: torch.Tensor) -> torch.Tensor:
    """ln(x) for finite x > 0, subnormals included: floats.ln (a subnormal is first scaled by 2**54, exactly)."""
    small = x < SMALLEST_NORMAL
    m, e = _split(torch.where(small, torch.mul(x, TWO_54), x))
    return _ln_reduced(m, torch.where(small, e - 54, e))


def _cos_sin(angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of int64 counts a in [0, 2**53) turns * 2**-53: floats.cos_sin_turn, its octant table as the
    three selects of docs/portable.md 4.2 (swap when (o + 1) & 2, negate C when (o + 2) & 4, S when o & 4)."""
    octant = angle >> floats.OCTANT_BITS
    fraction = angle & FRACTION_MASK
    fraction = torch.where((octant & 1) != 0, FULL_TURN - fraction, fraction)
    x = torch.mul(torch.mul(fraction.to(torch.float64), TWO_M50), floats.PI_4)  # the first product is exact
    t = torch.mul(x, x)
    sine = _series(t, floats.SIN[1:])
    sine.mul_(torch.mul(x, t))  # (x * t) * p
    sine = torch.add(x, sine)
    cosine = _series(t, floats.COS[1:])
    cosine.mul_(t)
    cosine = torch.add(cosine, 1.0)  # 1.0 + t * p
    swap = ((octant + 1) & 2) != 0
    cos_, sin_ = torch.where(swap, sine, cosine), torch.where(swap, cosine, sine)
    cos_ = torch.where(((octant + 2) & 4) != 0, torch.neg(cos_), cos_)
    sin_ = torch.where((octant & 4) != 0, torch.neg(sin_), sin_)
    return cos_, sin_


def _uniform_pairs(even: torch.Tensor, odd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U of the pair's even and odd element from their 53-bit counts W >> 11: count * 2**-53, exact."""
    return torch.mul(even.to(torch.float64), TWO_M53), torch.mul(odd.to(torch.float64), TWO_M53)


def _normal_pairs(radius: torch.Tensor, angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-Muller from the pair's 53-bit counts W0 >> 11 and W1 >> 11: (r * C, r * S) with r = sqrt(-2.0 * L),
    L = ln((W0 >> 11) + 1) of 4.1 and (C, S) of the angle W1 >> 11 (docs/portable.md section 4)."""
    r = _sqrt(torch.mul(_ln_count(radius + 1), -2.0))
    cos_, sin_ = _cos_sin(angle)
    return torch.mul(r, cos_), torch.mul(r, sin_)


def _quantile(p: torch.Tensor) -> torch.Tensor:
    """Phi^{-1}(p): gauss.normal_quantile (AS241), every region computed and selected."""
    q = torch.sub(p, 0.5)
    negative = q < 0.0
    r = torch.add(torch.neg(torch.mul(q, q)), gauss.CONST1)  # CONST1 - q * q
    central = torch.div(torch.mul(q, _series(r, gauss.AS241_A)), _series(r, gauss.AS241_B))
    tail = torch.where(negative, p, torch.add(torch.neg(p), 1.0))  # p, or 1.0 - p (exact)
    tail = torch.where(tail > 0.0, tail, 1.0)  # lanes that p <= 0, p >= 1 or NaN select away: keep ln finite
    r = _sqrt(torch.neg(_ln_positive(tail)))
    near = torch.sub(r, gauss.CONST2)
    far = torch.sub(r, gauss.SPLIT2)
    value = torch.where(
        r <= gauss.SPLIT2,
        torch.div(_series(near, gauss.AS241_C), _series(near, gauss.AS241_D)),
        torch.div(_series(far, gauss.AS241_E), _series(far, gauss.AS241_F)),
    )
    value = torch.where(negative, torch.neg(value), value)
    value = torch.where(torch.abs(q) <= gauss.SPLIT1, central, value)
    value = torch.where(p >= 1.0, math.inf, value)
    value = torch.where(p <= 0.0, -math.inf, value)
    return torch.where(torch.isnan(p), p, value)


def _truncated(counts: torch.Tensor, plan: tuple[bool, float, float, float]) -> torch.Tensor:
    """z of draws.truncated_standard from each element's 52-bit count W >> 12 (int64)."""
    flip, low, width, upper = plan
    if width == 0.0:
        z = torch.full(counts.shape, upper, dtype=torch.float64, device=counts.device)
    else:
        u = torch.mul(torch.add(counts.to(torch.float64), 0.5), TWO_M52)  # the open uniform, exact
        z = _quantile(torch.add(torch.mul(u, width), low))  # low + u * width
    return torch.neg(z) if flip else z


def _pairs_of(layout: _Layout, first: int, count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | int]:
    """(pairs, picks) of positions [first, first + count) of the slice: the distinct pair indices of their
    elements, in order, and for each position the index of its value in the pairs' values interleaved as (even,
    odd, even, odd, ...). Within one run (the whole tensor, or a chunk that stays in one row of a slice) the
    elements are consecutive: the pairs are a range, found in Python (no device synchronization), and picks is
    the first element's parity (the values are then a slice of the interleaved ones)."""
    if layout.within_one_run(first, count):
        element = layout.element(first)
        pairs = torch.arange(element >> 1, ((element + count - 1) >> 1) + 1, dtype=torch.int64, device=device)
        return pairs, element & 1
    elements = layout.elements(torch.arange(first, first + count, dtype=torch.int64, device=device))
    pairs, inverse = torch.unique_consecutive(elements >> 1, return_inverse=True)  # elements increase
    return pairs, inverse * 2 + (elements & 1)


def _interleave(even: torch.Tensor, odd: torch.Tensor, picks: torch.Tensor | int, count: int) -> torch.Tensor:
    """Each position's value from its pair's (even, odd) values (a new tensor, contiguous)."""
    values = torch.stack((even, odd), dim=1).view(-1)
    return values[picks : picks + count] if isinstance(picks, int) else values[picks]


def _chunk(
    request: tensors.Plan, layout: _Layout, key: tuple[int, int], first: int, count: int, device: torch.device
) -> torch.Tensor:
    """The float64 values of positions [first, first + count) of the slice."""
    kind, p, q = request.kind, request.p, request.q
    pairs, picks = _pairs_of(layout, first, count, device)
    words = _philox(pairs, draws.VALUES, key)
    del pairs
    shift = OPEN_SHIFT if kind == "trunc_normal" else COUNT_SHIFT
    even, odd = _counts(words[0], words[1], shift), _counts(words[2], words[3], shift)  # W0 >> shift, W1 >> shift
    del words
    if kind == "trunc_normal":
        counts = _interleave(even, odd, picks, count)
        del even, odd, picks
        a, b = request.more
        value = torch.add(torch.mul(_truncated(counts, request.truncation), q), p)  # type: ignore[arg-type]
        value = torch.where(value < a, a, value)
        return torch.where(value > b, b, value)
    even, odd = (_uniform_pairs if kind == "uniform" else _normal_pairs)(even, odd)
    x = _interleave(even, odd, picks, count)
    del even, odd, picks
    x.mul_(q)
    x.add_(p)  # p + q * X
    return x


def fill(
    out: torch.Tensor,
    scheme: str,
    params: Mapping[str, object],
    shape: Sequence[int],
    seed: int,
    resolved: Resolved = (),
    first: int = 0,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> None:
    """Write positions ``[first, first + out.numel())`` of ``full[slices]`` (C order) into the contiguous tensor
    ``out`` (float32, float64, float16 or bfloat16, on any device), computed on ``out``'s device: the bytes of
    ``tensors.fill`` for the same arguments, for a drawn scheme whose request ``tensors.check`` accepted.

    NotImplementedError for sparse and the fills (callers make those elsewhere); ValueError for a scheme with no
    portable form, as ``tensors.fill``."""
    tensors.check_device_out(out, scheme, "elementwise portable fill")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be positive, not {chunk_elements}")
    if out.numel() == 0:  # nothing to write; a zero-element shape has no fans to scale by either
        return
    request = tensors.plan(scheme, params, shape)  # once per request, as cpu's
    layout, key, flat = _Layout.of(shape, resolved), key_of(seed), out.view(-1)
    for start in range(0, flat.numel(), chunk_elements):
        count = min(chunk_elements, flat.numel() - start)
        values = _chunk(request, layout, key, first + start, count, out.device)
        if out.dtype != torch.float64:
            values = values.to(torch.float32)  # nearest-even; float16/bfloat16 from this float32 value
        flat[start : start + count].copy_(values)
        tensors.canonicalize_nans(flat[start : start + count], values)

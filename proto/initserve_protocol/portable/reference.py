"""The portable generator's executable specification: element by element, in plain Python.

Slow (a few microseconds per element) and written to be read next to docs/portable.md: the fast kernels
(``initserve_protocol.portable.cpu``) must equal it byte for byte, and the known-answer file
(tests/protocol/portable_known_answers.json) is generated from it. Covers the drawn schemes; the fills
(constant, ones, zeros, eye, dirac) have no random bits and are torch's.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Mapping, Sequence

from initserve_protocol.portable.draws import clamp, element_word, normal, truncated_standard, truncation, uniform
from initserve_protocol.portable.scales import draw
from initserve_protocol.portable.sparse import zero_rows
from initserve_protocol.slices import Resolved

FLOAT32_FORMAT = "<f"


def to_float32(x: float) -> float:
    """x rounded to float32, to nearest, ties to even (overflow gives an infinity, as a C cast does)."""
    try:
        return struct.unpack(FLOAT32_FORMAT, struct.pack(FLOAT32_FORMAT, x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def encode(x: float, dtype: str) -> bytes:
    """The little-endian bytes of a float64 value in ``dtype``: float64 as is; float32 rounded to nearest-even;
    float16 and bfloat16 rounded to nearest-even from that float32 value; every NaN as its dtype's one NaN,
    positive, quiet, with no other payload bit."""
    if x != x:
        x = math.nan  # 0x7FF8000000000000, whichever NaN the arithmetic made
    if dtype == "float64":
        return struct.pack("<d", x)
    single = to_float32(x)
    if dtype == "float32":
        return struct.pack(FLOAT32_FORMAT, single)
    if dtype == "float16":
        try:
            return struct.pack("<e", single)  # exact input, so this is float32 -> float16 nearest-even
        except OverflowError:
            return struct.pack("<e", math.copysign(math.inf, single))
    if dtype == "bfloat16":
        bits = struct.unpack("<I", struct.pack(FLOAT32_FORMAT, single))[0]
        if math.isnan(single):
            return struct.pack("<H", 0x7FC0)
        bits += 0x7FFF + ((bits >> 16) & 1)  # round the low 16 bits to nearest, ties to even
        return struct.pack("<H", bits >> 16)
    raise ValueError(f"dtype {dtype!r} is not served")


def indices(shape: Sequence[int], resolved: Resolved = ()) -> list[int]:
    """The C-order indices in the full tensor of the elements of ``full[slices]``, in the slice's C order."""
    ranges = [range(size) for size in shape]
    for dim, start, length in resolved:
        ranges[dim] = range(start, start + length)
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    return [sum(i * s for i, s in zip(point, strides, strict=True)) for point in itertools.product(*ranges)]


def values(
    scheme: str, params: Mapping[str, object], shape: Sequence[int], seed: int, resolved: Resolved = ()
) -> list[float]:
    """The float64 value of every element of the slice, before rounding to the dtype."""
    elements = indices(shape, resolved)
    if not elements:
        return []
    kind, p, q, *more = draw(scheme, params, shape)
    if kind == "uniform":
        width = q - p
        return [p + width * uniform(element_word(seed, i)) for i in elements]
    if kind == "normal":
        return [p + q * normal(seed, i) for i in elements]
    if kind == "trunc_normal":
        a, b = more
        plan = truncation(p, q, a, b)  # once per request
        return [clamp(p + q * truncated_standard(element_word(seed, i), *plan), a, b) for i in elements]
    if kind == "sparse":
        (zeros,) = more
        rows, cols = shape
        zero = {c: zero_rows(seed, rows, cols, c, zeros) for c in sorted({i % cols for i in elements})}
        return [0.0 if i // cols in zero[i % cols] else p + q * normal(seed, i) for i in elements]
    raise ValueError(f"{scheme} is a fill: its bytes are torch's, with no random draw")


def generate(
    scheme: str, params: Mapping[str, object], shape: Sequence[int], dtype: str, seed: int, resolved: Resolved = ()
) -> bytes:
    """The bytes of ``full[slices]`` (C order, little-endian) for a drawn scheme."""
    return b"".join(encode(x, dtype) for x in values(scheme, params, shape, seed, resolved))

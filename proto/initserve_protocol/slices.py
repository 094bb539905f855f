"""Slices of a contract tensor: ranges and shards along dims, resolved against the whole tensor's shape.

A request for a slice gets the bytes of ``full[slices]`` (C order), where ``full`` is the contract tensor of
the whole shape: fans, and so every scheme's scale, come from the whole shape, never from the slice. Two
forms, at most one per dim:

- :class:`Range` ``(dim, start, length)``: elements ``[start, start + length)`` of ``dim``;
- :class:`Shard` ``(dim, index, count)``: shard ``index`` of ``count`` as ``torch.chunk`` and DTensor's
  ``Shard(dim)`` place them: every shard holds ``ceil(size / count)`` elements, except that the last ones may
  be shorter or empty. Concatenating the shards ``0..count-1`` along ``dim`` gives the whole tensor.

Both the client and the server resolve slices here, so they agree on the slice's shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MAX_SLICES = 16  # at most one per dim, and a shape has at most max_dims dims


@dataclass(frozen=True)
class Range:
    """Elements ``[start, start + length)`` along ``dim`` (negative ``dim`` counts from the end)."""

    dim: int
    start: int
    length: int


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` along ``dim``, split as ``torch.chunk`` splits (negative ``dim`` allowed)."""

    dim: int
    index: int
    count: int


Slice = Range | Shard
Resolved = tuple[tuple[int, int, int], ...]  # (dim, start, length) per sliced dim, in dim order


def shard_bounds(size: int, index: int, count: int) -> tuple[int, int]:
    """(start, length) of shard ``index`` of ``count`` of a dim of ``size`` elements (``torch.chunk``'s split)."""
    step = -(-size // count) if size else 0
    start = min(size, index * step)
    return start, min(size, start + step) - start


def _int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    return value


def resolve(shape: Sequence[int], slices: Iterable[Slice]) -> Resolved:
    """Each slice as (dim, start, length), sorted by dim; ValueError naming the slice when it does not fit."""
    resolved: dict[int, tuple[int, int]] = {}
    for number, item in enumerate(slices):
        if not isinstance(item, (Range, Shard)):
            kind = type(item).__name__
            raise TypeError(f"slices[{number}] must be an initserve.Range or initserve.Shard, not {kind}")
        dim = _int(item.dim, f"slices[{number}].dim")
        if not -len(shape) <= dim < len(shape):
            raise ValueError(f"slices[{number}]: dim {dim} is out of range for a tensor of {len(shape)} dims")
        dim %= len(shape)
        if dim in resolved:
            raise ValueError(f"slices[{number}]: dim {dim} is sliced twice")
        size = shape[dim]
        if isinstance(item, Range):
            start, length = _int(item.start, f"slices[{number}].start"), _int(item.length, f"slices[{number}].length")
            if start < 0 or length < 0 or start + length > size:
                raise ValueError(
                    f"slices[{number}]: range [{start}, {start + length}) does not fit dim {dim} of size {size}"
                )
        else:
            index, count = _int(item.index, f"slices[{number}].index"), _int(item.count, f"slices[{number}].count")
            if count < 1 or not 0 <= index < count:
                raise ValueError(f"slices[{number}]: shard {index} of {count} does not exist (0 <= index < count)")
            start, length = shard_bounds(size, index, count)
        resolved[dim] = (start, length)
    return tuple((dim, *resolved[dim]) for dim in sorted(resolved))


def sliced_shape(shape: Sequence[int], resolved: Resolved) -> tuple[int, ...]:
    sizes = list(shape)
    for dim, _, length in resolved:
        sizes[dim] = length
    return tuple(sizes)


def index(resolved: Resolved) -> tuple[slice, ...]:
    """A tensor index that takes the slice: ``full[index(resolved)]``."""
    if not resolved:
        return ()
    parts = [slice(None)] * (max(dim for dim, _, _ in resolved) + 1)
    for dim, start, length in resolved:
        parts[dim] = slice(start, start + length)
    return tuple(parts)


def numel(shape: Sequence[int], resolved: Resolved) -> int:
    return math.prod(sliced_shape(shape, resolved))


@dataclass(frozen=True)
class Runs:
    """Where the positions of ``full[slices]`` (C order) lie in the full tensor: the innermost sliced-or-partial
    dim and every full dim after it make one contiguous run of ``length`` elements starting at ``start`` (plus
    the outer dims' offsets); ``outer`` holds (start, length, stride) of each dim before it, outermost first."""

    start: int
    length: int
    outer: tuple[tuple[int, int, int], ...]


def runs(shape: Sequence[int], resolved: Resolved = ()) -> Runs:
    """The runs of ``full[slices]`` in the full tensor of ``shape`` (a 0-d tensor is one run of one element)."""
    if not shape:
        return Runs(0, 1, ())
    box = [(0, size) for size in shape]
    for dim, start, length in resolved:
        box[dim] = (start, length)
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    k = len(shape) - 1
    while k > 0 and box[k] == (0, shape[k]):
        k -= 1
    outer = tuple((box[d][0], box[d][1], strides[d]) for d in range(k))
    return Runs(box[k][0] * strides[k], box[k][1] * strides[k], outer)

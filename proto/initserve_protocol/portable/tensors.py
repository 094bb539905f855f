"""The portable generator on torch tensors: what the server and the SDK both call.

``check`` raises what torch raises for the request (its messages, its warnings), so a portable request is refused
exactly where torch's own function would refuse it. ``fill`` writes a range of a (slice of a) tensor's elements
with the CPU kernel, in the tensor's dtype, so a producer can generate piece by piece and a slice costs only its
own elements. The fills (constant, ones, zeros, eye, dirac) draw nothing: their bytes are torch's, and callers
generate them with torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from initserve_protocol.portable import cpu, draws, scales, sparse
from initserve_protocol.portable.scales import is_drawn
from initserve_protocol.schemes import REQUIRED, SCHEMES
from initserve_protocol.slices import Resolved

KINDS = {"uniform": cpu.UNIFORM, "normal": cpu.NORMAL, "trunc_normal": cpu.TRUNC_NORMAL, "sparse": cpu.NORMAL}
STAGING_ELEMENTS = 1 << 20  # float16/bfloat16 go through float32 in pieces of this many elements (4 MiB)


class NotPortable(ValueError):
    """The scheme has no portable form (orthogonal)."""


def complete(scheme: str, params: Mapping[str, object]) -> dict[str, object]:
    """The request's parameters with torch's defaults for the ones it left out."""
    full = {p.name: p.default for p in SCHEMES[scheme].params if not p.required}
    full.update(params)
    missing = [name for name, value in full.items() if value is REQUIRED]
    if missing:
        raise TypeError(f"{scheme}_() missing required argument: {missing[0]!r}")
    return full


@dataclass(frozen=True)
class Plan:
    """What every implementation computes once per drawn request: its draw ``kind`` and each value ``p + q * X``
    (X uniform in [0, 1) for uniform, so ``q`` is the width b - a; the standard value otherwise); for trunc_normal
    the bounds ``(a, b)`` and ``truncation``, draws.truncation's (flip, low, width, upper); for sparse ``more`` is
    (zeros per column,)."""

    kind: str
    p: float
    q: float
    more: tuple[float, ...] = ()
    truncation: tuple[bool, float, float, float] | None = None


def plan(scheme: str, params: Mapping[str, object], shape: Sequence[int]) -> Plan:
    """The :class:`Plan` of a drawn scheme's request that ``check`` accepted (fans from the full ``shape``)."""
    kind, p, q, *more = scales.draw(scheme, complete(scheme, params), shape)
    if kind == "uniform":
        return Plan(kind, p, q - p)  # low + (high - low) * U
    if kind == "trunc_normal":
        return Plan(kind, p, q, tuple(more), draws.truncation(p, q, *more))
    return Plan(kind, p, q, tuple(more))


def check_device_out(out: torch.Tensor, scheme: str, maker: str) -> None:
    """What a device path (``elementwise``, ``gpu``) refuses: NotImplementedError for sparse and the fills, which
    are made on the CPU; ValueError for an ``out`` of another dtype, or not contiguous."""
    if scheme in scales.FILLS or scheme == "sparse":
        raise NotImplementedError(f"the {maker} does not make {scheme}")
    if out.dtype not in BITS:
        raise ValueError(f"portable fill writes float32, float64, float16 or bfloat16, not {out.dtype}")
    if not out.is_contiguous():
        raise ValueError("portable fill writes a contiguous tensor")


class _Probe(torch.Tensor):
    """A meta tensor of the request's shape whose final fill runs on one CPU element: torch's function then
    computes its fans and bounds on the real shape and raises its CPU errors and messages, for no memory."""

    def uniform_(self, *args: object, **kwargs: object) -> torch.Tensor:
        torch.empty(1, dtype=self.dtype).uniform_(*args, **kwargs)
        return self

    def normal_(self, *args: object, **kwargs: object) -> torch.Tensor:
        torch.empty(1, dtype=self.dtype).normal_(*args, **kwargs)
        return self


class _Sampler(torch.Tensor):
    """A one-element CPU tensor for trunc_normal_, which returns at once on a meta tensor (before its warning and
    its checks). Its ``normal_`` and ``uniform_`` run torch's own on a scratch element (torch's errors), then
    write a value that ends torch's rejection loops in one round: a value inside the bounds, and 0 for the
    acceptance draw (log 0 accepts), so a request whose acceptance is tiny costs nothing to check."""

    def normal_(self, mean: float = 0.0, std: float = 1.0, **kwargs: object) -> torch.Tensor:
        torch.empty(1, dtype=self.dtype).normal_(mean, std, generator=_scratch_generator())
        low, high = self._bounds  # type: ignore[attr-defined]
        torch.Tensor.fill_(self, min(max(mean, low), high))
        return self

    def uniform_(self, low: float = 0.0, high: float = 1.0, **kwargs: object) -> torch.Tensor:
        torch.empty(1, dtype=self.dtype).uniform_(low, high, generator=_scratch_generator())
        torch.Tensor.fill_(self, low)
        return self


def _scratch_generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)  # checks draw nothing from torch's default generator


def check(scheme: str, params: Mapping[str, object], shape: Sequence[int], dtype: torch.dtype) -> None:
    """Raise what ``torch.nn.init.<scheme>_`` raises on a tensor of this shape and dtype, warn what it warns;
    NotPortable for a scheme with no portable form."""
    if scheme in scales.NOT_PORTABLE:
        raise NotPortable(scales.NOT_PORTABLE[scheme])
    function = getattr(torch.nn.init, f"{scheme}_")
    if scheme == "sparse":
        # Its shape check runs on the meta probe (then sparse_ returns); its other errors (num_zeros of a NaN or
        # infinite sparsity, a negative std) on a real tensor of the same rows and no columns, so no column loop.
        function(torch.empty(shape, dtype=dtype, device="meta").as_subclass(_Probe), **params)
        function(torch.empty((shape[0], 0), dtype=dtype), **params)
        return
    if math.prod(shape) == 0:  # no memory either way: torch's own call, its zero-element warning included
        function(torch.empty(shape, dtype=dtype), **params)
        return
    if scheme == "trunc_normal":  # no shape check: one element of the dtype stands for the tensor
        sampler = torch.empty(1, dtype=dtype).as_subclass(_Sampler)
        full = complete(scheme, params)
        bounds = [torch.tensor(float(full[name]), dtype=dtype).item() for name in ("a", "b")]  # type: ignore[arg-type]
        sampler._bounds = (min(bounds), max(bounds))
        function(sampler, **params)
        return
    function(torch.empty(shape, dtype=dtype, device="meta").as_subclass(_Probe), **params)


def fill(
    out: torch.Tensor,
    scheme: str,
    params: Mapping[str, object],
    shape: Sequence[int],
    seed: int,
    resolved: Resolved = (),
    first: int = 0,
) -> None:
    """Write positions ``[first, first + out.numel())`` of ``full[slices]`` (C order) into the contiguous CPU
    tensor ``out``, in its dtype, for a drawn scheme whose request ``check`` accepted."""
    if out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError("portable fill writes a contiguous CPU tensor")
    if out.numel() == 0:  # nothing to write; a zero-element shape has no fans to scale by either
        return
    request = plan(scheme, params, shape)
    extra = None
    if request.truncation is not None:
        flip, low, width, upper = request.truncation
        extra = (low, width, float(flip), *request.more, upper)
    zeros = None
    if request.kind == "sparse":
        zeros = _SparseZeros(shape, resolved, seed, int(request.more[0]), first, out.numel())
    flat = out.view(-1)

    def fill_float(piece: np.ndarray, start: int) -> None:
        cpu.fill(piece, shape, resolved, KINDS[request.kind], request.p, request.q, seed, first=start, extra=extra)
        if zeros is not None:
            zeros.apply(piece, start)

    if out.dtype in (torch.float32, torch.float64):
        fill_float(flat.numpy(), first)
        return
    staging = torch.empty(min(STAGING_ELEMENTS, flat.numel()), dtype=torch.float32)
    for start in range(0, flat.numel(), STAGING_ELEMENTS):
        piece = staging[: min(STAGING_ELEMENTS, flat.numel() - start)]
        fill_float(piece.numpy(), first + start)
        flat[start : start + piece.numel()].copy_(piece)  # float32 -> float16/bfloat16, nearest-even
        canonicalize_nans(flat[start : start + piece.numel()], piece)


CANONICAL_NAN = {torch.float64: 0x7FF8000000000000, torch.float32: 0x7FC00000, torch.float16: 0x7E00,
                 torch.bfloat16: 0x7FC0}  # fmt: skip
BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def canonicalize_nans(target: torch.Tensor, source: torch.Tensor) -> None:
    """Give each element of ``target`` whose value in ``source`` (the float64 or float32 it was rounded from) is a
    NaN the one NaN of its dtype (docs/portable.md section 6). torch's conversions keep a NaN's sign and payload,
    or not, by device and CPU capability: its bfloat16 one gives 0xFFFF on some CPUs, 0x7FC0 on others, 0x7FFF
    on CUDA."""
    if source.device.type == "cpu" and not cpu.any_nan(source.view(-1).numpy()):
        return
    nan = source.isnan()
    if source.device.type == "cpu" or bool(nan.any()):
        target.view(BITS[target.dtype]).masked_fill_(nan, CANONICAL_NAN[target.dtype])


class _SparseZeros:
    """sparse's zeros for positions ``[first, first + count)`` of a slice of a (rows, cols) tensor: the
    thresholds of the columns those positions touch (all rows' keys of each), once; then each piece's elements
    are zeroed from their own keys (stream 1), a piece of at most STAGING_ELEMENTS at a time."""

    def __init__(self, shape: Sequence[int], resolved: Resolved, seed: int, zeros: int, first: int, count: int):
        rows, cols = shape
        box = {0: (0, rows), 1: (0, cols)}
        box.update({dim: (start, length) for dim, start, length in resolved})
        (self.row0, _), (self.col0, self.width) = box[0], box[1]
        self.shape, self.resolved, self.seed = (rows, cols), resolved, seed
        self.start = self.col0  # the first column whose threshold is kept
        touched = self.width
        if count and self.width and first // self.width == (first + count - 1) // self.width:  # within one row
            self.start, touched = self.col0 + first % self.width, count
        self.limits = sparse.thresholds(seed, rows, cols, self.start, touched if count else 0, zeros)

    def apply(self, values: np.ndarray, first: int) -> None:
        for offset in range(0, values.size, STAGING_ELEMENTS):
            piece = values[offset : offset + STAGING_ELEMENTS]
            keys = np.empty(piece.size, dtype=np.float64)
            at = first + offset
            cpu.fill(keys, self.shape, self.resolved, cpu.UNIFORM, 0.0, 1.0, self.seed, stream=draws.SPARSE, first=at)
            positions = np.arange(at, at + piece.size, dtype=np.int64)
            rows, columns = np.divmod(positions, self.width)
            piece[sparse.zero_mask(keys, rows + self.row0, columns + (self.col0 - self.start), self.limits)] = 0.0


def generate(
    scheme: str,
    params: Mapping[str, object],
    shape: Sequence[int],
    dtype: torch.dtype,
    seed: int,
    resolved: Resolved = (),
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``full[slices]`` as a new tensor on ``device`` (generated on the CPU, then copied), after ``check``."""
    from initserve_protocol.slices import index, sliced_shape

    check(scheme, params, shape, dtype)
    if not is_drawn(scheme):
        full = torch.empty(shape, dtype=dtype)
        getattr(torch.nn.init, f"{scheme}_")(full, **params)
        return full[index(resolved)].contiguous().to(device)
    out = torch.empty(sliced_shape(shape, resolved), dtype=dtype)
    fill(out, scheme, params, shape, seed, resolved)
    return out.to(device)

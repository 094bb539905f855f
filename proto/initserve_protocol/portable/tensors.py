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

import torch

from initserve_protocol.portable import cpu, scales
from initserve_protocol.schemes import REQUIRED, SCHEMES
from initserve_protocol.slices import Resolved

KINDS = {"uniform": cpu.UNIFORM, "normal": cpu.NORMAL}
STAGING_ELEMENTS = 1 << 20  # float16/bfloat16 go through float32 in pieces of this many elements (4 MiB)


class NotPortable(ValueError):
    """The scheme has no portable form (trunc_normal and sparse not yet, orthogonal never)."""


def complete(scheme: str, params: Mapping[str, object]) -> dict[str, object]:
    """The request's parameters with torch's defaults for the ones it left out."""
    full = {p.name: p.default for p in SCHEMES[scheme].params if not p.required}
    full.update(params)
    missing = [name for name, value in full.items() if value is REQUIRED]
    if missing:
        raise TypeError(f"{scheme}_() missing required argument: {missing[0]!r}")
    return full


def is_drawn(scheme: str) -> bool:
    """Whether the scheme draws random values (else it is a fill: torch's bytes, on every generator)."""
    return scheme not in scales.FILLS


class _Probe(torch.Tensor):
    """A meta tensor of the request's shape whose final fill runs on one CPU element: torch's function then
    computes its fans and bounds on the real shape and raises its CPU errors and messages, for no memory."""

    def uniform_(self, *args: object, **kwargs: object) -> torch.Tensor:
        torch.empty(1, dtype=self.dtype).uniform_(*args, **kwargs)
        return self

    def normal_(self, *args: object, **kwargs: object) -> torch.Tensor:
        torch.empty(1, dtype=self.dtype).normal_(*args, **kwargs)
        return self


def check(scheme: str, params: Mapping[str, object], shape: Sequence[int], dtype: torch.dtype) -> None:
    """Raise what ``torch.nn.init.<scheme>_`` raises on a tensor of this shape and dtype, warn what it warns;
    NotPortable for a scheme with no portable form."""
    if scheme in scales.NOT_PORTABLE:
        raise NotPortable(scales.NOT_PORTABLE[scheme])
    function = getattr(torch.nn.init, f"{scheme}_")
    if math.prod(shape) == 0:  # no memory either way: torch's own call, its zero-element warning included
        function(torch.empty(shape, dtype=dtype), **params)
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
    kind, p, q = scales.draw(scheme, complete(scheme, params), shape)
    if kind == "uniform":
        p, q = p, q - p  # low + (high - low) * U
    flat = out.view(-1)
    if out.dtype in (torch.float32, torch.float64):
        cpu.fill(flat.numpy(), shape, resolved, KINDS[kind], p, q, seed, first=first)
        return
    staging = torch.empty(min(STAGING_ELEMENTS, flat.numel()), dtype=torch.float32)
    for start in range(0, flat.numel(), STAGING_ELEMENTS):
        piece = staging[: min(STAGING_ELEMENTS, flat.numel() - start)]
        cpu.fill(piece.numpy(), shape, resolved, KINDS[kind], p, q, seed, first=first + start)
        flat[start : start + piece.numel()].copy_(piece)  # float32 -> float16/bfloat16, nearest-even


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

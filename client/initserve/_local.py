"""Bytes made here: the portable generator run by this process for a checksum-only answer (``local=True``).

The server answers each tensor with its header and trailer only; :class:`~initserve._pipeline.Fetch` calls the
maker made here with the verified header, and checks what it returns against the trailer's checksum. The bytes
come from the same kernel the server runs (``initserve_protocol.portable``), so a rank's traffic is a few hundred
bytes per tensor, whatever its size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from initserve._codec import Allocate
from initserve._pipeline import MakeHere
from initserve._requests import Prepared
from initserve_protocol.portable import PHILOX
from initserve_protocol.schemes import PARAM_NAMES
from initserve_protocol.v1 import initserve_pb2 as pb


def check_local(local: bool, rng: str) -> None:
    if local and rng != PHILOX:
        raise ValueError(
            f"local=True makes the bytes here, which only the portable generator can promise: use rng={PHILOX!r} "
            f"(torch's bytes depend on the server's device and torch build)"
        )


def maker(prepared: Sequence[Prepared], outs: Sequence[torch.Tensor | None], allocate: Allocate) -> MakeHere:
    """``make(position, header)``: tensor ``position``'s bytes under the portable generator, with the seed its
    header reports, written into its ``out`` when it has one, else into ``allocate(shape, dtype)``'s tensor (the
    client's memory policy, as for a fetched tensor). An ``out`` on a GPU is made there, by the first
    path ``placement`` has verified on that device (the Triton kernel, the elementwise path), else on the CPU and
    copied; the caller verifies the result's bytes (on the host) against the server's checksum either way."""

    from initserve_protocol.portable import tensors as portable  # Numba: loaded by the first local fetch

    def make(position: int, header: pb.Header) -> torch.Tensor:
        item, out = prepared[position], outs[position]
        request = item.request
        params = {name: getattr(request.params, name) for name in PARAM_NAMES if request.params.HasField(name)}
        shape = tuple(request.shape)
        resolved = tuple((part.dim, part.start, part.length) for part in request.slices)
        if out is not None and (tuple(out.shape) != tuple(item.out_shape) or out.dtype != item.dtype):
            raise ValueError(f"out is {list(out.shape)} {out.dtype}; the result is {list(item.out_shape)} {item.dtype}")
        if out is not None and out.device.type != "cpu":
            return _on_device(out, request.scheme, params, shape, header.seed_used, resolved)
        tensor = out if out is not None else allocate(item.out_shape, item.dtype)
        if portable.is_drawn(request.scheme):
            portable.fill(tensor, request.scheme, params, shape, header.seed_used, resolved)
        else:  # a fill: torch's own bytes, made whole and cut, as tensors.generate (and the server) make them
            tensor.copy_(portable.generate(request.scheme, params, shape, item.dtype, 0, resolved))
        return tensor

    return make


def _on_device(
    out: torch.Tensor, scheme: str, params: dict, shape: tuple[int, ...], seed: int, resolved: tuple
) -> torch.Tensor:
    """``out`` (on a GPU) filled with the request's bytes: in place by a verified device path when it is
    contiguous, else made by ``placement.generate`` (on the device where it can, on the CPU where not) and copied."""
    from initserve_protocol.portable import placement

    fill = placement.device_fill(scheme, params, shape, out.dtype, out.device) if out.is_contiguous() else None
    if fill is not None:
        fill(out, scheme, params, shape, seed, resolved)
    else:
        out.copy_(placement.generate(scheme, params, shape, out.dtype, seed, resolved, out.device))
    return out

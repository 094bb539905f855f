"""Bytes made here: the portable generator run by this process for a checksum-only answer (``local=True``).

The server answers each tensor with its header and trailer only; :class:`~initserve._pipeline.Fetch` calls the
maker made here with the verified header, and checks what it returns against the trailer's checksum. The bytes
come from the same kernel the server runs (``initserve_protocol.portable``), so a rank's traffic is a few hundred
bytes per tensor, whatever its size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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


def maker(prepared: Sequence[Prepared], outs: Sequence[torch.Tensor | None]) -> MakeHere:
    """``make(position, header)``: tensor ``position``'s bytes under the portable generator, with the seed its
    header reports, written into its ``out`` when it has one."""

    from initserve_protocol.portable import tensors as portable  # Numba: loaded by the first local fetch

    def make(position: int, header: pb.Header) -> torch.Tensor:
        item, out = prepared[position], outs[position]
        request = item.request
        params = {name: getattr(request.params, name) for name in PARAM_NAMES if request.params.HasField(name)}
        shape = tuple(request.shape)
        resolved = tuple((part.dim, part.start, part.length) for part in request.slices)
        tensor = out if out is not None else torch.empty(item.out_shape, dtype=item.dtype)
        if portable.is_drawn(request.scheme):
            portable.fill(tensor, request.scheme, params, shape, header.seed_used, resolved)
        else:  # a fill: torch's own bytes, made whole and cut, as tensors.generate (and the server) make them
            tensor.copy_(portable.generate(request.scheme, params, shape, item.dtype, 0, resolved))
        return tensor

    return make

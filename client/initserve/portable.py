"""The portable generator on this machine, no server: ``initserve.portable.generate``.

Its bytes are those a server answers for the same request with ``rng=initserve.portable.PHILOX``, on any
device and torch release (docs/portable.md): a run can be reproduced, or a shard built, where the weights
are needed, from the request alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from initserve_protocol import dtypes
from initserve_protocol.portable import PHILOX
from initserve_protocol.portable.placement import generate as _generate
from initserve_protocol.schemes import SCHEMES, ParamValue
from initserve_protocol.seeds import check_name, check_seed, derive_seed
from initserve_protocol.slices import Slice, resolve

__all__ = ["PHILOX", "generate"]


def generate(
    shape: Sequence[int] | int,
    scheme: str,
    *,
    seed: int,
    name: str | None = None,
    derive: bool | None = None,
    slices: Sequence[Slice] = (),
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **params: ParamValue,
) -> torch.Tensor:
    """``full[slices]`` of ``scheme`` under the portable generator, as ``Client.fetch(..., rng=PHILOX)`` returns
    it: the same arguments (``name`` with ``seed`` derives the seed, as there), torch's errors for what torch
    refuses, ValueError for a scheme with no portable form. Made on ``device``: on a GPU by the elementwise path
    once a self-check has shown it gives the CPU kernel's bytes there, else by the CPU kernel and copied."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; use one of: {', '.join(SCHEMES)}")
    dtypes.from_torch(dtype)
    sizes = (shape,) if isinstance(shape, int) else tuple(int(size) for size in shape)
    seed = check_seed(seed)
    if derive is None:
        derive = name is not None
    if derive:
        if name is None:
            raise ValueError("derive needs name")
        seed = derive_seed(seed, check_name(name))
    return _generate(scheme, params, sizes, dtype, seed, resolve(sizes, slices), device)

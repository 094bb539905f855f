"""The dtype table: wire enum ⇄ torch dtype ⇄ name ⇄ itemsize, for every dtype the service serves."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from initserve_protocol.v1 import initserve_pb2 as pb


@dataclass(frozen=True)
class DTypeEntry:
    wire: int  # initserve.v1.DType value
    torch_dtype: torch.dtype
    name: str
    itemsize: int


DTYPES: tuple[DTypeEntry, ...] = (
    DTypeEntry(pb.DTYPE_FLOAT32, torch.float32, "float32", 4),
    DTypeEntry(pb.DTYPE_FLOAT64, torch.float64, "float64", 8),
    DTypeEntry(pb.DTYPE_FLOAT16, torch.float16, "float16", 2),
    DTypeEntry(pb.DTYPE_BFLOAT16, torch.bfloat16, "bfloat16", 2),
)
DEFAULT_DTYPE = DTYPES[0]  # DTYPE_UNSPECIFIED means float32, torch's default dtype

_BY_WIRE = {entry.wire: entry for entry in DTYPES}
_BY_TORCH = {entry.torch_dtype: entry for entry in DTYPES}
SUPPORTED_NAMES = ", ".join(entry.name for entry in DTYPES)


def from_wire(wire: int) -> DTypeEntry | None:
    """The entry for an initserve.v1.DType value (UNSPECIFIED is float32); None if not served."""
    if wire == pb.DTYPE_UNSPECIFIED:
        return DEFAULT_DTYPE
    return _BY_WIRE.get(wire)


def from_torch(dtype: torch.dtype) -> DTypeEntry:
    """The entry for a torch dtype; ValueError naming the served dtypes otherwise."""
    entry = _BY_TORCH.get(dtype)
    if entry is None:
        raise ValueError(f"dtype {dtype} is not served by initserve; use one of {SUPPORTED_NAMES}")
    return entry

"""InitSpec: a validated init request as plain data, free of protobuf and gRPC."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from initserve._dtypes import DTypeEntry
from initserve._schemes import ParamValue, Scheme


@dataclass(frozen=True)
class InitSpec:
    scheme: Scheme
    shape: tuple[int, ...]
    dtype: DTypeEntry
    params: tuple[tuple[str, ParamValue], ...]  # only the parameters the request set; torch supplies the rest
    seed: int  # 0 for unseeded schemes
    device: torch.device
    chunk_bytes: int  # effective payload bytes per chunk
    offset: int = 0  # resume: the first byte to stream
    seed_drawn: bool = False  # the server drew the seed (the request gave none): not worth caching

    @property
    def key(self) -> tuple:
        """What decides the bytes: equal keys, equal tensors (chunking and offset only change the stream).

        Floats enter by their bits: -0.0 == 0.0 in Python, but constant_(val=-0.0) writes different bytes.
        """
        params = tuple((name, value.hex() if isinstance(value, float) else value) for name, value in self.params)
        return (self.scheme.name, self.shape, self.dtype.wire, params, self.seed, str(self.device))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def total_bytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def kwargs(self) -> dict[str, ParamValue]:
        return dict(self.params)

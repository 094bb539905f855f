"""InitSpec: a validated init request as plain data, free of protobuf and gRPC."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from initserve_protocol.dtypes import DTypeEntry
from initserve_protocol.schemes import ParamValue, Scheme
from initserve_protocol.slices import Resolved, sliced_shape


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
    name: str = ""  # the request's name (echoed in the header)
    base_seed: int | None = None  # set when ``seed`` was derived from it and ``name``
    slices: Resolved = ()  # (dim, start, length) per sliced dim: the bytes served are full[slices]

    @property
    def key(self) -> tuple:
        """What decides the bytes: equal keys, equal tensors (chunking and offset only change the stream).

        Floats enter by their bits: -0.0 == 0.0 in Python, but constant_(val=-0.0) writes different bytes.
        """
        params = tuple((name, value.hex() if isinstance(value, float) else value) for name, value in self.params)
        return (self.scheme.name, self.shape, self.dtype.wire, params, self.seed, str(self.device), self.slices)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The shape of the bytes served: the slice's, or the whole ``shape``."""
        return sliced_shape(self.shape, self.slices)

    @property
    def total_bytes(self) -> int:
        """The bytes served (the slice's, when sliced); offsets and the checksum refer to them."""
        return math.prod(self.out_shape) * self.dtype.itemsize

    @property
    def full_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def whole(self) -> InitSpec:
        """The unsliced tensor this slice is cut from, from its first byte."""
        return dataclasses.replace(self, slices=(), offset=0)

    def kwargs(self) -> dict[str, ParamValue]:
        return dict(self.params)

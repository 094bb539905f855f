"""A call's arguments checked and turned into requests, with what the answers to them must say: no I/O."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from initserve._codec import Allocate, StreamAssembler
from initserve_protocol import dtypes
from initserve_protocol.errors import tensor_label
from initserve_protocol.portable import TORCH, generator_name
from initserve_protocol.schemes import SCHEMES, ParamValue, Scheme
from initserve_protocol.seeds import check_name, check_seed, derive_seed
from initserve_protocol.slices import Slice, resolve, sliced_shape
from initserve_protocol.v1 import initserve_pb2 as pb

ShapeLike = int | Sequence[int] | torch.Size


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of :meth:`Client.fetch_many`: :meth:`Client.fetch`'s arguments, as data.

    ``seed``: None takes the call's base seed; with a seed (either one) the generator's seed is
    ``derive_seed(seed, name)`` unless ``derive=False``. ``out``: a contiguous CPU tensor of the result's
    shape and dtype to write into (a parameter's own storage, say); with ``local=True``, a GPU tensor too.
    """

    name: str
    shape: ShapeLike
    scheme: str
    params: Mapping[str, ParamValue] = field(default_factory=dict)
    seed: int | None = None
    derive: bool | None = None
    slices: Sequence[Slice] = ()
    dtype: torch.dtype = torch.float32
    out: torch.Tensor | None = None


@dataclass
class Prepared:
    """An InitRequest and what its answer must carry: the slice's shape, the bytes, the seed."""

    request: pb.InitRequest
    dtype: torch.dtype
    out_shape: tuple[int, ...]  # the result's shape: the slice's when sliced
    total_bytes: int
    expected_seed: int | None  # the seed the header must report (derived when derive_seed), None if drawn
    seed_given: bool  # the request names its seed: a resumed stream never replaces it
    rng: str = TORCH  # the generator asked for, which the header must report

    def resumed(self, offset: int, drawn_seed: int | None) -> pb.InitRequest:
        """The request for a stream that resumes at ``offset``: a copy (the prepared request is never changed),
        asking for ``drawn_seed``, the seed the server drew for the first stream, unless the call named its own."""
        if not offset and drawn_seed is None:
            return self.request
        request = pb.InitRequest()
        request.CopyFrom(self.request)
        request.offset = offset
        if drawn_seed is not None and not self.seed_given:
            request.seed = drawn_seed
        return request

    def assembler(
        self,
        *,
        out: torch.Tensor | None = None,
        allocate: Allocate | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> StreamAssembler:
        return StreamAssembler(
            expected_shape=self.out_shape,
            expected_dtype=self.dtype,
            expected_scheme=self.request.scheme,
            expected_seed=self.expected_seed,
            expected_generator="" if self.rng == TORCH else self.rng,
            out=out,
            allocate=allocate,
            progress=progress,
        )


def prepare(
    shape: ShapeLike,
    scheme: str,
    *,
    seed: int | None = None,
    name: str | None = None,
    derive: bool | None = None,
    slices: Sequence[Slice] = (),
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    chunk_bytes: int = 0,
    require_device_fingerprint: str = "",
    params: dict[str, Any] | None = None,
    rng: str = TORCH,
    checksum_only: bool = False,
) -> Prepared:
    """The request for one tensor, refused here (as torch would refuse the call) when it cannot be valid."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; use one of: {', '.join(SCHEMES)}")
    entry = dtypes.from_torch(dtype)
    sizes = _shape(shape)
    request = pb.InitRequest(scheme=scheme, shape=sizes, dtype=entry.wire)  # the rest only where not default
    if params:
        _params(SCHEMES[scheme], params, request.params)
    if device != "cpu":
        request.device = str(device)
    if chunk_bytes:
        request.chunk_bytes = chunk_bytes
    rng = generator_name(rng)
    if rng != TORCH:
        request.generator = rng
    if checksum_only:
        request.checksum_only = True
    if require_device_fingerprint:
        request.require_device_fingerprint = require_device_fingerprint
    out_shape = sizes
    if slices:
        resolved = resolve(sizes, slices)
        out_shape = sliced_shape(sizes, resolved)
        request.slices.extend(pb.Slice(dim=dim, start=start, length=length) for dim, start, length in resolved)
    expected_seed = None
    if seed is not None:
        request.seed = expected_seed = check_seed(seed)
    if name is not None:
        request.name = check_name(name)
    if derive is None:
        derive = name is not None and seed is not None
    if derive:
        if seed is None or name is None:
            raise ValueError("derive needs both seed (the job's base seed) and name")
        request.derive_seed = True
        expected_seed = derive_seed(request.seed, request.name)
    return Prepared(
        request=request,
        dtype=dtype,
        out_shape=out_shape,
        total_bytes=math.prod(out_shape) * entry.itemsize,
        expected_seed=expected_seed,
        seed_given=seed is not None,
        rng=rng,
    )


def prepare_many(
    specs: Sequence[TensorSpec],
    *,
    seed: int | None,
    device: str,
    chunk_bytes: int,
    require_device_fingerprint: str,
    rng: str = TORCH,
    checksum_only: bool = False,
) -> list[Prepared]:
    """Each spec's request (``seed``: the base seed of every spec that gives none); names must be unique."""
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"tensor name {spec.name!r} appears twice")
        seen.add(spec.name)
    prepared = []
    for position, spec in enumerate(specs):
        try:
            prepared.append(
                prepare(
                    spec.shape,
                    spec.scheme,
                    seed=seed if spec.seed is None else spec.seed,
                    name=spec.name,
                    derive=spec.derive,
                    slices=spec.slices,
                    dtype=spec.dtype,
                    device=device,
                    chunk_bytes=chunk_bytes,
                    require_device_fingerprint=require_device_fingerprint,
                    params=dict(spec.params),
                    rng=rng,
                    checksum_only=checksum_only,
                )
            )
        except (ValueError, TypeError, IndexError) as error:  # named as the server names its refusals
            if type(error) not in (ValueError, TypeError, IndexError):
                raise
            raise type(error)(tensor_label(position, spec.name) + str(error)) from error
    return prepared


def _shape(shape: ShapeLike) -> tuple[int, ...]:
    if type(shape) is tuple and all(type(size) is int for size in shape):  # the common case, checked cheaply
        return shape
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        return (int(shape),)
    try:
        sizes = tuple(shape)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints, not {type(shape).__name__}") from None
    for size in sizes:
        if not isinstance(size, numbers.Integral) or isinstance(size, bool):
            raise TypeError(f"shape must contain ints, got {size!r} in {shape!r}")
    return tuple(int(size) for size in sizes)


def _params(scheme: Scheme, params: dict[str, Any], message: pb.InitParams) -> None:
    """Check ``params`` against the scheme (TypeError as a call with wrong arguments) and set them in ``message``."""
    for name, value in params.items():
        param = scheme.param(name)
        if param is None:
            takes = ", ".join(scheme.param_names) or "no parameters"
            raise TypeError(f"{scheme.name}() got an unexpected parameter {name!r} (it takes: {takes})")
        if param.kind is str:
            if not isinstance(value, str):
                raise TypeError(f"{scheme.name}(): {name} must be a str, not {type(value).__name__}")
        elif param.kind is int:
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise TypeError(f"{scheme.name}(): {name} must be an int, not {type(value).__name__}")
            value = int(value)
        else:
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise TypeError(f"{scheme.name}(): {name} must be a number, not {type(value).__name__}")
            value = float(value)
        setattr(message, name, value)

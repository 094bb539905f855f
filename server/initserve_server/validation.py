"""Request validation: an InitRequest becomes an InitSpec, or an InvalidRequest naming the field and the limit."""

from __future__ import annotations

import math
from collections.abc import Callable

from initserve_protocol import dtypes
from initserve_protocol.portable import generator_name
from initserve_protocol.portable.scales import NOT_PORTABLE
from initserve_protocol.schemes import INFINITE_ALLOWED, PARAM_NAMES, SCHEMES, ParamValue
from initserve_protocol.seeds import MAX_NAME_CHARS, derive_seed
from initserve_protocol.slices import MAX_SLICES, Range, Resolved, Shard, resolve, sliced_shape
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_server import devices
from initserve_server.config import MAX_CHUNKS_PER_STREAM, MAX_STRING_PARAM_CHARS, ServerConfig
from initserve_server.spec import InitSpec

_SCHEME_LIST = ", ".join(SCHEMES)


class InvalidRequest(Exception):
    """The request can never succeed as written (INVALID_ARGUMENT); the message names the field."""


class OffsetOutOfRange(InvalidRequest):
    """A resume offset past the tensor's end (OUT_OF_RANGE)."""


def _shown(text: str, limit: int = 64) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _check_shape(shape: list[int], dtype: dtypes.DTypeEntry, config: ServerConfig) -> tuple[int, ...]:
    if len(shape) > config.max_dims:
        raise InvalidRequest(f"shape has {len(shape)} dims; the limit is {config.max_dims} (max_dims)")
    for index, size in enumerate(shape):
        if size < 0:
            raise InvalidRequest(f"shape[{index}] is {size}; dimensions must be >= 0")
    numel = math.prod(shape)  # Python ints: a product past int64 is caught below, not wrapped
    total_bytes = numel * dtype.itemsize
    if total_bytes > config.max_tensor_bytes:
        raise InvalidRequest(
            f"shape {shape} is {numel} elements, {total_bytes} bytes of {dtype.name}; "
            f"the limit is {config.max_tensor_bytes} bytes (max_tensor_bytes)"
        )
    return tuple(shape)


def _check_params(scheme_name: str, params: pb.InitParams) -> tuple[tuple[str, ParamValue], ...]:
    scheme = SCHEMES[scheme_name]
    taken = []
    for name in PARAM_NAMES:
        if not params.HasField(name):
            continue
        if scheme.param(name) is None:
            takes = ", ".join(scheme.param_names) or "no parameters"
            raise InvalidRequest(f"scheme {scheme_name!r} does not take parameter {name!r} (it takes: {takes})")
        value = getattr(params, name)
        if isinstance(value, str) and len(value) > MAX_STRING_PARAM_CHARS:
            raise InvalidRequest(
                f"parameter {name!r} is {len(value)} characters; the limit is {MAX_STRING_PARAM_CHARS}"
            )
        taken.append((name, value))
    for param in scheme.params:
        if param.required and not params.HasField(param.name):
            raise InvalidRequest(f"scheme {scheme_name!r} requires parameter {param.name!r}")
    return tuple(taken)


def _chunk_bytes(requested: int, total_bytes: int, config: ServerConfig) -> int:
    if requested > config.max_chunk_bytes:
        raise InvalidRequest(
            f"chunk_bytes {requested} exceeds the limit {config.max_chunk_bytes} (max_message_bytes "
            f"{config.max_message_bytes} less framing)"
        )
    chunk_bytes = requested or config.chunk_bytes
    # Bound the number of messages: a few-byte chunk size is honoured for small tensors only.
    return max(chunk_bytes, -(-total_bytes // MAX_CHUNKS_PER_STREAM))


def _check_slices(request: pb.InitRequest, shape: tuple[int, ...]) -> Resolved:
    if len(request.slices) > MAX_SLICES:
        raise InvalidRequest(f"{len(request.slices)} slices; the limit is {MAX_SLICES} (one per dim)")
    slices = []
    for number, part in enumerate(request.slices):
        if part.shard_count:
            if part.start or part.length:
                raise InvalidRequest(f"slices[{number}] sets both a range (start, length) and a shard (shard_count)")
            slices.append(Shard(part.dim, part.shard_index, part.shard_count))
        elif part.shard_index:
            raise InvalidRequest(f"slices[{number}] sets shard_index {part.shard_index} without shard_count")
        else:
            slices.append(Range(part.dim, part.start, part.length))
    try:
        return resolve(shape, slices)
    except ValueError as error:
        raise InvalidRequest(str(error)) from None


def _seed(request: pb.InitRequest, seeded: bool, draw_seed: Callable[[], int]) -> tuple[int, int | None, bool]:
    """(seed, base seed it was derived from or None, whether the server drew it)."""
    if not seeded:
        return 0, None, False
    if request.derive_seed:
        if not request.HasField("seed"):
            raise InvalidRequest("derive_seed needs seed: the job's base seed, from which the name's seed is derived")
        return derive_seed(request.seed, request.name), request.seed, False
    if request.HasField("seed"):
        return request.seed, None, False
    return draw_seed(), None, True


def validate_request(request: pb.InitRequest, config: ServerConfig, draw_seed: Callable[[], int]) -> InitSpec:
    """The request as an InitSpec; InvalidRequest or devices.DeviceUnavailable if it cannot be served."""
    if not request.scheme:
        raise InvalidRequest(f"scheme is empty; use one of: {_SCHEME_LIST}")
    if request.scheme not in SCHEMES:
        raise InvalidRequest(f"unknown scheme {_shown(request.scheme)}; use one of: {_SCHEME_LIST}")
    scheme = SCHEMES[request.scheme]
    dtype = dtypes.from_wire(request.dtype)
    if dtype is None:
        raise InvalidRequest(f"dtype {request.dtype} is not served; use one of: {dtypes.SUPPORTED_NAMES}")
    shape = _check_shape(list(request.shape), dtype, config)
    try:
        generator = generator_name(request.generator)
    except ValueError as error:
        raise InvalidRequest(str(error)) from None
    if generator != "torch" and scheme.name in NOT_PORTABLE:
        raise InvalidRequest(f"generator {generator}: {NOT_PORTABLE[scheme.name]}")
    params = _check_params(scheme.name, request.params)
    try:
        device = devices.parse_device(request.device)
    except ValueError as error:
        raise InvalidRequest(str(error)) from None
    devices.require_available(device)
    if request.require_device_fingerprint:
        fingerprint = devices.device_info(device).fingerprint
        if request.require_device_fingerprint != fingerprint:
            raise devices.DeviceUnavailable(
                f"device fingerprint mismatch: the request requires "
                f"{_shown(request.require_device_fingerprint, 200)}, this server's {device} is {fingerprint!r}"
            )
    if len(request.name) > MAX_NAME_CHARS:
        raise InvalidRequest(f"name is {len(request.name)} characters; the limit is {MAX_NAME_CHARS}")
    slices = _check_slices(request, shape)
    seed, base_seed, seed_drawn = _seed(request, scheme.seeded, draw_seed)
    total_bytes = math.prod(sliced_shape(shape, slices)) * dtype.itemsize
    if request.offset > total_bytes:
        raise OffsetOutOfRange(f"offset {request.offset} is past the tensor's end ({total_bytes} bytes)")
    if request.checksum_only and request.offset:
        raise InvalidRequest("checksum_only answers the whole tensor's checksum: offset must be 0")
    if request.checksum_only and request.shared_memory_region:
        raise InvalidRequest("checksum_only sends no tensor bytes: it takes no shared_memory_region")
    return InitSpec(
        scheme=scheme,
        shape=shape,
        dtype=dtype,
        params=params,
        seed=seed,
        device=device,
        chunk_bytes=_chunk_bytes(request.chunk_bytes, total_bytes, config),
        offset=request.offset,
        seed_drawn=seed_drawn,
        name=request.name,
        base_seed=base_seed,
        slices=slices,
        generator=generator,
        checksum_only=request.checksum_only,
    )


def check_finite(spec: InitSpec) -> None:
    """Refuse non-finite parameters that torch accepted: they never make usable weights.

    Runs after generation, so wherever torch itself rejects the value the client sees torch's own error.
    """
    for name, value in spec.params:
        if isinstance(value, float) and not math.isfinite(value):
            if math.isinf(value) and (spec.scheme.name, name) in INFINITE_ALLOWED:
                continue
            raise InvalidRequest(
                f"parameter {name!r} is {value}; initserve refuses non-finite parameters "
                f"(only trunc_normal's bounds a and b may be infinite)"
            )

"""The public client: one method per torch.nn.init scheme, generated from the scheme table, plus fetch/init/describe."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import torch
from torch import nn

from initserve import _modules, _regions, _shared
from initserve._codec import Allocate
from initserve._many import TensorSpec, fetch_many_resuming
from initserve._memory import DEFAULT_MEMORY, HostMemory, MemoryPolicy
from initserve._modules import Rule, Sharding
from initserve._requests import ShapeLike, prepare
from initserve._retry import RetryPolicy, fetch_resuming
from initserve._transport import DEFAULT_MAX_RECEIVE_MESSAGE_BYTES, Transport
from initserve_protocol import dtypes
from initserve_protocol.limits import MAX_UNARY_BYTES
from initserve_protocol.schemes import SCHEMES, ParamValue, Scheme
from initserve_protocol.slices import Slice
from initserve_protocol.v1 import initserve_pb2 as pb

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT_SECONDS = 300.0


@dataclass(frozen=True)
class InitResult:
    """A fetched tensor with what the server reported about it."""

    tensor: torch.Tensor
    seed: int  # the seed used (drawn by the server when the request gave none); 0 for unseeded schemes
    seeded: bool
    torch_version: str  # the server's torch: the contract's reference
    device: pb.DeviceInfo  # generation device, with its fingerprint
    header: pb.Header  # the first stream's header
    attempts: int = 1  # streams used: more than one when a broken stream was resumed
    resumed_at: tuple[int, ...] = ()  # the byte offsets that later streams started from
    server_ids: tuple[str, ...] = ()  # the replica behind each stream, in order
    transport: str = "stream"  # how the bytes came: "stream", "unary" (InitUnary) or "shared_memory"


def _result(
    tensor: torch.Tensor,
    header: pb.Header,
    attempts: int,
    resumed_at: tuple[int, ...],
    server_ids: tuple[str, ...],
    transport: str,
) -> InitResult:
    return InitResult(
        tensor=tensor,
        seed=header.seed_used,
        seeded=header.seeded,
        torch_version=header.torch_version,
        device=header.device,
        header=header,
        attempts=attempts,
        resumed_at=resumed_at,
        server_ids=server_ids,
        transport=transport,
    )


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A seed drawn from ``generator``, or torch's global RNG when None: ``torch.manual_seed`` makes it repeatable."""
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.empty((), dtype=torch.int64, device=device).random_(generator=generator))


def _pem(value: bytes | str | os.PathLike | None) -> bytes | None:
    """PEM bytes as given, or read from a path."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


if TYPE_CHECKING:  # the scheme methods' signatures, for type checkers; at run time they are made below
    from initserve._scheme_methods import SchemeMethods
else:
    SchemeMethods = object


class Client(SchemeMethods):
    """A connection to an initserve server; use as a context manager or call :meth:`close`.

    Args:
        target: ``host:port`` (any gRPC target string, e.g. ``dns:///initserve.ns.svc:50051``), or a list
            (or comma-separated string) of ``host:port`` replicas; requests are balanced round robin, and a
            stream that breaks resumes from its last verified byte, on another replica when one is up.
        timeout: default per-call deadline in seconds (None: no deadline); each call may override it.
        credentials: ``grpc.ChannelCredentials`` for a TLS channel; None for an insecure channel (unless a
            TLS option below is given).
        root_certificates: PEM CA bundle (bytes, or a path) that signed the server's certificate: a TLS channel.
        client_certificate, client_key: PEM certificate chain and key (bytes, or paths) for mutual TLS.
        tls_server_name: the name to check the server's certificate against, when it differs from the target's
            host (an IP address, say).
        token: bearer token sent with every call (``authorization: Bearer <token>``) to a server started with
            ``--auth-token-file``; use it over TLS.
        max_receive_message_bytes: largest message accepted; must exceed the server's chunk size.
        options: extra gRPC channel options, e.g. keepalive settings.
        chunk_bytes: preferred chunk size (0: the server's default).
        require_device_fingerprint: refuse results generated on any other device (FailedPrecondition).
        retry: how many streams one fetch may use and the backoff between them (see RetryPolicy).
        unary_max_bytes: a fetch of at most this many bytes, with no chunk size asked for, is one InitUnary
            call instead of a stream (lower latency); 0 always streams. At most 1 MiB (the server's limit).
        shared_memory: on the server's host, have the server write each tensor into memory this client hands
            it (a sealed memfd, registered on the server's Unix socket; see docs/shared-memory.md). True: the
            socket Describe names (``describe().shared_memory_socket``), which must belong to the server Describe
            reached; a path: that socket (with several replicas, the local one's). The server needs
            --shared-memory-socket and must allow this process's UID; where it cannot be used, fetches go over
            gRPC (``InitResult.transport`` says which).
        shared_memory_pool_bytes: with ``shared_memory``, regions whose tensors were freed (and the regions of
            fetches into ``out=``) are kept, registered, for the next fetch of the same byte size, up to this
            many bytes, least recently used evicted; a reused region has no page faults and no registration to
            pay (see docs/performance.md). 0 keeps none. They go at :meth:`close` and with the process.
        memory: how the tensors gRPC fetches return get their host memory (:class:`MemoryPolicy`). The default
            is plain ``torch.empty``, nothing kept and nothing process-wide; ``MemoryPolicy.fast()`` turns on
            the reuse pool (freed tensors' memory kept for the next fetch, ``reuse_bytes`` of it), prefaulting
            and glibc's malloc thresholds, which make repeated large fetches faster where page faults are dear
            (see docs/performance.md). :meth:`release_memory` gives the kept memory back.
    """

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_SECONDS,
        credentials: grpc.ChannelCredentials | None = None,
        root_certificates: bytes | str | os.PathLike | None = None,
        client_certificate: bytes | str | os.PathLike | None = None,
        client_key: bytes | str | os.PathLike | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
        max_receive_message_bytes: int = DEFAULT_MAX_RECEIVE_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
        chunk_bytes: int = 0,
        require_device_fingerprint: str | None = None,
        retry: RetryPolicy | None = None,
        unary_max_bytes: int = MAX_UNARY_BYTES,
        shared_memory: bool | str | os.PathLike = False,
        shared_memory_pool_bytes: int = _regions.DEFAULT_POOL_BYTES,
        memory: MemoryPolicy = DEFAULT_MEMORY,
    ) -> None:
        if shared_memory_pool_bytes < 0:
            raise ValueError(f"shared_memory_pool_bytes must be at least 0, got {shared_memory_pool_bytes}")
        if not 0 <= unary_max_bytes <= MAX_UNARY_BYTES:
            raise ValueError(f"unary_max_bytes must be in 0..{MAX_UNARY_BYTES}, got {unary_max_bytes}")
        self.unary_max_bytes = unary_max_bytes
        self.target = target
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.require_device_fingerprint = require_device_fingerprint
        if root_certificates is not None or client_certificate is not None or client_key is not None:
            if credentials is not None:
                raise ValueError("give credentials= or the TLS files, not both")
            if (client_certificate is None) != (client_key is None):
                raise ValueError("client_certificate and client_key go together (mutual TLS)")
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(root_certificates),
                private_key=_pem(client_key),
                certificate_chain=_pem(client_certificate),
            )
        if tls_server_name is not None:
            options = [*options, ("grpc.ssl_target_name_override", tls_server_name)]
        self._memory = HostMemory(memory)
        self._transport = Transport(
            target,
            credentials=credentials,
            max_receive_message_bytes=max_receive_message_bytes,
            options=options,
            token=token,
        )
        self._shared: _shared.SharedMemory | None = None
        if shared_memory is not False:
            path = None if shared_memory is True else os.fspath(shared_memory)
            self._shared = _shared.SharedMemory(self._transport.describe, path, shared_memory_pool_bytes)

    @property
    def shared_memory(self) -> bool:
        """Whether fetches still try the same-host transport (False once it proved unusable for this client)."""
        return self._shared is not None and self._shared.enabled

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._transport.close()
        if self._shared is not None:
            self._shared.close()
        self._memory.close()

    def release_memory(self) -> int:
        """Give back the memory kept for reuse (``memory.reuse_bytes``, ``shared_memory_pool_bytes``) now, as
        ``torch.cuda.empty_cache()`` does for CUDA's; the pools stay on. Returns the bytes released."""
        released = self._memory.release()
        if self._shared is not None:
            released += self._shared.release_memory()
        return released

    @property
    def _allocate(self) -> Allocate:
        return self._memory.allocate

    def describe(self, *, timeout: float | None = None) -> pb.ServerInfo:
        """The server's versions, devices, schemes with their parameters and defaults, and limits."""
        return self._transport.describe(self.timeout if timeout is None else timeout)

    def fetch(
        self,
        shape: ShapeLike,
        scheme: str,
        *,
        seed: int | None = None,
        name: str | None = None,
        derive: bool | None = None,
        slices: Sequence[Slice] = (),
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        chunk_bytes: int | None = None,
        timeout: float | None = None,
        require_device_fingerprint: str | None = None,
        out: torch.Tensor | None = None,
        progress: Callable[[int, int], None] | None = None,
        **params: ParamValue,
    ) -> InitResult:
        """Generate ``scheme`` on the server and return the verified tensor with its header.

        ``name``: the parameter's name. With a ``seed``, the generator's seed is then
        ``initserve.derive_seed(seed, name)`` (``derive=False`` uses ``seed`` itself); the header reports both.
        ``slices``: :class:`initserve.Range` / :class:`initserve.Shard` items: the result is ``full[slices]``
        of the tensor of the whole ``shape`` (fans from the whole shape), with the slice's shape.
        ``out``: a contiguous CPU tensor of the result's shape and dtype to write into instead of a new one.
        ``progress(received_bytes, total_bytes)``: called after every chunk.
        ``timeout``: the whole fetch's deadline, resumed streams included.
        """
        prepared = prepare(
            shape,
            scheme,
            seed=seed,
            name=name,
            derive=derive,
            slices=slices,
            dtype=dtype,
            device=device,
            chunk_bytes=self.chunk_bytes if chunk_bytes is None else chunk_bytes,
            require_device_fingerprint=require_device_fingerprint or self.require_device_fingerprint or "",
            params=params,
        )
        request, out_shape, total_bytes = prepared.request, prepared.out_shape, prepared.total_bytes
        assembler = prepared.assembler(out=out, allocate=self._allocate, progress=progress)
        deadline = self.timeout if timeout is None else timeout
        if self._shared is not None and self._shared.enabled and total_bytes > 0:
            shared = self._shared.fetch(
                lambda token, remaining: self._transport.init_shared(request, token, remaining),
                assembler,
                out_shape,
                dtype,
                total_bytes,
                self.retry,
                deadline,
            )
            if not isinstance(shared, str):
                tensor, header, attempts = shared
                if out is not None:
                    tensor = out.copy_(tensor)  # the region goes back to the pool
                if progress is not None:
                    progress(total_bytes, total_bytes)
                return _result(tensor, header, attempts, (), (header.server_id,), "shared_memory")
        transport = "stream"

        def open_stream(offset: int, resume_seed: int | None, remaining: float | None) -> Any:
            nonlocal transport
            unary = request.chunk_bytes == 0 and total_bytes - offset <= self.unary_max_bytes
            transport = "unary" if unary else "stream"
            return self._transport.init(prepared.resumed(offset, resume_seed), remaining, unary=unary)

        outcome = fetch_resuming(open_stream, assembler, self.retry, deadline)
        if transport == "unary" and self._transport.unary_refused:
            transport = "stream"
        server_ids = tuple(h.server_id for h in outcome.headers)
        return _result(
            outcome.tensor, outcome.header, outcome.attempts, tuple(outcome.resumed_at), server_ids, transport
        )

    def fetch_many(
        self,
        specs: Sequence[TensorSpec],
        *,
        seed: int | None = None,
        device: str = "cpu",
        chunk_bytes: int | None = None,
        timeout: float | None = None,
        require_device_fingerprint: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, InitResult]:
        """Every tensor of ``specs`` on one InitMany stream, verified, by name (in order).

        ``seed``: the job's base seed, for every spec that gives none: each tensor's seed is then
        ``derive_seed(seed, spec.name)``. ``progress(received_bytes, total_bytes)`` counts the whole call.
        ``timeout``: the whole call's deadline, resumed streams included. A broken stream resumes from the first
        tensor not yet verified, at its last verified byte. Names must be unique.
        """
        seen: set[str] = set()
        for spec in specs:
            if spec.name in seen:
                raise ValueError(f"tensor name {spec.name!r} appears twice")
            seen.add(spec.name)
        prepared = [
            prepare(
                spec.shape,
                spec.scheme,
                seed=seed if spec.seed is None else spec.seed,
                name=spec.name,
                derive=spec.derive,
                slices=spec.slices,
                dtype=spec.dtype,
                device=device,
                chunk_bytes=self.chunk_bytes if chunk_bytes is None else chunk_bytes,
                require_device_fingerprint=require_device_fingerprint or self.require_device_fingerprint or "",
                params=dict(spec.params),
            )
            for spec in specs
        ]
        total = sum(item.total_bytes for item in prepared)
        before = [sum(item.total_bytes for item in prepared[:position]) for position in range(len(prepared))]

        def tensor_progress(position: int) -> Callable[[int, int], None] | None:
            if progress is None:
                return None
            return lambda received, _: progress(before[position] + received, total)

        assemblers = [
            item.assembler(out=spec.out, allocate=self._allocate, progress=tensor_progress(position))
            for position, (item, spec) in enumerate(zip(prepared, specs, strict=True))
        ]

        def open_many(first: int, offset: int, drawn_seed: int | None, remaining: float | None) -> Any:
            tensors = [item.request for item in prepared[first:]]
            if tensors:
                tensors[0] = prepared[first].resumed(offset, drawn_seed)
            return self._transport.init_many(pb.InitManyRequest(tensors=tensors), remaining)

        deadline = self.timeout if timeout is None else timeout
        outcome = fetch_many_resuming(open_many, assemblers, self.retry, deadline)
        results = {}
        for position, (spec, assembler) in enumerate(zip(specs, assemblers, strict=True)):
            assert assembler.tensor is not None and assembler.header is not None
            server_ids = tuple(header.server_id for header in assembler.headers)
            results[spec.name] = _result(
                assembler.tensor,
                assembler.header,
                outcome.attempts,
                tuple(outcome.resumed_at[position]),
                server_ids,
                "stream",
            )
        return results

    def init_module(
        self,
        module: nn.Module,
        *,
        seed: int,
        rules: Sequence[Rule] = (),
        prefix: str = "",
        generate_on: str = "cpu",
        timeout: float | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> nn.Module:
        """Initialize every parameter of ``module`` in place, each with ``derive_seed(seed, prefix + name)``, in
        one InitMany call: with no ``rules`` as each layer's ``reset_parameters`` does, else the first matching
        :class:`initserve.Rule` (see ``initserve._modules`` for the defaults). Returns ``module``."""
        return _modules.init_module(
            self,
            module,
            seed=seed,
            rules=rules,
            prefix=prefix,
            generate_on=generate_on,
            timeout=timeout,
            progress=progress,
        )

    def materialize(
        self,
        module: nn.Module,
        *,
        seed: int,
        device: str | torch.device = "cpu",
        rules: Sequence[Rule] = (),
        prefix: str = "",
        shard: Sharding | None = None,
        leave_buffers: bool = False,
        generate_on: str = "cpu",
        timeout: float | None = None,
    ) -> nn.Module:
        """A ``meta``-device ``module`` with each parameter allocated once on ``device`` and initialized in place
        as :meth:`init_module` does; with ``shard`` (:class:`initserve.Sharding`) only this process's shard of
        each parameter it matches. Also usable as FSDP's ``param_init_fn``. Returns ``module``."""
        return _modules.materialize(
            self,
            module,
            seed=seed,
            device=device,
            rules=rules,
            prefix=prefix,
            shard=shard,
            leave_buffers=leave_buffers,
            generate_on=generate_on,
            timeout=timeout,
        )

    def init(self, shape: ShapeLike, scheme: str, **kwargs: Any) -> torch.Tensor:
        """A new CPU tensor of ``shape`` filled by ``torch.nn.init.<scheme>_``; keywords as :meth:`fetch`."""
        return self.fetch(shape, scheme, **kwargs).tensor

    def fill_(
        self,
        tensor: torch.Tensor,
        scheme: str,
        *,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        device: str = "cpu",
        timeout: float | None = None,
        **params: ParamValue,
    ) -> torch.Tensor:
        """Fill ``tensor`` (any local device) in place, as ``torch.nn.init.<scheme>_(tensor, ...)`` would.

        With no ``seed``, one is drawn from ``generator`` (torch's global RNG when None), so
        ``torch.manual_seed`` makes the result repeatable. ``device`` is where the server generates.
        """
        if tensor.is_meta:  # torch's initializers leave meta tensors alone: there is no storage
            return tensor
        dtype = dtypes.from_torch(tensor.dtype).torch_dtype  # refuse before touching any RNG, as torch does
        if seed is None and SCHEMES[scheme].seeded:
            seed = draw_seed(generator)
        direct = tensor.device.type == "cpu" and tensor.is_contiguous()
        result = self.fetch(
            tuple(tensor.shape),
            scheme,
            seed=seed,
            dtype=dtype,
            device=device,
            timeout=timeout,
            out=tensor.detach() if direct else None,
            **params,
        )
        if not direct:
            with torch.no_grad():
                tensor.copy_(result.tensor)
        return tensor


_P = inspect.Parameter


def _scheme_parameters(scheme: Scheme, kind: Any) -> list[inspect.Parameter]:
    return [_P(p.name, kind, default=_P.empty if p.required else p.default) for p in scheme.params]


def _binder(signature: inspect.Signature, scheme: Scheme) -> Callable[[tuple, dict], tuple[Any, Any, dict, dict]]:
    """``bind(args, kwargs) -> (self, first argument, scheme parameters given, other arguments given)``, as
    ``signature.bind`` would split them. The usual call (``self`` and one positional argument, the rest by
    keyword, every required parameter given) is split directly, 10x faster than ``inspect``; any other call
    goes through ``signature.bind``, which also raises Python's own TypeError for a call that does not fit.
    Defaults are left to the method called next, whose defaults are the signature's."""
    _, first, *others = signature.parameters  # self, then shape or tensor
    keywords = frozenset(others)
    required = frozenset(p.name for p in scheme.params if p.required)
    names = frozenset(scheme.param_names)

    def bind(args: tuple, kwargs: dict) -> tuple[Any, Any, dict, dict]:
        if len(args) == 2 and kwargs.keys() <= keywords and required <= kwargs.keys():
            params = {name: value for name, value in kwargs.items() if name in names}
            rest = {name: value for name, value in kwargs.items() if name not in names}
            return args[0], args[1], params, rest
        bound = dict(signature.bind(*args, **kwargs).arguments)
        client, first_value = bound.pop("self"), bound.pop(first)
        params = {name: value for name, value in bound.items() if name in names}
        return client, first_value, params, {name: value for name, value in bound.items() if name not in names}

    return bind


def _make_new_tensor_method(scheme: Scheme) -> Any:
    parameters = [_P("self", _P.POSITIONAL_ONLY), _P("shape", _P.POSITIONAL_OR_KEYWORD)]
    parameters += _scheme_parameters(scheme, _P.KEYWORD_ONLY)
    if scheme.seeded:
        parameters.append(_P("seed", _P.KEYWORD_ONLY, default=None))
    parameters += [
        _P("dtype", _P.KEYWORD_ONLY, default=torch.float32),
        _P("device", _P.KEYWORD_ONLY, default="cpu"),
        _P("timeout", _P.KEYWORD_ONLY, default=None),
    ]
    signature = inspect.Signature(parameters, return_annotation=torch.Tensor)
    bind = _binder(signature, scheme)

    def method(*args: Any, **kwargs: Any) -> torch.Tensor:
        client, shape, params, rest = bind(args, kwargs)
        return client.init(shape, scheme.name, **rest, **params)

    method.__signature__ = signature  # type: ignore[attr-defined]
    method.__name__ = method.__qualname__ = scheme.name
    method.__doc__ = (
        f"A new CPU tensor of ``shape`` filled by ``{scheme.torch_function}`` on the server "
        f"(parameters and defaults as torch's; shapes: {scheme.shapes})."
        + ("\n\nWith no ``seed`` the server draws one; :meth:`fetch` reports it." if scheme.seeded else "")
    )
    return method


def _make_in_place_method(scheme: Scheme) -> Any:
    parameters = [_P("self", _P.POSITIONAL_ONLY), _P("tensor", _P.POSITIONAL_OR_KEYWORD)]
    parameters += _scheme_parameters(scheme, _P.POSITIONAL_OR_KEYWORD)
    if scheme.seeded:
        parameters.append(_P("generator", _P.POSITIONAL_OR_KEYWORD, default=None))
        parameters.append(_P("seed", _P.KEYWORD_ONLY, default=None))
    parameters += [_P("device", _P.KEYWORD_ONLY, default="cpu"), _P("timeout", _P.KEYWORD_ONLY, default=None)]
    signature = inspect.Signature(parameters, return_annotation=torch.Tensor)
    bind = _binder(signature, scheme)

    def method(*args: Any, **kwargs: Any) -> torch.Tensor:
        client, tensor, params, rest = bind(args, kwargs)
        return client.fill_(tensor, scheme.name, **rest, **params)

    method.__signature__ = signature  # type: ignore[attr-defined]
    method.__name__ = method.__qualname__ = f"{scheme.name}_"
    method.__doc__ = (
        f"Drop-in for ``{scheme.torch_function}``: fills ``tensor`` in place with the server's bytes "
        f"and returns it (shapes: {scheme.shapes})."
        + (
            "\n\nWith no ``seed``, the seed is drawn from ``generator`` (torch's global RNG when None)."
            if scheme.seeded
            else ""
        )
    )
    return method


for _scheme in SCHEMES.values():
    setattr(Client, _scheme.name, _make_new_tensor_method(_scheme))
    setattr(Client, f"{_scheme.name}_", _make_in_place_method(_scheme))
del _scheme

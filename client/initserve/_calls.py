"""What the sync and the asyncio clients share, none of it I/O: settings, a call's arguments turned into a
:class:`~initserve._pipeline.Fetch`, its results, and the scheme methods made from the scheme table."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import torch
from torch import nn

from initserve import _modules, _own_init
from initserve._channel import ChannelConfig
from initserve._local import check_local, maker
from initserve._memory import HostMemory, MemoryPolicy
from initserve._modules import ModuleWork, Rule, Sharding
from initserve._own_init import OwnInitWork
from initserve._pipeline import Fetch, InitResult
from initserve._requests import ShapeLike, TensorSpec, prepare, prepare_many
from initserve._retry import RetryPolicy
from initserve_protocol import dtypes
from initserve_protocol.limits import MAX_UNARY_BYTES
from initserve_protocol.portable import TORCH, generator_name
from initserve_protocol.schemes import SCHEMES, ParamValue, Scheme
from initserve_protocol.slices import Slice

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT_SECONDS = 300.0


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A seed drawn from ``generator``, or torch's global RNG when None: ``torch.manual_seed`` makes it repeatable."""
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.empty((), dtype=torch.int64, device=device).random_(generator=generator))


def _pem(value: bytes | str | os.PathLike | None) -> bytes | None:
    """PEM bytes as given, or read from a path."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def channel_config(
    target: str | Sequence[str],
    *,
    credentials: grpc.ChannelCredentials | None,
    root_certificates: bytes | str | os.PathLike | None,
    client_certificate: bytes | str | os.PathLike | None,
    client_key: bytes | str | os.PathLike | None,
    tls_server_name: str | None,
    token: str | None,
    max_receive_message_bytes: int,
    options: Sequence[tuple[str, Any]],
) -> ChannelConfig:
    """The channel a client's TLS, token and option arguments describe (see :class:`initserve.Client`)."""
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
    return ChannelConfig.make(
        target,
        credentials=credentials,
        max_receive_message_bytes=max_receive_message_bytes,
        options=options,
        token=token,
    )


class ClientCore:
    """A client's settings, and each call planned from them: the part of a client that does no I/O."""

    def __init__(
        self,
        *,
        timeout: float | None,
        retry: RetryPolicy | None,
        chunk_bytes: int,
        require_device_fingerprint: str | None,
        unary_max_bytes: int,
        memory: MemoryPolicy,
        rng: str = TORCH,
        local: bool = False,
    ) -> None:
        if not 0 <= unary_max_bytes <= MAX_UNARY_BYTES:
            raise ValueError(f"unary_max_bytes must be in 0..{MAX_UNARY_BYTES}, got {unary_max_bytes}")
        self.unary_max_bytes = unary_max_bytes
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.require_device_fingerprint = require_device_fingerprint
        self.rng = generator_name(rng)
        check_local(local, self.rng)
        self.local = local
        self._memory = HostMemory(memory)

    def _fingerprint(self, given: str | None) -> str:
        return given or self.require_device_fingerprint or ""

    def _plan_fetch(
        self,
        shape: ShapeLike,
        scheme: str,
        *,
        seed: int | None,
        name: str | None,
        derive: bool | None,
        slices: Sequence[Slice],
        dtype: torch.dtype,
        device: str,
        chunk_bytes: int | None,
        timeout: float | None,
        require_device_fingerprint: str | None,
        out: torch.Tensor | None,
        progress: Callable[[int, int], None] | None,
        params: dict[str, ParamValue],
        rng: str | None = None,
        local: bool | None = None,
    ) -> Fetch:
        """:meth:`Client.fetch`'s call, refused here when it cannot be valid (as torch would refuse it)."""
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
            require_device_fingerprint=self._fingerprint(require_device_fingerprint),
            params=params,
            rng=self._rng(rng, local),
            checksum_only=self._local(local),
        )
        assembler = prepared.assembler(out=out, allocate=self._memory.allocate, progress=progress)
        deadline = self.timeout if timeout is None else timeout
        return Fetch(
            [prepared], [assembler], self.retry, deadline, many=False, unary_max_bytes=self.unary_max_bytes,
            make_here=maker([prepared], [out], self._memory.allocate) if self._local(local) else None,
        )  # fmt: skip

    def _rng(self, rng: str | None, local: bool | None) -> str:
        """The call's generator (the client's unless given), refused with local=True unless portable."""
        chosen = self.rng if rng is None else generator_name(rng)
        check_local(self._local(local), chosen)
        return chosen

    def _local(self, local: bool | None) -> bool:
        return self.local if local is None else local

    def _check_local_draws(self, local_draws: bool, rng: str | None) -> None:
        """local_draws run torch's generator in this process: their bytes cannot be the portable generator's."""
        if local_draws and self._rng(rng, False) != TORCH:
            raise ValueError(
                "local_draws=True draws with torch's generator here, so with the portable generator the model's "
                "bytes would not be portable: leave local_draws off (temporaries then raise, naming the call)"
            )

    def _plan_many(
        self,
        specs: Sequence[TensorSpec],
        *,
        seed: int | None,
        device: str,
        chunk_bytes: int | None,
        timeout: float | None,
        require_device_fingerprint: str | None,
        progress: Callable[[int, int], None] | None,
        rng: str | None = None,
        local: bool | None = None,
    ) -> Fetch:
        """:meth:`Client.fetch_many`'s call: one InitMany :class:`Fetch` of every spec."""
        prepared = prepare_many(
            specs,
            seed=seed,
            device=device,
            chunk_bytes=self.chunk_bytes if chunk_bytes is None else chunk_bytes,
            require_device_fingerprint=self._fingerprint(require_device_fingerprint),
            rng=self._rng(rng, local),
            checksum_only=self._local(local),
        )
        total = sum(item.total_bytes for item in prepared)
        before = [sum(item.total_bytes for item in prepared[:position]) for position in range(len(prepared))]

        def tensor_progress(position: int) -> Callable[[int, int], None] | None:
            if progress is None:
                return None
            return lambda received, _: progress(before[position] + received, total)

        assemblers = [
            item.assembler(out=spec.out, allocate=self._memory.allocate, progress=tensor_progress(position))
            for position, (item, spec) in enumerate(zip(prepared, specs, strict=True))
        ]
        deadline = self.timeout if timeout is None else timeout
        make_here = maker(prepared, [spec.out for spec in specs], self._memory.allocate) if self._local(local) else None
        return Fetch(prepared, assemblers, self.retry, deadline, many=True, make_here=make_here)

    @staticmethod
    def _many_results(fetch: Fetch, specs: Sequence[TensorSpec]) -> dict[str, InitResult]:
        return {spec.name: fetch.result(position) for position, spec in enumerate(specs)}

    @staticmethod
    def _init_module_work(
        module: nn.Module,
        *,
        seed: int,
        init_fn: Callable[..., Any] | None,
        rules: Sequence[Rule],
        prefix: str,
        generate_on: str,
        timeout: float | None,
        progress: Callable[[int, int], None] | None,
        local_draws: bool,
        leave_unwritten: bool,
    ) -> ModuleWork | OwnInitWork:
        """:meth:`Client.init_module`'s work: the table of ``rules`` when given, else the model's own init code."""
        if rules:
            if init_fn is not None:
                raise ValueError("give init_fn= (the model's own init code) or rules= (a table), not both")
            return _modules.init_module(
                module,
                seed=seed,
                rules=rules,
                prefix=prefix,
                generate_on=generate_on,
                timeout=timeout,
                progress=progress,
            )
        return _own_init.own_init_work(
            module,
            seed=seed,
            init_fn=init_fn,
            prefix=prefix,
            generate_on=generate_on,
            timeout=timeout,
            progress=progress,
            local_draws=local_draws,
            leave_unwritten=leave_unwritten,
        )

    @staticmethod
    def _materialize_work(
        module: nn.Module,
        *,
        seed: int,
        device: str | torch.device,
        init_fn: Callable[..., Any] | None,
        rules: Sequence[Rule],
        prefix: str,
        shard: Sharding | None,
        leave_buffers: bool,
        generate_on: str,
        timeout: float | None,
        local_draws: bool,
    ) -> ModuleWork | OwnInitWork:
        """:meth:`Client.materialize`'s work: with ``rules`` or ``shard``, the table's; else the meta model allocated
        on ``device`` (ties kept) and its own init code."""
        if rules or shard is not None:
            if init_fn is not None:
                raise ValueError(
                    "init_fn= runs the model's own code on whole tensors: give it without rules= or shard="
                )
            return _modules.materialize(
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
        buffers, undo = _own_init.allocate(module, device)
        return _own_init.own_init_work(
            module,
            seed=seed,
            init_fn=init_fn,
            prefix=prefix,
            generate_on=generate_on,
            timeout=timeout,
            progress=None,
            local_draws=local_draws,
            leave_unwritten=False,
            must_write=set() if leave_buffers else buffers,
            undo=undo,
        )

    @staticmethod
    def _fill_seed(
        tensor: torch.Tensor, scheme: str, generator: torch.Generator | None, seed: int | None
    ) -> tuple[torch.dtype, int | None, bool]:
        """For :meth:`Client.fill_`: (the dtype to fetch, the seed, whether the bytes can go straight into
        ``tensor``). Refuses an unserved dtype before touching any RNG, as torch does; with no ``seed`` one is
        drawn from ``generator`` (torch's global RNG when None)."""
        dtype = dtypes.from_torch(tensor.dtype).torch_dtype
        if seed is None and SCHEMES[scheme].seeded:
            seed = draw_seed(generator)
        return dtype, seed, tensor.device.type == "cpu" and tensor.is_contiguous()


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


def _generator_parameters(scheme: Scheme) -> list[inspect.Parameter]:
    """``rng`` and ``local``, for the schemes that draw (the client's settings when None)."""
    if not scheme.seeded:
        return []
    return [_P("rng", _P.KEYWORD_ONLY, default=None), _P("local", _P.KEYWORD_ONLY, default=None)]


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
    parameters += _generator_parameters(scheme)
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
    parameters += _generator_parameters(scheme)
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


def attach_scheme_methods(cls: type) -> None:
    """Give ``cls`` one new-tensor method and one in-place twin per scheme, calling its ``init`` and ``fill_``
    (coroutines in the asyncio client: the methods then return them)."""
    for scheme in SCHEMES.values():
        setattr(cls, scheme.name, _make_new_tensor_method(scheme))
        setattr(cls, f"{scheme.name}_", _make_in_place_method(scheme))

"""The sync client: one method per torch.nn.init scheme, plus fetch/fetch_many/init_module/describe, each a
:class:`~initserve._pipeline.Fetch` driven over blocking gRPC calls (or the same-host transport)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import torch
from torch import nn

from initserve import _regions, _shared
from initserve._calls import DEFAULT_TARGET, DEFAULT_TIMEOUT_SECONDS, ClientCore, attach_scheme_methods, channel_config
from initserve._channel import DEFAULT_MAX_RECEIVE_MESSAGE_BYTES
from initserve._errors import InitServeError
from initserve._memory import DEFAULT_MEMORY, MemoryPolicy
from initserve._modules import ModuleWork, Rule, Sharding
from initserve._own_init import OwnInitWork
from initserve._pipeline import Attempt, Fetch, InitResult
from initserve._requests import ShapeLike, TensorSpec
from initserve._retry import RetryPolicy
from initserve._transport import Transport
from initserve_protocol.limits import MAX_UNARY_BYTES
from initserve_protocol.schemes import ParamValue
from initserve_protocol.slices import Slice
from initserve_protocol.v1 import initserve_pb2 as pb

if TYPE_CHECKING:  # the scheme methods' signatures, for type checkers; at run time they are made below
    from initserve._scheme_methods import SchemeMethods
else:
    SchemeMethods = object


def drive(
    fetch: Fetch, open_call: Callable[[Attempt], Iterable[Any]], sleep: Callable[[float], None] = time.sleep
) -> Attempt:
    """Run ``fetch`` to the end over ``open_call(attempt)``'s streams (Init: messages; InitMany: (index, message)
    pairs), closing each (which cancels its call); returns the last attempt."""
    while True:
        attempt = fetch.next_attempt()
        try:
            stream = open_call(attempt)
            try:
                if fetch.many:
                    for index, message in stream:
                        fetch.receive(message, index)
                else:
                    for message in stream:
                        fetch.receive(message)
            finally:
                close = getattr(stream, "close", None)
                if close is not None:  # a stream's generator: closing it cancels the call
                    close()
            fetch.end()
            return attempt
        except InitServeError as error:
            pause = fetch.failed(error)
            if pause is None:
                return attempt
            sleep(pause)


class Client(ClientCore, SchemeMethods):
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
        rng: the random generator of every call (``fetch``/``fetch_many`` take ``rng=`` per call too): ``"torch"``,
            the contract's torch.Generator, or ``"philox4x32-10/v1"``, the portable generator whose bytes depend
            on the request alone (docs/portable.md).
        local: with the portable generator, make each tensor's bytes in this process and verify them against the
            server's checksum-only answer (a header and a trailer): a few hundred bytes on the network per tensor
            (``fetch``/``fetch_many`` take ``local=`` per call too). ``InitResult.transport`` is then "local".
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
        rng: str = "torch",
        local: bool = False,
    ) -> None:
        if shared_memory_pool_bytes < 0:
            raise ValueError(f"shared_memory_pool_bytes must be at least 0, got {shared_memory_pool_bytes}")
        config = channel_config(
            target,
            credentials=credentials,
            root_certificates=root_certificates,
            client_certificate=client_certificate,
            client_key=client_key,
            tls_server_name=tls_server_name,
            token=token,
            max_receive_message_bytes=max_receive_message_bytes,
            options=options,
        )
        ClientCore.__init__(
            self,
            timeout=timeout,
            retry=retry,
            chunk_bytes=chunk_bytes,
            require_device_fingerprint=require_device_fingerprint,
            unary_max_bytes=unary_max_bytes,
            memory=memory,
            rng=rng,
            local=local,
        )
        self.target = target
        self._transport = Transport(config)
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
        rng: str | None = None,
        local: bool | None = None,
        **params: ParamValue,
    ) -> InitResult:
        """Generate ``scheme`` on the server and return the verified tensor with its header.

        ``name``: the parameter's name. With a ``seed``, the generator's seed is then
        ``initserve.derive_seed(seed, name)`` (``derive=False`` uses ``seed`` itself); the header reports both.
        ``slices``: :class:`initserve.Range` / :class:`initserve.Shard` items: the result is ``full[slices]``
        of the tensor of the whole ``shape`` (fans from the whole shape), with the slice's shape.
        ``out``: a contiguous CPU tensor of the result's shape and dtype to write into instead of a new one;
        with ``local=True``, a tensor on a GPU too, whose bytes are then made on that GPU.
        ``progress(received_bytes, total_bytes)``: called after every chunk.
        ``timeout``: the whole fetch's deadline, resumed streams included.
        """
        fetch = self._plan_fetch(
            shape,
            scheme,
            seed=seed,
            name=name,
            derive=derive,
            slices=slices,
            dtype=dtype,
            device=device,
            chunk_bytes=chunk_bytes,
            timeout=timeout,
            require_device_fingerprint=require_device_fingerprint,
            out=out,
            progress=progress,
            params=params,
            rng=rng,
            local=local,
        )
        total_bytes = fetch.prepared[0].total_bytes
        if self._shared is not None and self._shared.enabled and total_bytes > 0 and fetch.make_here is None:
            result = self._shared.fetch(self._transport.init_shared, fetch)
            if not isinstance(result, str):
                if out is not None:
                    result = dataclasses.replace(result, tensor=out.copy_(result.tensor))  # the region goes back
                if progress is not None:
                    progress(total_bytes, total_bytes)
                return result
            fetch = fetch.fresh()  # shared memory gave up: gRPC, with a budget of its own
        last = drive(fetch, lambda attempt: self._transport.init(attempt.request, attempt.timeout, unary=attempt.unary))
        unary = last.unary and not self._transport.unary_refused
        return fetch.result(0, "unary" if unary else "stream")

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
        rng: str | None = None,
        local: bool | None = None,
    ) -> dict[str, InitResult]:
        """Every tensor of ``specs`` on one InitMany stream, verified, by name (in order).

        ``seed``: the job's base seed, for every spec that gives none: each tensor's seed is then
        ``derive_seed(seed, spec.name)``. ``progress(received_bytes, total_bytes)`` counts the whole call.
        ``timeout``: the whole call's deadline, resumed streams included. A broken stream resumes from the first
        tensor not yet verified, at its last verified byte. Names must be unique.
        """
        fetch = self._plan_many(
            specs,
            seed=seed,
            device=device,
            chunk_bytes=chunk_bytes,
            timeout=timeout,
            require_device_fingerprint=require_device_fingerprint,
            progress=progress,
            rng=rng,
            local=local,
        )
        drive(fetch, lambda attempt: self._transport.init_many(attempt.request, attempt.timeout))
        return self._many_results(fetch, specs)

    def _run(self, work: ModuleWork | OwnInitWork, rng: str | None = None, local: bool | None = None) -> nn.Module:
        """Make ``work``'s fetch_many calls: the dry run's draws on one call, then the real run; or a table's calls."""
        if isinstance(work, OwnInitWork):
            specs = work.record(made_here=self._local(local))
            served = (
                self.fetch_many(
                    specs,
                    seed=work.seed,
                    device=work.generate_on,
                    timeout=work.timeout,
                    progress=work.progress,
                    rng=rng,
                    local=local,
                )
                if specs
                else {}
            )
            return work.replay(served)
        for call in work.calls:
            if self._local(local):
                call = call.made_in_place()
            call.done(
                self.fetch_many(
                    call.specs,
                    seed=work.seed,
                    device=work.generate_on,
                    timeout=work.timeout,
                    progress=call.progress,
                    rng=rng,
                    local=local,
                )
            )
        return work.finish()

    def init_module(
        self,
        module: nn.Module,
        *,
        seed: int,
        init_fn: Callable[..., Any] | None = None,
        rules: Sequence[Rule] = (),
        prefix: str = "",
        generate_on: str = "cpu",
        timeout: float | None = None,
        progress: Callable[[int, int], None] | None = None,
        local_draws: bool = False,
        leave_unwritten: bool = False,
        rng: str | None = None,
        local: bool | None = None,
    ) -> nn.Module:
        """Initialize ``module`` in place by its own init code, every random draw served, on one InitMany call:
        each submodule's ``reset_parameters`` (children first), or ``init_fn`` (called once when it takes no
        argument, like ``model.init_weights``; else applied to every submodule, like ``model._init_weights``).
        The k-th random call on the tensor named ``fqn`` (``prefix`` + its qualified name) has the seed
        ``derive_seed(seed, fqn)`` for k = 0, ``derive_seed(seed, f"{fqn}#{k}")`` after (docs/models.md).
        ``local_draws``: random calls on anything but whole parameters and buffers run locally with a derived
        generator instead of raising. ``rules``: a table of schemes instead of the model's code.
        ``rng``, ``local``: the generator of every draw, and whether to make the bytes here (as :meth:`fetch`;
        the client's settings when None). Returns ``module``."""
        self._check_local_draws(local_draws, rng)
        work = self._init_module_work(
            module,
            seed=seed,
            init_fn=init_fn,
            rules=rules,
            prefix=prefix,
            generate_on=generate_on,
            timeout=timeout,
            progress=progress,
            local_draws=local_draws,
            leave_unwritten=leave_unwritten,
        )
        return self._run(work, rng, local)

    def materialize(
        self,
        module: nn.Module,
        *,
        seed: int,
        device: str | torch.device = "cpu",
        init_fn: Callable[..., Any] | None = None,
        rules: Sequence[Rule] = (),
        prefix: str = "",
        shard: Sharding | None = None,
        leave_buffers: bool = False,
        generate_on: str = "cpu",
        timeout: float | None = None,
        local_draws: bool = False,
        rng: str | None = None,
        local: bool | None = None,
    ) -> nn.Module:
        """A ``meta``-device ``module`` with each parameter and buffer allocated once on ``device`` (ties kept) and
        initialized in place as :meth:`init_module` does; a buffer no init code fills is an error unless
        ``leave_buffers``. With ``shard`` (:class:`initserve.Sharding`, with ``rules`` or the built-in table) only
        this process's shard of each parameter it matches. Also usable as FSDP's ``param_init_fn``. Returns
        ``module``."""
        self._check_local_draws(local_draws, rng)
        work = self._materialize_work(
            module,
            seed=seed,
            device=device,
            init_fn=init_fn,
            rules=rules,
            prefix=prefix,
            shard=shard,
            leave_buffers=leave_buffers,
            generate_on=generate_on,
            timeout=timeout,
            local_draws=local_draws,
        )
        return self._run(work, rng, local)

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
        rng: str | None = None,
        local: bool | None = None,
        **params: ParamValue,
    ) -> torch.Tensor:
        """Fill ``tensor`` (any local device) in place, as ``torch.nn.init.<scheme>_(tensor, ...)`` would.

        With no ``seed``, one is drawn from ``generator`` (torch's global RNG when None), so
        ``torch.manual_seed`` makes the result repeatable. ``device`` is where the server generates.
        """
        if tensor.is_meta:  # torch's initializers leave meta tensors alone: there is no storage
            return tensor
        dtype, seed, direct = self._fill_seed(tensor, scheme, generator, seed)
        out = tensor.detach() if direct else None
        result = self.fetch(
            tuple(tensor.shape),
            scheme,
            seed=seed,
            dtype=dtype,
            device=device,
            timeout=timeout,
            out=out,
            rng=rng,
            local=local,
            **params,
        )
        if not direct:
            with torch.no_grad():
                tensor.copy_(result.tensor)
        return tensor


attach_scheme_methods(Client)

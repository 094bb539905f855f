"""initserve for asyncio: :class:`Client`, with the sync client's methods as coroutines, over grpc.aio.

    import asyncio, initserve.aio

    async def main():
        async with initserve.aio.Client("localhost:50051") as client:
            w = await client.kaiming_normal((256, 128), seed=7, mode="fan_out", nonlinearity="relu")

    asyncio.run(main())

Every call plans and verifies exactly as the sync client does (the same :class:`~initserve._pipeline.Fetch`: the
same requests, checks, resumes on another replica from the last verified byte, and errors), so both return the
same bytes. Verification runs on the event loop's thread (a CRC-32 over each chunk as it arrives). The
same-host transport (``shared_memory=``) is the sync client's only.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import torch
from torch import nn

from initserve._async_transport import AsyncTransport
from initserve._calls import DEFAULT_TARGET, DEFAULT_TIMEOUT_SECONDS, ClientCore, attach_scheme_methods, channel_config
from initserve._channel import DEFAULT_MAX_RECEIVE_MESSAGE_BYTES
from initserve._errors import InitServeError
from initserve._memory import DEFAULT_MEMORY, MemoryPolicy
from initserve._modules import ModuleWork, Rule, Sharding
from initserve._own_init import OwnInitWork
from initserve._pipeline import Attempt, Fetch, InitResult
from initserve._requests import ShapeLike, TensorSpec
from initserve._retry import RetryPolicy
from initserve_protocol.limits import MAX_UNARY_BYTES
from initserve_protocol.schemes import ParamValue
from initserve_protocol.slices import Slice
from initserve_protocol.v1 import initserve_pb2 as pb

if TYPE_CHECKING:  # the scheme methods' signatures, as coroutines, for type checkers; at run time made below
    from initserve._scheme_methods import AsyncSchemeMethods
else:
    AsyncSchemeMethods = object

__all__ = ["Client", "drive"]


async def receive(fetch: Fetch, message: Any, index: int) -> None:
    """One message into ``fetch``; where its bytes are made here (``local=True``), in a worker thread, so the
    event loop goes on serving other calls while the kernel runs."""
    if fetch.make_here is None:
        fetch.receive(message, index)
    else:
        await asyncio.to_thread(fetch.receive, message, index)


async def drive(fetch: Fetch, open_call: Callable[[Attempt], AsyncIterator[Any]]) -> Attempt:
    """Run ``fetch`` to the end over ``open_call(attempt)``'s streams (Init: messages; InitMany: (index, message)
    pairs), closing each (which cancels its call); returns the last attempt. The sync twin:
    ``initserve._client.drive``."""
    while True:
        attempt = fetch.next_attempt()
        try:
            stream = open_call(attempt)
            try:
                if fetch.many:
                    async for index, message in stream:
                        await receive(fetch, message, index)
                else:
                    async for message in stream:
                        await receive(fetch, message, 0)
            finally:
                await stream.aclose()  # type: ignore[attr-defined]  # an async generator: cancels the call
            fetch.end()
            return attempt
        except InitServeError as error:
            pause = fetch.failed(error)
            if pause is None:
                return attempt
            await asyncio.sleep(pause)


class Client(ClientCore, AsyncSchemeMethods):
    """An asyncio connection to an initserve server: ``async with`` it, or ``await`` :meth:`close`.

    The arguments are :class:`initserve.Client`'s, except ``shared_memory`` (the sync client's only). The channel
    is opened in the event loop of the first call, and belongs to it: use one client per event loop.
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
        memory: MemoryPolicy = DEFAULT_MEMORY,
        rng: str = "torch",
        local: bool = False,
    ) -> None:
        self._config = channel_config(
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
        self._open: AsyncTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def _transport(self) -> AsyncTransport:
        loop = asyncio.get_running_loop()
        if self._open is None:
            self._open, self._loop = AsyncTransport(self._config), loop
        elif loop is not self._loop:
            raise RuntimeError("this initserve.aio.Client belongs to another event loop; make one per loop")
        return self._open

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._open is not None:
            await self._open.close()
        self._memory.close()

    def release_memory(self) -> int:
        """Give back the memory kept for reuse (``memory.reuse_bytes``) now; returns the bytes released."""
        return self._memory.release()

    async def describe(self, *, timeout: float | None = None) -> pb.ServerInfo:
        """The server's versions, devices, schemes with their parameters and defaults, and limits."""
        return await self._transport.describe(self.timeout if timeout is None else timeout)

    async def fetch(
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
        """:meth:`initserve.Client.fetch`, as a coroutine."""
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
        transport = self._transport
        last = await drive(fetch, lambda attempt: transport.init(attempt.request, attempt.timeout, unary=attempt.unary))
        unary = last.unary and not transport.unary_refused
        return fetch.result(0, "unary" if unary else "stream")

    async def fetch_many(
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
        """:meth:`initserve.Client.fetch_many`, as a coroutine."""
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
        transport = self._transport
        await drive(fetch, lambda attempt: transport.init_many(attempt.request, attempt.timeout))
        return self._many_results(fetch, specs)

    async def _run(
        self, work: ModuleWork | OwnInitWork, rng: str | None = None, local: bool | None = None
    ) -> nn.Module:
        """Make ``work``'s fetch_many calls: the dry run's draws on one call, then the real run; or a table's calls."""
        if isinstance(work, OwnInitWork):
            specs = work.record(made_here=self._local(local))
            served = (
                await self.fetch_many(
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
                await self.fetch_many(
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

    async def init_module(
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
        return await self._run(work, rng, local)

    async def materialize(
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
        return await self._run(work, rng, local)

    async def init(self, shape: ShapeLike, scheme: str, **kwargs: Any) -> torch.Tensor:
        """:meth:`initserve.Client.init`, as a coroutine."""
        return (await self.fetch(shape, scheme, **kwargs)).tensor

    async def fill_(
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
        """:meth:`initserve.Client.fill_`, as a coroutine (the seed, when drawn, is drawn before the call)."""
        if tensor.is_meta:
            return tensor
        dtype, seed, direct = self._fill_seed(tensor, scheme, generator, seed)
        out = tensor.detach() if direct else None
        result = await self.fetch(
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

"""initserve.aio.Client against real servers: the sync client's exactness, resume and error tests, as coroutines.

Each test runs its coroutine with ``asyncio.run`` (no plugin), bounded by ``asyncio.wait_for``.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
import pytest
import torch
from torch import nn

import initserve
import initserve.aio
from tests.conftest import ServerProcess, reference, same_bytes, start_server
from tests.e2e.test_errors import SEED, TORCH_ERROR_PARAMS, local_torch_error
from tests.e2e.test_exactness import VARIANTS, local_outcome
from tests.e2e.test_faults import (
    BIG_BYTES,
    BIG_SHAPE,
    FETCH_TIMEOUT,
    OWN_CONNECTIONS,
    RETRY,
    Killer,
    pause,
    resume,
    server_id,
    start_replicas,
    stop_replicas,
)

T = TypeVar("T")
TEST_SECONDS = 120.0
SHAPES = [(0,), (5,), (7, 15), (4, 3, 5), (3, 2, 3, 3)]


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, TEST_SECONDS))


def aio_client(server: ServerProcess, **kwargs: Any) -> initserve.aio.Client:
    return initserve.aio.Client(server.target, **kwargs)


# --- exactness ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scheme, params", VARIANTS)
def test_every_scheme_gives_torchs_bytes_or_torchs_error(
    server: ServerProcess, scheme: str, params: dict, dtype: torch.dtype
) -> None:
    async def served() -> list[object]:
        outcomes: list[object] = []
        async with aio_client(server) as client:
            for shape in SHAPES:
                for seed in (0, 7):
                    try:
                        outcomes.append((await client.fetch(shape, scheme, seed=seed, dtype=dtype, **params)).tensor)
                    except Exception as error:  # noqa: BLE001 - compared with what torch raised
                        outcomes.append(error)
        return outcomes

    expected = [local_outcome(scheme, shape, dtype, seed, params) for shape in SHAPES for seed in (0, 7)]
    compared = 0
    for got, want in zip(run(served()), expected, strict=True):
        if isinstance(want, BaseException):
            assert type(got) is type(want) and str(got) == str(want)
        else:
            assert not isinstance(got, BaseException), got
            assert same_bytes(got, want)
            compared += want.numel() > 0
    assert compared >= 2 or (scheme == "orthogonal" and dtype == torch.bfloat16)


def test_the_scheme_methods_are_coroutines_with_the_sync_signatures(server: ServerProcess) -> None:
    for name in [scheme for scheme in initserve.SCHEMES] + [f"{scheme}_" for scheme in initserve.SCHEMES]:
        assert inspect.signature(getattr(initserve.aio.Client, name)) == inspect.signature(
            getattr(initserve.Client, name)
        )

    async def calls() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        async with aio_client(server) as client:
            pending = client.kaiming_normal((64, 32), seed=7, mode="fan_out", nonlinearity="relu")
            assert inspect.isawaitable(pending)
            new = await pending
            in_place = torch.empty(16, 8, dtype=torch.float64)
            returned = await client.trunc_normal_(in_place, 0.0, 0.5, -1.0, 1.0, seed=3)
            assert returned is in_place
            strided = torch.empty(8, 16).t()  # not contiguous: filled through a copy
            await client.uniform_(strided, -1.0, 1.0, seed=4)
            return new, in_place, strided

    new, in_place, strided = run(calls())
    assert same_bytes(new, reference("kaiming_normal", (64, 32), seed=7, mode="fan_out", nonlinearity="relu"))
    expected = reference("trunc_normal", (16, 8), dtype=torch.float64, seed=3, mean=0.0, std=0.5, a=-1.0, b=1.0)
    assert same_bytes(in_place, expected)
    with server.client() as sync:  # the contract's (16, 8) tensor, copied in: as the sync client fills it
        assert same_bytes(strided, sync.uniform_(torch.empty(8, 16).t(), -1.0, 1.0, seed=4))


def test_streams_unary_calls_slices_and_derived_seeds_match_the_sync_client(server: ServerProcess) -> None:
    shard = initserve.Shard(dim=0, index=1, count=3)
    specs = [
        initserve.TensorSpec("embed.weight", (300, 64), "normal"),
        initserve.TensorSpec("proj.weight", (64, 64), "orthogonal", {"gain": 2.0}),
        initserve.TensorSpec("proj.bias", (64,), "zeros"),
        initserve.TensorSpec("head.weight", (100, 64), "xavier_uniform", slices=[shard]),
    ]

    async def fetched() -> tuple[initserve.InitResult, initserve.InitResult, dict[str, initserve.InitResult]]:
        async with aio_client(server) as client:
            streamed = await client.fetch((512, 512), "normal", seed=5, chunk_bytes=4096)  # 256 chunks
            unary = await client.fetch((100, 100), "uniform", seed=6, name="w", slices=[initserve.Range(1, 10, 50)])
            many = await client.fetch_many(specs, seed=11, chunk_bytes=1024)
            return streamed, unary, many

    streamed, unary, many = run(fetched())
    assert streamed.transport == "stream" and unary.transport == "unary"
    assert same_bytes(streamed.tensor, reference("normal", (512, 512), seed=5))
    assert unary.seed == initserve.derive_seed(6, "w")
    assert same_bytes(unary.tensor, reference("uniform", (100, 100), seed=unary.seed)[:, 10:60])
    with server.client() as sync:
        expected = sync.fetch_many(specs, seed=11)
    assert list(many) == list(expected)
    for name in expected:
        assert same_bytes(many[name].tensor, expected[name].tensor), name
        assert many[name].seed == expected[name].seed
        assert many[name].seed == (initserve.derive_seed(11, name) if many[name].seeded else 0)


def test_init_module_and_materialize_match_the_sync_client(server: ServerProcess) -> None:
    def model() -> nn.Module:
        return nn.Sequential(nn.Embedding(50, 16, padding_idx=0), nn.Linear(16, 32), nn.LayerNorm(32))

    async def initialized() -> tuple[nn.Module, nn.Module]:
        async with aio_client(server) as client:
            progress: list[int] = []
            built = await client.init_module(model(), seed=21, progress=lambda received, _: progress.append(received))
            drawn = [p for name, p in built.named_parameters() if not name.startswith("2.")]  # LayerNorm: local fills
            assert progress and progress[-1] == sum(p.numel() * 4 for p in drawn)
            with torch.device("meta"):
                meta = model()
            return built, await client.materialize(meta, seed=21)

    built, materialized = run(initialized())
    with server.client() as sync:
        expected = sync.init_module(model(), seed=21)
    for (name, got), (_, again), (_, want) in zip(
        built.state_dict().items(), materialized.state_dict().items(), expected.state_dict().items(), strict=True
    ):
        assert same_bytes(got, want) and same_bytes(again, want), name


# --- errors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("scheme", "shape", "dtype", "params"), TORCH_ERROR_PARAMS)
def test_the_client_raises_the_exception_torch_raises(
    server: ServerProcess, scheme: str, shape: tuple[int, ...], dtype: torch.dtype, params: dict[str, Any]
) -> None:
    expected = local_torch_error(scheme, shape, dtype, params)

    async def call() -> None:
        async with aio_client(server) as client:
            await client.fetch(shape, scheme, seed=SEED, dtype=dtype, **params)

    with pytest.raises(type(expected)) as raised:
        run(call())
    assert type(raised.value) is type(expected)
    assert str(raised.value) == str(expected)
    assert isinstance(raised.value.__cause__, grpc.RpcError)


def test_refusals_map_to_the_sync_clients_errors(server: ServerProcess) -> None:
    async def refusals() -> list[BaseException]:
        caught: list[BaseException] = []
        async with aio_client(server, require_device_fingerprint="cpu/elsewhere") as client:
            for call in (
                lambda: client.normal((1,) * 17),
                lambda: client.normal((2, 2), seed=1),
                lambda: client.fetch((2, 2), "nope"),
                lambda: client.fetch_many([initserve.TensorSpec("x", (1,), "ones")] * 2),
            ):
                try:
                    await call()
                except Exception as error:  # noqa: BLE001 - each is checked below
                    caught.append(error)
        return caught

    too_many_dims, mismatch, unknown, twice = run(refusals())
    assert type(too_many_dims) is initserve.InvalidArgument
    assert str(too_many_dims) == "shape has 17 dims; the limit is 16 (max_dims)"
    assert type(mismatch) is initserve.FailedPrecondition and mismatch.code == "FAILED_PRECONDITION"
    assert str(mismatch).startswith("device fingerprint mismatch: the request requires 'cpu/elsewhere'")
    assert type(unknown) is ValueError and str(unknown).startswith("unknown scheme 'nope'")
    assert type(twice) is ValueError and str(twice) == "tensor name 'x' appears twice"


def test_no_server_is_unavailable_after_the_retry_budget_and_a_deadline_is_deadline_exceeded() -> None:
    replica = start_server()
    target = replica.target
    replica.stop()

    async def unreachable() -> tuple[BaseException, BaseException]:
        errors = []
        for kwargs in (
            {"retry": initserve.RetryPolicy(max_attempts=2, initial_backoff=0.0, max_backoff=0.0), "timeout": 20.0},
            {"timeout": 0.3},
        ):
            async with initserve.aio.Client(target, **kwargs) as client:
                try:
                    await client.normal((4, 4), seed=1)
                except initserve.InitServeError as error:
                    errors.append(error)
        return errors[0], errors[1]

    unavailable, deadline = run(unreachable())
    assert type(unavailable) is initserve.Unavailable
    assert unavailable.__notes__ == ["initserve: gave up after 2 stream(s), 0 bytes verified"]
    assert type(deadline) in (initserve.DeadlineExceeded, initserve.Unavailable)  # whichever the deadline cut
    assert deadline.code in ("DEADLINE_EXCEEDED", "UNAVAILABLE")


def test_a_cancelled_fetch_cancels_its_call_on_the_server(server: ServerProcess) -> None:
    async def cancelled() -> None:
        async with aio_client(server) as client:
            started = asyncio.Event()
            task = asyncio.create_task(
                client.fetch((2048, 2048), "orthogonal", seed=77, progress=lambda *_: started.set(), chunk_bytes=4096)
            )
            await asyncio.wait_for(started.wait(), 60)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(200):
                if (await client.describe()).stats.inflight_requests == 0:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("the cancelled call is still in flight on the server")

    run(cancelled())


# --- resume ---------------------------------------------------------------------------------------------------------


def test_a_replica_killed_mid_stream_is_resumed_on_another() -> None:
    """test_faults' killed-replica test, through the asyncio client: three replicas, the two others paused so that
    the first stream goes to the victim, which is SIGKILLed a third of the way through (no cache: the survivor
    regenerates)."""
    seed = 2025
    expected = reference("normal", BIG_SHAPE, seed=seed)
    replicas = start_replicas(3, "--cache-bytes", "0")
    victim, others = replicas[0], replicas[1:]
    killer = Killer(victim, others, BIG_BYTES // 3)

    async def fetch() -> initserve.InitResult:
        targets = [replica.target for replica in replicas]
        async with initserve.aio.Client(targets, timeout=FETCH_TIMEOUT, retry=RETRY, options=OWN_CONNECTIONS) as client:
            return await client.fetch(BIG_SHAPE, "normal", seed=seed, progress=killer)

    try:
        for other in others:
            pause(other)
        try:
            result = run(fetch())
        finally:
            for other in others:
                resume(other)
        assert killer.killed_after, "the progress callback never reached the kill point"
        assert victim.process.returncode == -signal.SIGKILL
        assert same_bytes(result.tensor, expected)
        assert result.attempts >= 2 and result.resumed_at[0] >= killer.killed_after
        assert result.server_ids[0] == server_id(victim.process)
        assert set(result.server_ids[1:]) <= {server_id(other.process) for other in others}
    finally:
        stop_replicas(replicas)

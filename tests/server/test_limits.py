"""The server's memory budgets and call lifecycle, against real server processes.

- the in-flight byte budget (--max-inflight-bytes): RESOURCE_EXHAUSTED with the exact message, for one request
  over the whole budget and for one that does not fit beside a stream really held in flight;
- cancellation and deadlines free what a stream held (Describe's gauges return to zero, ``cancelled`` counts it);
- the cache (--cache-bytes): a repeated request is a hit, generates nothing, and is many times faster.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch

import initserve
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_protocol.v1 import initserve_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess, reference, same_bytes, start_server
from tests.conftest import settled as settled_stats

MIB = 1 << 20
RPC_TIMEOUT_SECONDS = 30.0
SETTLE_SECONDS = 15.0  # the bound on waiting for the server's gauges to return to zero
# The budget server: no cache (every stream's tensor counts in flight) and a 24 MiB in-flight budget.
INFLIGHT_BUDGET = 24 * MIB
HELD_SHAPE = (2048, 2048)  # 16 MiB float32: far beyond what HTTP/2 flow control buffers for an unread stream
HELD_BYTES = 16 * MIB
LIMIT = f"in-flight bytes limit (max_inflight_bytes={INFLIGHT_BUDGET})"
# The cache server.
CACHE_BUDGET = 64 * MIB
CACHE_INFLIGHT_BUDGET = 40 * MIB
ORTHOGONAL_SHAPE = (1024, 1024)  # a QR: slow to generate (~0.1 s), quick to stream (4 MiB)
SPEEDUP = 5.0  # median miss time over median hit time, at least; measured ~8-11x on a 2-core machine


# --- fixtures and helpers -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def budget_server() -> Iterator[ServerProcess]:
    running = start_server("--cache-bytes", "0", "--max-inflight-bytes", "24M")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def cache_server() -> Iterator[ServerProcess]:
    running = start_server("--cache-bytes", "64M", "--max-inflight-bytes", "40960K")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture()
def channel(budget_server: ServerProcess) -> Iterator[grpc.Channel]:
    # A connection of its own with BDP probing off: "held" streams rely on HTTP/2 flow control stopping an
    # unread stream. grpc shares connections between channels to one target, and on the shared one earlier fast
    # fetches let BDP probing grow the window until a whole 16 MiB stream fitted (seen once in a full run).
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(budget_server.target, options=options) as opened:
        yield opened


@pytest.fixture()
def stub(channel: grpc.Channel, budget_server: ServerProcess) -> Iterator[pb_grpc.InitServiceStub]:
    """A raw stub; after each test the server has nothing in flight and still gives exact bytes."""
    stub = pb_grpc.InitServiceStub(channel)
    yield stub
    settled(stub, lambda s: s.inflight_requests == 0 and s.inflight_bytes == 0, "nothing in flight")
    assert budget_server.alive()
    with budget_server.client() as client:
        assert same_bytes(client.normal((5, 3), seed=11), reference("normal", (5, 3), seed=11))


def stats(stub: pb_grpc.InitServiceStub) -> pb.ServerStats:
    return stub.Describe(pb.DescribeRequest(), timeout=RPC_TIMEOUT_SECONDS).stats


def settled(stub: pb_grpc.InitServiceStub, condition: Callable[[pb.ServerStats], bool], what: str) -> pb.ServerStats:
    """Poll Describe until ``condition(stats)`` holds, for at most SETTLE_SECONDS."""
    return settled_stats(lambda: stats(stub), condition, what, SETTLE_SECONDS)


def init_request(scheme: str, shape: tuple[int, ...], seed: int, **fields) -> pb.InitRequest:
    return pb.InitRequest(scheme=scheme, shape=shape, seed=seed, **fields)


def open_held_stream(stub: pb_grpc.InitServiceStub, seed: int, timeout: float = 60.0):
    """Start a 16 MiB stream and read only its header: its tensor is generated and held by the stream."""
    call = stub.Init(init_request("normal", HELD_SHAPE, seed), timeout=timeout)
    first = next(call)
    assert first.WhichOneof("part") == "header"
    assert first.header.total_bytes == HELD_BYTES and not first.header.cache_hit
    return call


def rest_of_stream(call, *, pause: float = 0.0) -> bytes:
    """Read a stream's chunks to its trailer, slowly when asked; the payload's bytes."""
    payload = bytearray()
    trailer = None
    for message in call:
        part = message.WhichOneof("part")
        if part == "chunk":
            assert message.chunk.offset == len(payload)
            payload += message.chunk.data
            time.sleep(pause)
        else:
            assert part == "trailer" and trailer is None
            trailer = message.trailer
    assert trailer is not None and trailer.checksum == initserve.tensor_checksum(bytes(payload))
    return bytes(payload)


def tensor_from(payload: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.frombuffer(bytearray(payload), dtype=torch.float32).reshape(shape)


# --- the in-flight byte budget --------------------------------------------------------------------------------------


def test_describe_reports_the_budgets_given_as_flags(budget_server: ServerProcess, cache_server: ServerProcess) -> None:
    for running, cache_bytes, inflight_bytes in (
        (budget_server, 0, INFLIGHT_BUDGET),
        (cache_server, CACHE_BUDGET, CACHE_INFLIGHT_BUDGET),
    ):
        with running.client() as client:
            limits = client.describe().limits
        assert (limits.cache_bytes, limits.max_inflight_bytes) == (cache_bytes, inflight_bytes)


def test_a_request_over_the_whole_in_flight_budget_is_resource_exhausted(
    budget_server: ServerProcess, stub: pb_grpc.InitServiceStub
) -> None:
    before = stats(stub)
    with budget_server.client() as client:
        with pytest.raises(initserve.ResourceExhausted) as refused:
            client.uniform((4096, 2048), seed=1)  # 32 MiB
    assert refused.value.code == "RESOURCE_EXHAUSTED"
    assert str(refused.value) == f"{LIMIT}: this request needs {32 * MIB} bytes, more than the limit"
    # The same through raw gRPC: the status code itself, and no message was streamed before it.
    call = stub.Init(init_request("uniform", (4096, 2048), 1), timeout=RPC_TIMEOUT_SECONDS)
    with pytest.raises(grpc.RpcError) as raised:
        next(call)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert raised.value.details() == str(refused.value)
    after = stats(stub)
    assert after.refused_inflight_bytes - before.refused_inflight_bytes == 2
    assert after.generations == before.generations
    assert (after.inflight_requests, after.inflight_bytes) == (0, 0)
    # Exactly the budget is served.
    with budget_server.client() as client:
        exact = client.uniform((3072, 2048), seed=1)  # 24 MiB
    assert same_bytes(exact, reference("uniform", (3072, 2048), seed=1))


def test_a_request_that_does_not_fit_beside_a_held_stream_is_told_to_retry_later(
    budget_server: ServerProcess, stub: pb_grpc.InitServiceStub
) -> None:
    held = open_held_stream(stub, seed=21)
    try:
        current = settled(stub, lambda s: s.inflight_bytes == HELD_BYTES, "holding the 16 MiB stream")
        assert current.inflight_requests == 1
        time.sleep(0.3)  # still held a moment later: the unread stream cannot finish
        assert stats(stub).inflight_bytes == HELD_BYTES
        refused_before = current.refused_inflight_bytes
        with budget_server.client() as client:
            with pytest.raises(initserve.ResourceExhausted) as refused:
                client.normal((3072, 1024), seed=22)  # 12 MiB: 16 + 12 > 24
            assert str(refused.value) == (
                f"{LIMIT}: {HELD_BYTES} bytes in flight, this request needs {12 * MIB}; retry later"
            )
            # Without a cache, even the held request's twin is a new generation that does not fit.
            with pytest.raises(initserve.ResourceExhausted, match=r"16777216 bytes in flight, .* retry later$"):
                client.normal(HELD_SHAPE, seed=21)
            # What does fit beside it is served, exactly, while the first stream is still held.
            small = client.normal((256, 256), seed=23)
            assert same_bytes(small, reference("normal", (256, 256), seed=23))
            assert stats(stub).refused_inflight_bytes - refused_before == 2
            # Read the held stream slowly to its end: it is whole and exact.
            payload = rest_of_stream(held, pause=0.01)
            assert same_bytes(tensor_from(payload, HELD_SHAPE), reference("normal", HELD_SHAPE, seed=21))
            after = settled(stub, lambda s: s.inflight_requests == 0 and s.inflight_bytes == 0, "released")
            assert after.cancelled == current.cancelled  # it finished; nothing was cancelled
            # Retry later works: the refused request fits now.
            retried = client.normal((3072, 1024), seed=22)
            assert same_bytes(retried, reference("normal", (3072, 1024), seed=22))
    finally:
        held.cancel()


# --- cancellation and deadlines free what a stream held -------------------------------------------------------------


def test_cancelling_a_stream_frees_its_request_and_bytes(stub: pb_grpc.InitServiceStub) -> None:
    before = stats(stub)
    call = open_held_stream(stub, seed=31)
    try:
        holding = settled(stub, lambda s: s.inflight_bytes == HELD_BYTES, "holding the stream")
        assert holding.inflight_requests == 1
        chunk = next(call)
        assert chunk.WhichOneof("part") == "chunk" and chunk.chunk.offset == 0
    finally:
        call.cancel()
    after = settled(
        stub,
        lambda s: (
            s.inflight_requests == 0
            and s.inflight_bytes == 0
            and s.cancelled > before.cancelled
            and s.generations + s.abandoned_generations > before.generations + before.abandoned_generations
        ),
        "freed, counted as cancelled, its generation ended",
    )
    assert after.cancelled - before.cancelled == 1
    # Its generation either finished first or stopped part-way (at its next piece) when its only stream went.
    generated = after.generations - before.generations
    abandoned = after.abandoned_generations - before.abandoned_generations
    assert (generated, abandoned) in ((1, 0), (0, 1))
    with pytest.raises(grpc.RpcError) as raised:
        next(call)
    assert raised.value.code() == grpc.StatusCode.CANCELLED


def test_a_deadline_that_expires_mid_stream_frees_its_request_and_bytes(stub: pb_grpc.InitServiceStub) -> None:
    deadline_seconds = 3.0
    before = stats(stub)
    started = time.monotonic()
    call = open_held_stream(stub, seed=41, timeout=deadline_seconds)
    try:
        holding = settled(stub, lambda s: s.inflight_bytes == HELD_BYTES, "holding the stream")
        assert holding.inflight_requests == 1
        time.sleep(max(0.0, started + deadline_seconds + 0.5 - time.monotonic()))  # the deadline passes
        with pytest.raises(grpc.RpcError) as raised:
            for _ in call:  # what was buffered before the deadline, then the status
                pass
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        call.cancel()
    after = settled(
        stub,
        lambda s: s.inflight_requests == 0 and s.inflight_bytes == 0 and s.cancelled > before.cancelled,
        "freed and counted as cancelled",
    )
    assert after.cancelled - before.cancelled == 1


def test_the_clients_deadline_exceeded_for_a_too_short_timeout(
    budget_server: ServerProcess, stub: pb_grpc.InitServiceStub
) -> None:
    before = stats(stub)
    with budget_server.client() as client:
        started = time.monotonic()
        with pytest.raises(initserve.DeadlineExceeded) as raised:
            # A 1024x1024 QR (4 MiB, 18 MiB with its working memory) takes ~0.1 s alone; the call may have 20 ms.
            client.orthogonal((1024, 1024), seed=51, timeout=0.02)
        elapsed = time.monotonic() - started
    assert raised.value.code == "DEADLINE_EXCEEDED"
    assert str(raised.value) == "Deadline Exceeded"
    assert elapsed < 5.0  # raised at the deadline, not after the server's generation
    # The server finishes the generation it started, notices the call is gone, and frees everything.
    after = settled(
        stub,
        lambda s: s.inflight_requests == 0 and s.inflight_bytes == 0 and s.cancelled > before.cancelled,
        "freed and counted as cancelled",
    )
    assert after.cancelled - before.cancelled == 1
    with budget_server.client() as client:
        result = client.fetch((1024, 1024), "orthogonal", seed=51)
    assert same_bytes(result.tensor, reference("orthogonal", (1024, 1024), seed=51))


# --- the cache ------------------------------------------------------------------------------------------------------


def test_a_repeated_request_is_a_cache_hit_that_generates_nothing_and_is_much_faster(
    cache_server: ServerProcess,
) -> None:
    seeds = range(101, 106)
    hits_per_seed = 3
    miss_seconds: list[float] = []
    hit_seconds: list[float] = []
    with cache_server.client() as client:
        client.normal((3, 5), seed=0)  # warm the connection and the server's code paths
        for seed in seeds:
            expected = reference("orthogonal", ORTHOGONAL_SHAPE, seed=seed)
            generations = client.describe().stats.generations
            started = time.perf_counter()
            first = client.fetch(ORTHOGONAL_SHAPE, "orthogonal", seed=seed)
            miss_seconds.append(time.perf_counter() - started)
            assert not first.header.cache_hit
            assert same_bytes(first.tensor, expected)
            assert client.describe().stats.generations == generations + 1
            for _ in range(hits_per_seed):
                started = time.perf_counter()
                again = client.fetch(ORTHOGONAL_SHAPE, "orthogonal", seed=seed)
                hit_seconds.append(time.perf_counter() - started)
                assert again.header.cache_hit
                assert same_bytes(again.tensor, expected)
            info = client.describe()
            assert info.stats.generations == generations + 1  # the hits generated nothing
        stats_now = client.describe().stats
    assert stats_now.cache_hits >= len(seeds) * hits_per_seed
    assert stats_now.cache_bytes_used <= CACHE_BUDGET
    miss, hit = statistics.median(miss_seconds), statistics.median(hit_seconds)
    assert miss >= SPEEDUP * hit, f"median miss {miss * 1e3:.1f} ms, median hit {hit * 1e3:.1f} ms"


def test_the_cache_respects_its_budget_and_evicts(cache_server: ServerProcess) -> None:
    with cache_server.client() as client:
        before = client.describe().stats
        for seed in range(6):  # 6 x 16 MiB through a 64 MiB cache
            tensor = client.uniform(HELD_SHAPE, seed=200 + seed)
            assert same_bytes(tensor, reference("uniform", HELD_SHAPE, seed=200 + seed))
            now = client.describe().stats
            assert now.cache_bytes_used <= CACHE_BUDGET
        after = client.describe().stats
        assert after.cache_evictions - before.cache_evictions >= 2
        # The most recent is still cached; the first has been evicted.
        assert client.fetch(HELD_SHAPE, "uniform", seed=205).header.cache_hit
        assert not client.fetch(HELD_SHAPE, "uniform", seed=200).header.cache_hit
        assert (client.describe().stats.inflight_requests, client.describe().stats.inflight_bytes) == (0, 0)


def test_a_request_whose_seed_the_server_draws_is_not_cached(cache_server: ServerProcess) -> None:
    with cache_server.client() as client:
        first = client.fetch((64, 64), "normal")
        second = client.fetch((64, 64), "normal", seed=first.seed)  # the same tensor, asked for by seed
    assert not first.header.cache_hit and not second.header.cache_hit
    assert same_bytes(first.tensor, second.tensor)


def test_parameters_that_differ_only_in_the_sign_of_zero_are_different_tensors(cache_server: ServerProcess) -> None:
    with cache_server.client() as client:
        positive = client.fetch((4, 4), "constant", val=0.0)
        negative = client.fetch((4, 4), "constant", val=-0.0)
    assert same_bytes(positive.tensor, reference("constant", (4, 4), val=0.0))
    assert same_bytes(negative.tensor, reference("constant", (4, 4), val=-0.0))

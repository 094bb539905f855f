"""The InitUnary answer memo: a repeated cached request gets the same bytes without being parsed again."""

from __future__ import annotations

import grpc
import pytest

import initserve
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_server.answers import AnswerMemo
from initserve_server.config import MAX_ANSWER_MEMO_BYTES, ServerConfig
from tests.conftest import reference, start_server

SERVICE = "initserve.v1.InitService"
RPC_TIMEOUT_SECONDS = 30.0


def test_the_memo_keeps_answers_in_lru_order_within_its_budget() -> None:
    memo = AnswerMemo(budget_bytes=100)
    memo.put(b"a" * 10, b"A" * 30, "about a")  # 40 bytes, request and answer counted
    memo.put(b"b" * 10, b"B" * 30)
    assert memo.gauges() == (2, 80)
    assert memo.get(b"a" * 10) == (b"A" * 30, "about a")  # a becomes the most recently used
    memo.put(b"c" * 10, b"C" * 30)  # 120 > 100: the least recently used (b) goes
    assert memo.get(b"b" * 10) is None
    assert memo.get(b"a" * 10)[0] == b"A" * 30 and memo.get(b"c" * 10)[0] == b"C" * 30
    assert memo.gauges() == (2, 80) and memo.hits == 3
    memo.put(b"d", b"D" * 100)  # larger than the whole budget: never kept, nothing evicted for it
    assert memo.get(b"d") is None and memo.gauges() == (2, 80)


def test_the_memo_budget_follows_the_cache() -> None:
    assert ServerConfig(cache_bytes=1 << 30).answer_memo_bytes == MAX_ANSWER_MEMO_BYTES == 64 << 20
    assert ServerConfig(cache_bytes=1 << 20).answer_memo_bytes == 1 << 20
    assert ServerConfig(cache_bytes=0).answer_memo_bytes == 0  # no cache, no memo


def raw_unary(channel: grpc.Channel):
    return channel.unary_unary(f"/{SERVICE}/InitUnary", request_serializer=None, response_deserializer=None)


def test_a_repeated_request_gets_the_cache_hits_answer_from_the_memo(server) -> None:
    client = server.client()
    request = pb.InitRequest(scheme="normal", shape=(31, 17), seed=424242).SerializeToString()
    with grpc.insecure_channel(server.target) as channel:
        call = raw_unary(channel)
        before = client.describe().stats
        generated = pb.InitUnaryResponse.FromString(call(request, timeout=RPC_TIMEOUT_SECONDS))
        hit = call(request, timeout=RPC_TIMEOUT_SECONDS)  # served by the tensor cache, then kept
        after_hit = client.describe().stats
        reused = call(request, timeout=RPC_TIMEOUT_SECONDS)
        after = client.describe().stats
    assert not generated.header.cache_hit
    assert reused == hit  # byte for byte the cache hit's answer
    answer = pb.InitUnaryResponse.FromString(reused)
    assert answer.header.cache_hit and answer.chunk.data == generated.chunk.data
    assert answer.chunk.data == reference("normal", (31, 17), seed=424242).numpy().tobytes()
    assert answer.trailer.checksum == generated.trailer.checksum
    assert after.unary_answers_reused == after_hit.unary_answers_reused + 1
    assert after.requests == after_hit.requests + 1 and after.cache_hits == after_hit.cache_hits + 1
    assert after.generations == before.generations + 1  # generated once, for the first call
    # The client's own unary fetch of the same tensor (its request bytes differ) verifies against the contract.
    result = client.fetch((31, 17), "normal", seed=424242)
    assert result.transport == "unary" and result.header.cache_hit
    assert result.tensor.numpy().tobytes() == answer.chunk.data


def test_requests_without_a_seed_are_never_answered_from_the_memo(server) -> None:
    request = pb.InitRequest(scheme="normal", shape=(4, 4)).SerializeToString()  # the server draws a seed
    with grpc.insecure_channel(server.target) as channel:
        call = raw_unary(channel)
        answers = [pb.InitUnaryResponse.FromString(call(request, timeout=RPC_TIMEOUT_SECONDS)) for _ in range(3)]
    seeds = {answer.header.seed_used for answer in answers}
    assert len(seeds) == 3 and not any(answer.header.cache_hit for answer in answers)
    for answer in answers:
        assert answer.chunk.data == reference("normal", (4, 4), seed=answer.header.seed_used).numpy().tobytes()


def test_a_server_without_a_cache_keeps_no_answers() -> None:
    running = start_server("--cache-bytes", "0")
    try:
        request = pb.InitRequest(scheme="normal", shape=(4, 4), seed=9).SerializeToString()
        with grpc.insecure_channel(running.target) as channel:
            call = raw_unary(channel)
            answers = [pb.InitUnaryResponse.FromString(call(request, timeout=RPC_TIMEOUT_SECONDS)) for _ in range(3)]
        stats = running.client().describe().stats
        assert [answer.header.cache_hit for answer in answers] == [False, False, False]
        assert (stats.generations, stats.unary_answers_reused) == (3, 0)
    finally:
        running.stop()


@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"\x0a\x05ab"], ids=["truncated-varint", "overrun"])
def test_bytes_that_are_not_a_request_are_refused_every_time(server, payload: bytes) -> None:
    with grpc.insecure_channel(server.target) as channel:
        call = raw_unary(channel)
        for _ in range(2):  # never kept: the second answer is the same refusal
            with pytest.raises(grpc.RpcError) as raised:
                call(payload, timeout=RPC_TIMEOUT_SECONDS)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert raised.value.details().startswith(
                f"request is not a valid initserve.v1 message ({len(payload)} bytes): "
            )
    assert initserve.Client(server.target).ones((2,)).tolist() == [1.0, 1.0]  # still serving

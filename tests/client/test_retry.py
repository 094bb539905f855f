"""The client's resume logic over real encoded streams, and how it builds channel targets.

The streams here are the real codec's output for a real tensor; only their delivery is scripted (a stream that
stops after k chunks and raises the SDK error its transport would), so each resume path is checked exactly.
End-to-end resumes through killed replicas and a corrupting proxy are in tests/e2e/test_faults.py.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import pytest
import torch

import initserve
from initserve._channel import channel_target
from initserve._client import drive
from initserve._pipeline import Fetch
from initserve._requests import prepare
from initserve._retry import RetryPolicy
from initserve_protocol.codec import encode_stream, seal_header, tensor_bytes
from initserve_protocol.v1 import initserve_pb2 as pb
from tests.conftest import same_bytes

SOURCE = torch.arange(1000, dtype=torch.float32)  # 4000 bytes
CHUNK = 512
NO_WAIT = RetryPolicy(initial_backoff=0.0, max_backoff=0.0)


def header(offset: int = 0, **overrides) -> pb.Header:
    fields = dict(
        shape=[1000],
        dtype=pb.DTYPE_FLOAT32,
        total_bytes=4000,
        seed_used=99,
        seeded=True,
        torch_version=torch.__version__,
        checksum_algorithm=initserve.CHECKSUM_ALGORITHM,
        chunk_bytes=CHUNK,
        scheme="normal",
        offset=offset,
        server_id="replica-a",
    )
    fields.update(overrides)
    return seal_header(pb.Header(**fields))


class Script:
    """Delivers, for stream i, the real stream from the requested offset, cut per ``plan[i]``."""

    def __init__(self, plan: list, source: torch.Tensor = SOURCE, header_overrides: list | None = None) -> None:
        self.plan = plan
        self.source = source
        self.header_overrides = header_overrides or [{}] * len(plan)
        self.calls: list[tuple[int, int | None]] = []

    def __call__(self, offset: int, seed: int | None, timeout: float | None) -> Iterator[pb.InitResponse]:
        index = len(self.calls)
        self.calls.append((offset, seed))
        cut = self.plan[index]
        messages = encode_stream(
            header(offset, **self.header_overrides[index]), tensor_bytes(self.source), CHUNK, offset=offset
        )
        for position, message in enumerate(messages):
            if isinstance(message, bytes):  # a chunk, encoded by hand: parse it as protobuf would
                message = pb.InitResponse.FromString(message)
            if isinstance(cut, tuple) and position == cut[0]:
                raise cut[1]
            if callable(cut):
                message = cut(position, message)
            yield message
        if isinstance(cut, tuple) and cut[0] == "after the trailer":
            raise cut[1]


def assemble(script: Script, policy: RetryPolicy = NO_WAIT, timeout: float | None = 30.0) -> initserve.InitResult:
    """The sync client's driver over ``script``'s streams (each asks for the request's offset and seed)."""
    prepared = prepare((1000,), "normal")
    fetch = Fetch([prepared], [prepared.assembler()], policy, timeout, many=False)

    def open_call(attempt):
        request = attempt.request
        return script(request.offset, request.seed if request.HasField("seed") else None, attempt.timeout)

    drive(fetch, open_call)
    return fetch.result()


def test_an_unbroken_stream_takes_one_attempt() -> None:
    outcome = assemble(Script([None]))
    assert same_bytes(outcome.tensor, SOURCE)
    assert (outcome.attempts, outcome.resumed_at) == (1, ())


def test_unavailable_mid_stream_resumes_at_the_first_missing_byte_with_the_reported_seed() -> None:
    # Message 0 is the header, message k the chunk at (k-1)*512: cut before message 4 -> 3 chunks held.
    script = Script([(4, initserve.Unavailable("replica went away")), (2, initserve.Internal("reset")), None])
    outcome = assemble(script)
    assert same_bytes(outcome.tensor, SOURCE)
    assert script.calls == [(0, None), (3 * CHUNK, 99), (4 * CHUNK, 99)]
    assert outcome.resumed_at == (3 * CHUNK, 4 * CHUNK)
    assert outcome.server_ids == ("replica-a",) * 3  # one header per stream, each checked


def test_a_stream_that_fails_after_its_verified_trailer_is_complete() -> None:
    # Every byte and the whole-tensor checksum were verified: the status that follows cannot change them, and
    # another stream would only fetch the same bytes again.
    script = Script([("after the trailer", initserve.Unavailable("connection reset after the trailer"))])
    outcome = assemble(script)
    assert same_bytes(outcome.tensor, SOURCE)
    assert (outcome.attempts, len(script.calls)) == (1, 1)


def test_a_damaged_chunk_is_refetched_from_its_own_offset() -> None:
    def flip_chunk_5(position: int, message: pb.InitResponse) -> pb.InitResponse:
        if position == 5:
            damaged = pb.InitResponse()
            damaged.CopyFrom(message)
            damaged.chunk.data = bytes([message.chunk.data[0] ^ 1]) + message.chunk.data[1:]
            return damaged
        return message

    script = Script([flip_chunk_5, None])
    outcome = assemble(script)
    assert same_bytes(outcome.tensor, SOURCE)
    assert script.calls[1] == (4 * CHUNK, 99)


def test_a_whole_tensor_checksum_failure_restarts_from_byte_zero() -> None:
    def forge_chunk_2(position: int, message: pb.InitResponse) -> pb.InitResponse:
        if position == 2:  # damaged data with a matching CRC: only the whole-tensor checksum can tell
            forged = pb.InitResponse()
            forged.CopyFrom(message)
            forged.chunk.data = b"\x00" * len(message.chunk.data)
            forged.chunk.crc32 = zlib.crc32(forged.chunk.data)
            return forged
        return message

    script = Script([forge_chunk_2, None])
    outcome = assemble(script)
    assert same_bytes(outcome.tensor, SOURCE)
    assert script.calls == [(0, None), (0, 99)]


def test_a_resumed_header_for_another_tensor_raises_and_is_not_retried() -> None:
    script = Script(
        [(3, initserve.Unavailable("gone")), None, None],
        header_overrides=[{}, {"torch_version": "2.12.0"}, {}],
    )
    with pytest.raises(initserve.IntegrityError, match="header field torch_version differs"):
        assemble(script)
    assert len(script.calls) == 2


@pytest.mark.parametrize(
    "error",
    [initserve.InvalidArgument("no"), initserve.ResourceExhausted("full"), initserve.DeadlineExceeded("late")],
    ids=lambda e: e.code,
)
def test_answers_are_raised_at_once(error: initserve.InitServeError) -> None:
    script = Script([(2, error), None])
    with pytest.raises(type(error)):
        assemble(script)
    assert len(script.calls) == 1


def test_when_attempts_run_out_the_last_error_is_raised_with_a_note() -> None:
    script = Script([(2, initserve.Unavailable(f"down {n}")) for n in range(3)])
    with pytest.raises(initserve.Unavailable, match="down 2") as raised:
        assemble(script, RetryPolicy(max_attempts=3, initial_backoff=0.0, max_backoff=0.0))
    assert raised.value.__notes__ == [
        f"initserve: gave up after 3 stream(s), {3 * CHUNK} bytes verified"
    ]  # one chunk per stream


def test_the_deadline_covers_every_attempt() -> None:
    # Each stream breaks after its header: no progress, so only the deadline can end the fetch. (Breaking after
    # one chunk, the 8 chunks arrived within 0.5 s whenever 7 jittered backoffs summed under it: 1 run in 10.)
    script = Script([(1, initserve.Unavailable("down"))] * 100)
    policy = RetryPolicy(max_attempts=100, initial_backoff=0.2, max_backoff=0.2, multiplier=1.0)
    with pytest.raises(initserve.DeadlineExceeded, match=r"deadline of 0.5s passed after \d+ stream\(s\)"):
        assemble(script, policy, timeout=0.5)
    assert 2 <= len(script.calls) < 100


def test_backoff_is_bounded_full_jitter() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0)
    for retry, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (30, 1.0)]:
        pauses = [policy.backoff(retry) for _ in range(200)]
        assert all(0 <= pause <= ceiling for pause in pauses)
        assert max(pauses) > ceiling / 2  # jitter spans the range, not a constant


def test_retry_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="max_attempts must be at least 1"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="initial_backoff <= max_backoff"):
        RetryPolicy(initial_backoff=3.0, max_backoff=1.0)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("localhost:50051", "localhost:50051"),
        ("dns:///initserve.ml.svc:50051", "dns:///initserve.ml.svc:50051"),
        (["127.0.0.1:1", "127.0.0.2:2"], "ipv4:127.0.0.1:1,127.0.0.2:2"),
        ("127.0.0.1:1, 127.0.0.2:2", "ipv4:127.0.0.1:1,127.0.0.2:2"),
        (["[::1]:5", "[::2]:6"], "ipv6:[::1]:5,[::2]:6"),
        (["127.0.0.1:7"], "127.0.0.1:7"),
    ],
)
def test_channel_targets(given, expected: str) -> None:
    assert channel_target(given) == expected


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ([], "no target given"),
        (["127.0.0.1:1", "nope"], "target 'nope' is not host:port"),
        (["127.0.0.1:1", "no-such-host.invalid:5"], "target 'no-such-host.invalid:5': cannot resolve"),
    ],
)
def test_bad_target_lists_are_refused(given, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        channel_target(given)


def test_a_resumed_request_is_a_copy_with_the_offset_and_the_drawn_seed() -> None:
    from initserve._requests import prepare

    drawn = prepare((64, 64), "normal", params={"std": 0.5})
    original = drawn.request.SerializeToString()
    assert drawn.resumed(0, None) is drawn.request  # the first stream: the request as prepared
    resumed = drawn.resumed(4096, 1234)
    assert (resumed.offset, resumed.seed, resumed.params.std) == (4096, 1234, 0.5)
    assert drawn.request.SerializeToString() == original  # never changed: a later resume starts from it again
    named = prepare((64, 64), "normal", seed=7)
    assert (named.resumed(4096, 1234).offset, named.resumed(4096, 1234).seed) == (4096, 7)  # the caller's seed kept

"""Prometheus metrics on their own port and the access log: counts after known calls, never tensor data."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_protocol.v1 import initserve_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess, reference, same_bytes, start_server

SCRAPE_SECONDS = 10.0
LOG_SECONDS = 10.0
RPC_TIMEOUT_SECONDS = 30.0
SHAPE = (64, 32)  # 8 KiB of float32: one InitUnary answer
SHAPE_BYTES = 64 * 32 * 4


@pytest.fixture()
def metered() -> Iterator[ServerProcess]:
    """A server of its own (counts start at zero) with metrics on a free port and JSON logs."""
    running = start_server("--metrics-port", "0", "--log-format", "json")
    yield running
    running.stop()


def metrics_port(server: ServerProcess) -> int:
    line = next(line for line in server.output if line.startswith("initserve metrics on "))
    return int(line.rsplit(":", 1)[1])


def scrape(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on /metrics, keyed by (name, sorted labels)."""
    url = f"http://127.0.0.1:{metrics_port(server)}/metrics"
    with urllib.request.urlopen(url, timeout=SCRAPE_SECONDS) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def access_lines(server: ServerProcess, count: int) -> list[dict]:
    """The server's JSON access lines, once there are ``count`` (a thread of the server's writes them)."""
    deadline = time.monotonic() + LOG_SECONDS
    while True:
        lines = [json.loads(line) for line in list(server.output) if line.startswith("{")]
        access = [line for line in lines if line["logger"] == "initserve.access"]
        if len(access) >= count or time.monotonic() > deadline:
            assert len(access) == count, access
            return access
        time.sleep(0.01)


def test_scraped_counts_match_the_calls_made(metered: ServerProcess) -> None:
    with metered.client() as client:
        for _ in range(3):  # a generation, a cache hit, then the answer memo: three calls, one generation
            result = client.fetch(SHAPE, "kaiming_normal", seed=7)
            assert same_bytes(result.tensor, reference("kaiming_normal", SHAPE, seed=7))
        streamed = client.fetch((256, 256), "normal", seed=1, chunk_bytes=64 << 10)  # Init: a stream of chunks
        assert same_bytes(streamed.tensor, reference("normal", (256, 256), seed=1))
        with pytest.raises(ValueError):
            client.fetch(SHAPE, "kaiming_normal", seed=7, mode="fan_x")
        stats = client.describe().stats
    access_lines(metered, 6)  # every call's line written, so its metrics were recorded (they come first)
    samples = scrape(metered)

    def value(sample: str, **labels: str) -> float:
        return samples[(sample, tuple(sorted(labels.items())))]

    assert value("initserve_requests_total", method="InitUnary", scheme="kaiming_normal", code="OK") == 3
    assert value("initserve_requests_total", method="Init", scheme="normal", code="OK") == 1
    assert value("initserve_requests_total", method="InitUnary", scheme="kaiming_normal", code="INVALID_ARGUMENT") == 1
    assert value("initserve_bytes_sent_total", method="InitUnary") == 3 * SHAPE_BYTES
    assert value("initserve_bytes_sent_total", method="Init") == 256 * 256 * 4
    assert value("initserve_tensors_total", scheme="kaiming_normal") == 3
    assert value("initserve_call_seconds_count", method="InitUnary") == 4
    assert value("initserve_generation_seconds_count", scheme="kaiming_normal", device="cpu") == 1
    assert value("initserve_generation_seconds_count", scheme="normal", device="cpu") == 1
    # The servicer's own figures, read at scrape time: the same as Describe's (the Describe call changed none).
    assert value("initserve_generations_total") == stats.generations == 2
    assert value("initserve_cache_hits_total") == stats.cache_hits
    assert value("initserve_cache_misses_total") == stats.cache_misses
    assert value("initserve_unary_answers_reused_total") == stats.unary_answers_reused == 1
    assert value("initserve_cache_entries") == stats.cache_entries == 2
    assert value("initserve_cache_bytes") == stats.cache_bytes_used == SHAPE_BYTES + 256 * 256 * 4
    assert value("initserve_inflight_bytes") == 0
    cpu = client_device_fingerprint(metered)
    assert value("initserve_device_info", device="cpu", name=cpu.name, fingerprint=cpu.fingerprint) == 1


def client_device_fingerprint(server: ServerProcess) -> pb.DeviceInfo:
    with server.client() as client:
        return client.describe().devices[0]


def test_the_access_log_is_one_json_line_per_call_and_never_data(metered: ServerProcess) -> None:
    with grpc.insecure_channel(metered.target) as channel:
        stub = pb_grpc.InitServiceStub(channel)
        request = pb.InitRequest(scheme="uniform", shape=[3, 5], dtype=pb.DTYPE_FLOAT32, device="cpu", seed=11)
        messages = list(stub.Init(request, timeout=RPC_TIMEOUT_SECONDS, metadata=(("x-request-id", "job-42/rank-3"),)))
        payload = b"".join(message.chunk.data for message in messages if message.HasField("chunk"))
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Init(pb.InitRequest(scheme="no_such", shape=[2]), timeout=RPC_TIMEOUT_SECONDS))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    expected = reference("uniform", (3, 5), seed=11)
    assert payload == bytes(expected.view(torch.uint8).reshape(-1))
    served, refused = access_lines(metered, 2)
    assert served["request_id"] == "job-42/rank-3"
    assert (served["method"], served["code"], served["scheme"], served["shape"]) == ("Init", "OK", "uniform", [3, 5])
    assert (served["tensors"], served["bytes"], served["cache_hit"]) == (1, 60, False)
    assert served["peer"].startswith("ipv4:127.0.0.1:") and served["ms"] > 0 and served["level"] == "INFO"
    assert served["message"] == "Init OK" and refused["message"] == "Init INVALID_ARGUMENT"
    assert (refused["method"], refused["code"], refused["tensors"], refused["bytes"]) == (
        "Init",
        "INVALID_ARGUMENT",
        0,
        0,
    )
    assert len(refused["request_id"]) == 16  # none was sent: the server made one
    assert set(served) == {
        "time", "level", "logger", "message",
        "request_id", "method", "code", "scheme", "shape", "tensors", "bytes", "cache_hit", "ms", "peer",
    }  # fmt: skip
    # No line carries tensor data: the payload's bytes appear in no form in the whole log.
    log = "".join(metered.output)
    assert payload.hex() not in log and repr(payload) not in log


def test_a_memo_answered_call_is_logged_with_its_request_id_and_peer() -> None:
    """The access-log line and metrics of a call are written after its answer went out (a termination
    callback), the request id and peer read then: a repeated InitUnary, answered from the memo, has them."""
    request = pb.InitRequest(scheme="normal", shape=[3, 5], dtype=pb.DTYPE_FLOAT32, seed=12)
    metered = start_server("--metrics-port", "0", "--log-format", "json")
    try:
        check_memo_call_records(metered, request)
    finally:
        metered.stop()


def check_memo_call_records(metered: ServerProcess, request: pb.InitRequest) -> None:
    with grpc.insecure_channel(metered.target) as channel:
        stub = pb_grpc.InitServiceStub(channel)
        for request_id in ("generated", "from-the-cache", "from-the-memo"):  # the memo keeps what the cache served
            answer = stub.InitUnary(request, timeout=RPC_TIMEOUT_SECONDS, metadata=(("x-request-id", request_id),))
            assert answer.chunk.data == bytes(reference("normal", (3, 5), seed=12).view(torch.uint8).reshape(-1))
    first, cached, memo = access_lines(metered, 3)
    assert (first["request_id"], first["cache_hit"], cached["cache_hit"]) == ("generated", False, True)
    assert (memo["request_id"], memo["method"], memo["code"], memo["cache_hit"]) == (
        "from-the-memo",
        "InitUnary",
        "OK",
        True,
    )
    assert (memo["scheme"], memo["shape"], memo["tensors"], memo["bytes"]) == ("normal", [3, 5], 1, 60)
    assert memo["peer"].startswith("ipv4:127.0.0.1:") and memo["peer"] == first["peer"]
    samples = scrape(metered)
    assert samples[("initserve_unary_answers_reused_total", ())] == 1
    key = ("initserve_requests_total", (("code", "OK"), ("method", "InitUnary"), ("scheme", "normal")))
    assert samples[key] == 3


def test_metrics_are_off_by_default_and_text_logs_say_the_same(server: ServerProcess) -> None:
    assert not any(line.startswith("initserve metrics on ") for line in server.output)
    with server.client() as client:
        client.fetch((2, 2), "ones", name="text-log-probe")
    expected = ' method="InitUnary" code="OK" scheme="ones" shape=[2,2] tensors=1 bytes=16 '
    deadline = time.monotonic() + LOG_SECONDS
    while not any(expected in line for line in list(server.output)) and time.monotonic() < deadline:
        time.sleep(0.01)
    line = next(line for line in list(server.output) if expected in line)
    assert line.split(" ")[2:5] == ["INFO", "initserve.access:", "call"]


def test_a_metrics_port_in_use_stops_the_server_with_a_reason() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        finished = subprocess.run(
            [
                sys.executable,
                "-m",
                "initserve_server",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--metrics-port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert finished.returncode == 1
    assert f"--metrics-port: cannot serve metrics on 127.0.0.1:{port}: Address already in use" in finished.stderr


def test_the_metrics_flag_and_its_environment_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    from initserve_server.cli import build_parser

    assert build_parser().parse_args([]).metrics_port is None
    assert build_parser().parse_args(["--metrics-port", "9090"]).metrics_port == 9090
    monkeypatch.setenv("INITSERVE_METRICS_PORT", "9091")
    assert build_parser().parse_args([]).metrics_port == 9091
    assert build_parser().parse_args(["--metrics-port", "off"]).metrics_port is None  # the flag wins
    finished = subprocess.run(
        [sys.executable, "-m", "initserve_server", "--metrics-port", "70000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 2
    assert "argument --metrics-port: invalid _optional_port value: '70000'" in finished.stderr

"""The soak's hostile phases (issue 17): stalled readers and the heaviest admitted requests against one server, and
peak memory under every scheme at its largest admitted size.

Both start the installed ``initserve-server`` with the flags stated in their report sections, and size what
they send with the server's own code: its flags parsed by its own parser (``cli``), each request validated and
costed as the server will (``validation``, ``costs``), so "the heaviest request it admits" and "the largest
tensor it admits" are the server's answers, not guesses.

- :func:`run_hostile`: 64 streams of 24 MiB opened on their own connections and never read, and 16 requests
  from other clients whose generations are estimated just under ``max_work_seconds`` (2 running, 14 queued),
  none with a deadline. While all of them are held: health on the main port and on the health port, an
  uncached ``[4, 4]`` from a new client, and a cached 256 MiB fetch against the same fetch on the idle server.
  Then the stall watch must cancel the readers and release their bytes, leaving the heavy requests alone.
- :func:`run_memory`: several clients at once fetch every scheme at the largest size the cost model and the
  budgets admit; peak RSS over idle (``clear_refs`` and ``VmHWM``, and ``VmRSS`` sampled) against
  1.1 x (cache + in-flight budgets) + 300 MiB; every answer the reference's bytes or a "retry later".
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2

import initserve
from initserve._requests import prepare
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_protocol.v1 import initserve_pb2_grpc as pb_grpc
from initserve_server import costs
from initserve_server.cli import build_parser, config_from_args
from initserve_server.config import ServerConfig
from initserve_server.validation import InvalidRequest, validate_request
from tests.conftest import ServerProcess, reference, same_bytes, start_installed_server
from tests.server.test_hostile import SERVICE, health, own_channel, read_status, settled, stats
from tests.soak import Check, Request

MIB = 1 << 20
GIB = 1 << 30
SERVING = health_pb2.HealthCheckResponse.SERVING


# --- admission, decided by the server's own code --------------------------------------------------------------------


def server_config(flags: Sequence[str]) -> ServerConfig:
    """The configuration ``initserve-server <flags>`` runs with (its own parser, this environment's INITSERVE_*)."""
    return config_from_args(build_parser().parse_args(list(flags)))


def message(request: Request) -> pb.InitRequest:
    """The InitRequest the SDK sends for ``request``."""
    return prepare(request.shape, request.scheme, seed=request.seed, dtype=request.dtype,
                   params=dict(request.params)).request  # fmt: skip


def admitted_cost(request: Request, config: ServerConfig) -> costs.Cost | None:
    """The cost of ``request`` if an idle server with ``config`` admits it: valid, its work within
    max_work_seconds, its tensor and working memory within max_inflight_bytes. None if it is refused."""
    try:
        spec = validate_request(message(request), config, lambda: 1)
        cost = costs.check(spec.whole(), config.max_work_seconds)
    except InvalidRequest:  # costs.WorkRefused included
        return None
    return cost if spec.total_bytes + cost.working_bytes <= config.max_inflight_bytes else None


def largest(
    make: Callable[[int], Request], config: ServerConfig, within: Callable[[costs.Cost], bool] = lambda cost: True
) -> Request:
    """``make(n)`` for the largest ``n`` that the server admits and ``within`` accepts (both grow with ``n``)."""

    def fits(n: int) -> bool:
        cost = admitted_cost(make(n), config)
        return cost is not None and within(cost)

    low, high = 1, 2
    if not fits(low):
        raise ValueError(f"{make(low)} is not admitted even at its smallest")
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return make(low)


def describe(request: Request) -> str:
    params = "".join(f", {name}={value:g}" if isinstance(value, float) else f", {name}={value}"
                     for name, value in request.params)  # fmt: skip
    dtype = "" if request.dtype == torch.float32 else f", {str(request.dtype).removeprefix('torch.')}"
    return f"`{request.scheme}` {list(request.shape)}{params}{dtype}"


def _mib(nbytes: float) -> str:
    return f"{nbytes / MIB:,.0f} MiB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


# --- the hostile phase ----------------------------------------------------------------------------------------------

STALL_SECONDS = 20.0
WORKERS = 2  # generation threads: the reference machine's cores (the default there), stated for other machines
HOSTILE_FLAGS: tuple[str, ...] = (
    "--workers", str(WORKERS),
    "--cache-bytes", "512M",
    "--max-inflight-bytes", "6G",  # 64 readers x 24 MiB and 16 heavy requests (with their working memory) fit
    "--stall-seconds", f"{STALL_SECONDS:g}",
    "--health-port", "0",
)  # fmt: skip
STALLED_READERS = 64
READER_SHAPE = (6 * 1024, 1024)  # 24 MiB of float32; unseeded, so never cached: counted in flight until released
HEAVY_WORK_FRACTION = 0.95  # the heavy requests' estimated work, as a fraction of max_work_seconds (at most)
# The heavy requests, each to be sized at the largest n within HEAVY_WORK_FRACTION. The first two run during the
# measurements: sparse's column loop (compiled, without the GIL) and a far-tail trunc_normal, whose rejection
# rounds are torch's own loop in Python, holding the GIL between short torch calls: the hardest neighbour left
# for the servicer's threads. The others wait in the queue, orthogonal's uninterruptible QRs last. (dirac, whose
# torch loop was the other such neighbour, is one indexed assignment in the server now: no longer heavy.)
HEAVY_TEMPLATES: tuple[Callable[[int], Request], ...] = (
    lambda n: Request("sparse", (1, n), seed=1, params=(("sparsity", 0.5),)),
    lambda n: Request("trunc_normal", (1,), seed=2, params=(("a", 5.0), ("b", 5.0 + n))),
    lambda n: Request("trunc_normal", (1,), seed=3, params=(("a", 4.0), ("b", 4.0 + n))),
    lambda n: Request("sparse", (4, n), seed=4, params=(("sparsity", 0.25),)),
    lambda n: Request("trunc_normal", (1024,), seed=5, params=(("a", 4.0), ("b", 4.0 + n))),
    lambda n: Request("trunc_normal", (16,), seed=6, params=(("a", 6.0), ("b", 6.0 + n))),
    lambda n: Request("sparse", (16, n), seed=7, params=(("sparsity", 0.1),)),
    lambda n: Request("trunc_normal", (256,), seed=8, params=(("a", 3.5), ("b", 3.5 + n))),
    lambda n: Request("trunc_normal", (4,), seed=9, params=(("a", 3.0), ("b", 3.0 + n))),
    lambda n: Request("sparse", (2, n), seed=10, params=(("sparsity", 0.5),)),
    lambda n: Request("trunc_normal", (8,), seed=11, params=(("a", 7.0), ("b", 7.0 + n))),
    lambda n: Request("trunc_normal", (64,), seed=12, params=(("a", 8.0), ("b", 8.0 + n))),
    lambda n: Request("sparse", (8, n), seed=13, params=(("sparsity", 0.3),)),
    lambda n: Request("trunc_normal", (32,), seed=14, params=(("a", 4.5), ("b", 4.5 + n))),
    lambda n: Request("orthogonal", (n, n), seed=15),
    lambda n: Request("orthogonal", (n, n), seed=16, dtype=torch.float64),
)
CACHED = Request("normal", (64 * 1024, 1024), seed=7)  # 256 MiB
SPEED_SAMPLES = 5  # cached fetches on the idle server, and under each control load
# Controls for the cached fetch's speed, on the idle server before the phase: the cores taken by other processes
# (CPU alone), and the generation threads busy with QRs, which release the GIL (CPU within the server's process).
BURNER = "while True: pass"
QR_CONTROL = tuple(Request("orthogonal", (5120, 5120), seed=101 + index) for index in range(WORKERS))
MEASURE_MARGIN_SECONDS = 2.0  # the measurements end this long before the first reader can be cancelled
HEALTH_SECONDS = 1.0
SMALL_SECONDS = 2.0
HEALTH_TIMEOUT_SECONDS = 10.0  # a check slower than this is recorded as failed (and took this long)
SMALL_TIMEOUT_SECONDS = 10.0
CACHED_SPEED_RATIO = 0.5
SETTLE_SECONDS = 60.0


def heavy_plan(config: ServerConfig) -> list[tuple[Request, costs.Cost]]:
    limit = HEAVY_WORK_FRACTION * config.max_work_seconds
    plan = []
    for make in HEAVY_TEMPLATES:
        request = largest(make, config, lambda cost: cost.work_seconds <= limit)
        cost = admitted_cost(request, config)
        assert cost is not None
        plan.append((request, cost))
    return plan


@dataclass
class HostileFigures:
    flags: tuple[str, ...] = HOSTILE_FLAGS
    heavy: list[tuple[Request, costs.Cost]] = field(default_factory=list)
    heavy_admitted_bytes: int = 0  # their tensors and working memory, counted in flight by the server
    health_main: list[float] = field(default_factory=list)
    health_port: list[float] = field(default_factory=list)
    health_not_serving: list[str] = field(default_factory=list)
    small: list[float] = field(default_factory=list)
    idle_seconds: list[float] = field(default_factory=list)  # cached 256 MiB fetches
    burner_seconds: list[float] = field(default_factory=list)  # the same, both cores busy in other processes
    qr_seconds: list[float] = field(default_factory=list)  # the same, both generation threads running a QR
    qr_control_held: bool = False  # both QRs were still running after the last of those fetches
    loaded_seconds: list[float] = field(default_factory=list)
    wrong_bytes: int = 0
    held_while_measuring: str = ""  # Describe after the last measurement: everything still held?
    held_ok: bool = False
    readers_held_bytes: int = 0
    stall_cancel_seconds: float = 0.0  # from the readers' opening to the last of them cancelled
    readers_cancelled: int = 0  # readers whose calls ended CANCELLED
    after_stall: pb.ServerStats | None = None
    heavy_release_seconds: float = 0.0
    final: pb.ServerStats | None = None
    server_rss_peak_bytes: int = 0
    server_alive: bool = False
    server_exit: int | None = None
    stop_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @staticmethod
    def _speeds(samples: list[float]) -> float:
        return CACHED.nbytes / statistics.median(samples) if samples else 0.0

    def checks(self) -> list[Check]:
        idle, loaded = self._speeds(self.idle_seconds), self._speeds(self.loaded_seconds)
        ratio = loaded / idle if idle else 0.0
        health = self.health_main + self.health_port
        after = self.after_stall
        final = self.final
        return [
            Check(
                "hostile: Health/Check SERVING, main port and health port",
                f"{len(health)} checks, {len(self.health_not_serving)} not SERVING; max {_ms(max(health, default=0))}",
                f"every check SERVING, < {HEALTH_SECONDS:g} s",
                bool(health) and not self.health_not_serving and max(health) < HEALTH_SECONDS,
            ),
            Check(
                "hostile: uncached `normal` [4, 4] from a new client",
                f"{len(self.small)} fetches; max {_ms(max(self.small, default=0))}",
                f"every fetch exact, < {SMALL_SECONDS:g} s",
                bool(self.small) and max(self.small) < SMALL_SECONDS and self.wrong_bytes == 0,
            ),
            Check(
                "hostile: cached 256 MiB fetch, loaded / idle speed (medians)",
                f"{ratio:.2f} ({loaded / 1e9:.2f} / {idle / 1e9:.2f} GB/s)",
                f">= {CACHED_SPEED_RATIO:g}",
                ratio >= CACHED_SPEED_RATIO,
            ),
            Check(
                "hostile: every reader and heavy request still held after the measurements",
                self.held_while_measuring,
                f"{STALLED_READERS + len(self.heavy)} in flight, 0 stalls",
                self.held_ok,
            ),
            Check(
                "hostile: readers cancelled by the stall watch, their bytes released",
                (
                    f"{after.stalled_streams} stalled, {self.readers_cancelled} CANCELLED; then "
                    f"{after.inflight_requests} in flight holding {after.inflight_bytes:,} bytes"
                    if after
                    else "not reached"
                ),
                f"{STALLED_READERS} cancelled; the {len(self.heavy)} heavy requests left, holding exactly their "
                f"{self.heavy_admitted_bytes:,} bytes",
                after is not None
                and after.stalled_streams == STALLED_READERS
                and self.readers_cancelled == STALLED_READERS
                and after.inflight_requests == len(self.heavy)
                and after.inflight_bytes == self.heavy_admitted_bytes,
            ),
            Check(
                "hostile: heavy requests cancelled by their callers: everything released",
                (
                    f"{final.inflight_requests} in flight, {final.inflight_bytes} bytes, "
                    f"{final.running_generations} running, {final.queued_generations} queued, "
                    f"after {self.heavy_release_seconds:.1f} s"
                    if final
                    else "not reached"
                ),
                "0, 0, 0, 0",
                final is not None
                and final.inflight_requests == 0
                and final.inflight_bytes == 0
                and final.running_generations == 0
                and final.queued_generations == 0,
            ),
            Check(
                "hostile: the server process",
                f"alive to the end: {self.server_alive}; SIGTERM: exit {self.server_exit} in {self.stop_seconds:.1f} s",
                "alive; exit 0",
                self.server_alive and self.server_exit == 0,
            ),
            Check("hostile: errors", "; ".join(self.errors[:5]) or "none", "none", not self.errors),
        ]

    def markdown(self) -> str:
        def spread(samples: list[float]) -> str:
            if not samples:
                return "none"
            return f"{len(samples)}: median {_ms(statistics.median(samples))}, max {_ms(max(samples))}"

        heavy = "\n".join(
            f"| {index + 1} | {describe(request)} | {cost.work_seconds:.1f} s | "
            f"{_mib(request.nbytes + cost.working_bytes)} |"
            for index, (request, cost) in enumerate(self.heavy)
        )

        def speeds(samples: list[float]) -> str:
            return ", ".join(f"{CACHED.nbytes / seconds / 1e9:.2f}" for seconds in samples) or "none"

        def ratio(samples: list[float]) -> str:
            idle = self._speeds(self.idle_seconds)
            return f"{self._speeds(samples) / idle:.2f}" if idle and samples else "-"

        qr = " ".join(describe(request) for request in QR_CONTROL)
        final_rss = _mib(self.server_rss_peak_bytes)
        return f"""## Hostile clients: stalled readers and the heaviest admitted requests

`initserve-server {" ".join(self.flags)}` (and `--host 127.0.0.1 --port 0`), other flags at their defaults
(`--max-work-seconds 60`, `--max-concurrent-calls 256`).

Held at once, none with a deadline, each on a connection of its own (BDP probing off, so HTTP/2 flow control
really stops a stream nobody reads):
- **{STALLED_READERS} stalled readers**: `Init` `normal` {list(READER_SHAPE)} (24 MiB, no seed: never cached,
  {_mib(self.readers_held_bytes)} in flight), opened and never read;
- **{len(self.heavy)} heavy requests** from other clients, each the largest of its kind whose estimated work is
  within {HEAVY_WORK_FRACTION:.0%} of `max_work_seconds` (the server's cost model, `initserve_server.costs`),
  {_mib(self.heavy_admitted_bytes)} admitted in flight; the first {WORKERS} run on the {WORKERS}
  generation threads during the measurements, the others wait in the queue:

| # | request | estimated work | tensor + working memory |
|---|---|---|---|
{heavy}

Measured meanwhile, in rounds until {MEASURE_MARGIN_SECONDS:g} s before the first reader could be cancelled
(each health check and each `[4, 4]` on a new connection, as a probe or a new job makes them):

| | samples |
|---|---|
| `Health/Check` on the main port | {spread(self.health_main)} |
| `Health/Check` on the health port | {spread(self.health_port)} |
| uncached `normal` [4, 4], new client, distinct seeds | {spread(self.small)} |

The cached fetch, {describe(CACHED)} ({_mib(CACHED.nbytes)}) over gRPC by one client on this machine (which
receives it and verifies every chunk's CRC and the checksum), on the idle server, under the phase's load, and,
as controls measured before the phase, beside {WORKERS} processes burning the cores (`{BURNER}`) and
while the {WORKERS} generation threads run QRs ({qr}: torch releases the GIL during them; still running
after the last fetch: {self.qr_control_held}):

| cached fetch | GB/s, each fetch | median / idle median |
|---|---|---|
| idle server | {speeds(self.idle_seconds)} | 1 |
| control: both cores busy in other processes | {speeds(self.burner_seconds)} | {ratio(self.burner_seconds)} |
| control: both generation threads in a QR | {speeds(self.qr_seconds)} | {ratio(self.qr_seconds)} |
| **the phase**: readers and heavy requests held, #1 and #2 running | {speeds(self.loaded_seconds)} \
| **{ratio(self.loaded_seconds)}** |

Where the time goes: on {os.cpu_count()} cores, the fetch's two busy threads (the server's, sending; the
client's, receiving and verifying) share the cores with whatever else runs, so two busy threads anywhere cost
it about half its idle speed: in other processes, or in the server's generation threads while torch runs a QR
without the GIL. The phase's running generations are sparse's column loop, compiled (TorchScript runs it
without the GIL), and a far-tail trunc\\_normal, whose rejection rounds are torch's own loop in Python over short
torch calls: it holds the server's GIL between them, and the thread sending the cached tensor, in the same
process, needs the GIL for every 1 MiB chunk (its message is built in Python, then handed to gRPC). Heavy
generation threads run 10 nice steps below the serving threads, so on these cores the sending thread comes
first; the speed lost beyond the controls is lost to the GIL.

The stall watch cancelled the readers {self.stall_cancel_seconds:.1f} s after the first of them was opened
(`--stall-seconds {STALL_SECONDS:g}`, checked twice a second); the heavy requests' callers then cancelled them,
and the server was back to nothing in flight {self.heavy_release_seconds:.1f} s later. Server peak RSS during
the phase: {final_rss}.
"""


def run_hostile(log: Callable[[str], None] = lambda line: None) -> HostileFigures:
    figures = HostileFigures()
    config = server_config(HOSTILE_FLAGS)
    figures.heavy = heavy_plan(config)
    figures.heavy_admitted_bytes = sum(request.nbytes + cost.working_bytes for request, cost in figures.heavy)
    reader_bytes = math.prod(READER_SHAPE) * 4
    figures.readers_held_bytes = STALLED_READERS * reader_bytes
    if figures.readers_held_bytes + figures.heavy_admitted_bytes > config.max_inflight_bytes:
        raise ValueError("the phase's readers and heavy requests do not fit its --max-inflight-bytes")
    server = start_installed_server(*HOSTILE_FLAGS)
    health_target = f"127.0.0.1:{server.announced_port('health')}"
    channels: list[grpc.Channel] = []
    try:
        _hostile(server, health_target, figures, channels, log)
    except Exception as error:  # noqa: BLE001 - reported as a failed line, with what was measured so far
        figures.errors.append(f"{type(error).__name__}: {error}")
    finally:
        for channel in channels:
            channel.close()
        figures.server_alive = server.alive()
        if figures.server_alive:
            figures.server_rss_peak_bytes = read_status(server.process.pid, "VmHWM")
        started = time.monotonic()
        figures.server_exit = server.stop()
        figures.stop_seconds = time.monotonic() - started
    return figures


def _hostile(
    server: ServerProcess,
    health_target: str,
    figures: HostileFigures,
    channels: list[grpc.Channel],
    log: Callable[[str], None],
) -> None:
    expected = CACHED.reference(CACHED.seed)

    def cached_fetch(client: initserve.Client) -> float:
        started = time.monotonic()
        result = client.fetch(CACHED.shape, CACHED.scheme, seed=CACHED.seed)
        seconds = time.monotonic() - started
        if not same_bytes(result.tensor, expected):
            figures.wrong_bytes += 1
            figures.errors.append("the 256 MiB fetch: wrong bytes")
        return seconds

    def stream(request: pb.InitRequest) -> grpc.Call:
        channel = own_channel(server.target)
        channels.append(channel)
        return pb_grpc.InitServiceStub(channel).Init(request)

    with initserve.Client(server.target, timeout=120) as client:
        cached_fetch(client)  # generated, and cached from now on
        figures.idle_seconds = [cached_fetch(client) for _ in range(SPEED_SAMPLES)]
        burners = [subprocess.Popen([sys.executable, "-c", BURNER]) for _ in range(WORKERS)]
        try:
            figures.burner_seconds = [cached_fetch(client) for _ in range(SPEED_SAMPLES)]
        finally:
            for burner in burners:
                burner.kill()
                burner.wait()
        qrs = [stream(message(request)) for request in QR_CONTROL]
        settled(server.target, lambda s: s.running_generations == len(QR_CONTROL), "the control QRs running")
        figures.qr_seconds = [cached_fetch(client) for _ in range(SPEED_SAMPLES)]
        figures.qr_control_held = stats(server.target).running_generations == len(QR_CONTROL)
        for call in qrs:
            call.cancel()  # a QR cannot be interrupted: it ends, and its tensor is let go
        settled(server.target, lambda s: s.running_generations == 0 and s.inflight_bytes == 0, "the QRs ended",
                SETTLE_SECONDS)  # fmt: skip
        log(f"hostile: cached fetch idle {figures.idle_seconds}, CPU control {figures.burner_seconds}, "
            f"QR control {figures.qr_seconds}")  # fmt: skip

        readers_opened = time.monotonic()
        readers = [stream(pb.InitRequest(scheme="normal", shape=READER_SHAPE)) for _ in range(STALLED_READERS)]
        settled(
            server.target,
            lambda s: s.inflight_requests == STALLED_READERS and s.running_generations + s.queued_generations == 0,
            "holding every stalled reader, generated",
            SETTLE_SECONDS,
        )
        heavy = []
        for index, (request, _) in enumerate(figures.heavy):
            heavy.append(stream(message(request)))
            queued = max(0, index + 1 - WORKERS)
            settled(server.target, lambda s, queued=queued: s.queued_generations == queued, "heavy requests queued")
        settled(server.target, lambda s: s.running_generations == WORKERS, "the heavy generations running")
        log(f"hostile: {STALLED_READERS} readers and {len(heavy)} heavy requests held")

        deadline = readers_opened + STALL_SECONDS - MEASURE_MARGIN_SECONDS
        seed = 1000
        while time.monotonic() < deadline:
            for target, samples in ((server.target, figures.health_main), (health_target, figures.health_port)):
                for service in ("", SERVICE):
                    started = time.monotonic()
                    try:
                        status = health(target, service, timeout=HEALTH_TIMEOUT_SECONDS)
                    except grpc.RpcError as error:
                        status = error.code()
                    samples.append(time.monotonic() - started)
                    if status != SERVING:
                        figures.health_not_serving.append(f"{target} {service!r}: {status}")
            seed += 1
            started = time.monotonic()
            try:
                with initserve.Client(server.target, timeout=SMALL_TIMEOUT_SECONDS) as fresh:
                    figures.wrong_bytes += not same_bytes(fresh.normal((4, 4), seed=seed),
                                                          reference("normal", (4, 4), seed=seed))  # fmt: skip
            except initserve.InitServeError as error:
                figures.errors.append(f"the [4, 4] with seed {seed}: {type(error).__name__}: {error}")
            figures.small.append(time.monotonic() - started)
            if time.monotonic() < deadline:
                figures.loaded_seconds.append(cached_fetch(client))
        held = stats(server.target)
        figures.held_while_measuring = (
            f"{held.inflight_requests} in flight, {held.running_generations} running, "
            f"{held.queued_generations} queued, {held.stalled_streams} stalls"
        )
        figures.held_ok = held.inflight_requests == STALLED_READERS + len(heavy) and held.stalled_streams == 0
        log(f"hostile: measured; {figures.held_while_measuring}")

        figures.after_stall = settled(
            server.target,
            lambda s: s.stalled_streams >= STALLED_READERS and s.inflight_requests <= len(heavy),
            "readers cancelled by the stall watch",
            STALL_SECONDS + SETTLE_SECONDS,
        )
        figures.stall_cancel_seconds = time.monotonic() - readers_opened
        for call in readers:
            try:
                for _ in call:
                    pass
            except grpc.RpcError as error:
                figures.readers_cancelled += error.code() == grpc.StatusCode.CANCELLED
        log(f"hostile: readers cancelled after {figures.stall_cancel_seconds:.1f} s")

        cancelled = time.monotonic()
        for call in heavy:
            call.cancel()
        figures.final = settled(
            server.target,
            lambda s: s.inflight_requests == 0 and s.inflight_bytes == 0 and s.running_generations == 0
            and s.queued_generations == 0,
            "everything released after the heavy requests were cancelled",
            SETTLE_SECONDS,
        )  # fmt: skip
        figures.heavy_release_seconds = time.monotonic() - cancelled


# --- the memory phase -----------------------------------------------------------------------------------------------

MEMORY_FLAGS: tuple[str, ...] = ("--workers", str(WORKERS), "--cache-bytes", "1G", "--max-inflight-bytes", "1G")
MEMORY_CLIENTS = 4
MEMORY_SECONDS = 90.0
RSS_FACTOR = 1.1
RSS_OVERHEAD_BYTES = 300 * MIB
RSS_SAMPLE_SECONDS = 0.05
FETCH_TIMEOUT = 180.0
RETRY_LATER_PAUSE_SECONDS = 0.2
WIDE = 16 * 1024  # columns of the 2-D shapes: a row is 64 KiB of float32
# Every scheme, each made as large as the server admits: the fills up to the in-flight budget, the schemes with
# working memory (trunc_normal's two branches, orthogonal's QR, sparse's permutations) to what leaves room for it.
MEMORY_TEMPLATES: tuple[Callable[[int], Request], ...] = (
    lambda n: Request("uniform", (n, WIDE), seed=1),
    lambda n: Request("normal", (n, WIDE), seed=2),
    lambda n: Request("constant", (n, WIDE), params=(("val", 0.5),)),
    lambda n: Request("ones", (n, WIDE)),
    lambda n: Request("zeros", (n, WIDE)),
    lambda n: Request("eye", (n, WIDE)),
    lambda n: Request("dirac", (n, WIDE, 1)),
    lambda n: Request("xavier_uniform", (n, WIDE), seed=8),
    lambda n: Request("xavier_normal", (n, WIDE), seed=9),
    lambda n: Request("kaiming_uniform", (n, WIDE), seed=10),
    lambda n: Request("kaiming_normal", (n, WIDE), seed=11),
    lambda n: Request("trunc_normal", (n, 1024), seed=12),  # the normal branch: 3 tensors and a mask beside it
    lambda n: Request("trunc_normal", (n, 1024), seed=13, params=(("a", 0.5), ("b", 0.6))),  # uniform: 4 and a mask
    lambda n: Request("orthogonal", (n, 1024), seed=14),  # a tall QR: Q, R, the flattened copy, LAPACK's workspace
    lambda n: Request("sparse", (WIDE, n), seed=15, params=(("sparsity", 0.1),)),
)


@dataclass
class MemoryFigures:
    flags: tuple[str, ...] = MEMORY_FLAGS
    config: ServerConfig | None = None
    plan: list[tuple[Request, costs.Cost]] = field(default_factory=list)
    reference_seconds: float = 0.0
    seconds: float = 0.0
    idle_rss: int = 0
    peak_hwm: int = 0  # VmHWM after the load, over idle
    peak_sampled: int = 0  # the highest VmRSS sampled, over idle
    outcomes: Counter[str] = field(default_factory=Counter)  # "exact", "retry later", "wrong", "error"
    by_request: Counter[str] = field(default_factory=Counter)  # exact results per request
    bytes_verified: int = 0
    failures: list[str] = field(default_factory=list)
    final: pb.ServerStats | None = None
    server_alive: bool = False
    server_exit: int | None = None

    @property
    def budgets(self) -> int:
        return self.config.cache_bytes + self.config.max_inflight_bytes if self.config else 0

    @property
    def bound(self) -> float:
        return RSS_FACTOR * self.budgets + RSS_OVERHEAD_BYTES

    @property
    def peak(self) -> int:
        return max(self.peak_hwm, self.peak_sampled)

    def checks(self) -> list[Check]:
        covered = {request.scheme for request, _ in self.plan if self.by_request[describe(request)]}
        return [
            Check(
                "memory: peak RSS over idle, every scheme at its largest admitted size",
                f"{_mib(self.peak)} (VmHWM {_mib(self.peak_hwm)}, sampled VmRSS {_mib(self.peak_sampled)})",
                f"<= {RSS_FACTOR:g} x {_mib(self.budgets)} + {_mib(RSS_OVERHEAD_BYTES)} = {_mib(self.bound)}",
                self.peak_hwm > 0 and self.peak <= self.bound,
            ),
            Check(
                "memory: answers",
                ", ".join(f"{count} {kind}" for kind, count in sorted(self.outcomes.items())) or "none",
                "exact or RESOURCE_EXHAUSTED retry later; no other",
                self.outcomes["exact"] > 0 and not self.failures,
            ),
            Check(
                "memory: schemes served exactly at least once",
                f"{len(covered)} of 14",
                "14 of 14",
                len(covered) == 14,
            ),
            Check(
                "memory: the server process",
                f"alive to the end: {self.server_alive}; SIGTERM: exit {self.server_exit}",
                "alive; exit 0",
                self.server_alive and self.server_exit == 0,
            ),
        ]

    def markdown(self) -> str:
        rows = "\n".join(
            f"| {describe(request)} | {_mib(request.nbytes)} | {_mib(cost.working_bytes)} | "
            f"{cost.work_seconds:.1f} s | {self.by_request[describe(request)]} |"
            for request, cost in self.plan
        )
        final = self.final
        server = (
            f"{final.generations} generations, {final.cache_hits} cache hits, {final.single_flight_joins} joins, "
            f"{final.cache_evictions} evictions, {final.refused_inflight_bytes} refused for the in-flight budget"
            if final
            else "no final Describe"
        )
        failures = "".join(f"\n- {line}" for line in self.failures[:20]) or " none."
        return f"""## Memory: every scheme at its largest admitted size, at once

`initserve-server {" ".join(self.flags)}` (and `--host 127.0.0.1 --port 0`): budgets
{_mib(self.budgets)} (cache + in flight). {MEMORY_CLIENTS} clients at once for {self.seconds:.0f} s, each going
through these in turn from its own starting point (the default memory policy; a "retry later" is asked again),
each request the largest of its shape that the server admits:
its tensor and the working memory the cost model counts for it within `--max-inflight-bytes`, its estimated
work within `--max-work-seconds`. Every result was compared with the local reference by its SHA-256 (the
references, {_mib(sum(request.nbytes for request, _ in self.plan))} in all, computed once beforehand in
{self.reference_seconds:.0f} s); a RESOURCE_EXHAUSTED "retry later" is the in-flight budget at work (one
largest tensor at a time), and the client asks again {RETRY_LATER_PAUSE_SECONDS:g} s later.

| request | tensor | working memory | estimated work | exact results |
|---|---|---|---|---|
{rows}

Peak RSS over idle ({_mib(self.idle_rss)} idle, after one small fetch; `/proc/PID/clear_refs` 5, then `VmHWM`
at the end and `VmRSS` every {RSS_SAMPLE_SECONDS * 1000:.0f} ms): **{_mib(self.peak)}**, against
{_mib(self.bound)}. Results: {", ".join(f"{count} {kind}" for kind, count in sorted(self.outcomes.items()))},
{self.bytes_verified / GIB:.1f} GiB verified. The server: {server}.

Failures:{failures}
"""


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _reference_digest(request: Request) -> str:
    return _digest(request.reference(request.seed or 0))


def memory_plan(config: ServerConfig) -> list[tuple[Request, costs.Cost]]:
    plan = []
    for make in MEMORY_TEMPLATES:
        request = largest(make, config)
        cost = admitted_cost(request, config)
        assert cost is not None
        plan.append((request, cost))
    return plan


def run_memory(
    seconds: float = MEMORY_SECONDS, clients: int = MEMORY_CLIENTS, log: Callable[[str], None] = lambda line: None
) -> MemoryFigures:
    figures = MemoryFigures()
    figures.config = config = server_config(MEMORY_FLAGS)
    figures.plan = memory_plan(config)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # torch runs one intra-op thread each (conftest)
        requests = [request for request, _ in figures.plan]
        digests = dict(zip(requests, pool.map(_reference_digest, requests), strict=True))
    figures.reference_seconds = time.monotonic() - started
    log(f"memory: {len(digests)} references in {figures.reference_seconds:.0f} s")
    server = start_installed_server(*MEMORY_FLAGS)
    try:
        _memory(server, digests, figures, seconds, clients, log)
    except Exception as error:  # noqa: BLE001 - reported as a failed line
        figures.failures.append(f"{type(error).__name__}: {error}")
    finally:
        figures.server_alive = server.alive()
        figures.server_exit = server.stop()
    return figures


def _memory(
    server: ServerProcess,
    digests: dict[Request, str],
    figures: MemoryFigures,
    seconds: float,
    clients: int,
    log: Callable[[str], None],
) -> None:
    pid = server.process.pid
    with initserve.Client(server.target, timeout=60) as client:
        client.normal((3, 5), seed=1)  # gRPC's and torch's own start-up allocations
    figures.idle_rss = read_status(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    stop = threading.Event()
    lock = threading.Lock()
    requests = list(digests)

    def sample() -> None:
        while not stop.wait(RSS_SAMPLE_SECONDS):
            figures.peak_sampled = max(figures.peak_sampled, read_status(pid, "VmRSS") - figures.idle_rss)

    def client_loop(index: int) -> None:
        # Each client goes through every request in turn, from its own starting point, and asks again for what it
        # was told to retry later (as a job needing that tensor would).
        turn = index * len(requests) // clients
        with initserve.Client(server.target, timeout=FETCH_TIMEOUT) as client:
            while not stop.is_set():
                request = requests[turn % len(requests)]
                try:
                    tensor = client.fetch(request.shape, request.scheme, seed=request.seed, dtype=request.dtype,
                                          **dict(request.params)).tensor  # fmt: skip
                    exact = _digest(tensor) == digests[request]
                    del tensor
                except initserve.ResourceExhausted as error:
                    with lock:
                        if "retry later" in str(error):
                            figures.outcomes["retry later"] += 1
                        else:
                            figures.outcomes["error"] += 1
                            figures.failures.append(f"{describe(request)}: {error}")
                    stop.wait(RETRY_LATER_PAUSE_SECONDS)
                    continue
                except Exception as error:  # noqa: BLE001 - reported
                    turn += 1
                    with lock:
                        figures.outcomes["error"] += 1
                        figures.failures.append(f"{describe(request)}: {type(error).__name__}: {error}")
                    continue
                turn += 1
                with lock:
                    if exact:
                        figures.outcomes["exact"] += 1
                        figures.by_request[describe(request)] += 1
                        figures.bytes_verified += request.nbytes
                    else:
                        figures.outcomes["wrong"] += 1
                        figures.failures.append(f"{describe(request)}: wrong bytes")

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    threads = [threading.Thread(target=client_loop, args=(index,), daemon=True) for index in range(clients)]
    started = time.monotonic()
    sampler.start()
    for thread in threads:
        thread.start()
    while (left := seconds - (time.monotonic() - started)) > 0:
        time.sleep(min(left, 10.0))
        log(f"memory: {time.monotonic() - started:5.0f}s {dict(figures.outcomes)}, peak {_mib(figures.peak_sampled)}")
    stop.set()
    for thread in threads:
        thread.join(FETCH_TIMEOUT + 30)
        if thread.is_alive():
            figures.failures.append(f"a client did not finish within {FETCH_TIMEOUT + 30:.0f} s of the stop")
    figures.seconds = time.monotonic() - started
    sampler.join(5)
    figures.peak_hwm = read_status(pid, "VmHWM") - figures.idle_rss
    figures.final = stats(server.target)
    log(f"memory: peak {_mib(figures.peak)} over idle {_mib(figures.idle_rss)}; {dict(figures.outcomes)}")

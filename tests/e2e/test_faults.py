"""Faults end to end, against real server processes: replicas killed with SIGKILL mid-stream, a TCP proxy that
cuts connections or flips bytes, the raw resume semantics of the Init call, graceful shutdown with a stream in
flight, and a short soak (tests/soak.py) of all of them at once.

The property under test everywhere: a fetch returns the contract's exact bytes, or raises an InitServeError;
never wrong bytes. Every wait is bounded, and every process and proxy a test starts is stopped in ``finally``.
"""

from __future__ import annotations

import contextlib
import glob
import random
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.internal.encoder import _VarintBytes
from grpc_health.v1 import health_pb2, health_pb2_grpc

import initserve
from initserve_protocol.checksum import tensor_checksum
from initserve_protocol.codec import tensor_bytes
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_protocol.v1 import initserve_pb2_grpc as pb_grpc
from tests.conftest import SERVER_STOP_SECONDS, ServerProcess, reference, same_bytes, start_server

BIG_SHAPE = (4096, 4096)  # float32: 64 MiB, 64 chunks of the default 1 MiB
BIG_BYTES = 4096 * 4096 * 4
MEDIUM_SHAPE = (1024, 1024)  # float32: 4 MiB
MEDIUM_BYTES = 1024 * 1024 * 4
MEDIUM_CHUNK = 256 << 10  # 16 chunks per stream
WAIT_SECONDS = 30.0  # the bound on every wait for a server, a thread or a stream
FETCH_TIMEOUT = 60.0
RETRY = initserve.RetryPolicy(max_attempts=6, initial_backoff=0.05, max_backoff=0.5)
# A channel of its own subchannels: by default gRPC shares connections between channels with equal options, so a
# new client could inherit a READY connection to a replica the test has just paused.
# Connections of the test's own; BDP probing off, so HTTP/2 flow control keeps a stream's server a few MiB ahead
# of what the client has read: with it, the window grew past the last third of a 64 MiB stream, whose server had
# then sent everything before the Killer looked (seen in a full run once the client received faster).
OWN_CONNECTIONS = (("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0))


def server_id(process: subprocess.Popen) -> str:
    """The id a replica puts in every header (``<hostname>:<pid>``); the replicas run on this host."""
    return f"{socket.gethostname()}:{process.pid}"


def start_replicas(count: int, *flags: str) -> list[ServerProcess]:
    """``count`` servers started concurrently (each is its own process); all or none are left running."""
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(start_server, *flags) for _ in range(count)]
    started = [future.result() for future in futures if future.exception() is None]
    failed = [future.exception() for future in futures if future.exception() is not None]
    if failed:
        stop_replicas(started)
        raise failed[0]
    return started


def stop_replicas(replicas: Iterable[ServerProcess]) -> None:
    """Kill every replica still running (continuing any a test paused first) and reap it."""
    for replica in replicas:
        if replica.alive():
            with contextlib.suppress(ProcessLookupError):
                replica.process.send_signal(signal.SIGCONT)
                replica.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            replica.process.wait(SERVER_STOP_SECONDS)


def pause(replica: ServerProcess) -> None:
    """SIGSTOP ``replica`` and wait until every one of its threads is stopped (signal delivery is asynchronous: on a
    busy machine a thread may still answer a new connection after kill(2) has returned)."""
    replica.process.send_signal(signal.SIGSTOP)

    def all_threads_stopped() -> bool:
        states = []
        for path in glob.glob(f"/proc/{replica.process.pid}/task/*/stat"):
            with contextlib.suppress(OSError), open(path) as stat:
                states.append(stat.read().rsplit(")", 1)[1].split()[0])
        return bool(states) and all(state in ("T", "t") for state in states)

    wait_until(all_threads_stopped, f"replica {replica.process.pid} to stop")


def resume(replica: ServerProcess) -> None:
    with contextlib.suppress(ProcessLookupError):
        replica.process.send_signal(signal.SIGCONT)


def wait_until(condition: Callable[[], bool], what: str, seconds: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        time.sleep(0.02)


def describe(replica: ServerProcess) -> pb.ServerInfo:
    with replica.client(timeout=WAIT_SECONDS) as client:
        return client.describe()


# --- A TCP proxy that cuts or corrupts ---------------------------------------------------------------------------


@dataclass
class Fault:
    """One fault in one proxied connection's server→client bytes, at byte ``at`` of that direction.

    ``cut``: forward the bytes before ``at``, then close both sides. ``flip``: xor the byte at ``at`` with
    ``mask``. ``flip-pattern``: xor byte ``pattern_index`` of the first occurrence of ``pattern`` that starts
    at or after ``at`` and lies within one received piece (a header field, say) with ``mask``.
    """

    kind: str
    at: int = 0
    mask: int = 0x01
    pattern: bytes = b""
    pattern_index: int = 0
    on_fire: Callable[[], None] | None = None  # called (on the proxy's thread) right after the fault is applied
    fired: bool = False


PROXY_POLL_SECONDS = 0.2
PROXY_PIECE_BYTES = 64 << 10


class FaultProxy:
    """A pure-socket TCP proxy on 127.0.0.1 (port 0) to the local port ``upstream`` (or ``upstream()``).

    Connection number n (0-based, in accept order) gets the faults ``faults(n)`` yields, in order of ``at``; the
    client→server direction always passes unchanged. HTTP/2 framing, HPACK and gRPC framing all pass through
    the proxy as opaque bytes, so a fault may land anywhere: in a chunk, a header, a frame header, a trailer.
    """

    def __init__(self, upstream: int | Callable[[], int], faults: Callable[[int], Iterable[Fault]]) -> None:
        self._upstream = upstream if callable(upstream) else (lambda: upstream)
        self._faults = faults
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(PROXY_POLL_SECONDS)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._closed = threading.Event()
        self.connections = 0
        self.fired: list[Fault] = []
        self._acceptor = threading.Thread(target=self._accept, name=f"proxy:{self.port}", daemon=True)
        self._acceptor.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def fired_kinds(self) -> Counter[str]:
        with self._lock:
            return Counter(fault.kind for fault in self.fired)

    def close(self) -> None:
        self._closed.set()
        self._acceptor.join(WAIT_SECONDS)
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            _hang_up(sock)
        for thread in threads:
            thread.join(WAIT_SECONDS)
        self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            with self._lock:
                index = self.connections
                self.connections += 1
            try:
                upstream = socket.create_connection(("127.0.0.1", self._upstream()), timeout=5.0)
                upstream.settimeout(None)
            except OSError:  # the replica is down: the client sees its connection dropped
                _hang_up(client)
                continue
            with self._lock:
                self._sockets.update((client, upstream))
            for source, sink, faults in ((client, upstream, ()), (upstream, client, self._faults(index))):
                thread = threading.Thread(target=self._pump, args=(source, sink, iter(faults)), daemon=True)
                with self._lock:
                    self._threads.add(thread)
                thread.start()

    def _pump(self, source: socket.socket, sink: socket.socket, faults: Iterator[Fault]) -> None:
        position = 0  # bytes of this direction forwarded so far
        pending = next(faults, None)
        try:
            while True:
                data = source.recv(PROXY_PIECE_BYTES)
                if not data:
                    break
                cut = False
                while pending is not None and pending.at < position + len(data):
                    data, cut = self._apply(pending, data, position)
                    if not pending.fired:
                        break  # a pattern not in this piece: look again in the next one
                    pending = next(faults, None)
                    if cut:
                        break
                sink.sendall(data)
                position += len(data)
                if cut:
                    break
        except OSError:
            pass
        finally:
            _hang_up(source)
            _hang_up(sink)
            with self._lock:
                self._sockets.difference_update((source, sink))
                self._threads.discard(threading.current_thread())

    def _apply(self, fault: Fault, data: bytes, position: int) -> tuple[bytes, bool]:
        start = max(0, fault.at - position)
        if fault.kind == "cut":
            self._record(fault)
            return data[:start], True
        index = start
        if fault.kind == "flip-pattern":
            index = data.find(fault.pattern, start)
            if index < 0:
                return data, False
            index += fault.pattern_index
        changed = bytearray(data)
        changed[index] ^= fault.mask
        self._record(fault)
        return bytes(changed), False

    def _record(self, fault: Fault) -> None:
        fault.fired = True
        with self._lock:
            self.fired.append(fault)
        if fault.on_fire is not None:
            fault.on_fire()


def _hang_up(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def first_connection(*faults: Fault) -> Callable[[int], list[Fault]]:
    """Faults for the proxy's first connection only: a reconnecting client gets a clean one."""
    return lambda index: list(faults) if index == 0 else []


# --- Replicas killed mid-stream ----------------------------------------------------------------------------------


class Killer:
    """A progress callback that, once ``kill_at`` bytes are verified, continues the paused ``others``, waits until
    they answer, checks that ``victim`` serves exactly one stream (the one being read), and SIGKILLs it."""

    def __init__(self, victim: ServerProcess, others: list[ServerProcess], kill_at: int) -> None:
        self.victim, self.others, self.kill_at = victim, others, kill_at
        self.killed_after = 0  # bytes verified when the victim died

    def __call__(self, received: int, total: int) -> None:
        assert total == BIG_BYTES
        if self.killed_after or received < self.kill_at:
            return
        for other in self.others:
            resume(other)
        for other in self.others:
            describe(other)
        assert describe(self.victim).stats.inflight_requests == 1
        self.victim.process.kill()
        self.victim.process.wait(WAIT_SECONDS)
        self.killed_after = received


@pytest.mark.parametrize("cache", ["cache", "no-cache"])
def test_a_replica_killed_mid_stream_is_resumed_on_another(cache: str) -> None:
    """Three replicas; in round i replica i serves the first stream and is SIGKILLed part-way through it.

    How the victim is chosen, deterministically and without touching the client: before the fetch, the two
    other replicas are paused with SIGSTOP (until all their threads are stopped). The kernel accepts TCP
    connections to them, but they never send HTTP/2 SETTINGS, and gRPC only calls a connection READY once it has
    them; so the client's round-robin channel (with connections of its own: OWN_CONNECTIONS) sees only the
    victim READY and sends the first stream there. From the progress callback (once ``kill_at`` bytes are
    verified), the test continues the others (SIGCONT), waits until they answer Describe, checks that the victim
    has exactly one Init in flight (this stream), and kills it. The result's ``server_ids`` then prove it: the
    victim's ``<host>:<pid>`` first, a surviving replica's after. The killed replica is restarted on its port
    before the next round.

    With ``no-cache`` (--cache-bytes 0) every resume regenerates the tensor on the surviving replica; with the
    cache, every replica was warmed first, so the victim's stream is a cache hit.
    """
    flags = ("--cache-bytes", "0") if cache == "no-cache" else ()
    seed = 2024
    expected = reference("normal", BIG_SHAPE, seed=seed)
    replicas = start_replicas(3, *flags)
    try:
        if cache == "cache":
            for replica in replicas:
                with replica.client(timeout=FETCH_TIMEOUT) as warm:
                    assert same_bytes(warm.fetch(BIG_SHAPE, "normal", seed=seed).tensor, expected)
        for round_, kill_at in enumerate([1 << 20, BIG_BYTES // 3, 2 * BIG_BYTES // 3]):
            victim = replicas[round_]
            others = [replica for index, replica in enumerate(replicas) if index != round_]
            killer = Killer(victim, others, kill_at)
            for other in others:
                pause(other)
            try:
                targets = [replica.target for replica in replicas]
                with initserve.Client(targets, timeout=FETCH_TIMEOUT, retry=RETRY, options=OWN_CONNECTIONS) as client:
                    result = client.fetch(BIG_SHAPE, "normal", seed=seed, progress=killer)
            finally:
                for other in others:
                    resume(other)

            assert killer.killed_after, "the progress callback never reached the kill point"
            assert victim.process.returncode == -signal.SIGKILL
            assert same_bytes(result.tensor, expected)
            assert result.seed == seed
            assert result.attempts >= 2
            assert len(result.resumed_at) == result.attempts - 1
            assert result.resumed_at[0] >= killer.killed_after > 0
            assert all(offset > 0 for offset in result.resumed_at)
            assert result.server_ids[0] == server_id(victim.process)
            survivors = {server_id(other.process): other for other in others}
            assert result.server_ids[1] in survivors
            assert set(result.server_ids[1:]) <= set(survivors)
            assert result.header.cache_hit == (cache == "cache")
            if cache == "no-cache":
                resumed_on = describe(survivors[result.server_ids[1]]).stats
                assert resumed_on.cache_hits == 0 and resumed_on.generations >= 1

            if round_ < 2:  # restarted (on its port if it is still free), so every round has three replicas
                try:
                    replicas[round_] = start_server(*flags, "--port", str(victim.port))
                except RuntimeError:  # another process took the port meanwhile; each round builds a new client
                    replicas[round_] = start_server(*flags)
    finally:
        stop_replicas(replicas)


# --- A proxy that cuts or corrupts -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair() -> Iterator[list[ServerProcess]]:
    """Two replicas for the proxy tests: the proxy fronts the first, the second is a direct route."""
    replicas = start_replicas(2)
    try:
        yield replicas
    finally:
        stop_replicas(replicas)


def random_fault(rng: random.Random, *, anywhere: bool) -> Fault:
    """A cut, or a flip of 1 to 8 bits of one byte, at a random point of the first stream.

    ``anywhere``: a quarter of the points fall in the first 1024 bytes (HTTP/2 settings, the response headers,
    the Header message), where damage is not a chunk's; otherwise the point is in the tensor's data.
    """
    if anywhere and rng.random() < 0.25:
        at = rng.randrange(1024)
    else:
        at = rng.randrange(1024, MEDIUM_BYTES)
    if rng.random() < 0.5:
        return Fault("cut", at=at)
    return Fault("flip", at=at, mask=rng.randrange(1, 256))


@pytest.mark.parametrize("seed", range(10))
def test_a_cutting_or_corrupting_proxy_never_yields_wrong_bytes(pair: list[ServerProcess], seed: int) -> None:
    """Per case, three fetches whose first stream goes through a proxy that damages it at a random point.

    Fetch 0: the proxy is the only route and the fault is in the data, so the fetch must be resumed. Fetches 1
    and 2: the fault may be anywhere, and the route is the proxy alone (the resume reconnects through it) or
    the proxy plus a direct route to the second replica. So that the first stream does take the proxy in that
    case, the direct replica is paused (see the killed-replica test: round robin only picks a READY connection)
    until the fault fires; the resume may then take either route. Each fetch returns the exact bytes or raises an
    InitServeError; the case's outcomes are counted (pytest -s prints them).
    """
    rng = random.Random(seed)
    direct = pair[1]
    outcomes: list[str] = []
    counts: Counter[str] = Counter()
    for fetch in range(3):
        tensor_seed = rng.randrange(1 << 63)
        two_routes = fetch > 0 and rng.random() < 0.5
        fault = random_fault(rng, anywhere=fetch > 0)
        if two_routes:
            fault.on_fire = lambda: resume(direct)
            pause(direct)
        try:
            with FaultProxy(pair[0].port, first_connection(fault)) as proxy:
                targets = [proxy.target, direct.target] if two_routes else [proxy.target]
                options = OWN_CONNECTIONS
                try:
                    with initserve.Client(targets, timeout=FETCH_TIMEOUT, retry=RETRY, options=options) as client:
                        result = client.fetch(MEDIUM_SHAPE, "normal", seed=tensor_seed, chunk_bytes=MEDIUM_CHUNK)
                except initserve.InitServeError as error:
                    outcome = f"raised {type(error).__name__}"
                else:
                    expected = reference("normal", MEDIUM_SHAPE, seed=tensor_seed)
                    assert same_bytes(result.tensor, expected), (
                        f"wrong bytes after {fault} ({result.attempts} streams, resumed at {result.resumed_at})"
                    )
                    outcome = "exact, resumed" if result.attempts >= 2 else "exact, one stream"
        finally:
            resume(direct)
        assert fault.fired, f"the first stream never reached {fault}"
        if fetch == 0:
            assert outcome == "exact, resumed", (fault, outcome)
        routes = "proxy+direct" if two_routes else "proxy"
        outcomes.append(f"{fault.kind}@{fault.at} via {routes}: {outcome}")
        counts[outcome] += 1
    print(f"seed {seed}: {outcomes}")
    assert counts["exact, resumed"] >= 1, counts  # fetch 0's, at least
    assert sum(counts.values()) == 3


def test_a_route_that_breaks_every_connection_is_routed_around(pair: list[ServerProcess]) -> None:
    """The proxy cuts every connection it carries, somewhere in the data; the direct route finishes the job."""
    rng = random.Random(7)

    def every_connection(index: int) -> list[Fault]:
        return [Fault("cut", at=rng.randrange(1024, MEDIUM_BYTES))]

    with FaultProxy(pair[0].port, every_connection) as proxy:
        with initserve.Client([proxy.target, pair[1].target], timeout=FETCH_TIMEOUT, retry=RETRY) as client:
            for seed in range(6):
                result = client.fetch(MEDIUM_SHAPE, "uniform", seed=seed, chunk_bytes=MEDIUM_CHUNK, a=-3.0, b=3.0)
                assert same_bytes(result.tensor, reference("uniform", MEDIUM_SHAPE, seed=seed, a=-3.0, b=3.0))
        assert proxy.fired_kinds()["cut"] >= 1  # round robin sent at least one stream through the proxy


@pytest.mark.parametrize("kind", ["cut", "flip"])
def test_a_resumed_request_without_a_seed_matches_the_seed_it_reports(pair: list[ServerProcess], kind: str) -> None:
    """No seed in the request: the server draws one; the resumed stream asks for that same seed."""
    fault = Fault(kind, at=(3 << 20) // 2, mask=0x40)  # in the data, 1.5 MiB in
    with FaultProxy(pair[0].port, first_connection(fault)) as proxy:
        with initserve.Client(proxy.target, timeout=FETCH_TIMEOUT, retry=RETRY) as client:
            result = client.fetch(MEDIUM_SHAPE, "kaiming_normal", chunk_bytes=MEDIUM_CHUNK, mode="fan_out")
    assert fault.fired
    assert result.attempts >= 2 and result.resumed_at[0] > 0
    assert result.seeded
    expected = reference("kaiming_normal", MEDIUM_SHAPE, seed=result.seed, mode="fan_out")
    assert same_bytes(result.tensor, expected)


@pytest.mark.parametrize("kind", ["cut", "flip"])
def test_a_resumed_named_slice_keeps_its_base_seed_and_slice(pair: list[ServerProcess], kind: str) -> None:
    """A derived seed is never sent back as the seed: the resumed stream asks for the same base seed, name and
    slice, and the result is the derived seed's slice."""
    fault = Fault(kind, at=(3 << 20) // 2, mask=0x40)  # in the data, 1.5 MiB into a 2 MiB slice
    slices = [initserve.Shard(dim=1, index=1, count=2)]
    with FaultProxy(pair[0].port, first_connection(fault)) as proxy:
        with initserve.Client(proxy.target, timeout=FETCH_TIMEOUT, retry=RETRY) as client:
            result = client.fetch(
                MEDIUM_SHAPE, "normal", seed=77, name="decoder.proj.weight", slices=slices, chunk_bytes=MEDIUM_CHUNK
            )
    assert fault.fired and result.attempts >= 2 and result.resumed_at[0] > 0
    derived = initserve.derive_seed(77, "decoder.proj.weight")
    assert result.seed == derived and result.header.base_seed == 77
    assert same_bytes(result.tensor, reference("normal", MEDIUM_SHAPE, seed=derived)[:, 512:])


@pytest.mark.parametrize("at_mib", [1.5, 4.0, 6.25])  # inside tensor 0, at the boundary, inside tensor 1
@pytest.mark.parametrize("kind", ["cut", "flip"])
@pytest.mark.parametrize("seeded", [True, False], ids=["base-seed", "drawn-seeds"])
def test_a_broken_init_many_resumes_at_the_first_unverified_tensor(
    pair: list[ServerProcess], at_mib: float, kind: str, seeded: bool
) -> None:
    specs = [initserve.TensorSpec(f"layer{i}.weight", MEDIUM_SHAPE, "normal") for i in range(3)]  # 4 MiB each
    fault = Fault(kind, at=int(at_mib * (1 << 20)), mask=0x40)
    with FaultProxy(pair[0].port, first_connection(fault)) as proxy:
        with initserve.Client(proxy.target, timeout=FETCH_TIMEOUT, retry=RETRY) as client:
            results = client.fetch_many(specs, seed=99 if seeded else None, chunk_bytes=MEDIUM_CHUNK)
    assert fault.fired
    attempts = {result.attempts for result in results.values()}
    assert attempts == {2}
    resumed = [results[spec.name].resumed_at for spec in specs]
    assert sum(len(offsets) for offsets in resumed) == 1  # exactly one tensor was resumed, from its last byte
    for spec in specs:
        result = results[spec.name]
        seed = initserve.derive_seed(99, spec.name) if seeded else result.seed
        assert result.seed == seed
        assert same_bytes(result.tensor, reference("normal", MEDIUM_SHAPE, seed=seed))


SEED_WITH_A_LONG_VARINT = 0x0123456789ABCDEF


@pytest.mark.parametrize("then_cut", [False, True], ids=["header-only", "header-then-cut"])
def test_a_damaged_header_seed_is_never_trusted(pair: list[ServerProcess], then_cut: bool) -> None:
    """One byte of the first Header's seed_used field (tag 4, varint) is damaged; optionally the connection is
    then cut, 2 MiB in. The fetch must raise, or return the requested seed's tensor and report that seed."""
    field = b"\x20" + _VarintBytes(SEED_WITH_A_LONG_VARINT)  # Header.seed_used, as serialized
    faults = [Fault("flip-pattern", pattern=field, pattern_index=1, mask=0x01)]
    if then_cut:
        faults.append(Fault("cut", at=2 << 20))
    with FaultProxy(pair[0].port, first_connection(*faults)) as proxy:
        with initserve.Client(proxy.target, timeout=FETCH_TIMEOUT, retry=RETRY) as client:
            try:
                result = client.fetch(MEDIUM_SHAPE, "normal", seed=SEED_WITH_A_LONG_VARINT, chunk_bytes=MEDIUM_CHUNK)
            except initserve.InitServeError:
                return
    assert all(fault.fired for fault in faults)
    assert result.seed == SEED_WITH_A_LONG_VARINT
    assert same_bytes(result.tensor, reference("normal", MEDIUM_SHAPE, seed=SEED_WITH_A_LONG_VARINT))


# --- Resume semantics on the wire --------------------------------------------------------------------------------

RAW_SHAPE = (50, 70)  # float32: 14000 bytes
RAW_BYTES = 50 * 70 * 4
RAW_CHUNK = 1000


@pytest.fixture()
def stub(server: ServerProcess) -> Iterator[pb_grpc.InitServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.InitServiceStub(channel)


def raw_request(offset: int = 0) -> pb.InitRequest:
    return pb.InitRequest(
        scheme="xavier_uniform",
        shape=RAW_SHAPE,
        dtype=pb.DTYPE_FLOAT32,
        params=pb.InitParams(gain=1.5),
        seed=77,
        chunk_bytes=RAW_CHUNK,
        offset=offset,
    )


def split(messages: list[pb.InitResponse]) -> tuple[pb.Header, list[pb.Chunk], pb.Trailer]:
    parts = [message.WhichOneof("part") for message in messages]
    assert parts == ["header"] + ["chunk"] * (len(messages) - 2) + ["trailer"]
    return messages[0].header, [message.chunk for message in messages[1:-1]], messages[-1].trailer


@pytest.mark.parametrize("offset", [1, 7, RAW_CHUNK, 4321, RAW_BYTES - 1])
def test_a_stream_from_an_offset_carries_the_rest_and_the_whole_tensors_checksum(stub, offset: int) -> None:
    expected = reference("xavier_uniform", RAW_SHAPE, seed=77, gain=1.5)
    expected_bytes = bytes(tensor_bytes(expected))
    full_header, full_chunks, full_trailer = split(list(stub.Init(raw_request(), timeout=WAIT_SECONDS)))
    assert full_header.offset == 0 and b"".join(c.data for c in full_chunks) == expected_bytes
    assert full_trailer.checksum == tensor_checksum(expected_bytes)

    header, chunks, trailer = split(list(stub.Init(raw_request(offset), timeout=WAIT_SECONDS)))
    assert header.offset == offset
    assert header.total_bytes == RAW_BYTES and header.seed_used == 77 and header.chunk_bytes == RAW_CHUNK
    starts = [chunk.offset for chunk in chunks]
    assert starts == list(range(offset, RAW_BYTES, RAW_CHUNK))  # contiguous from the offset, chunk by chunk
    assert b"".join(chunk.data for chunk in chunks) == expected_bytes[offset:]
    assert trailer.checksum == full_trailer.checksum  # the whole tensor's, not the suffix's


def test_a_stream_from_the_end_is_a_header_and_a_trailer(stub) -> None:
    messages = list(stub.Init(raw_request(RAW_BYTES), timeout=WAIT_SECONDS))
    assert [message.WhichOneof("part") for message in messages] == ["header", "trailer"]
    assert messages[0].header.offset == RAW_BYTES
    full = list(stub.Init(raw_request(), timeout=WAIT_SECONDS))
    assert messages[1].trailer.checksum == full[-1].trailer.checksum


@pytest.mark.parametrize("offset", [RAW_BYTES + 1, 1 << 40])
def test_an_offset_past_the_end_is_out_of_range(stub, offset: int) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Init(raw_request(offset), timeout=WAIT_SECONDS))
    assert raised.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert raised.value.details() == f"offset {offset} is past the tensor's end ({RAW_BYTES} bytes)"


# --- Graceful shutdown with a stream in flight -------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_new_work_and_lets_the_stream_in_flight_finish(sig: int) -> None:
    """--grace-seconds 20; a 64 MiB fetch whose slow reader (10 ms per 1 MiB chunk) holds still at 2 MiB, so the
    stream is certainly in flight when the signal comes, until the checks are done; then it reads on.

    During the grace period: a Health.Watch opened before the signal reports NOT_SERVING for "" (a new Check
    would be refused with the rest: the listener is closed), new Init calls are refused with UNAVAILABLE, and
    the stream in flight completes with the exact bytes; then the process exits 0.
    """
    running = start_server("--grace-seconds", "20")
    outcome: dict[str, object] = {}
    stream_held = threading.Event()  # the reader is holding at 2 MiB
    checks_done = threading.Event()  # ... until this is set
    try:
        with grpc.insecure_channel(running.target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=WAIT_SECONDS
            )
            statuses = iter(watch)
            assert next(statuses).status == health_pb2.HealthCheckResponse.SERVING

            def slow_progress(received: int, total: int) -> None:
                time.sleep(0.01)
                if received >= 2 << 20 and not stream_held.is_set():
                    stream_held.set()
                    checks_done.wait(WAIT_SECONDS)

            def fetch() -> None:
                try:
                    with running.client(timeout=FETCH_TIMEOUT, retry=initserve.RetryPolicy(max_attempts=1)) as client:
                        outcome["result"] = client.fetch(BIG_SHAPE, "normal", seed=5, progress=slow_progress)
                except BaseException as error:  # noqa: BLE001 - reported by the assertion below
                    outcome["error"] = error

            fetcher = threading.Thread(target=fetch, daemon=True)
            fetcher.start()
            assert stream_held.wait(WAIT_SECONDS), "the fetch never got going"
            signalled = time.monotonic()
            running.process.send_signal(sig)

            assert next(statuses).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()  # an open Watch would otherwise hold the server for the whole grace period

            refused: list[initserve.InitServeError] = []

            def new_init_is_refused() -> bool:
                # A call that slips in before the server stops accepting succeeds; one that arrives in the instant
                # it stops is CANCELLED (gRPC's answer to a call it will not run). Both are transitions: poll on
                # until the listener is closed and a new call is refused outright.
                try:
                    with initserve.Client(running.target, timeout=5.0, retry=initserve.RetryPolicy(1)) as late:
                        late.fetch((8,), "normal", seed=1)
                except initserve.Cancelled:
                    pass
                except initserve.Unavailable as error:
                    refused.append(error)
                return bool(refused)

            wait_until(new_init_is_refused, "a new Init call to be refused", seconds=10.0)
            assert refused[0].code == "UNAVAILABLE"
            assert fetcher.is_alive() and running.alive(), "the in-flight stream ended before the checks did"

            checks_done.set()
            fetcher.join(WAIT_SECONDS)
            assert not fetcher.is_alive(), "the in-flight fetch did not finish within the grace period"
        assert "error" not in outcome, outcome.get("error")
        result = outcome["result"]
        assert isinstance(result, initserve.InitResult)
        assert same_bytes(result.tensor, reference("normal", BIG_SHAPE, seed=5))
        assert result.attempts == 1
        assert running.process.wait(WAIT_SECONDS) == 0
        assert time.monotonic() - signalled < 20.0  # it exited when the stream was done, not at the grace's end
    finally:
        checks_done.set()
        stop_replicas([running])


# --- Soak: everything at once ------------------------------------------------------------------------------------


def check_soak(stats) -> None:
    assert stats.wrong_bytes == 0, stats.failures
    assert stats.unexpected == [], stats.unexpected
    assert stats.crashes == [], stats.crashes
    assert stats.kills >= 1 and stats.restarts == stats.kills
    assert stats.ok >= 20 and stats.bytes_verified > 0
    assert stats.resumes >= 1


def test_soak_short() -> None:
    """The fault soak, with the same-host victim and attacker beside it, and its report (make soak's, minus the
    hostile phases, whose reproductions are in test_hostile.py)."""
    from tests import soak

    stats = soak.run_soak(duration=8.0, clients=16, kill_every=1.5, seed=1, shared_memory=True)
    print(soak.summary(stats))
    check_soak(stats)
    same_host = stats.shared_memory
    assert same_host is not None and same_host.passed, same_host
    made, refused = same_host.attempts
    assert same_host.victim.checks > 0 and made == refused > 0
    text = soak.report(stats, "test_soak_short")
    assert "**PASSED**" in text and "## Same-host transport under attack" in text and "**FAIL**" not in text


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_soak_long() -> None:
    from tests import soak

    stats = soak.run_soak(duration=240.0, clients=16, kill_every=4.0, seed=2, shared_memory=True)
    print(soak.summary(stats))
    check_soak(stats)
    assert stats.shared_memory is not None and stats.shared_memory.passed, stats.shared_memory
    assert stats.corruptions["flip"] >= 1 and stats.corruptions["cut"] >= 1

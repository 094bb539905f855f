"""The soak: three replicas under N client threads while replicas are SIGKILLed and a proxy cuts and corrupts.

    python -m tests.soak --duration 300 --report docs/reliability.md

Three replica processes (one with the default cache, one with a small cache that evicts, one with none) serve
N client threads (default 16) that loop over a mix of small and large requests with repeated keys (cache hits,
single-flight joins), some without a seed. Every result is checked byte for byte against a local reference
(cached per key). Meanwhile a fault thread SIGKILLs a random replica every few seconds and restarts it on the
same port (a new one if that port cannot be bound; the clients then rebuild their channels from the current
target list), one replica at a time. Half of the client threads reach replica 0 only through a proxy that cuts
its connections or flips bytes in them at random points.

With ``--phases`` (all by default, as ``make soak`` runs it) the same run also holds issue 17's hostile phases
(tests/soak_hostile.py: stalled readers and the heaviest admitted requests against one server, then peak memory
under every scheme at its largest admitted size) before the fault soak, and, during the fault soak, a same-host
client fetching through shared memory while an attacker process tries to write into it
(tests/soak_shared_memory.py). The report gets a section and verdict lines for each.

Exit status: 0 when no result had a wrong byte and no unexpected error occurred, and every phase held its
thresholds. Expected of the fault soak: no error at all on the direct routes (a killed replica must be
invisible: the stream resumes on another); on the proxied routes, an InitServeError is an allowed outcome of a
damaged stream (the contract: exact bytes or an error), anything else is not.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import random
import shlex
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import torch

import initserve
from tests import soak_shared_memory
from tests.conftest import SERVER_STOP_SECONDS, ServerProcess, reference, same_bytes, start_server
from tests.e2e.test_faults import Fault, FaultProxy

if TYPE_CHECKING:
    from tests import soak_hostile

REPLICA_FLAGS: tuple[tuple[str, ...], ...] = (
    (),  # the default cache (1/8 of memory)
    ("--cache-bytes", "24M"),  # small: large tensors evict each other
    ("--cache-bytes", "0"),  # none: every request generates (single-flight still applies)
)
FETCH_TIMEOUT = 90.0
RETRY = initserve.RetryPolicy(max_attempts=10, initial_backoff=0.05, max_backoff=1.0)
MEAN_FAULT_GAP_BYTES = 24 << 20  # on a proxied connection, one fault per this many bytes on average
JOIN_SECONDS = FETCH_TIMEOUT + 30.0


@dataclass(frozen=True)
class Request:
    scheme: str
    shape: tuple[int, ...]
    seed: int | None = 0  # None: the server draws one, and the result is checked against the seed it reports
    dtype: torch.dtype = torch.float32
    params: tuple[tuple[str, object], ...] = ()
    chunk_bytes: int = 0

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()

    def reference(self, seed: int) -> torch.Tensor:
        return reference(self.scheme, self.shape, dtype=self.dtype, seed=seed, **dict(self.params))


@dataclass(frozen=True)
class Check:
    """One line of the report's verdict: what was measured, against what, and whether it held."""

    what: str
    measured: str
    threshold: str
    passed: bool


SMALL: tuple[Request, ...] = (
    *(Request("normal", (64, 64), seed=seed) for seed in range(4)),
    Request("kaiming_normal", (256, 128), seed=1, params=(("mode", "fan_out"), ("nonlinearity", "relu"))),
    Request("xavier_uniform", (128, 128), seed=5, params=(("gain", 2.0),)),
    Request("uniform", (33,), seed=9, params=(("a", -2.0), ("b", 2.0))),
    Request("trunc_normal", (300, 200), seed=3, dtype=torch.bfloat16, chunk_bytes=4096),
    Request("orthogonal", (64, 32), seed=11),
    Request("sparse", (100, 50), seed=2, params=(("sparsity", 0.3),)),
    Request("constant", (10, 10), params=(("val", 0.5),)),
    Request("eye", (50, 50), dtype=torch.float16),
    Request("normal", (1000,), seed=None, dtype=torch.float16),
    Request("kaiming_uniform", (128, 64), seed=None),
)
LARGE: tuple[Request, ...] = (
    Request("normal", (1024, 1024), seed=1, chunk_bytes=256 << 10),  # 4 MiB in 16 chunks
    Request("uniform", (2048, 2048), seed=2),  # 16 MiB
    Request("xavier_normal", (2048, 1024), seed=3, dtype=torch.float64),  # 16 MiB
    Request("normal", (512, 512), seed=None, chunk_bytes=64 << 10),  # 1 MiB in 16 chunks, no seed
    Request("trunc_normal", (4096, 1024), seed=4, params=(("a", -1.0), ("b", 1.0))),  # 16 MiB
)
LARGE_SHARE = 0.3
PHASES = ("hostile", "memory", "fault")  # in the order they run


@dataclass
class SoakStats:
    duration: float = 0.0
    clients: int = 0
    requests: int = 0
    ok: int = 0
    bytes_verified: int = 0
    resumes: int = 0  # results that took more than one stream
    extra_streams: int = 0  # streams beyond the first, over all results
    cache_hits: int = 0  # results whose first stream came from a replica's cache or a joined generation
    unseeded: int = 0
    by_group: Counter[str] = field(default_factory=Counter)  # results per client group
    errors: Counter[str] = field(default_factory=Counter)  # "<group>: <type>"
    wrong_bytes: int = 0
    failures: list[str] = field(default_factory=list)  # what each wrong result was
    unexpected: list[str] = field(default_factory=list)
    kills: int = 0
    restarts: int = 0
    port_changes: int = 0
    restart_seconds: list[float] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)  # a replica that exited without being killed
    corruptions: Counter[str] = field(default_factory=Counter)  # proxy faults that fired, by kind
    proxied_connections: int = 0
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"small": [], "large": []})
    shared_memory: soak_shared_memory.SharedMemoryStats | None = None  # the same-host victim and attacker
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def passed(self) -> bool:
        return (
            self.wrong_bytes == 0
            and not self.unexpected
            and not self.crashes
            and (self.shared_memory is None or self.shared_memory.passed)
        )


class References:
    """The local reference of each seeded request, computed once (per-key locks: other keys go on meanwhile)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[Request, threading.Lock] = {}
        self._tensors: dict[Request, torch.Tensor] = {}

    def get(self, request: Request, seed: int) -> torch.Tensor:
        if request.seed is None:
            return request.reference(seed)  # a fresh seed each time: nothing to cache
        with self._lock:
            key_lock = self._locks.setdefault(request, threading.Lock())
        with key_lock:
            if request not in self._tensors:
                self._tensors[request] = request.reference(request.seed)
            return self._tensors[request]


class Cluster:
    """The replicas, their current ports, and a version that changes when any port does."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.replicas: list[ServerProcess] = []
        self.version = 0
        self.closed = False

    def start(self) -> None:
        for flags in REPLICA_FLAGS:
            self.replicas.append(start_server(*flags))

    def port(self, index: int) -> int:
        with self._lock:
            return self.replicas[index].port

    def targets(self, proxy: str | None) -> tuple[int, list[str]]:
        """(version, targets): the direct group gets every replica, the proxied one replica 0 via the proxy."""
        with self._lock:
            direct = [replica.target for replica in self.replicas]
            return self.version, ([proxy, *direct[1:]] if proxy else direct)

    def kill_and_restart(self, index: int, stats: SoakStats) -> None:
        victim = self.replicas[index]
        if not victim.alive():  # it went on its own: a crash (it is restarted like a killed one)
            with stats.lock:
                stats.crashes.append(f"replica {index} exited with {victim.process.returncode} on its own")
        victim.process.kill()
        victim.process.wait(SERVER_STOP_SECONDS)
        with stats.lock:
            stats.kills += 1
        started = time.monotonic()
        replacement = None
        for port in (victim.port, victim.port, 0):  # the same port (twice: a transient clash), then any port
            try:
                replacement = start_server(*REPLICA_FLAGS[index], "--port", str(port))
                break
            except RuntimeError as error:
                last_error = error
        if replacement is None:
            with stats.lock:
                stats.unexpected.append(f"replica {index} could not be restarted: {last_error}")
            return
        with self._lock:
            if self.closed:  # stopped meanwhile (interrupted): this one is not in the list that stop() kills
                replacement.process.kill()
                replacement.process.wait(SERVER_STOP_SECONDS)
                return
            self.replicas[index] = replacement
            if replacement.port != victim.port:
                self.version += 1
        with stats.lock:
            stats.restarts += 1
            stats.port_changes += replacement.port != victim.port
            stats.restart_seconds.append(time.monotonic() - started)

    def crashed(self) -> list[str]:
        """Replicas that exited without being killed (the fault loop restarts only those it kills)."""
        with self._lock:
            return [
                f"replica {index} exited with {replica.process.returncode} on its own"
                for index, replica in enumerate(self.replicas)
                if not replica.alive()
            ]

    def stop(self) -> None:
        with self._lock:
            self.closed = True
        for replica in self.replicas:
            if replica.alive():
                replica.process.kill()
            with contextlib.suppress(Exception):
                replica.process.wait(SERVER_STOP_SECONDS)


def proxy_faults(seed: int) -> Callable[[int], Iterator[Fault]]:
    """Connection n's faults: cuts (40%) and byte flips (60%), one per MEAN_FAULT_GAP_BYTES on average."""

    def faults(index: int) -> Iterator[Fault]:
        rng = random.Random(seed * 1_000_003 + index)
        position = 0
        while True:
            position += 1 + int(rng.expovariate(1 / MEAN_FAULT_GAP_BYTES))
            if rng.random() < 0.4:
                yield Fault("cut", at=position)
                return  # nothing follows a cut on this connection
            yield Fault("flip", at=position, mask=rng.randrange(1, 256))

    return faults


def client_loop(
    index: int,
    proxied: bool,
    cluster: Cluster,
    proxy: FaultProxy | None,
    references: References,
    stats: SoakStats,
    stop: threading.Event,
    seed: int,
) -> None:
    group = "proxied" if proxied else "direct"
    rng = random.Random(seed * 7919 + index)
    client: initserve.Client | None = None
    version = -1
    try:
        while not stop.is_set():
            current, targets = cluster.targets(proxy.target if proxied and proxy else None)
            if client is None or current != version:
                if client is not None:
                    client.close()
                client, version = initserve.Client(targets, timeout=FETCH_TIMEOUT, retry=RETRY), current
            large = rng.random() < LARGE_SHARE
            request = rng.choice(LARGE if large else SMALL)
            started = time.monotonic()
            try:
                result = client.fetch(
                    request.shape,
                    request.scheme,
                    seed=request.seed,
                    dtype=request.dtype,
                    chunk_bytes=request.chunk_bytes,
                    **dict(request.params),
                )
            except initserve.InitServeError as error:
                with stats.lock:
                    stats.requests += 1
                    stats.errors[f"{group}: {type(error).__name__} ({error.code})"] += 1
                    if not proxied:
                        stats.unexpected.append(f"direct route: {type(error).__name__}: {error}")
                continue
            except Exception as error:  # noqa: BLE001 - anything but an InitServeError is unexpected
                with stats.lock:
                    stats.requests += 1
                    stats.errors[f"{group}: {type(error).__name__}"] += 1
                    stats.unexpected.append(f"{group} route: {type(error).__name__}: {error}")
                continue
            elapsed = time.monotonic() - started
            expected_seed = result.seed if request.seed is None else request.seed  # 0 for unseeded schemes
            right = result.seed == expected_seed and same_bytes(result.tensor, references.get(request, result.seed))
            with stats.lock:
                stats.requests += 1
                stats.by_group[group] += 1
                stats.latencies["large" if large else "small"].append(elapsed)
                if right:
                    stats.ok += 1
                    stats.bytes_verified += request.nbytes
                else:
                    stats.wrong_bytes += 1
                    stats.failures.append(
                        f"{request} via {group}: seed {result.seed}, {result.attempts} streams, "
                        f"resumed at {result.resumed_at}, servers {result.server_ids}"
                    )
                stats.resumes += result.attempts > 1
                stats.extra_streams += result.attempts - 1
                stats.cache_hits += result.header.cache_hit
                stats.unseeded += request.seed is None
    except BaseException as error:  # noqa: BLE001 - a crashed client thread is reported, never silent
        with stats.lock:
            stats.unexpected.append(f"client thread {index} crashed: {type(error).__name__}: {error}")
    finally:
        if client is not None:
            client.close()


def fault_loop(cluster: Cluster, stats: SoakStats, stop: threading.Event, kill_every: float, seed: int) -> None:
    rng = random.Random(seed)
    try:
        while not stop.wait(kill_every * rng.uniform(0.5, 1.5)):
            cluster.kill_and_restart(rng.randrange(len(cluster.replicas)), stats)
    except BaseException as error:  # noqa: BLE001
        with stats.lock:
            stats.unexpected.append(f"fault thread crashed: {type(error).__name__}: {error}")


def run_soak(
    duration: float,
    *,
    clients: int = 16,
    kill_every: float = 5.0,
    seed: int = 0,
    corrupt: bool = True,
    shared_memory: bool = False,
    log: Callable[[str], None] = lambda line: None,
) -> SoakStats:
    """Run the soak for ``duration`` seconds of load (plus start-up and drain) and return its figures; with
    ``shared_memory``, the same-host victim and attacker run meanwhile against a server of their own."""
    stats = SoakStats(clients=clients)
    cluster = Cluster()
    proxy: FaultProxy | None = None
    stop_faults, stop_clients, stop_shared = threading.Event(), threading.Event(), threading.Event()
    threads: list[threading.Thread] = []
    same_host: threading.Thread | None = None
    try:
        if shared_memory:

            def run_same_host() -> None:
                stats.shared_memory = soak_shared_memory.run_alongside(duration, stop_shared, seed)

            same_host = threading.Thread(target=run_same_host, name="same-host", daemon=True)
            same_host.start()
        cluster.start()
        if corrupt:
            proxy = FaultProxy(lambda: cluster.port(0), proxy_faults(seed))
        references = References()
        log(f"replicas on {cluster.targets(None)[1]}; proxy {proxy.target if proxy else 'off'}; {clients} clients")
        faults = threading.Thread(
            target=fault_loop, args=(cluster, stats, stop_faults, kill_every, seed), name="faults", daemon=True
        )
        for index in range(clients):
            proxied = corrupt and index % 2 == 1
            thread = threading.Thread(
                target=client_loop,
                args=(index, proxied, cluster, proxy, references, stats, stop_clients, seed),
                name=f"client-{index}",
                daemon=True,
            )
            threads.append(thread)
        started = time.monotonic()
        for thread in threads:
            thread.start()
        faults.start()
        while (left := duration - (time.monotonic() - started)) > 0:
            time.sleep(min(left, 10.0))
            with stats.lock:
                log(
                    f"{time.monotonic() - started:6.1f}s: {stats.ok} ok, {stats.bytes_verified >> 20} MiB verified, "
                    f"{stats.resumes} resumed, {stats.kills} kills, wrong {stats.wrong_bytes}, "
                    f"errors {sum(stats.errors.values())}"
                )
        stop_faults.set()
        faults.join(JOIN_SECONDS)
        stop_clients.set()
        deadline = time.monotonic() + JOIN_SECONDS
        for thread in [faults, *threads]:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                stats.unexpected.append(f"{thread.name} did not finish within {JOIN_SECONDS}s of the stop")
        stats.duration = time.monotonic() - started
        stats.crashes.extend(cluster.crashed())
        if same_host is not None:
            same_host.join(JOIN_SECONDS + soak_shared_memory.JOIN_SECONDS)
            if stats.shared_memory is None:
                stats.unexpected.append("the same-host victim and attacker did not report")
    finally:
        stop_faults.set()
        stop_clients.set()
        stop_shared.set()
        if proxy is not None:
            with stats.lock:
                stats.corruptions.update(proxy.fired_kinds())
                stats.proxied_connections = proxy.connections
            proxy.close()
        cluster.stop()
    return stats


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summary(stats: SoakStats) -> str:
    errors = ", ".join(f"{name}: {count}" for name, count in sorted(stats.errors.items())) or "none"
    return (
        f"{stats.duration:.0f}s, {stats.clients} clients: {stats.requests} requests, {stats.ok} exact, "
        f"{stats.bytes_verified / (1 << 20):.0f} MiB verified; {stats.kills} kills, {stats.restarts} restarts; "
        f"corruptions {dict(stats.corruptions)}; {stats.resumes} resumed; wrong bytes {stats.wrong_bytes}; "
        f"errors: {errors}; unexpected: {len(stats.unexpected)}"
    )


def shared_memory_checks(same_host: soak_shared_memory.SharedMemoryStats) -> list[Check]:
    victim = same_host.victim
    made, refused = same_host.attempts
    return [
        Check(
            "same-host: the victim's verified, live tensors changed (foreign writes)",
            f"{victim.foreign_writes} in {victim.checks:,} comparisons, {victim.fetches:,} fetches",
            "0",
            victim.foreign_writes == 0 and victim.checks > 0,
        ),
        Check(
            "same-host: the victim's fetches through shared memory, exact",
            f"{victim.transports['shared_memory']:,} of {victim.fetches:,}, {victim.exact:,} exact; errors: "
            f"{'; '.join(victim.errors[:3]) or 'none'}",
            "all, all exact, no error",
            victim.fetches > 0
            and victim.transports["shared_memory"] == victim.fetches == victim.exact
            and not victim.errors,
        ),
        Check(
            "same-host: the attacker's attempts refused",
            f"{refused:,} of {made:,} over {same_host.attack.get('rounds', 0)} rounds; otherwise: "
            f"{'; '.join(same_host.attack_unexpected[:3]) or 'none'}",
            "all",
            same_host.attack.get("rounds", 0) > 0 and refused == made and not same_host.attack_unexpected,
        ),
        Check(
            "same-host: the server process",
            f"alive to the end: {same_host.server_alive}; SIGTERM: exit {same_host.server_exit}",
            "alive; exit 0",
            same_host.server_alive and same_host.server_exit == 0,
        ),
    ]


def shared_memory_section(same_host: soak_shared_memory.SharedMemoryStats) -> str:
    victim = same_host.victim
    attempts = "\n".join(f"| {what} | {made:,} | {refused:,} |" for what, (made, refused) in same_host.refusals.items())
    others = ", ".join(f"{what}: {count:,}" for what, count in same_host.attack.items() if what != "rounds")
    keys = ", ".join(f"`{scheme}` {list(shape)}" for scheme, shape, _ in soak_shared_memory.VICTIM_KEYS)
    return f"""## Same-host transport under attack

During the fault soak, `initserve-server {" ".join(same_host.server_flags)}` (never killed) served a victim
client (`Client(shared_memory=True)`) fetching {keys} at random, comparing each with the local reference,
keeping the last {soak_shared_memory.HELD} alive and comparing those again after every fetch, for
{same_host.seconds:.0f} s: {victim.fetches:,} fetches ({dict(victim.transports)}), {victim.checks:,} comparisons
of live tensors, **{victim.foreign_writes} foreign writes**. Meanwhile an attacker process of the same UID
(`python -m tests.soak_shared_memory attack`) ran {same_host.attack.get("rounds", 0)} rounds of:

| attempt | made | refused |
|---|---|---|
{attempts}

Refused means: a write answered FAILED_PRECONDITION (no such region; by name, never), a registration answered
with an error, a shrink, grow or hole punch failing with EPERM. Also: {others}. Releases of the victim's
tokens on the attacker's connection must be ignored: had one taken effect, the victim's next fetch with that
region would have gone over gRPC. Not tried, being outside the threat model (docs/shared-memory.md): writing
through a victim's *live* token, which only the victim's registration connection receives; a leaked token is a
bearer capability (a one-off check of the victim's comparison: such a write changes a held tensor, and is seen).
"""


def report(
    stats: SoakStats | None,
    command: str,
    hostile: soak_hostile.HostileFigures | None = None,
    memory: soak_hostile.MemoryFigures | None = None,
) -> str:
    """docs/reliability.md: the verdict, the figures of each phase, how they were made, and what they show."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    checks = verdict(stats, hostile, memory)
    passed = all(check.passed for check in checks)
    lines = "\n".join(
        f"| {check.what} | {check.measured} | {check.threshold} | {'PASS' if check.passed else '**FAIL**'} |"
        for check in checks
    )
    phases = ", ".join(
        name for name, ran in (("hostile", hostile), ("memory", memory), ("fault soak", stats)) if ran is not None
    )
    sections = [
        hostile.markdown() if hostile else "",
        memory.markdown() if memory else "",
        fault_section(stats) if stats else "",
        shared_memory_section(stats.shared_memory) if stats and stats.shared_memory else "",
    ]
    body = "\n".join(section for section in sections if section)
    return f"""# Reliability: the soak

Generated by `{command}` on {now}: **{"PASSED" if passed else "FAILED"}**.

| | |
|---|---|
| Machine | {os.cpu_count()} cores, {_memory_gib():.0f} GiB, {platform.system()} {platform.release()} \
{platform.machine()}, Python {platform.python_version()} |
| Versions | torch {torch.__version__}, grpcio {grpc.__version__}, initserve {initserve.__version__} |
| Phases | {phases}, one after the other |

## Verdict

| Check | Measured | Threshold | Result |
|---|---|---|---|
{lines}

{body}"""


def _memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)


def verdict(
    stats: SoakStats | None,
    hostile: soak_hostile.HostileFigures | None,
    memory: soak_hostile.MemoryFigures | None,
) -> list[Check]:
    """Every threshold of every phase that ran, and the run's three counts: crashes, wrong bytes, foreign writes."""
    same_host = stats.shared_memory if stats else None
    crashes = list(stats.crashes) if stats else []
    for name, alive in (("hostile", hostile and hostile.server_alive), ("memory", memory and memory.server_alive),
                        ("shared-memory", same_host and same_host.server_alive)):  # fmt: skip
        ran = {"hostile": hostile, "memory": memory, "shared-memory": same_host}[name]
        if ran is not None and not alive:
            crashes.append(f"the {name} phase's server exited before the end")
    wrong = {
        "fault soak": stats.wrong_bytes if stats else 0,
        "hostile": hostile.wrong_bytes if hostile else 0,
        "memory": memory.outcomes["wrong"] if memory else 0,
        "same-host": same_host.victim.wrong_bytes if same_host else 0,
    }
    checks = [
        Check("crashes", "; ".join(crashes) or "0", "0", not crashes),
        Check(
            "wrong bytes",
            f"{sum(wrong.values())} results ({', '.join(f'{name} {count}' for name, count in wrong.items())})",
            "0",
            sum(wrong.values()) == 0,
        ),
        Check(
            "foreign writes",
            str(same_host.foreign_writes) if same_host else "not run",
            "0",
            same_host is not None and same_host.foreign_writes == 0,
        ),
    ]
    if hostile:
        checks += hostile.checks()
    if memory:
        checks += memory.checks()
    if stats:
        checks.append(
            Check(
                "fault soak: unexpected errors",
                f"{len(stats.unexpected)} in {stats.requests:,} requests",
                "0",
                not stats.unexpected,
            )
        )
    if same_host:
        checks += shared_memory_checks(same_host)
    return checks


def fault_section(stats: SoakStats) -> str:
    """The fault soak's figures: three replicas, SIGKILLs and a corrupting proxy."""
    errors = "\n".join(f"| {name} | {count} |" for name, count in sorted(stats.errors.items())) or "| none | 0 |"
    errors = "\n".join(f"| {name} | {count} |" for name, count in sorted(stats.errors.items())) or "| none | 0 |"
    restart = (
        f"{sum(stats.restart_seconds) / len(stats.restart_seconds):.1f} s mean, "
        f"{max(stats.restart_seconds):.1f} s max, {stats.port_changes} on a new port"
        if stats.restart_seconds
        else "none"
    )

    def latency(kind: str) -> str:
        values = stats.latencies[kind]
        return f"{_percentile(values, 0.5) * 1000:.0f} ms / {_percentile(values, 0.99) * 1000:.0f} ms"

    unexpected = "".join(f"\n- {line}" for line in stats.unexpected[:20]) or " none."
    failures = "".join(f"\n- {line}" for line in stats.failures[:20]) or " none."
    crashes = "".join(f"\n- {line}" for line in stats.crashes[:20]) or " none."
    return f"""## The fault soak: replicas killed, streams corrupted

| | |
|---|---|
| Replicas | 3 processes on 127.0.0.1: default cache, `--cache-bytes 24M`, `--cache-bytes 0` |
| Load | {stats.clients} client threads for {stats.duration:.0f} s; half reach replica 0 through a corrupting proxy |
| Requests | {len(SMALL)} small and {len(LARGE)} large (1 to 16 MiB) keys, {LARGE_SHARE:.0%} large, some unseeded |

### Figures

| | |
|---|---|
| Requests | {stats.requests} ({stats.by_group["direct"]} direct and {stats.by_group["proxied"]} proxied results) |
| Results exact, byte for byte | {stats.ok} |
| Bytes verified | {stats.bytes_verified / (1 << 30):.2f} GiB |
| **Wrong bytes returned** | **{stats.wrong_bytes}** |
| Replicas killed (SIGKILL) | {stats.kills}; restarted {stats.restarts} ({restart}) |
| Proxy faults that fired | {stats.corruptions["flip"]} byte flips, {stats.corruptions["cut"]} cuts, \
over {stats.proxied_connections} connections |
| Results resumed | {stats.resumes} ({stats.extra_streams} extra streams) |
| First stream from a cache or a joined generation | {stats.cache_hits} |
| Unseeded requests, checked against the reported seed | {stats.unseeded} |
| Latency, median / p99 | small {latency("small")}; large {latency("large")} |

Errors returned to the caller, by route and type:

| Route: error | Count |
|---|---|
{errors}

Unexpected errors:{unexpected}

Wrong results:{failures}

Replicas that exited without being killed:{crashes}

### What this shows

- **No wrong bytes.** Every tensor the client returned was compared with the contract's local reference
  (`torch.nn.init.<scheme>_` with a seeded generator). The client verifies each chunk's CRC-32 where it lands
  and the whole tensor's checksum (from the trailer) before it returns anything, so a damaged chunk, a short or
  reordered stream, or a stream joined from two replicas that disagree, is never returned.
- **A replica's death is invisible.** Generation is deterministic, so a stream that breaks part-way is resumed
  on another replica from the last verified byte (`offset`), with the seed the first header reported. On the
  direct routes, any error is a failure of this soak: with one replica down at a time, every fetch completes.
- **Corruption is caught.** On the proxied routes, a flipped byte in a chunk fails its CRC and the stream is
  resumed; a flip in HTTP/2 or gRPC framing breaks the connection, which is resumed the same way; a cut is a
  broken stream. What cannot be repaired is raised as an `InitServeError`, never returned as a tensor.
- **Headers are checked too.** Each header carries a CRC-32 of its own fields, and the client compares the
  scheme, shape, dtype and seed with what it asked for, so a damaged `seed_used` is never reported or resumed with.
- Limits of the run: one machine, loopback networking, one replica killed at a time; the proxy damages the
  server-to-client direction only.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=16, help="client threads")
    parser.add_argument("--kill-every", type=float, default=5.0, help="mean seconds between replica kills")
    parser.add_argument("--seed", type=int, default=0, help="seeds the workload, the kills and the proxy's faults")
    parser.add_argument("--no-corrupt", action="store_true", help="no corrupting proxy: kills only")
    parser.add_argument("--report", type=Path, help="write the Markdown report here (e.g. docs/reliability.md)")
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated phases to run, in this order: {', '.join(PHASES)} (fault includes the same-host "
        "attacker)",
    )
    parser.add_argument("--memory-seconds", type=float, default=90.0, help="seconds of load in the memory phase")
    args = parser.parse_args(argv)
    phases = [phase.strip() for phase in args.phases.split(",") if phase.strip()]
    if unknown := set(phases) - set(PHASES):
        parser.error(f"unknown phases {sorted(unknown)}; use {', '.join(PHASES)}")
    command = "python -m tests.soak " + shlex.join(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a SIGTERM stops the replicas on the way out

    def log(line: str) -> None:
        print(line, flush=True)

    from tests import soak_hostile  # it builds on this module's Request and Check

    hostile = soak_hostile.run_hostile(log) if "hostile" in phases else None
    memory = soak_hostile.run_memory(args.memory_seconds, log=log) if "memory" in phases else None
    stats = None
    if "fault" in phases:
        stats = run_soak(
            args.duration,
            clients=args.clients,
            kill_every=args.kill_every,
            seed=args.seed,
            corrupt=not args.no_corrupt,
            shared_memory=True,
            log=log,
        )
        print(summary(stats))
        for line in stats.unexpected + stats.failures + stats.crashes:
            print("  " + line)
    checks = verdict(stats, hostile, memory)
    for check in checks:
        print(f"{'PASS' if check.passed else 'FAIL'}: {check.what}: {check.measured} (threshold {check.threshold})")
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(report(stats, command, hostile, memory))
        print(f"report written to {args.report}")
    return 0 if all(check.passed for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())

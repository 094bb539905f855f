"""The soak's same-host phase: a client fetching through shared memory while an attacker process tries to write into it.

A server with ``--shared-memory-socket`` (never killed) serves a *victim* thread of the soak process: it fetches
tensors through shared memory, compares each with the local reference, keeps the last few alive (their regions
stay registered and lent out) and compares those again after every fetch. A *foreign write* is a verified,
live tensor whose bytes changed. Meanwhile an *attacker* process of the same UID (``python -m
tests.soak_shared_memory attack ...``) tries, in rounds, what issue 17 item 5 and its threat model name:

- guessed tokens, and the deprecated by-name field, with a request for ``constant val=1234.5``;
- replays of tokens it was given on connections it has since closed, and of tokens it released;
- releases of the victim's live tokens on its own connection (the harness hands them over: a leak the attacker
  could not arrange, so that the server's "tokens of other connections are ignored" is tried for real);
- memfds that could hurt the server: unsealed, shrink-only, unallocated, a /dev/shm file;
- shrinking, growing and hole-punching its own registered region while the server writes into it.

Every attempt must be refused (or, for its own region, written and survived). What a leaked live token allows
is outside the model: tokens are 128-bit secrets held by the connection that registered the region, and a
process that can read another's memory (same UID: ptrace) can write it anyway (docs/shared-memory.md).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

import initserve
from initserve_protocol.v1 import initserve_pb2 as pb
from tests.conftest import ServerProcess, reference, same_bytes, start_installed_server
from tests.e2e.test_shared_memory import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    SERVICE,
    connect,
    fallocate,
    memfd,
    register,
    release,
)

SERVER_FLAGS: tuple[str, ...] = ("--cache-bytes", "64M")  # plus --shared-memory-socket DIR/shm.sock
VICTIM_KEYS: tuple[tuple[str, tuple[int, ...], int], ...] = (  # (scheme, shape, seed): 64 KiB to 4 MiB
    ("normal", (128, 128), 1),
    ("normal", (1024, 1024), 2),
    ("uniform", (512, 512), 3),
    ("trunc_normal", (256, 1024), 4),
    ("kaiming_uniform", (1024, 512), 5),
    ("normal", (1024, 1024), 6),
)
HELD = 8  # verified tensors the victim keeps alive, compared again after every fetch
VICTIM_PAUSE_SECONDS = 0.05
ATTACK_PAUSE_SECONDS = 0.2  # between the attacker's rounds: modest, beside the fault soak
ATTACK_SIZE = 4 << 20  # the attacker's own regions
DEAD_TOKEN_SECONDS = 5.0  # a closed connection's or a released token must be dead within this
HOSTILE_VALUE = 1234.5
JOIN_SECONDS = 60.0


@dataclass
class VictimStats:
    fetches: int = 0
    exact: int = 0
    wrong_bytes: int = 0
    foreign_writes: int = 0  # a verified tensor, still alive, whose bytes changed
    checks: int = 0  # comparisons of held tensors
    transports: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


@dataclass
class SharedMemoryStats:
    server_flags: tuple[str, ...] = ()
    seconds: float = 0.0
    victim: VictimStats = field(default_factory=VictimStats)
    refusals: dict[str, list[int]] = field(default_factory=dict)  # what must be refused: [attempts, refused]
    attack: dict[str, int] = field(default_factory=dict)  # the attacker's other counts (rounds, writes, releases)
    attack_unexpected: list[str] = field(default_factory=list)  # an attempt that did not fail as it must
    server_alive: bool = True
    server_exit: int | None = None

    @property
    def foreign_writes(self) -> int:
        return self.victim.foreign_writes

    @property
    def attempts(self) -> tuple[int, int]:
        """(attempts that must be refused, how many were)."""
        return sum(made for made, _ in self.refusals.values()), sum(refused for _, refused in self.refusals.values())

    @property
    def passed(self) -> bool:
        made, refused = self.attempts
        return (
            self.victim.foreign_writes == 0
            and self.victim.wrong_bytes == 0
            and not self.victim.errors
            and self.victim.transports["shared_memory"] == self.victim.fetches > 0
            and self.attack.get("rounds", 0) > 0
            and made == refused
            and not self.attack_unexpected
            and self.server_alive
            and self.server_exit == 0
        )


def _publish_tokens(client: initserve.Client, path: Path) -> None:
    """The victim's live tokens, where the attacker reads them (written whole, then renamed into place)."""
    shared = client._shared  # the harness's side channel: no real attacker can read these
    tokens = [region.token for region in shared.pool.lent() if region.token] if shared is not None else []
    partial = path.with_suffix(".partial")
    partial.write_text("\n".join(tokens))
    partial.replace(path)


def victim_loop(server: ServerProcess, tokens: Path, stats: VictimStats, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    references = {key: reference(key[0], key[1], seed=key[2]) for key in VICTIM_KEYS}
    held: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with initserve.Client(server.target, timeout=60, shared_memory=True) as client:
            while not stop.is_set():
                key = rng.choice(VICTIM_KEYS)
                result = client.fetch(key[1], key[0], seed=key[2])
                stats.fetches += 1
                stats.transports[result.transport] += 1
                if same_bytes(result.tensor, references[key]):
                    stats.exact += 1
                    held.append((result.tensor, references[key]))
                    del held[:-HELD]
                else:
                    stats.wrong_bytes += 1
                del result
                changed = [entry for entry in held if not same_bytes(*entry)]
                stats.checks += len(held)
                stats.foreign_writes += len(changed)
                held = [entry for entry in held if all(entry is not bad for bad in changed)]
                _publish_tokens(client, tokens)
                stop.wait(VICTIM_PAUSE_SECONDS)
    except BaseException as error:  # noqa: BLE001 - reported, never silent
        stats.errors.append(f"{type(error).__name__}: {error}")


def run_alongside(seconds: float, stop: threading.Event, seed: int = 0) -> SharedMemoryStats:
    """A shared-memory server, the victim and the attacker for ``seconds`` (or until ``stop``)."""
    directory = tempfile.mkdtemp(prefix="initserve-soak-shm-")
    flags = (*SERVER_FLAGS, "--shared-memory-socket", os.path.join(directory, "shm.sock"))
    stats = SharedMemoryStats(server_flags=flags)
    tokens = Path(directory) / "victim-tokens"
    tokens.write_text("")
    server = start_installed_server(*flags)
    started = time.monotonic()
    try:
        victim = threading.Thread(
            target=victim_loop, args=(server, tokens, stats.victim, stop, seed), name="shm-victim", daemon=True
        )
        victim.start()
        attacker = subprocess.run(
            [sys.executable, "-m", "tests.soak_shared_memory", "attack", "--socket", flags[-1],
             "--target", server.target, "--tokens", str(tokens), "--seconds", str(seconds), "--seed", str(seed)],
            capture_output=True, text=True, timeout=seconds + JOIN_SECONDS, check=False,
        )  # fmt: skip
        stop.set()
        victim.join(JOIN_SECONDS)
        try:
            report = json.loads(attacker.stdout.strip().splitlines()[-1])
            stats.refusals, stats.attack, stats.attack_unexpected = (
                report["refusals"],
                report["counts"],
                report["unexpected"],
            )
        except (IndexError, ValueError, KeyError):
            stats.attack_unexpected.append(
                f"the attacker exited {attacker.returncode} without its report: {attacker.stderr[-2000:]}"
            )
        stats.server_alive = server.alive()
    finally:
        stats.seconds = time.monotonic() - started
        stats.server_exit = server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return stats


# --- the attacker process -------------------------------------------------------------------------------------------


class Attacker:
    def __init__(self, socket_path: str, target: str, tokens: Path, seed: int) -> None:
        self.socket_path = socket_path
        self.tokens = tokens
        self.rng = random.Random(seed)
        self.channel = grpc.insecure_channel(target)
        self._unary = self.channel.unary_unary(
            f"/{SERVICE}/InitUnary",
            request_serializer=pb.InitRequest.SerializeToString,
            response_deserializer=pb.InitUnaryResponse.FromString,
        )
        self.refusals: dict[str, list[int]] = {}  # what must be refused: [attempts, refused]
        self.counts: Counter[str] = Counter()
        self.unexpected: list[str] = []

    def refused(self, what: str, refused: bool, outcome: str) -> None:
        counts = self.refusals.setdefault(what, [0, 0])
        counts[0] += 1
        counts[1] += refused
        if not refused and len(self.unexpected) < 50:
            self.unexpected.append(f"{what}: {outcome}")

    def write(self, region: str = "", *, by_name: str = "", size: int = ATTACK_SIZE) -> grpc.StatusCode:
        """Ask for ``constant val=HOSTILE_VALUE`` of ``size`` bytes into ``region``: the call's status."""
        request = pb.InitRequest(scheme="constant", shape=[size // 4], params=pb.InitParams(val=HOSTILE_VALUE),
                                 shared_memory_region=region, shared_memory=by_name)  # fmt: skip
        try:
            self._unary(request, timeout=30)
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()

    def expect_refused(self, what: str, code: grpc.StatusCode) -> None:
        """A write the server must refuse without writing: FAILED_PRECONDITION (no such region, or by name)."""
        self.refused(what, code == grpc.StatusCode.FAILED_PRECONDITION, code.name)

    def own_region(self, sock) -> tuple[int, str]:  # noqa: ANN001 - a socket
        fd = memfd(ATTACK_SIZE)
        answer = register(sock, fd, ATTACK_SIZE)
        if not answer.region:
            os.close(fd)
            raise RuntimeError(f"the attacker's own good region was refused: {answer.error}")
        return fd, answer.region

    def dead_within(self, what: str, token: str) -> None:
        """A token whose connection closed, or that was released: refused within DEAD_TOKEN_SECONDS."""
        deadline = time.monotonic() + DEAD_TOKEN_SECONDS
        while (code := self.write(token)) == grpc.StatusCode.OK and time.monotonic() < deadline:
            time.sleep(0.05)
        self.expect_refused(what, code)

    def round(self) -> None:
        for _ in range(8):
            self.expect_refused("guessed token", self.write(f"region-{secrets.token_hex(16)}"))
        self.expect_refused("region by /dev/shm name", self.write(by_name="initserve-" + secrets.token_hex(8)))
        with connect(self.socket_path) as sock:  # a closed connection's token
            fd, token = self.own_region(sock)
            os.close(fd)
        self.dead_within("replayed token of a closed connection", token)
        with connect(self.socket_path) as sock:
            fd, token = self.own_region(sock)
            os.close(fd)
            release(sock, token)
            self.dead_within("replayed released token", token)
            victims = [line for line in self.tokens.read_text().split() if line]
            if victims:
                release(sock, *victims[:64])  # not this connection's: the server must ignore it
                self.counts["victim tokens released on another connection"] += len(victims[:64])
            for make, label in ((lambda: memfd(ATTACK_SIZE, seals=0), "unsealed memfd"),
                                (lambda: memfd(ATTACK_SIZE, seals=fcntl.F_SEAL_SHRINK), "shrink-only memfd"),
                                (lambda: memfd(ATTACK_SIZE, allocate=False), "unallocated memfd"),
                                (self._dev_shm_file, "/dev/shm file")):  # fmt: skip
                bad = make()
                try:
                    answer = register(sock, bad, ATTACK_SIZE)
                finally:
                    os.close(bad)
                self.refused(f"register a {label}", not answer.region, f"registered as {answer.region}")
            self.shrink_while_written(sock)

    def _dev_shm_file(self) -> int:
        fd, path = tempfile.mkstemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.unlink(path)
        os.ftruncate(fd, ATTACK_SIZE)
        return fd

    def shrink_while_written(self, sock) -> None:  # noqa: ANN001 - a socket
        """Its own registered region, shrunk, grown and punched while the server writes into it."""
        fd, token = self.own_region(sock)
        stop = threading.Event()
        outcomes: Counter[tuple[str, bool]] = Counter()  # (attempt, refused with EPERM)

        def hostile() -> None:
            while not stop.is_set():
                for name, size in (("shrink", 0), ("grow", 2 * ATTACK_SIZE)):
                    try:
                        os.ftruncate(fd, size)
                        outcomes[name, False] += 1
                    except PermissionError:
                        outcomes[name, True] += 1
                punched = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, ATTACK_SIZE)
                outcomes["punch a hole in", punched == errno.EPERM] += 1

        thread = threading.Thread(target=hostile)
        thread.start()
        try:
            for _ in range(4):
                code = self.write(token)
                self.counts["writes into its own region while shrinking it"] += 1
                if code != grpc.StatusCode.OK:
                    self.unexpected.append(f"a write into the attacker's own region: {code.name}")
        finally:
            stop.set()
            thread.join()
            for (name, refused), count in outcomes.items():
                counts = self.refusals.setdefault(f"{name} its own region while the server writes into it", [0, 0])
                counts[0] += count
                counts[1] += count if refused else 0
                if not refused:
                    self.unexpected.append(f"{name} its own sealed region: succeeded {count} times")
            if os.fstat(fd).st_size != ATTACK_SIZE:
                self.unexpected.append(f"the attacker's sealed region is {os.fstat(fd).st_size} bytes")
            os.close(fd)
            release(sock, token)

    def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.round()
            self.counts["rounds"] += 1
            time.sleep(ATTACK_PAUSE_SECONDS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak_shared_memory")
    parser.add_argument("mode", choices=["attack"])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--tokens", type=Path, required=True, help="where the victim's live tokens are published")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    attacker = Attacker(args.socket, args.target, args.tokens, args.seed)
    try:
        attacker.run(args.seconds)
    except Exception as error:  # noqa: BLE001 - reported in the JSON line
        attacker.unexpected.append(f"the attacker stopped: {type(error).__name__}: {error}")
    print(json.dumps({"refusals": attacker.refusals, "counts": dict(attacker.counts),
                      "unexpected": attacker.unexpected[:50]}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared fixtures: real initserve server processes on 127.0.0.1 (port 0), and the contract's local reference."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import initserve
from initserve_protocol.v1 import initserve_pb2 as pb

# The contract is defined under the server's torch, which runs one intra-op thread (orthogonal_'s QR gives
# thread-count-dependent bits). The local reference runs the same way.
torch.set_num_threads(1)

SERVER_START_SECONDS = 60.0
SERVER_STOP_SECONDS = 15.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class ServerProcess:
    """A real ``python -m initserve_server`` process listening on a loopback port."""

    process: subprocess.Popen
    port: int
    output: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **options) -> initserve.Client:
        options.setdefault("timeout", 60.0)
        return initserve.Client(self.target, **options)

    def announced_port(self, what: str) -> int:
        """The port of the server's ``initserve <what> on HOST:PORT`` line (``metrics``, ``health``)."""
        match = re.search(rf"initserve {what} on \S+:(\d+)", "".join(self.output))
        if match is None:
            raise AssertionError(f"the server announced no {what} port: {''.join(self.output)}")
        return int(match[1])

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(SERVER_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(SERVER_STOP_SECONDS)
        return self.process.returncode


def run_python(
    source: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """``source`` (dedented) in a fresh interpreter with the repository importable, this environment plus ``env``."""
    path = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": path, **(env or {})},
        check=False,
    )


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """(certificate, key): a self-signed certificate for "localhost", made by openssl in ``directory``."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def settled(
    stats: Callable[[], pb.ServerStats], condition: Callable[[pb.ServerStats], bool], what: str, seconds: float
) -> pb.ServerStats:
    """Poll ``stats()`` (a server's Describe stats) until ``condition`` holds, for at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        current = stats()
        if condition(current):
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"after {seconds}s, still not {what}: {current}")
        time.sleep(0.02)


def page_faults(pid: int) -> int:
    """A process's minor page faults so far (/proc/PID/stat, field 10)."""
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[7])


def preallocated(client: initserve.Client, nbytes: int, timeout: float = 30.0) -> int:
    """The server's free tensor memory once its start-up preallocation has reached ``nbytes`` (or after
    ``timeout``): the background thread writes it while the server already serves."""
    deadline = time.monotonic() + timeout
    while (free := client.describe().stats.buffer_pool_bytes) < nbytes and time.monotonic() < deadline:
        time.sleep(0.01)
    return free


def start_server(*flags: str, env: dict[str, str] | None = None) -> ServerProcess:
    """Start a server with ``flags`` on a free loopback port and wait until it says where it listens."""
    command = [sys.executable, "-m", "initserve_server", "--host", "127.0.0.1", "--port", "0", *flags]
    return start_command(command, {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def start_installed_server(*flags: str) -> ServerProcess:
    """Start the installed ``initserve-server`` command, as operators do, with ``flags`` on a free loopback port."""
    script = os.path.join(os.path.dirname(sys.executable), "initserve-server")
    command = [script, "--host", "127.0.0.1", "--port", "0", *flags]
    return start_command(command, {**os.environ, "PYTHONUNBUFFERED": "1"})


def start_command(command: list[str], env: dict[str, str], cwd: str | os.PathLike[str] | None = None) -> ServerProcess:
    """Run a server command line exactly as given, in exactly ``env``, until it prints its listening line."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    lines: queue.Queue[str | None] = queue.Queue()
    output: list[str] = []

    def pump() -> None:
        with process.stdout:  # type: ignore[union-attr]  # closed at the server's end, not left to the collector
            for line in process.stdout:  # type: ignore[union-attr]
                output.append(line)
                lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + SERVER_START_SECONDS
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            process.kill()
            raise RuntimeError(f"server did not start in {SERVER_START_SECONDS}s: {''.join(output)}")
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            process.wait(SERVER_STOP_SECONDS)
            raise RuntimeError(f"server exited with {process.returncode}: {''.join(output)}")
        if line.startswith("initserve listening on "):
            port = int(line.rsplit(":", 1)[1])
            return ServerProcess(process=process, port=port, output=output)


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """One default server for the whole session (tests that kill or reconfigure servers start their own)."""
    running = start_server()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def tiny_chunk_server() -> Iterator[ServerProcess]:
    """A server whose default chunk is 7 bytes: every tensor spans many chunks, none aligned to elements."""
    running = start_server("--chunk-bytes", "7")
    yield running
    running.stop()


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[initserve.Client]:
    with server.client() as connected:
        yield connected


def reference(
    scheme: str,
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: str = "cpu",
    **params,
) -> torch.Tensor:
    """The contract, literally: torch.nn.init.<scheme>_ on torch.empty with a seeded generator.

    ``sparse`` is the one scheme whose torch function ignores the generator for part of its draws; its
    reference is :func:`reference_sparse`, the documented algorithm.
    """
    tensor = torch.empty(shape, dtype=dtype, device=device)
    if scheme == "sparse":
        return reference_sparse(tensor, seed=seed, **params)
    function = getattr(torch.nn.init, f"{scheme}_")
    if initserve.SCHEMES[scheme].seeded:
        return function(tensor, **params, generator=torch.Generator(device).manual_seed(seed))
    return function(tensor, **params)


def reference_sparse(tensor: torch.Tensor, *, seed: int, sparsity: float, std: float = 0.01) -> torch.Tensor:
    """torch 2.13's sparse_ with ``torch.randperm(rows)`` given the request's generator (docs/contract.md: 'sparse')."""
    import math

    if tensor.ndimension() != 2:
        raise ValueError("Only tensors with 2 dimensions are supported")
    generator = torch.Generator(tensor.device).manual_seed(seed)
    rows, cols = tensor.shape
    num_zeros = math.ceil(sparsity * rows)
    with torch.no_grad():
        tensor.normal_(0, std, generator=generator)
        for col_idx in range(cols):
            row_indices = torch.randperm(rows, generator=generator, device=tensor.device)
            tensor[row_indices[:num_zeros], col_idx] = 0
    return tensor


def same_bytes(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Bit-for-bit equality, NaN payloads and signed zeros included: never allclose."""
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return False
    # As raw bytes: a uint8 view compares bits, and stays fast where bytes(storage) iterates element-wise.
    return torch.equal(_raw(actual), _raw(expected))


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)

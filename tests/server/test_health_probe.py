"""``initserve-health``, the probe of container and exec healthchecks: its exit status against real servers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import ServerProcess, self_signed_certificate, start_server

PROBE = str(Path(sys.executable).parent / "initserve-health")
PROBE_SECONDS = 30.0


def probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("INITSERVE_")}
    return subprocess.run(
        [PROBE, *args], capture_output=True, text=True, timeout=PROBE_SECONDS, env={**clean, **(env or {})}
    )


def test_serving_is_exit_0_for_the_server_and_the_init_service(server: ServerProcess) -> None:
    for service in ("", "initserve.v1.InitService"):
        done = probe("--target", server.target, "--service", service)
        assert (done.returncode, done.stdout) == (0, f"{server.target}: SERVING\n")


def test_the_default_target_is_this_hosts_initserve_port(server: ServerProcess) -> None:
    done = probe(env={"INITSERVE_PORT": str(server.port)})  # the server's own env twin: one environment, both
    assert (done.returncode, done.stdout) == (0, f"127.0.0.1:{server.port}: SERVING\n")
    done = probe(env={"INITSERVE_HEALTH_TARGET": server.target, "INITSERVE_PORT": "1"})  # its own twin wins
    assert done.returncode == 0


def test_an_unknown_service_is_exit_1_and_no_server_is_exit_2(server: ServerProcess) -> None:
    done = probe("--target", server.target, "--service", "no.such.Service")
    assert (done.returncode, done.stderr) == (1, f"{server.target}: SERVICE_UNKNOWN 'no.such.Service'\n")
    with socket.socket() as closed:  # a port nobody listens on: bound, never listening
        closed.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{closed.getsockname()[1]}"
        done = probe("--target", target, "--timeout", "2")
    assert done.returncode == 2 and done.stderr.startswith(f"{target}: UNAVAILABLE: ")


def test_a_draining_server_is_not_serving(tmp_path: Path) -> None:
    """After SIGTERM, while a stream drains, the probe fails: health answers NOT_SERVING for an instant, then the
    listening socket closes (gRPC's stop) and a new probe's connection is refused. Either way, not 0."""
    running = start_server("--grace-seconds", "30", "--chunk-bytes", "1024")
    try:
        with running.client() as client:
            received = threading.Event()
            release = threading.Event()

            def progress(done: int, total: int) -> None:
                received.set()
                release.wait(PROBE_SECONDS)  # hold the stream open, half-read, until the probe has run

            fetching = threading.Thread(
                target=lambda: client.fetch((256, 1024), "normal", seed=5, progress=progress), daemon=True
            )
            fetching.start()
            assert received.wait(PROBE_SECONDS)
            running.process.send_signal(signal.SIGTERM)
            try:
                deadline = time.monotonic() + PROBE_SECONDS
                done = probe("--target", running.target)
                while done.returncode == 0 and time.monotonic() < deadline:  # the server's 1 s signal loop
                    done = probe("--target", running.target)
            finally:
                release.set()
            fetching.join(PROBE_SECONDS)
        assert (done.returncode, done.stderr) == (1, f"{running.target}: NOT_SERVING\n") or (
            done.returncode == 2 and "Connection refused" in done.stderr
        )
        assert running.process.wait(PROBE_SECONDS) == 0  # drained and exited after the one signal
    finally:
        running.stop()


def test_the_probe_never_imports_torch() -> None:
    code = "import sys, initserve_server.health_probe; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=PROBE_SECONDS)
    assert done.stdout == "False\n"


def test_the_default_target_is_the_plaintext_health_port_when_the_server_has_one(tmp_path: Path) -> None:
    """A TLS server with --health-port: the probe, given only the server's environment (its TLS CA too), asks the
    plaintext health port, so the image's HEALTHCHECK works without certificates."""
    cert, key = self_signed_certificate(tmp_path)
    running = start_server("--tls-cert", str(cert), "--tls-key", str(key), "--health-port", "0")
    try:
        health_port = running.announced_port("health")
        environment = {"INITSERVE_PORT": str(running.port), "INITSERVE_HEALTH_PORT": str(health_port),
                       "INITSERVE_HEALTH_TLS_CA": str(cert)}  # fmt: skip
        done = probe(env=environment)
        assert (done.returncode, done.stdout) == (0, f"127.0.0.1:{health_port}: SERVING\n")
        done = probe("--service", "initserve.v1.InitService", env=environment)
        assert done.returncode == 0
    finally:
        running.stop()

"""Processes for the benchmark: servers started on port 0 and always stopped, and peak-RSS readings from /proc."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

STOP_SECONDS = 30.0  # how long a server gets after SIGTERM before it is killed
START_SECONDS = 120.0  # how long a server may take to print its listening line
KIB = 1 << 10


class ServerUnavailable(RuntimeError):
    """A server did not start; ``unknown_flag`` when argparse refused a flag this build does not have."""

    def __init__(self, message: str, unknown_flag: bool) -> None:
        super().__init__(message)
        self.unknown_flag = unknown_flag


@dataclass(frozen=True)
class Server:
    """A running server process and the target it printed."""

    process: subprocess.Popen
    target: str

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def port(self) -> int:
        return int(self.target.rpartition(":")[2])


def _drain(stream: object) -> None:
    with stream:  # type: ignore[attr-defined]  # closed at the process's end, not left to the collector
        for _ in stream:  # type: ignore[attr-defined]
            pass


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running(command: Sequence[str], ready_prefix: str) -> Iterator[Server]:
    """Start ``command``, wait for its ``ready_prefix HOST:PORT`` line, and SIGTERM it on the way out.

    stdout is drained by a thread after the line; stderr goes to a temporary file, quoted when the process
    exits early, so a chatty server never blocks on a full pipe.
    """
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            target = None
            timer = threading.Timer(START_SECONDS, process.kill)
            timer.start()
            try:
                for line in process.stdout:  # type: ignore[union-attr]
                    if line.startswith(ready_prefix):
                        target = line.split()[-1]
                        break
            finally:
                timer.cancel()
            if target is None:
                code = process.wait()
                log.seek(0)
                message = log.read().strip()
                raise ServerUnavailable(
                    f"{' '.join(command)} exited with {code}: {message[-2000:]}",
                    unknown_flag=code == 2 and "unrecognized arguments" in message,
                )
            threading.Thread(target=_drain, args=(process.stdout,), daemon=True).start()
            yield Server(process, target)
        finally:
            _stop(process)


def initserve_server(*flags: str) -> contextlib.AbstractContextManager[Server]:
    """An initserve server on 127.0.0.1 with a free port and ``flags``."""
    command = [sys.executable, "-m", "initserve_server", "--host", "127.0.0.1", "--port", "0", *flags]
    return running(command, "initserve listening on ")


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size now (VmRSS)."""
    return _status_kib(pid or os.getpid(), "VmRSS") * KIB


def peak_rss_bytes(pid: int | None = None) -> int:
    """Peak resident set size since the process started or :func:`reset_peak_rss` (VmHWM)."""
    return _status_kib(pid or os.getpid(), "VmHWM") * KIB


def reset_peak_rss(pid: int | None = None) -> None:
    """Set VmHWM back to the current RSS (Linux: "5" to clear_refs; allowed for one's own processes)."""
    Path(f"/proc/{pid or os.getpid()}/clear_refs").write_text("5")

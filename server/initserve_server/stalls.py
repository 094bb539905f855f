"""The stall watch: a stream whose client takes none of a message for ``stall_seconds`` is cancelled.

gRPC's threaded server sends a stream's message, then asks the handler for the next one; a client that stops
reading leaves the send waiting on HTTP/2 flow control, holding the call's thread, its message and the lease on
its tensor. One watcher thread looks at every stream twice a second and cancels (``context.cancel()``: an
RST_STREAM, so the client sees CANCELLED and the SDK resumes from its last verified byte) each one whose current
message has been waiting longer than ``stall_seconds``. The call's thread then returns and releases what it
held. Time spent waiting for bytes still being generated is not a stall: only a message handed to gRPC counts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CHECK_SECONDS = 0.5  # how often streams are looked at: a stall is noticed within stall_seconds + this


class Sending:
    """One stream's state as the watch sees it: since when its current message waits for the client."""

    __slots__ = ("cancel", "since", "stalled")

    def __init__(self, cancel: Callable[[], object]) -> None:
        self.cancel = cancel
        self.since: float | None = None  # monotonic time the message was handed to gRPC; None between messages
        self.stalled = False

    def handed(self) -> None:
        self.since = time.monotonic()

    def taken(self) -> None:
        self.since = None


class StallWatch:
    def __init__(self, stall_seconds: float, on_stall: Callable[[], None] = lambda: None) -> None:
        self.stall_seconds = stall_seconds
        self._on_stall = on_stall
        self._lock = threading.Lock()
        self._streams: set[Sending] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="initserve-stall-watch", daemon=True)
        self._thread.start()

    def add(self, cancel: Callable[[], object]) -> Sending:
        sending = Sending(cancel)
        with self._lock:
            self._streams.add(sending)
        return sending

    def remove(self, sending: Sending) -> None:
        with self._lock:
            self._streams.discard(sending)

    def _watch(self) -> None:
        while not self._stop.wait(CHECK_SECONDS):
            now = time.monotonic()
            with self._lock:
                stalled = [s for s in self._streams if s.since is not None and now - s.since > self.stall_seconds]
                for sending in stalled:
                    self._streams.discard(sending)
            for sending in stalled:
                sending.stalled = True
                self._on_stall()
                sending.cancel()

    def close(self) -> None:
        self._stop.set()

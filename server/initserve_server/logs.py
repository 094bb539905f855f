"""Logging: one line per record, as text or as JSON objects (``--log-format json``), and the access log."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any

from initserve_server.metrics import CallRecord

access_log = logging.getLogger("initserve.access")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", ...}``: an access line's fields are top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            # an access line: a short message and its fields as keys (its text form is never built)
            "message": getattr(record, "json_message", None) or record.getMessage(),
        }
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"), default=str)


def configure_logging(level: str, log_format: str) -> None:
    """The root logger at ``level`` on stderr, as ``text`` or ``json`` lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class AccessLog:
    """One ``initserve.access`` line per finished call, written by a thread of its own, in batches.

    A line costs about 25 µs to format and write; a cached small answer takes about 0.6 ms end to end. So the
    handler only queues the record (0.1 µs), and the writer wakes at most every FLUSH_SECONDS under load rather
    than once per call (a wake-up per call, competing for the GIL with the next request, measured +0.05x on the
    small-request p50). Lines keep the calls' order and appear within about FLUSH_SECONDS.
    """

    FLUSH_SECONDS = 0.05

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[CallRecord | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._lock = threading.Lock()

    def write(self, call: CallRecord) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        if self._writer is None:
            with self._lock:
                if self._writer is None:
                    self._writer = threading.Thread(target=self._drain, name="initserve-access-log", daemon=True)
                    self._writer.start()
        self._queue.put(call)

    def close(self, timeout_seconds: float = 5.0) -> None:
        """Write what is queued, then stop the writer."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(timeout_seconds)
            self._writer = None

    def _drain(self) -> None:
        while True:
            batch = [self._queue.get()]  # idle until a call ends
            if batch[0] is not None:
                time.sleep(self.FLUSH_SECONDS)  # let the calls of the next few ms join this wake-up
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for call in batch:
                if call is None:
                    return
                fields = access_fields(call)
                access_log.info(
                    "call %s",
                    _TextFields(fields),
                    extra={"fields": fields, "json_message": f"{call.method} {call.code}"},
                )


class _TextFields:
    """An access line's ``key=value`` text, built only by a formatter that prints it (not the JSON one)."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return " ".join(f"{key}={json.dumps(value, separators=(',', ':'))}" for key, value in self.fields.items())


def access_fields(call: CallRecord) -> dict[str, Any]:
    """An access line's fields, in the order the text form prints them."""
    return {
        "request_id": call.request_id,
        "method": call.method,
        "code": call.code,
        "scheme": call.scheme,
        "shape": list(call.shape),
        "tensors": call.tensors,
        "bytes": call.bytes_sent,
        "cache_hit": call.cache_hit,
        "ms": round(call.seconds * 1000, 3),
        "peer": call.peer,
    }

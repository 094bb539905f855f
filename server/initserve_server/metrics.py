"""Prometheus metrics on their own HTTP port (off by default), counted from every finished call.

Counters and histograms are updated as calls end; the cache's, in-flight and device figures are read from the
servicer when scraped, so they are never out of step with ``Describe``'s stats. Nothing here sees tensor data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from initserve_protocol.v1 import initserve_pb2 as pb

# Seconds: from a cached small answer (well under 1 ms) to a 4 GiB orthogonal (minutes).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


@dataclass
class CallRecord:
    """What the metrics and the access log (logs.AccessLog) say about one call (never tensor data)."""

    method: str  # Init, InitUnary, InitMany, Describe
    request_id: str
    peer: str
    seconds: float
    code: str  # the gRPC status name: OK, INVALID_ARGUMENT, ...
    scheme: str = ""  # "" before validation; "many" for InitMany
    shape: tuple[int, ...] = ()
    tensors: int = 0
    bytes_sent: int = 0  # payload bytes of the tensors answered (chunks, or a shared-memory write)
    cache_hit: bool = False


class _StatsCollector(Collector):
    """The servicer's ServerStats and devices, read at scrape time."""

    def __init__(self, stats: Callable[[], pb.ServerStats], devices: Callable[[], list[pb.DeviceInfo]]) -> None:
        self._stats = stats
        self._devices = devices

    def collect(self) -> Iterator[Any]:
        stats = self._stats()
        counters = {
            "generations": (stats.generations, "tensors generated"),
            "cache_hits": (stats.cache_hits, "requests served from a finished tensor in the cache"),
            "cache_misses": (stats.cache_misses, "requests that generated, or cut a slice"),
            "single_flight_joins": (stats.single_flight_joins, "requests that joined an identical generation"),
            "cache_evictions": (stats.cache_evictions, "tensors evicted from the cache"),
            "refused_inflight_bytes": (stats.refused_inflight_bytes, "generations refused for the in-flight budget"),
            "cancelled": (stats.cancelled, "calls that ended early: cancelled, expired or disconnected"),
            "abandoned_generations": (stats.abandoned_generations, "generations stopped part-way"),
            "unary_answers_reused": (stats.unary_answers_reused, "InitUnary answers served from the answer memo"),
            "slices_cut": (stats.slices_cut, "slices copied out of a whole tensor"),
            "stalled_streams": (stats.stalled_streams, "streams cancelled: their client read nothing for a while"),
            "refused_work": (stats.refused_work, "requests refused by the cost model (max_work_seconds)"),
            "refused_unauthenticated": (stats.refused_unauthenticated, "calls refused for a missing or wrong token"),
        }
        for name, (value, help_text) in counters.items():
            yield CounterMetricFamily(f"initserve_{name}", help_text, value=value)
        gauges = {
            "cache_entries": (stats.cache_entries, "tensors in the cache"),
            "cache_bytes": (stats.cache_bytes_used, "bytes of tensors in the cache"),
            "inflight_requests": (stats.inflight_requests, "calls being served"),
            "inflight_bytes": (stats.inflight_bytes, "bytes of tensors generated or streamed outside the cache"),
            "buffer_pool_bytes": (stats.buffer_pool_bytes, "memory of freed tensors kept for reuse"),
            "queued_generations": (stats.queued_generations, "admitted generations waiting for a generation thread"),
            "running_generations": (stats.running_generations, "generations running now"),
        }
        for name, (value, help_text) in gauges.items():
            yield GaugeMetricFamily(f"initserve_{name}", help_text, value=value)
        devices = GaugeMetricFamily(
            "initserve_device_info", "devices this server generates on", labels=["device", "name", "fingerprint"]
        )
        for device in self._devices():
            devices.add_metric([device.device, device.name, device.fingerprint], 1)
        yield devices


class Metrics:
    """The server's Prometheus registry; :meth:`record` counts every finished call."""

    def __init__(self, stats: Callable[[], pb.ServerStats], devices: Callable[[], list[pb.DeviceInfo]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "initserve_requests", "calls by method, scheme and status", ["method", "scheme", "code"],
            registry=self.registry,
        )  # fmt: skip
        self.bytes_sent = Counter(
            "initserve_bytes_sent", "tensor payload bytes answered, by method", ["method"], registry=self.registry
        )
        self.tensors = Counter("initserve_tensors", "tensors answered, by scheme", ["scheme"], registry=self.registry)
        self.call_seconds = Histogram(
            "initserve_call_seconds", "call duration, first byte to status, by method", ["method"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.generation_seconds = Histogram(
            "initserve_generation_seconds", "time to generate one tensor, by scheme and device", ["scheme", "device"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.registry.register(_StatsCollector(stats, devices))
        self._http: Any = None  # the /metrics HTTP server, once serve() started it
        self._children: dict[tuple[str, str, str], tuple[Any, Any, Any, Any]] = {}

    def record(self, call: CallRecord) -> None:
        """Count one finished call (children cached per label set: 1 µs where labels() costs 2 each)."""
        key = (call.method, call.scheme or "-", call.code)
        children = self._children.get(key)
        if children is None:
            tensors = self.tensors.labels(call.scheme) if call.scheme not in ("", "many") else None
            children = (
                self.requests.labels(*key),
                self.bytes_sent.labels(call.method),
                tensors,
                self.call_seconds.labels(call.method),
            )
            self._children[key] = children
        requests, bytes_sent, tensors, call_seconds = children
        requests.inc()
        if call.bytes_sent:
            bytes_sent.inc(call.bytes_sent)
        if call.tensors and tensors is not None:
            tensors.inc(call.tensors)
        call_seconds.observe(call.seconds)

    def generated(self, scheme: str, device: str, seconds: float) -> None:
        self.generation_seconds.labels(scheme, device).observe(seconds)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on ``host:port`` (0: a free port) in a daemon thread; the bound port."""
        try:
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            raise OSError(f"--metrics-port: cannot serve metrics on {host}:{port}: {error.strerror}") from None
        return self.port

    @property
    def port(self) -> int | None:
        return None if self._http is None else self._http.server_address[1]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

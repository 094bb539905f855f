"""serve(config): build and start the gRPC server (init service, health, reflection) and return it running.

Capacity: gRPC's thread pool has ``max_concurrent_calls`` threads for Init calls and CONTROL_THREADS more that
only Describe and health checks can use (the servicer refuses Init calls past the limit, RESOURCE_EXHAUSTED), so
those always answer, whatever the Init calls are doing. A thread a stalled stream holds is released after
``stall_seconds`` (``stalls``). Generations run in the engine's own pool.

Health: the service ``""`` answers SERVING while the process serves (liveness); ``initserve.v1.InitService``
(readiness) also waits for the required devices (``readiness``). Both turn NOT_SERVING when the server drains.
With ``health_port``, a second, plaintext server with threads of its own carries the health service alone (no
token, no TLS) on that port: kubelet's gRPC probes speak plaintext only.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from initserve_protocol.portable import triton_modules
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_server.allocator import return_large_blocks_to_the_os
from initserve_server.config import MAX_REQUEST_BYTES, ServerConfig
from initserve_server.devices import cpu_qr_probe
from initserve_server.engine import SERVER_ID, Engine
from initserve_server.initializers import configure_torch
from initserve_server.readiness import Readiness
from initserve_server.security import BearerTokenInterceptor, TokenSet, server_credentials
from initserve_server.servicer import InitServicer, add_to_server
from initserve_server.shared_memory import RegionLimits, SharedMemoryServer

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InitService"].full_name
CONTROL_THREADS = 16  # gRPC threads beyond max_concurrent_calls: Describe and health checks always find one
HEALTH_PORT_THREADS = 4
# Streams one client connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS; gRPC's own
# default is unlimited): a connection past it waits for one of its own streams to end.
MAX_STREAMS_PER_CONNECTION = 64
log = logging.getLogger("initserve.server")
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _host_for_target(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _options(config: ServerConfig) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        ("grpc.so_reuseport", 0),  # two servers must never share a port silently
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        # Clients ping idle connections every 30 s (the SDK's keepalive); allow it, and ping back.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if config.max_connection_age_seconds > 0:
        # GOAWAY after this age; gRPC's default grace is unlimited, so calls on the connection run to their end.
        options.append(("grpc.max_connection_age_ms", int(config.max_connection_age_seconds * 1000)))
    return options


@dataclass
class RunningServer:
    server: grpc.Server
    health: health.HealthServicer
    config: ServerConfig
    port: int  # the bound port (the real one when config.port was 0)
    servicer: InitServicer
    health_server: grpc.Server | None = None
    health_port: int | None = None  # the bound health-only port, or None
    readiness: Readiness | None = None
    shared_memory: SharedMemoryServer | None = None  # the same-host transport's socket, when configured

    @property
    def metrics_port(self) -> int | None:
        """The bound metrics port (the real one when config.metrics_port was 0), or None."""
        return self.servicer.metrics.port

    @property
    def target(self) -> str:
        return f"{_host_for_target(self.config.host)}:{self.port}"

    def stop(self, grace_seconds: float | None = None) -> int:
        """Report NOT_SERVING, refuse new calls, give in-flight calls the grace period, then stop; returns how
        many generations were still running (their threads are daemons: they end with the process)."""
        self.health.enter_graceful_shutdown()
        if self.readiness is not None:
            self.readiness.close()
        grace = self.config.grace_seconds if grace_seconds is None else grace_seconds
        self.server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()
        if self.shared_memory is not None:
            self.shared_memory.close()  # after the drain: no write into a region is left running
        self.servicer.stalls.close()
        self.servicer.metrics.close()  # after the drain, so the last calls are still scraped while it lasts
        self.servicer.access_log.close()  # the last calls' lines are written before stop() returns
        return self.servicer.engine.close()

    def wait(self) -> None:
        self.server.wait_for_termination()


def _use_triton_modules(directory: str) -> None:
    """Triton's C modules from ``directory``, else from this environment where it holds them, before Triton's
    first use (process-wide: Triton's build hook); nothing where Triton is not installed."""
    used = triton_modules.use(Path(directory)) if directory else triton_modules.use_installed() is not None
    if used:
        log.info("Triton takes its C modules from %s, compiling none", directory or "this environment")


def serve(config: ServerConfig) -> RunningServer:
    """Start serving per ``config``; ``config.port=0`` binds a free port (see RunningServer.port)."""
    configure_torch()
    _use_triton_modules(config.triton_modules)
    cpu_qr_probe()  # the CPU fingerprint's probe runs now, not in the first request (about 20 ms)
    return_large_blocks_to_the_os()
    credentials = server_credentials(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
    tokens = TokenSet(config.auth_token_file, config.auth_token)  # read now: a bad file stops the start
    shared_memory = None
    if config.shared_memory:
        limits = RegionLimits.for_tensors(config.max_tensor_bytes)
        shared_memory = SharedMemoryServer(config.shared_memory_socket, SERVER_ID, limits, config.shared_memory_uids)
    servicer = InitServicer(config, Engine(config), shared_memory)
    interceptors = [BearerTokenInterceptor(tokens, servicer.refused)] if tokens.required else []
    threads = config.max_concurrent_calls + CONTROL_THREADS
    server = grpc.server(
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="initserve"),
        options=_options(config),
        interceptors=interceptors,
        maximum_concurrent_rpcs=threads,
    )
    add_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{_host_for_target(config.host)}:{config.port}"
    port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind {address}")
    running = RunningServer(
        server=server, health=health_servicer, config=config, port=port, servicer=servicer, shared_memory=shared_memory
    )
    if config.health_port is not None:
        running.health_server = grpc.server(
            ThreadPoolExecutor(HEALTH_PORT_THREADS, thread_name_prefix="initserve-health"),
            options=[("grpc.so_reuseport", 0)],
        )
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, running.health_server)
        health_address = f"{_host_for_target(config.host)}:{config.health_port}"
        running.health_port = running.health_server.add_insecure_port(health_address)
        if running.health_port == 0:
            raise OSError(f"--health-port: could not bind {health_address}")
    if shared_memory is not None:  # before the gRPC server starts, as the metrics port: a failure stops nothing
        shared_memory.start()
    if config.metrics_port is not None:  # before the gRPC server starts: a port in use stops nothing running
        servicer.metrics.serve(config.host, config.metrics_port)
    server.start()
    if running.health_server is not None:
        running.health_server.start()
    health_servicer.set("", SERVING)

    def set_ready(ready: bool) -> None:
        health_servicer.set(SERVICE_NAME, SERVING if ready else NOT_SERVING)

    if config.require_devices:
        set_ready(False)
        running.readiness = Readiness(config.require_devices, servicer.engine.pool, set_ready)
    else:
        set_ready(True)
    mode = "mutual TLS" if config.tls_client_ca_file else "TLS" if credentials is not None else "plaintext"
    log.info(
        "serving on %s (%s%s); %d generation threads and a light lane; %d concurrent calls",
        running.target, mode, ", bearer token required" if tokens.required else "", config.workers,
        config.max_concurrent_calls,
    )  # fmt: skip
    return running

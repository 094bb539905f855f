"""serve(config): build and start the gRPC server (init service, health, reflection) and return it running.

The server is a grpc.aio server on an event loop of its own thread ("initserve-loop"): calls are coroutines, so
none holds a thread while it waits for its client or for bytes being generated; generation runs in the engine's
pool. ``serve`` returns once the server listens; ``RunningServer.stop`` drains and stops it from any thread.

Health: the service ``""`` answers SERVING while the process serves (liveness); ``initserve.v1.InitService``
(readiness) also waits for the required devices (``readiness``). Both turn NOT_SERVING when the server drains.
With ``health_port``, a second, plaintext server on that port carries the health service alone (no token, no
TLS): kubelet's gRPC probes speak plaintext only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from initserve.v1 import initserve_pb2 as pb
from initserve_server import readiness
from initserve_server.allocator import return_large_blocks_to_the_os
from initserve_server.config import MAX_REQUEST_BYTES, ServerConfig
from initserve_server.devices import cpu_qr_probe
from initserve_server.engine import Engine
from initserve_server.initializers import configure_torch
from initserve_server.security import BearerTokenInterceptor, TokenSet, server_credentials
from initserve_server.servicer import InitServicer, add_to_server

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InitService"].full_name
# Streams one client connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS; gRPC's own
# default is unlimited): a client past it waits for one of its streams to end, and costs nobody else anything.
MAX_STREAMS_PER_CONNECTION = 256
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
        # Clients ping idle connections every 30 s (see initserve._transport); allow it, and ping back.
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
    config: ServerConfig
    port: int  # the bound port (the real one when config.port was 0)
    health_port: int | None  # the bound health-only port, or None
    servicer: InitServicer
    _loop: asyncio.AbstractEventLoop
    _thread: threading.Thread
    _server: grpc.aio.Server
    _health_server: grpc.aio.Server | None
    _health: health.aio.HealthServicer
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stopped: threading.Event = field(default_factory=threading.Event)

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
        grace = self.config.grace_seconds if grace_seconds is None else grace_seconds
        if not self._stopped.is_set():
            asyncio.run_coroutine_threadsafe(self._stop(grace), self._loop).result()
            self._stopped.set()
            self._thread.join()
            self.servicer.metrics.close()  # after the drain, so the last calls are still scraped while it lasts
            self.servicer.access_log.close()  # the last calls' lines are written before stop() returns
        return self.servicer.engine.close()

    async def _stop(self, grace: float) -> None:
        await self._health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        await self._server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        self._loop.call_soon(self._loop.stop)

    def wait(self) -> None:
        self._thread.join()


async def _start(config: ServerConfig, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> RunningServer:
    credentials = server_credentials(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
    engine = Engine(config)
    servicer = InitServicer(config, engine)
    tokens = TokenSet(config.auth_token_file, config.auth_token)  # read now: a bad file stops the start
    interceptors = [BearerTokenInterceptor(tokens, servicer.refused)] if tokens.required else []
    server = grpc.aio.server(options=_options(config), interceptors=interceptors)
    add_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{_host_for_target(config.host)}:{config.port}"
    port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind {address}")
    health_server, health_port = None, None
    if config.health_port is not None:
        health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_address = f"{_host_for_target(config.host)}:{config.health_port}"
        health_port = health_server.add_insecure_port(health_address)
        if health_port == 0:
            raise OSError(f"--health-port: could not bind {health_address}")
    if config.metrics_port is not None:  # before the gRPC server starts: a port in use stops nothing running
        servicer.metrics.serve(config.host, config.metrics_port)
    await server.start()
    if health_server is not None:
        await health_server.start()
    running = RunningServer(
        config, port, health_port, servicer, loop, thread, server, health_server, health_servicer
    )  # fmt: skip
    await health_servicer.set("", SERVING)

    async def set_ready(ready: bool) -> None:
        await health_servicer.set(SERVICE_NAME, SERVING if ready else NOT_SERVING)

    if config.require_devices:
        await set_ready(False)
        running._tasks.append(loop.create_task(readiness.watch(config.require_devices, engine.pool, set_ready)))
    else:
        await set_ready(True)
    return running


def serve(config: ServerConfig) -> RunningServer:
    """Start serving per ``config``; ``config.port=0`` binds a free port (see RunningServer.port)."""
    configure_torch()
    cpu_qr_probe()  # the CPU fingerprint's probe runs now, not in the first request (about 20 ms)
    return_large_blocks_to_the_os()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="initserve-loop", daemon=True)
    thread.start()
    try:
        running = asyncio.run_coroutine_threadsafe(_start(config, loop, thread), loop).result()
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        raise
    credentials = "mutual TLS" if config.tls_client_ca_file else "TLS" if config.tls_cert_file else "plaintext"
    log.info(
        "serving on %s (%s%s); %d generation threads and a light lane",
        running.target, credentials, ", bearer token required" if config.auth_token or config.auth_token_file else "", config.workers,
    )  # fmt: skip
    return running

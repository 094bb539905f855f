"""serve(config): build and start the gRPC server (init service, health, reflection) and return it running."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from initserve.v1 import initserve_pb2 as pb
from initserve_server.allocator import return_large_blocks_to_the_os
from initserve_server.config import MAX_REQUEST_BYTES, ServerConfig
from initserve_server.devices import cpu_qr_probe
from initserve_server.initializers import configure_torch
from initserve_server.security import BearerTokenInterceptor, server_credentials
from initserve_server.servicer import SERVER_ID, InitServicer, add_to_server
from initserve_server.shared_memory import RegionLimits, SharedMemoryServer

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InitService"].full_name
log = logging.getLogger("initserve.server")


@dataclass
class RunningServer:
    server: grpc.Server
    health: health.HealthServicer
    config: ServerConfig
    port: int  # the bound port (the real one when config.port was 0)
    servicer: InitServicer
    shared_memory: SharedMemoryServer | None = None  # the same-host transport's socket, when configured

    @property
    def metrics_port(self) -> int | None:
        """The bound metrics port (the real one when config.metrics_port was 0), or None."""
        return self.servicer.metrics.port

    @property
    def target(self) -> str:
        return f"{_host_for_target(self.config.host)}:{self.port}"

    def stop(self, grace_seconds: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, give in-flight calls the grace period, then stop."""
        self.health.enter_graceful_shutdown()
        grace = self.config.grace_seconds if grace_seconds is None else grace_seconds
        self.server.stop(grace).wait()
        if self.shared_memory is not None:
            self.shared_memory.close()  # after the drain: no write into a region is left running
        self.servicer.metrics.close()  # after the drain, so the last calls are still scraped while it lasts
        self.servicer.access_log.close()  # the last calls' lines are written before stop() returns

    def wait(self) -> None:
        self.server.wait_for_termination()


def _host_for_target(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def serve(config: ServerConfig) -> RunningServer:
    """Start serving per ``config``; ``config.port=0`` binds a free port (see RunningServer.port)."""
    configure_torch()
    cpu_qr_probe()  # the CPU fingerprint's probe runs now, not in the first request (about 20 ms)
    return_large_blocks_to_the_os()
    options = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        ("grpc.so_reuseport", 0),  # two servers must never share a port silently
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
    credentials = server_credentials(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
    interceptors = [BearerTokenInterceptor(config.auth_token)] if config.auth_token else []
    server = grpc.server(
        ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="initserve"),
        options=options,
        interceptors=interceptors,
    )
    shared_memory = None
    if config.shared_memory:
        shared_memory = SharedMemoryServer(
            config.shared_memory_socket,
            SERVER_ID,
            RegionLimits.for_tensors(config.max_tensor_bytes),
            config.shared_memory_uids,
        )
    servicer = InitServicer(config, shared_memory)
    add_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{_host_for_target(config.host)}:{config.port}"
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind {address}")
    if shared_memory is not None:  # before the gRPC server starts, as the metrics port: a failure stops nothing running
        shared_memory.start()
    if config.metrics_port is not None:  # before the gRPC server starts: a port in use stops nothing running
        servicer.metrics.serve(config.host, config.metrics_port)
    server.start()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(
        server=server, health=health_servicer, config=config, port=port, servicer=servicer, shared_memory=shared_memory
    )
    log.info(
        "serving on %s (%s%s)",
        running.target,
        "mutual TLS" if config.tls_client_ca_file else "TLS" if credentials is not None else "plaintext",
        ", bearer token required" if config.auth_token else "",
    )
    return running

"""What the sync and the asyncio transports share: the channel's target, options, credentials and call metadata,
and the one mapping of an RpcError (either kind) to the SDK's exception."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from initserve._errors import FailedPrecondition, from_grpc_error, trailing_value
from initserve_protocol.errors import REFUSAL_KEY, UNARY_TOO_LARGE
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_protocol.wire import ChunkView

# Tensors of at most MAX_UNARY_BYTES (from the request's offset) are fetched by one InitUnary call: a stream's
# per-message costs are most of a small tensor's latency. A server whose messages are too small for it says so
# (INVALID_ARGUMENT with refusal UNARY_TOO_LARGE) and the client streams instead.
Message = pb.InitResponse | ChunkView | pb.Header | pb.Trailer  # a stream's messages, a unary answer's parts


def unary_too_large(error: grpc.RpcError) -> bool:
    """Whether the server refused an InitUnary call for its size (the caller then streams)."""
    return error.code() == grpc.StatusCode.INVALID_ARGUMENT and trailing_value(error, REFUSAL_KEY) == UNARY_TOO_LARGE


# Large enough for any chunk a server sends (its limit defaults to 4 MiB); requests themselves are tiny.
DEFAULT_MAX_RECEIVE_MESSAGE_BYTES = 64 << 20
SERVICE = pb.DESCRIPTOR.services_by_name["InitService"].full_name

# Round robin over every address behind the target; gRPC itself retries both calls (they are idempotent)
# when no response has arrived yet. A stream that breaks later is resumed by the client (initserve._retry).
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": SERVICE}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    ("grpc.enable_retries", 1),
    ("grpc.keepalive_time_ms", 30_000),  # ping an idle connection every 30 s; the server permits it
    ("grpc.keepalive_timeout_ms", 10_000),  # and drop it when a ping goes unanswered for 10 s
    ("grpc.initial_reconnect_backoff_ms", 100),  # a restarted replica is back in the rotation quickly
    ("grpc.max_reconnect_backoff_ms", 5_000),
)


def _addresses(host_port: str) -> list[str]:
    """``host:port`` or ``[v6]:port`` as resolved ``ip:port`` strings (IPv6 bracketed)."""
    host, separator, port = host_port.rpartition(":")
    if not separator or not port.isdigit():
        raise ValueError(f"target {host_port!r} is not host:port")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
        found = [str(ip)]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            raise ValueError(f"target {host_port!r}: cannot resolve {host!r} ({error})") from None
        found = list(dict.fromkeys(info[4][0] for info in infos))
    return [f"[{address}]:{port}" if ":" in address else f"{address}:{port}" for address in found]


def channel_target(target: str | Sequence[str]) -> str:
    """One gRPC target string for ``target``: as given, or an ``ipv4:``/``ipv6:`` list for several replicas.

    A list (or a comma-separated string) of ``host:port`` is resolved once, here; use ``dns:///name:port``
    for a name whose addresses change (gRPC re-resolves it).
    """
    if isinstance(target, str):
        if "," not in target:
            return target
        target = [part.strip() for part in target.split(",") if part.strip()]
    targets = list(target)
    if not targets:
        raise ValueError("no target given")
    if len(targets) == 1:
        return targets[0]
    addresses = [address for entry in targets for address in _addresses(entry)]
    v4 = [address for address in addresses if not address.startswith("[")]
    if v4:
        return "ipv4:" + ",".join(v4)
    return "ipv6:" + ",".join(addresses)


TLS_PROBE_SECONDS = 2.0


def speaks_tls(host_port: str, timeout: float = TLS_PROBE_SECONDS) -> bool:
    """Whether the server at ``host_port`` answers a TLS handshake (its certificate is not checked: this only asks
    which protocol the port speaks)."""
    host, _, port = host_port.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=None, do_handshake_on_connect=True):
                return True
    except ssl.SSLError as error:  # an answer in TLS, refusing this client (mutual TLS): still TLS
        return "WRONG_VERSION_NUMBER" not in str(error) and "record layer failure" not in str(error)
    except (OSError, ValueError):
        return False


def _single_address(target: str) -> str | None:
    """``host:port`` of a target that names one server (``host:port`` or ``dns:///host:port``), else None."""
    address = target.removeprefix("dns:///")
    if "," in address or "://" in address or address.startswith(("ipv4:", "ipv6:", "unix:")):
        return None
    host, separator, port = address.rpartition(":")
    return address if separator and host and port.isdigit() else None


@dataclass(frozen=True)
class ChannelConfig:
    """A channel's target string, options, credentials (None: plaintext) and the metadata sent with every call."""

    target: str
    options: tuple[tuple[str, Any], ...]
    credentials: grpc.ChannelCredentials | None
    metadata: tuple[tuple[str, str], ...] | None

    @classmethod
    def make(
        cls,
        target: str | Sequence[str],
        *,
        credentials: grpc.ChannelCredentials | None = None,
        max_receive_message_bytes: int = DEFAULT_MAX_RECEIVE_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
        token: str | None = None,
    ) -> ChannelConfig:
        given = {name for name, _ in options}
        channel_options = (
            ("grpc.max_receive_message_length", max_receive_message_bytes),
            *(option for option in CHANNEL_OPTIONS if option[0] not in given),
            *options,
        )
        # Sent with every call; over TLS, or to a trusted proxy that terminates it.
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        return cls(channel_target(target), channel_options, credentials, metadata)


class ErrorMapper:
    """Turns an RpcError (sync or grpc.aio) into the SDK's exception; a channel whose security does not match the
    server's is said to be one (FailedPrecondition, not retried), where gRPC says only "Socket closed" or
    "handshake failed"."""

    def __init__(self, config: ChannelConfig) -> None:
        self._target = config.target
        self._secure = config.credentials is not None
        self._tls_mismatch: str | None = None  # why this channel cannot talk to the server, once found

    def needs_probe(self, error: grpc.RpcError) -> bool:
        """Whether :meth:`error` may open a socket to ask the server which protocol it speaks (the asyncio
        client then calls it in a thread)."""
        return (
            error.code() == grpc.StatusCode.UNAVAILABLE
            and self._tls_mismatch is None
            and not self._secure
            and "Socket closed" in (error.details() or "")
        )

    @contextlib.contextmanager
    def mapped(self) -> Iterator[None]:
        """Raise the SDK's exception for any RpcError inside (sync calls only: see :meth:`needs_probe`)."""
        try:
            yield
        except grpc.RpcError as error:
            raise self.error(error) from error

    def error(self, error: grpc.RpcError) -> Exception:
        """The exception to raise (``from error``)."""
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            mismatch = self._security_mismatch(error.details() or "")
            if mismatch is not None:
                return FailedPrecondition(f"{mismatch} (gRPC said: {error.details()})")
        return from_grpc_error(error)

    def _security_mismatch(self, details: str) -> str | None:
        if self._tls_mismatch is not None:
            return self._tls_mismatch
        address = _single_address(self._target)
        if self._secure and "WRONG_VERSION_NUMBER" in details:
            self._tls_mismatch = f"the server at {self._target} does not speak TLS, and this client's channel does"
        elif not self._secure and "Socket closed" in details and address is not None and speaks_tls(address):
            self._tls_mismatch = (
                f"the server at {self._target} speaks TLS, and this client's channel is plaintext: "
                "give Client(root_certificates=...) (and client_certificate/client_key for mutual TLS)"
            )
        return self._tls_mismatch

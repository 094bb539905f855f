"""The client transport: the channel, its options and credentials, and every RpcError turned into an SDK error."""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from initserve._errors import FailedPrecondition, from_grpc_error, trailing_value
from initserve_protocol.errors import REFUSAL_KEY, UNARY_TOO_LARGE
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_protocol.v1 import initserve_pb2_grpc as pb_grpc
from initserve_protocol.wire import ChunkView, UnaryPart, decode_many_response, decode_response, decode_unary

# Tensors of at most MAX_UNARY_BYTES (from the request's offset) are fetched by one InitUnary call: a stream's
# per-message costs are most of a small tensor's latency. A server whose messages are too small for it says so
# (INVALID_ARGUMENT with refusal UNARY_TOO_LARGE) and the client streams instead.
Message = pb.InitResponse | ChunkView | pb.Header | pb.Trailer  # a stream's messages, a unary answer's parts


def _unary_too_large(error: grpc.RpcError) -> bool:
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


class Transport:
    """One gRPC channel to an initserve target and the stub calls over it."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        credentials: grpc.ChannelCredentials | None = None,
        max_receive_message_bytes: int = DEFAULT_MAX_RECEIVE_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
        token: str | None = None,
    ) -> None:
        self.target = channel_target(target)
        # Sent with every call; over TLS, or to a trusted proxy that terminates it.
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        given = {name for name, _ in options}
        channel_options = [
            ("grpc.max_receive_message_length", max_receive_message_bytes),
            *(option for option in CHANNEL_OPTIONS if option[0] not in given),
            *options,
        ]
        if credentials is None:
            self._channel = grpc.insecure_channel(self.target, options=channel_options)
        else:
            self._channel = grpc.secure_channel(self.target, credentials, options=channel_options)
        self._stub = pb_grpc.InitServiceStub(self._channel)
        # Init's chunks are decoded by hand, without copying their payloads (initserve_protocol.wire).
        self._init = self._channel.unary_stream(
            f"/{SERVICE}/Init",
            request_serializer=pb.InitRequest.SerializeToString,
            response_deserializer=decode_response,
            _registered_method=True,
        )
        self._init_unary = self._channel.unary_unary(
            f"/{SERVICE}/InitUnary",
            request_serializer=pb.InitRequest.SerializeToString,
            response_deserializer=decode_unary,  # the stream's messages, the chunk's payload not copied
            _registered_method=True,
        )
        self._init_many = self._channel.unary_stream(
            f"/{SERVICE}/InitMany",
            request_serializer=pb.InitManyRequest.SerializeToString,
            response_deserializer=decode_many_response,  # (tensor index, message), chunks not copied
            _registered_method=True,
        )
        self.unary_refused = False
        self._secure = credentials is not None
        self._tls_mismatch: str | None = None  # why this channel cannot talk to the server, once found

    def init_stream(self, request: pb.InitRequest, timeout: float | None) -> Iterator[Message]:
        """The Init stream's messages; on early exit (an integrity error, say) the call is cancelled."""
        call = self._init(request, timeout=timeout, metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as error:
            raise self._error(error) from error
        finally:
            call.cancel()  # a no-op once the stream has finished; otherwise it stops the server's work

    def init_many(self, request: pb.InitManyRequest, timeout: float | None) -> Iterator[tuple[int, Message]]:
        """The InitMany stream's (tensor index, message) pairs; on early exit the call is cancelled."""
        call = self._init_many(request, timeout=timeout, metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as error:
            raise self._error(error) from error
        finally:
            call.cancel()

    def init(self, request: pb.InitRequest, timeout: float | None, *, unary: bool) -> Iterator[Message]:
        """The Init call's messages: from one InitUnary call when ``unary`` (and the server takes it), else a stream."""
        if unary and not self.unary_refused:
            return self.init_unary(request, timeout)
        return self.init_stream(request, timeout)

    def init_unary(self, request: pb.InitRequest, timeout: float | None) -> Iterator[Message]:
        """InitUnary's answer as the stream's messages; the Init stream where the server refuses the size."""
        try:
            return iter(self._init_unary(request, timeout=timeout, metadata=self._metadata))
        except grpc.RpcError as error:
            if _unary_too_large(error):
                self.unary_refused = True  # this server's messages are smaller: stream from now on
                return self.init_stream(request, timeout)
            raise self._error(error) from error

    def init_shared(self, request: pb.InitRequest, region_token: str, timeout: float | None) -> list[UnaryPart]:
        """InitUnary asked to fill the registered shared-memory region ``region_token``: its header and trailer (a
        chunk, too, if the server sent one: the caller refuses it)."""
        shared = pb.InitRequest()
        shared.CopyFrom(request)
        shared.shared_memory_region = region_token
        try:
            return self._init_unary(shared, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._error(error) from error

    def describe(self, timeout: float | None) -> pb.ServerInfo:
        try:
            return self._stub.Describe(pb.DescribeRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._error(error) from error

    def close(self) -> None:
        self._channel.close()

    def _error(self, error: grpc.RpcError) -> Exception:
        """The SDK error for ``error``: a channel whose security does not match the server's is said to be one
        (FailedPrecondition, not retried), where gRPC says only "Socket closed" or "handshake failed"."""
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            mismatch = self._security_mismatch(error.details() or "")
            if mismatch is not None:
                return FailedPrecondition(f"{mismatch} (gRPC said: {error.details()})")
        return from_grpc_error(error)

    def _security_mismatch(self, details: str) -> str | None:
        if self._tls_mismatch is not None:
            return self._tls_mismatch
        address = _single_address(self.target)
        if self._secure and "WRONG_VERSION_NUMBER" in details:
            self._tls_mismatch = f"the server at {self.target} does not speak TLS, and this client's channel does"
        elif not self._secure and "Socket closed" in details and address is not None and speaks_tls(address):
            self._tls_mismatch = (
                f"the server at {self.target} speaks TLS, and this client's channel is plaintext: "
                "give Client(root_certificates=...) (and client_certificate/client_key for mutual TLS)"
            )
        return self._tls_mismatch

"""TLS, mutual TLS and bearer tokens: the server's credentials and the interceptor that checks tokens.

Every RPC but the gRPC health service (so Kubernetes and load-balancer probes need no secret) must carry
``authorization: Bearer <token>`` when the server has a token; the comparison takes the same time wherever the
tokens differ (``hmac.compare_digest``). A call without the right token gets UNAUTHENTICATED before its handler
runs, so no tensor work is done and no byte of data is sent.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"
AUTHORIZATION = "authorization"
UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"
MAX_TOKEN_BYTES = 4096


class SecurityConfigError(ValueError):
    """The TLS or token settings cannot work as given; the message names the flag."""


def read_token(path: str) -> str:
    """A token file's contents without surrounding whitespace; refused when empty or too long."""
    try:
        token = Path(path).read_text().strip()
    except OSError as error:
        raise SecurityConfigError(f"--auth-token-file {path}: {error.strerror}") from None
    return check_token(token, f"--auth-token-file {path}")


def check_token(token: str, where: str) -> str:
    if not token:
        raise SecurityConfigError(f"{where}: the token is empty")
    if len(token.encode()) > MAX_TOKEN_BYTES or not token.isprintable() or " " in token:
        raise SecurityConfigError(f"{where}: a token is at most {MAX_TOKEN_BYTES} printable bytes, without spaces")
    return token


def server_credentials(cert_file: str, key_file: str, client_ca_file: str) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files (None when no certificate is configured); with a client CA, clients must
    present a certificate it signed (mutual TLS)."""
    if not cert_file and not key_file:
        if client_ca_file:
            raise SecurityConfigError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS runs over TLS)")
        return None
    if not (cert_file and key_file):
        raise SecurityConfigError("--tls-cert and --tls-key go together")

    def read(flag: str, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as error:
            raise SecurityConfigError(f"{flag} {path}: {error.strerror}") from None

    client_ca = read("--tls-client-ca", client_ca_file) if client_ca_file else None
    return grpc.ssl_server_credentials(
        [(read("--tls-key", key_file), read("--tls-cert", cert_file))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


OnRefused = Callable[[str, grpc.aio.ServicerContext], None]  # (method, context): count and log the refusal


def _refusal(handler: grpc.RpcMethodHandler, method: str, on_refused: OnRefused) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED and nothing else."""

    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        on_refused(method, context)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health checks unless it carries ``authorization: Bearer <token>``; each refusal is
    reported to ``on_refused`` (the servicer counts it and writes its access line)."""

    def __init__(self, token: str, on_refused: OnRefused) -> None:
        self._expected = f"Bearer {token}".encode()
        self._on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        given = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == AUTHORIZATION:
                given = value.encode() if isinstance(value, str) else value
                break
        if hmac.compare_digest(given, self._expected):
            return handler
        return _refusal(handler, method.rsplit("/", 1)[-1], self._on_refused)

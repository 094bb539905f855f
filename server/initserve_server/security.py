"""TLS, mutual TLS and bearer tokens: credentials and tokens that reload from their files, and the token check.

Entry points (the server builds them once from its config; none starts a thread or needs closing):

- ``TokenSet(token_file, token)``: the bearer tokens accepted, from ``--auth-token-file`` (one token a line; blank
  lines and ``#`` comments skipped; at most ``MAX_TOKENS`` tokens in ``MAX_TOKEN_FILE_BYTES``) and the literal
  ``INITSERVE_AUTH_TOKEN``. The file is re-read when its stat signature (mtime, size, inode; ``os.stat`` follows
  the symlinks a Kubernetes Secret volume swaps) changes, checked at most once every ``RELOAD_CHECK_SECONDS`` by
  the call that comes first: a clock comparison per call, one ``stat()`` a second, a read only on change. Several
  tokens let clients move from an old token to a new one one by one. A reload that fails (unreadable, empty,
  malformed) keeps the tokens it had and logs an error naming the file and line. A token is compared against
  every accepted token, each as a SHA-256 digest with ``hmac.compare_digest`` and without an early exit, so the
  time a check takes depends on neither whether nor which token matched, nor on their lengths.
- ``BearerTokenInterceptor(tokens, on_refused)``: a ``grpc.ServerInterceptor``. Every RPC but the gRPC
  health service (Kubernetes and load-balancer probes need no secret) must carry ``authorization: Bearer
  <token>``; any other call is answered UNAUTHENTICATED before its handler runs, so no tensor work is done and no
  byte of data is sent. ``on_refused(method, context)`` is called first (the context gives the peer), so the
  server counts and logs refusals.
- ``server_credentials(cert_file, key_file, client_ca_file)``: None without TLS, else
  ``grpc.dynamic_ssl_server_credentials`` over ``ServerCertificates``, which hands gRPC a new certificate
  configuration when the certificate's, key's or client CA's files change (checked at most once a second, at a
  new connection's handshake): new connections get the new certificate, established ones keep theirs. A pair
  that does not load (half written, key and certificate not matching) keeps the previous configuration and logs
  an error. With a client CA, clients must present a certificate it signed (mutual TLS).

Settings that cannot work at start (a missing file, no token, a key not matching its certificate) raise
``SecurityConfigError`` naming the flag.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"
AUTHORIZATION = "authorization"
BEARER_PREFIX = b"Bearer "
UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"
MAX_TOKEN_BYTES = 4096
MAX_TOKEN_FILE_BYTES = 64 << 10
MAX_TOKENS = 64
# Token, certificate and key files are checked for changes at most this often.
RELOAD_CHECK_SECONDS = 1.0
NO_TOKEN_MESSAGE = "holds no token (one a line; blank lines and # comments are skipped)"

log = logging.getLogger("initserve.security")

# (mtime_ns, size, inode) of a file, or None when it cannot be stat'ed.
FileSignature = tuple[int, int, int] | None
RefusalCallback = Callable[[str, grpc.ServicerContext], None]


class SecurityConfigError(ValueError):
    """The TLS or token settings cannot work as given; the message names the flag."""


def file_signature(path: str) -> FileSignature:
    """What changes when a file is rewritten or a symlink on its path is swapped to another file."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size, status.st_ino


# -- bearer tokens ---------------------------------------------------------------------------------------------------


def check_token(token: str, where: str) -> str:
    if not token:
        raise SecurityConfigError(f"{where}: the token is empty")
    if len(token.encode()) > MAX_TOKEN_BYTES or not token.isprintable() or " " in token:
        raise SecurityConfigError(f"{where}: a token is at most {MAX_TOKEN_BYTES} printable bytes, without spaces")
    return token


def parse_tokens(data: bytes, where: str) -> tuple[str, ...]:
    """The tokens of a token file's bytes, in order and without repeats; the error names the line at fault."""
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise SecurityConfigError(f"{where}: larger than {MAX_TOKEN_FILE_BYTES} bytes")
    tokens: dict[str, None] = {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode().strip()
        except UnicodeDecodeError:
            raise SecurityConfigError(f"{where}: line {number}: not UTF-8") from None
        if line and not line.startswith("#"):
            tokens[check_token(line, f"{where}: line {number}")] = None
    if not tokens:
        raise SecurityConfigError(f"{where}: {NO_TOKEN_MESSAGE}")
    if len(tokens) > MAX_TOKENS:
        raise SecurityConfigError(f"{where}: more than {MAX_TOKENS} tokens")
    return tuple(tokens)


def read_tokens(path: str) -> tuple[FileSignature, tuple[str, ...]]:
    """A token file's signature when it was read, and its tokens; SecurityConfigError when they cannot be used."""
    where = f"--auth-token-file {path}"
    try:
        with open(path, "rb") as file:
            status = os.fstat(file.fileno())
            data = file.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as error:
        raise SecurityConfigError(f"{where}: {error.strerror}") from None
    return (status.st_mtime_ns, status.st_size, status.st_ino), parse_tokens(data, where)


def _digest(authorization: bytes) -> bytes:
    return hashlib.sha256(authorization).digest()


class TokenSet:
    """The bearer tokens a server accepts: the literal ``token`` (never reloaded) and the lines of ``token_file``,
    re-read when the file changes. Safe to use from several threads."""

    def __init__(
        self,
        token_file: str = "",
        token: str = "",
        *,
        check_seconds: float = RELOAD_CHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.token_file = token_file
        self._literal = (check_token(token, "INITSERVE_AUTH_TOKEN"),) if token else ()
        self._check_seconds = check_seconds
        self._clock = clock
        self._reload_lock = threading.Lock()
        self._signature: FileSignature = None
        self._file_tokens: tuple[str, ...] = ()
        if token_file:  # at start, a file that cannot be used stops the server
            self._signature, self._file_tokens = read_tokens(token_file)
        self._next_check = clock() + check_seconds
        # Digests of the whole header values; replaced whole, so a check never sees half a reload.
        self._digests = self._digests_of(self._file_tokens)

    def _digests_of(self, file_tokens: Iterable[str]) -> tuple[bytes, ...]:
        tokens = dict.fromkeys((*self._literal, *file_tokens))
        return tuple(_digest(BEARER_PREFIX + token.encode()) for token in tokens)

    @property
    def required(self) -> bool:
        """Whether any token was configured: the server installs the interceptor only then."""
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, authorization: str | bytes | None) -> bool:
        """Whether an ``authorization`` metadata value is ``Bearer <token>`` for an accepted token. Compares against
        every token, so its time says nothing about which (if any) matched."""
        self.reload_if_changed()
        if authorization is None:
            authorization = b""
        given = _digest(authorization.encode() if isinstance(authorization, str) else authorization)
        matched = False
        for expected in self._digests:
            matched |= hmac.compare_digest(expected, given)
        return matched

    def reload_if_changed(self) -> bool:
        """Re-read the token file if its signature changed and the last check is RELOAD_CHECK_SECONDS old; whether
        the accepted tokens changed. Never raises: a failed reload keeps the tokens and logs an error."""
        if not self.token_file or self._clock() < self._next_check:
            return False
        if not self._reload_lock.acquire(blocking=False):
            return False  # another thread is checking; this call uses the tokens as they are
        try:
            self._next_check = self._clock() + self._check_seconds
            if file_signature(self.token_file) == self._signature:
                return False
            try:
                signature, tokens = read_tokens(self.token_file)
            except SecurityConfigError as error:
                # Remembered, so one bad version is logged once, not every second; a new version is read again.
                self._signature = file_signature(self.token_file)
                log.error("%s; keeping the %d tokens accepted before", error, len(self._digests))
                return False
            self._signature = signature
            if tokens == self._file_tokens:
                return False
            self._file_tokens, self._digests = tokens, self._digests_of(tokens)
            log.info("--auth-token-file %s re-read: %d tokens accepted", self.token_file, len(self._digests))
            return True
        finally:
            self._reload_lock.release()


def _authorization(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | bytes | None:
    for key, value in metadata or ():
        if key == AUTHORIZATION:
            return value
    return None


def _call_on_refused(on_refused: RefusalCallback | None, method: str, context: grpc.ServicerContext) -> None:
    if on_refused is None:
        return
    try:
        on_refused(method, context)
    except Exception:  # counting must never turn a refusal into something else
        log.exception("on_refused failed for %s", method)


def _refused(handler: grpc.RpcMethodHandler | None, details: grpc.HandlerCallDetails, tokens: TokenSet) -> bool:
    """Whether a call must be refused: it has a handler, is no health check, and carries no accepted token."""
    if handler is None or details.method.startswith(HEALTH_PREFIX):
        return False
    return not tokens.accepts(_authorization(details.invocation_metadata))


def _of_kind(
    handler: grpc.RpcMethodHandler, unary_response: Callable[..., object], stream_response: Callable[..., object]
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` (its request and response cardinality); no request deserializer,
    so a refused request is never parsed."""
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream_response)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary_response)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(stream_response)
    return grpc.unary_unary_rpc_method_handler(unary_response)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call but health checks unless it carries ``authorization: Bearer <token>`` for a token of
    ``tokens``; ``on_refused(method, context)`` runs before each refusal (count it, log the peer)."""

    def __init__(self, tokens: TokenSet, on_refused: RefusalCallback | None = None) -> None:
        self._tokens = tokens
        self._on_refused = on_refused

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if not _refused(handler, handler_call_details, self._tokens):
            return handler
        method, on_refused = handler_call_details.method, self._on_refused

        def refuse(request: object, context: grpc.ServicerContext) -> None:
            _call_on_refused(on_refused, method, context)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

        return _of_kind(handler, refuse, refuse)


# -- TLS -------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertificateFiles:
    """The PEM files TLS is served from; client_ca_file "" for TLS without client certificates."""

    cert_file: str
    key_file: str
    client_ca_file: str = ""

    def signature(self) -> tuple[FileSignature, ...]:
        return tuple(file_signature(path) for path in (self.cert_file, self.key_file, self.client_ca_file) if path)


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise SecurityConfigError(f"{flag} {path}: {error.strerror}") from None


def _refuse_encrypted_key() -> bytes:
    raise SecurityConfigError("the key is encrypted; gRPC needs an unencrypted PEM key")


def check_key_pair(key: bytes, cert: bytes, client_ca: bytes | None, files: CertificateFiles) -> None:
    """Raise SecurityConfigError unless ``cert`` is a PEM chain whose first certificate ``key`` (PEM) belongs to and
    ``client_ca`` (when given) holds PEM certificates: what gRPC would otherwise find out at each handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # OpenSSL loads a chain only from a path: these exact bytes go through anonymous memory files, never the disk.
    descriptors = [os.memfd_create("initserve-tls", os.MFD_CLOEXEC) for _ in range(2)]
    try:
        for descriptor, data in zip(descriptors, (cert, key), strict=True):
            os.write(descriptor, data)
        cert_path, key_path = (f"/proc/self/fd/{descriptor}" for descriptor in descriptors)
        context.load_cert_chain(cert_path, key_path, password=_refuse_encrypted_key)
    except (ssl.SSLError, SecurityConfigError) as error:
        if isinstance(error, ssl.SSLError):
            reason = error.reason or "not PEM, or cut short"
        else:
            reason = str(error)
        raise SecurityConfigError(
            f"--tls-cert {files.cert_file} and --tls-key {files.key_file} do not load together ({reason})"
        ) from None
    finally:
        for descriptor in descriptors:
            os.close(descriptor)
    if client_ca is not None:
        try:
            context.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as error:
            raise SecurityConfigError(
                f"--tls-client-ca {files.client_ca_file}: not a PEM CA bundle ({error})"
            ) from None


class ServerCertificates:
    """The server's certificate configuration, loaded from ``files`` and loaded again when they change.

    ``fetch`` is gRPC's certificate_configuration_fetcher: gRPC calls it (from its own threads) before each new
    connection's handshake; it returns a new configuration when the files changed and load, else None (keep).
    """

    def __init__(
        self,
        files: CertificateFiles,
        *,
        check_seconds: float = RELOAD_CHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.files = files
        self._check_seconds = check_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._signature, self.configuration = self._load()  # at start, files that cannot be used stop the server
        self._next_check = clock() + check_seconds

    @property
    def mutual(self) -> bool:
        return bool(self.files.client_ca_file)

    def _load(self) -> tuple[tuple[FileSignature, ...], grpc.ServerCertificateConfiguration]:
        signature = self.files.signature()
        client_ca = _read("--tls-client-ca", self.files.client_ca_file) if self.mutual else None
        key = _read("--tls-key", self.files.key_file)
        cert = _read("--tls-cert", self.files.cert_file)
        check_key_pair(key, cert, client_ca, self.files)
        configuration = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)
        return signature, configuration

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration when the files changed since the last one and load; None otherwise. Never raises."""
        if self._clock() < self._next_check or not self._lock.acquire(blocking=False):
            return None
        try:
            self._next_check = self._clock() + self._check_seconds
            if self.files.signature() == self._signature:
                return None
            try:
                signature, configuration = self._load()
            except SecurityConfigError as error:
                self._signature = self.files.signature()  # this version is logged once; the next is tried again
                log.error("TLS files changed but do not load: %s; keeping the certificate served before", error)
                return None
            except Exception:  # gRPC's thread must get an answer, whatever went wrong
                log.exception("TLS files changed; reloading them failed; keeping the certificate served before")
                return None
            self._signature, self.configuration = signature, configuration
            log.info("TLS certificate reloaded from %s", self.files.cert_file)
            return configuration
        finally:
            self._lock.release()

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that serve the current configuration and pick up the next one by themselves."""
        return grpc.dynamic_ssl_server_credentials(
            self.configuration, self.fetch, require_client_authentication=self.mutual
        )


def server_credentials(cert_file: str, key_file: str, client_ca_file: str) -> grpc.ServerCredentials | None:
    """Reloading TLS credentials from PEM files (None when no certificate is configured), for ``grpc.server`` and
    ``grpc.aio.server`` alike; with a client CA, clients must present a certificate it signed (mutual TLS)."""
    if not cert_file and not key_file:
        if client_ca_file:
            raise SecurityConfigError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS runs over TLS)")
        return None
    if not (cert_file and key_file):
        raise SecurityConfigError("--tls-cert and --tls-key go together")
    return ServerCertificates(CertificateFiles(cert_file, key_file, client_ca_file)).credentials()

"""security.py on its own: token files and TLS files re-read while a server serves, refusals reported.

Small in-test servers with a trivial echo service stand in for initserve: the threaded grpc.server it runs, for
the interceptor; grpc.aio as well, for the reloading credentials, which serve both. Certificates are made by
openssl (tests/e2e/test_security.py's helpers). Files are replaced as Kubernetes replaces a Secret's: a new file
moved over the old name, or the symlink to it swapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from initserve_server import security
from initserve_server.security import (
    MAX_TOKEN_BYTES,
    MAX_TOKEN_FILE_BYTES,
    MAX_TOKENS,
    NO_TOKEN_MESSAGE,
    UNAUTHENTICATED_MESSAGE,
    BearerTokenInterceptor,
    CertificateFiles,
    SecurityConfigError,
    ServerCertificates,
    TokenSet,
    parse_tokens,
    server_credentials,
)
from tests.e2e.test_security import make_ca, make_cert

pytestmark = pytest.mark.timeout(60)

CALL_SECONDS = 10.0
SERVICE = "test.Echo"
OLD, NEW, LITERAL = "old-token-1", "new-token-2", "literal-token-3"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def replace(path: Path, data: str | bytes) -> None:
    """Write ``data`` beside ``path`` and move it over it: a new inode, as a Secret update or `kubectl cp` gives."""
    staged = path.with_name(path.name + ".new")
    staged.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(staged, path)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float = security.RELOAD_CHECK_SECONDS) -> None:
        self.now += seconds


# -- token files -----------------------------------------------------------------------------------------------------


def test_a_token_file_holds_one_token_a_line_with_blank_lines_and_comments_skipped() -> None:
    data = b"# rotated in on Monday\r\n\n  old-token-1  \nnew-token-2\r\nold-token-1\n\n"
    assert parse_tokens(data, "f") == (OLD, NEW)  # in order, without repeats, CRLF and padding stripped


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"ok\nhas space\n", "f: line 2: a token is at most 4096 printable bytes, without spaces"),
        (b"ok\n\ttab\there\n", "f: line 2: a token is at most 4096 printable bytes, without spaces"),
        (b"x" * (MAX_TOKEN_BYTES + 1), "f: line 1: a token is at most 4096 printable bytes"),
        (b"ok\n\xff\xfe\n", "f: line 2: not UTF-8"),
        (b"\n# nothing yet\n", f"f: {NO_TOKEN_MESSAGE}"),
        (b"", f"f: {NO_TOKEN_MESSAGE}"),
        (b"".join(b"t%d\n" % n for n in range(MAX_TOKENS + 1)), f"f: more than {MAX_TOKENS} tokens"),
        (b"#" * (MAX_TOKEN_FILE_BYTES + 1), f"f: larger than {MAX_TOKEN_FILE_BYTES} bytes"),
    ],
    ids=["space", "tab", "long", "utf8", "comments-only", "empty", "too-many", "too-large"],
)
def test_a_malformed_token_file_is_refused_naming_the_line(data: bytes, message: str) -> None:
    with pytest.raises(SecurityConfigError) as raised:
        parse_tokens(data, "f")
    assert str(raised.value).startswith(message)


def test_at_start_a_token_file_that_cannot_be_used_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SecurityConfigError, match=rf"^--auth-token-file {tmp_path}/missing: No such file"):
        TokenSet(str(tmp_path / "missing"))
    (tmp_path / "tokens").write_text("ok\nnot ok\n")
    with pytest.raises(SecurityConfigError, match=rf"^--auth-token-file {tmp_path}/tokens: line 2: "):
        TokenSet(str(tmp_path / "tokens"))
    with pytest.raises(SecurityConfigError, match="^INITSERVE_AUTH_TOKEN: a token is at most"):
        TokenSet(token="with space")


def test_tokens_rotate_in_overlap_and_out_once_the_file_changes(tmp_path: Path) -> None:
    path, clock = tmp_path / "tokens", Clock()
    path.write_text(OLD + "\n")
    tokens = TokenSet(str(path), LITERAL, clock=clock)
    assert tokens.required and len(tokens) == 2
    assert tokens.accepts(f"Bearer {OLD}") and tokens.accepts(f"Bearer {LITERAL}".encode())
    assert not tokens.accepts(f"Bearer {NEW}")
    replace(path, f"{OLD}\n{NEW}\n")  # clients switch one by one: both accepted meanwhile
    assert not tokens.accepts(f"Bearer {NEW}")  # not looked at before a check is due
    clock.advance()
    assert tokens.accepts(f"Bearer {NEW}") and tokens.accepts(f"Bearer {OLD}") and len(tokens) == 3
    replace(path, f"{NEW}\n")  # every client switched: the old token goes
    clock.advance()
    assert not tokens.accepts(f"Bearer {OLD}") and tokens.accepts(f"Bearer {NEW}")
    assert tokens.accepts(f"Bearer {LITERAL}")  # the literal is never reloaded away
    for wrong in (None, "", NEW, f"Bearer {NEW}x", f"bearer {NEW}", f"Bearer  {NEW}", f"Bearer {NEW[:-1]}"):
        assert not tokens.accepts(wrong), wrong


def test_the_file_is_stat_ed_at_most_once_a_check_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, clock = tmp_path / "tokens", Clock()
    path.write_text(OLD)
    tokens = TokenSet(str(path), clock=clock)
    stats: list[str] = []
    real = security.file_signature
    monkeypatch.setattr(security, "file_signature", lambda p: stats.append(p) or real(p))
    for _ in range(100):
        assert tokens.accepts(f"Bearer {OLD}")
    assert stats == []
    clock.advance()
    for _ in range(100):
        assert tokens.accepts(f"Bearer {OLD}")
    assert stats == [str(path)]


def test_a_symlink_swapped_to_a_new_file_is_read_as_kubernetes_updates_secrets(tmp_path: Path) -> None:
    """A Secret volume: tokens -> ..data/tokens, ..data -> ..<timestamp>; an update swaps ..data."""
    clock = Clock()
    for version, content in (("..v1", OLD), ("..v2", NEW)):
        (tmp_path / version).mkdir()
        (tmp_path / version / "tokens").write_text(content + "\n")
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "tokens").symlink_to("..data/tokens")
    tokens = TokenSet(str(tmp_path / "tokens"), clock=clock)
    assert tokens.accepts(f"Bearer {OLD}")
    (tmp_path / "..data_tmp").symlink_to("..v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    clock.advance()
    assert tokens.accepts(f"Bearer {NEW}") and not tokens.accepts(f"Bearer {OLD}")


@pytest.mark.parametrize(
    ("broken", "logged"),
    [
        (f"{NEW}\nhas a space\n", "line 2: a token is at most"),
        ("\n# all removed\n", NO_TOKEN_MESSAGE),
        (None, "No such file or directory"),  # deleted
        ("dir", "Is a directory"),  # unreadable, even by root
    ],
    ids=["malformed", "empty", "deleted", "unreadable"],
)
def test_a_reload_that_fails_keeps_the_tokens_and_logs_the_file_and_line_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, broken: str | None, logged: str
) -> None:
    path, clock = tmp_path / "tokens", Clock()
    path.write_text(OLD + "\n")
    tokens = TokenSet(str(path), clock=clock)
    if broken is None:
        path.unlink()
    elif broken == "dir":
        path.unlink()
        path.mkdir()
    else:
        replace(path, broken)
    with caplog.at_level(logging.ERROR, logger="initserve.security"):
        for _ in range(3):
            clock.advance()
            assert tokens.accepts(f"Bearer {OLD}") and not tokens.accepts(f"Bearer {NEW}")
    (record,) = caplog.records  # once per bad version, not once a second
    assert f"--auth-token-file {path}" in record.getMessage() and logged in record.getMessage()
    assert "keeping the 1 tokens accepted before" in record.getMessage()
    assert OLD not in record.getMessage() and NEW not in record.getMessage()
    if path.is_dir():
        path.rmdir()
    replace(path, NEW + "\n")  # repaired: read again
    clock.advance()
    assert tokens.accepts(f"Bearer {NEW}") and not tokens.accepts(f"Bearer {OLD}")


def test_every_token_is_compared_whichever_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: as many constant-time comparisons for the first token, the last, or none; each of
    fixed-size digests, so neither which token nor how long it is shows in the time."""
    path = tmp_path / "tokens"
    path.write_text("".join(f"token-{n}{'x' * n}\n" for n in range(10)))
    tokens = TokenSet(str(path), LITERAL)
    compared: list[tuple[int, int]] = []
    real = security.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", counting)
    for given, expected in ((f"Bearer {LITERAL}", True), ("Bearer token-9xxxxxxxxx", True), ("Bearer no", False),
                            (None, False), ("x" * 5000, False)):  # fmt: skip
        compared.clear()
        assert tokens.accepts(given) is expected
        assert compared == [(32, 32)] * 11, given


# -- the interceptor on the threaded grpc.server -------------------------------------------------------------------


def sync_echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def sync_echo_twice(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield request
    yield request


def sync_join(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return b"".join(requests)


def sync_echo_each(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    yield from requests


SYNC_ECHO = grpc.method_handlers_generic_handler(
    SERVICE,
    {
        "Unary": grpc.unary_unary_rpc_method_handler(sync_echo),
        "Stream": grpc.unary_stream_rpc_method_handler(sync_echo_twice),
        "Join": grpc.stream_unary_rpc_method_handler(sync_join),
        "Each": grpc.stream_stream_rpc_method_handler(sync_echo_each),
    },
)


@contextlib.contextmanager
def threaded_server(interceptors: Iterable[grpc.ServerInterceptor] = ()) -> Iterator[int]:
    """A threaded grpc.server with the echo service and the health service on a free loopback port."""
    server = grpc.server(ThreadPoolExecutor(8), interceptors=list(interceptors))
    server.add_generic_rpc_handlers((SYNC_ECHO,))
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def echo_twice(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield request
    yield request


async def join(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    return b"".join([request async for request in requests])


async def echo_each(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


ECHO = grpc.method_handlers_generic_handler(
    SERVICE,
    {
        "Unary": grpc.unary_unary_rpc_method_handler(echo),
        "Stream": grpc.unary_stream_rpc_method_handler(echo_twice),
        "Join": grpc.stream_unary_rpc_method_handler(join),
        "Each": grpc.stream_stream_rpc_method_handler(echo_each),
    },
)


@contextlib.asynccontextmanager
async def aio_server(
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (), credentials: grpc.ServerCredentials | None = None
) -> AsyncIterator[int]:
    """A grpc.aio server with the echo service and the health service on a free loopback port."""
    server = grpc.aio.server(interceptors=list(interceptors))
    server.add_generic_rpc_handlers((ECHO,))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = "127.0.0.1:0"
    port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


def all_calls(port: int, metadata: tuple[tuple[str, str], ...] | None) -> list[object]:
    """One call of each kind from a (thread-based) client; each result or the grpc.RpcError it ended with. The
    asyncio client can report a refused request stream as its own failed write (INTERNAL) instead of the status the
    server sent; this one reports the server's."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        calls: list[Callable[[], object]] = [
            lambda: channel.unary_unary(f"/{SERVICE}/Unary")(b"u", metadata=metadata, timeout=CALL_SECONDS),
            lambda: list(channel.unary_stream(f"/{SERVICE}/Stream")(b"s", metadata=metadata, timeout=CALL_SECONDS)),
            lambda: channel.stream_unary(f"/{SERVICE}/Join")(iter([b"a", b"b"]), metadata=metadata,
                                                             timeout=CALL_SECONDS),
            lambda: list(channel.stream_stream(f"/{SERVICE}/Each")(iter([b"a", b"b"]), metadata=metadata,
                                                                   timeout=CALL_SECONDS)),
        ]  # fmt: skip
        results: list[object] = []
        for call in calls:
            try:
                results.append(call())
            except grpc.RpcError as error:
                results.append(error)
        return results


SERVED = [b"u", [b"s", b"s"], b"ab", [b"a", b"b"]]


def unauthenticated(result: object) -> bool:
    return (
        isinstance(result, grpc.RpcError)
        and result.code() == grpc.StatusCode.UNAUTHENTICATED
        and result.details() == UNAUTHENTICATED_MESSAGE
    )


def test_the_interceptor_serves_the_right_token_refuses_the_rest_and_reports_each_refusal(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(OLD + "\n")
    tokens = TokenSet(str(path), check_seconds=0.0)
    refused: list[tuple[str, str]] = []

    def on_refused(method: str, context: grpc.ServicerContext) -> None:
        refused.append((method, context.peer()))

    with threaded_server([BearerTokenInterceptor(tokens, on_refused)]) as port:
        assert all_calls(port, bearer(OLD)) == SERVED
        assert refused == []
        for metadata in (None, bearer(NEW), (("authorization", OLD),)):
            assert all(map(unauthenticated, all_calls(port, metadata))), metadata
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # health needs no token
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    methods = [f"/{SERVICE}/{name}" for name in ("Unary", "Stream", "Join", "Each")]
    assert [method for method, _ in refused] == methods * 3
    assert all(peer.startswith("ipv4:127.0.0.1:") for _, peer in refused), refused


def test_tokens_rotated_while_a_server_serves(tmp_path: Path) -> None:
    """Old accepted until removed, new accepted once the file has it, both during the overlap; no restart."""
    path = tmp_path / "tokens"
    path.write_text(OLD + "\n")
    tokens = TokenSet(str(path), check_seconds=0.0)
    with threaded_server([BearerTokenInterceptor(tokens)]) as port:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # one connection throughout

            def served(token: str) -> bool:
                try:
                    return channel.unary_unary(f"/{SERVICE}/Unary")(b"u", metadata=bearer(token), timeout=10) == b"u"
                except grpc.RpcError as error:
                    assert unauthenticated(error), error
                    return False

            assert served(OLD) and not served(NEW)
            replace(path, f"{OLD}\n{NEW}\n")
            assert served(NEW) and served(OLD)
            replace(path, f"{NEW}\n")
            assert served(NEW) and not served(OLD)
            replace(path, "")  # a broken version: the tokens stay
            assert served(NEW) and not served(OLD)


def test_a_failing_on_refused_still_refuses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def on_refused(method: str, context: grpc.ServicerContext) -> None:
        raise RuntimeError("metrics are down")

    interceptor = BearerTokenInterceptor(TokenSet(token=LITERAL), on_refused)
    with caplog.at_level(logging.ERROR, logger="initserve.security"), threaded_server([interceptor]) as port:
        assert all(map(unauthenticated, all_calls(port, None)))
    assert "on_refused failed" in caplog.text


# -- TLS certificates on a grpc.aio server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two CAs, each with a server certificate (localhost, 127.0.0.1) and a client certificate."""
    directory = tmp_path_factory.mktemp("pki")
    for ca in ("ca_a", "ca_b"):
        make_ca(directory, ca)
        make_cert(directory, f"server_{ca}", ca, "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        make_cert(directory, f"client_{ca}", ca, "extendedKeyUsage=clientAuth\n")
    return directory


def install(pki: Path, live: Path, name: str, *, key_from: str | None = None) -> None:
    """Put ``name``'s certificate (and ``key_from``'s key, by default its own) in ``live`` as tls.crt/tls.key."""
    replace(live / "tls.crt", (pki / f"{name}.pem").read_bytes())
    replace(live / "tls.key", (pki / f"{key_from or name}.key").read_bytes())


def served_certificate(port: int, client: tuple[Path, Path] | None = None) -> bytes:
    """The DER certificate a new TLS connection to ``port`` is shown (nothing verified: only looked at)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])  # gRPC refuses a handshake without it
    if client is not None:
        context.load_cert_chain(*client)
    with socket.create_connection(("127.0.0.1", port), timeout=CALL_SECONDS) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            certificate = tls.getpeercert(binary_form=True)
    assert certificate is not None
    return certificate


def der(pki: Path, name: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert((pki / f"{name}.pem").read_text())


def tls_channel(port: int, pki: Path, ca: str, client: str | None = None) -> grpc.aio.Channel:
    key, chain = (
        ((pki / f"{client}.key").read_bytes(), (pki / f"{client}.pem").read_bytes()) if client else (None, None)
    )
    credentials = grpc.ssl_channel_credentials((pki / f"{ca}.pem").read_bytes(), key, chain)
    return grpc.aio.secure_channel(f"localhost:{port}", credentials)


async def answers(channel: grpc.aio.Channel) -> bool:
    try:
        return await channel.unary_unary(f"/{SERVICE}/Unary")(b"u", timeout=CALL_SECONDS) == b"u"
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        return False


def test_a_rotated_certificate_is_served_to_new_connections_and_old_ones_keep_working(
    pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    install(pki, tmp_path, "server_ca_a")
    certificates = ServerCertificates(CertificateFiles(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key")),
                                      check_seconds=0.0)  # fmt: skip

    async def scenario() -> None:
        async with aio_server(credentials=certificates.credentials()) as port:
            assert await asyncio.to_thread(served_certificate, port) == der(pki, "server_ca_a")
            old = tls_channel(port, pki, "ca_a")
            assert await answers(old)
            # A half-written rotation (the new certificate, the old key) is not served: the old pair stays.
            install(pki, tmp_path, "server_ca_b", key_from="server_ca_a")
            assert await asyncio.to_thread(served_certificate, port) == der(pki, "server_ca_a")
            assert "do not load together (KEY_VALUES_MISMATCH)" in caplog.text
            install(pki, tmp_path, "server_ca_b")
            assert await asyncio.to_thread(served_certificate, port) == der(pki, "server_ca_b")
            async with tls_channel(port, pki, "ca_b") as new, tls_channel(port, pki, "ca_a") as stale:
                assert await answers(new)  # trusts only the new CA
                assert not await answers(stale)  # a new connection trusting only the old CA fails
            assert await answers(old)  # the connection made before the rotation still serves
            await old.close()

    with caplog.at_level(logging.ERROR, logger="initserve.security"):
        asyncio.run(scenario())


def test_mutual_tls_picks_up_a_rotated_client_ca(pki: Path, tmp_path: Path) -> None:
    install(pki, tmp_path, "server_ca_a")
    replace(tmp_path / "ca.crt", (pki / "ca_a.pem").read_bytes())
    files = CertificateFiles(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"), str(tmp_path / "ca.crt"))
    certificates = ServerCertificates(files, check_seconds=0.0)

    async def scenario() -> None:
        async with aio_server(credentials=certificates.credentials()) as port:
            async with tls_channel(port, pki, "ca_a", "client_ca_a") as client_a:
                assert await answers(client_a)
            async with (
                tls_channel(port, pki, "ca_a", "client_ca_b") as client_b,
                tls_channel(port, pki, "ca_a") as bare,
            ):
                assert not await answers(client_b) and not await answers(bare)
            replace(tmp_path / "ca.crt", (pki / "ca_b.pem").read_bytes())
            async with tls_channel(port, pki, "ca_a", "client_ca_b") as client_b:
                assert await answers(client_b)
            async with tls_channel(port, pki, "ca_a", "client_ca_a") as client_a:
                assert not await answers(client_a)

    asyncio.run(scenario())


def test_the_fetcher_reloads_at_most_once_a_check_interval_and_only_on_change(pki: Path, tmp_path: Path) -> None:
    install(pki, tmp_path, "server_ca_a")
    clock = Clock()
    certificates = ServerCertificates(CertificateFiles(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key")),
                                      clock=clock)  # fmt: skip
    assert certificates.fetch() is None  # at start: gRPC serves the initial configuration
    install(pki, tmp_path, "server_ca_b")
    assert certificates.fetch() is None  # not looked at before a check is due
    clock.advance()
    assert isinstance(certificates.fetch(), grpc.ServerCertificateConfiguration)
    clock.advance()
    assert certificates.fetch() is None  # unchanged since


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (("server_ca_a.pem", "server_ca_b.key", ""), r"do not load together \(KEY_VALUES_MISMATCH\)"),
        (("server_ca_a.key", "server_ca_a.key", ""), r"do not load together"),
        (("server_ca_a.pem", "server_ca_a.key", "server_ca_a.key"), r"--tls-client-ca .*: not a PEM CA bundle"),
        (("server_ca_a.pem", "missing.key", ""), r"--tls-key .*missing.key: No such file"),
    ],
    ids=["mismatched", "not-a-certificate", "ca-not-pem", "missing"],
)
def test_tls_files_that_cannot_work_are_refused_at_start(pki: Path, files: tuple[str, str, str], message: str) -> None:
    cert, key, ca = (str(pki / name) if name else "" for name in files)
    with pytest.raises(SecurityConfigError, match=message):
        server_credentials(cert, key, ca)


def test_credentials_need_both_halves_of_a_pair() -> None:
    assert server_credentials("", "", "") is None
    with pytest.raises(SecurityConfigError, match="--tls-cert and --tls-key go together"):
        server_credentials("a.pem", "", "")
    with pytest.raises(SecurityConfigError, match="--tls-client-ca needs --tls-cert and --tls-key"):
        server_credentials("", "", "ca.pem")

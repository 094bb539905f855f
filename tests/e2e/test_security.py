"""TLS, mutual TLS and bearer tokens against real servers, with a CA and certificates made here by openssl."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import initserve
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_server.security import NO_TOKEN_MESSAGE
from tests.conftest import ServerProcess, reference, same_bytes, start_server

TOKEN = "s3cret-token-for-tests"
ONE_TRY = initserve.RetryPolicy(max_attempts=1)
OPENSSL_SECONDS = 30


def openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=OPENSSL_SECONDS)


EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_ca(directory: Path, name: str) -> None:
    subject = f"/CN=initserve test {name}"
    openssl(directory, "req", "-x509", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", subject)  # fmt: skip


def make_cert(directory: Path, name: str, ca: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions)
    openssl(directory, "req", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
    openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca signs server (localhost, 127.0.0.1) and worker (a client); other is a CA nobody here trusts."""
    directory = tmp_path_factory.mktemp("pki")
    make_ca(directory, "ca")
    make_ca(directory, "other")
    make_cert(directory, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    make_cert(directory, "worker", "ca", "extendedKeyUsage=clientAuth\n")
    make_cert(directory, "stranger", "other", "extendedKeyUsage=clientAuth\n")
    return directory


@pytest.fixture(scope="module")
def tls_server(pki: Path) -> Iterator[ServerProcess]:
    running = start_server("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def mtls_server(pki: Path) -> Iterator[ServerProcess]:
    running = start_server(
        "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
        "--tls-client-ca", str(pki / "ca.pem"),
    )  # fmt: skip
    yield running
    running.stop()


def fetch_ok(client: initserve.Client) -> None:
    result = client.fetch((16, 8), "normal", seed=3)
    assert same_bytes(result.tensor, reference("normal", (16, 8), seed=3))


def test_tls_with_the_right_ca_serves_and_anything_else_fails(tls_server: ServerProcess, pki: Path) -> None:
    with initserve.Client(tls_server.target, root_certificates=pki / "ca.pem", timeout=20) as client:
        fetch_ok(client)
    with initserve.Client(tls_server.target, root_certificates=(pki / "other.pem").read_bytes(),
                          timeout=5, retry=ONE_TRY) as client:  # fmt: skip
        with pytest.raises(initserve.Unavailable):
            client.fetch((2,), "normal", seed=1)
    with initserve.Client(tls_server.target, timeout=5, retry=ONE_TRY) as client:  # plaintext to a TLS port
        with pytest.raises(initserve.FailedPrecondition, match="speaks TLS, and this client's channel is plaintext"):
            client.fetch((2,), "normal", seed=1)


def test_mutual_tls_needs_a_client_certificate_the_ca_signed(mtls_server: ServerProcess, pki: Path) -> None:
    def client(**tls: object) -> initserve.Client:
        return initserve.Client(mtls_server.target, root_certificates=pki / "ca.pem", timeout=5, retry=ONE_TRY, **tls)

    with client(client_certificate=pki / "worker.pem", client_key=pki / "worker.key") as worker:
        fetch_ok(worker)
    for tls in ({}, {"client_certificate": pki / "stranger.pem", "client_key": pki / "stranger.key"}):
        with client(**tls) as refused, pytest.raises(initserve.Unavailable):
            refused.fetch((2,), "normal", seed=1)
    with pytest.raises(ValueError, match="client_certificate and client_key go together"):
        initserve.Client(mtls_server.target, root_certificates=pki / "ca.pem", client_certificate=pki / "worker.pem")


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN + "\n")
    running = start_server("--auth-token-file", str(token_file))
    yield running
    running.stop()


@pytest.mark.parametrize(
    "token", [None, "wrong", TOKEN + "x", TOKEN[:-1]], ids=["missing", "wrong", "longer", "prefix"]
)
def test_a_call_without_the_right_token_is_unauthenticated_and_gets_no_data(
    token_server: ServerProcess, token: str | None
) -> None:
    with initserve.Client(token_server.target, token=token, timeout=10) as client:
        for call in (
            lambda: client.fetch((2, 2), "normal", seed=1),  # InitUnary
            lambda: client.fetch((64, 64), "normal", seed=1, chunk_bytes=1024),  # Init stream
            lambda: client.fetch_many([initserve.TensorSpec("w", (2,), "ones")]),  # InitMany
            client.describe,
        ):
            with pytest.raises(initserve.Unauthenticated) as raised:
                call()
            assert str(raised.value) == "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"
    with grpc.insecure_channel(token_server.target) as channel:  # raw: not one message comes before the status
        stream = channel.unary_stream(
            "/initserve.v1.InitService/Init",
            request_serializer=pb.InitRequest.SerializeToString,
            response_deserializer=pb.InitResponse.FromString,
        )
        received = []
        with pytest.raises(grpc.RpcError) as raised:
            for message in stream(pb.InitRequest(scheme="normal", shape=(64, 64), seed=1), timeout=10):
                received.append(message)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED and received == []


def test_the_right_token_serves_and_health_needs_none(token_server: ServerProcess) -> None:
    with initserve.Client(token_server.target, token=TOKEN, timeout=10) as client:
        fetch_ok(client)
        assert client.fetch_many([initserve.TensorSpec("w", (3,), "ones")])["w"].tensor.tolist() == [1.0] * 3
        assert client.describe().stats.requests >= 2
    with grpc.insecure_channel(token_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "initserve.v1.InitService"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_tls_and_a_token_from_the_environment_together(pki: Path) -> None:
    running = start_server(
        "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
        env={"INITSERVE_AUTH_TOKEN": TOKEN},
    )  # fmt: skip
    try:
        with initserve.Client(running.target, root_certificates=pki / "ca.pem", token=TOKEN, timeout=20) as client:
            fetch_ok(client)
        with initserve.Client(running.target, root_certificates=pki / "ca.pem", timeout=20) as client:
            with pytest.raises(initserve.Unauthenticated):
                client.describe()
    finally:
        running.stop()
    assert TOKEN not in "".join(running.output)  # never logged


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "x.pem"], "initserve-server: --tls-cert and --tls-key go together"),
        (["--tls-client-ca", "ca.pem"], "initserve-server: --tls-client-ca needs --tls-cert and --tls-key"),
        (["--tls-cert", "missing.pem", "--tls-key", "missing.key"], "initserve-server: --tls-key missing.key: No such"),
        (["--auth-token-file", "missing-token"], "initserve-server: --auth-token-file missing-token: No such file"),
    ],
)
def test_security_settings_that_cannot_work_stop_the_server_with_a_reason(
    flags: list[str], message: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "initserve_server", "--host", "127.0.0.1", "--port", "0", *flags],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith(message)


def test_a_token_file_without_a_token_is_refused(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("\n# rotated out\n\n")
    done = subprocess.run(
        [sys.executable, "-m", "initserve_server", "--port", "0", "--auth-token-file", str(tmp_path / "token")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.strip() == f"initserve-server: --auth-token-file {tmp_path / 'token'}: {NO_TOKEN_MESSAGE}"


def health_probe(*args: str) -> subprocess.CompletedProcess[str]:
    probe = Path(sys.executable).parent / "initserve-health"
    return subprocess.run([str(probe), "--timeout", "5", *args], capture_output=True, text=True, timeout=60)


def test_the_health_probe_over_tls_and_mutual_tls(tls_server: ServerProcess, mtls_server: ServerProcess, pki: Path):
    ca = ("--tls-ca", str(pki / "ca.pem"))
    assert health_probe("--target", tls_server.target, *ca).returncode == 0
    assert health_probe("--target", tls_server.target).returncode == 2  # plaintext to a TLS port
    assert health_probe("--target", tls_server.target, "--tls-ca", str(pki / "other.pem")).returncode == 2
    named = ("--target", f"127.0.0.1:{tls_server.port}", *ca, "--tls-server-name", "localhost")
    assert health_probe(*named).returncode == 0
    assert health_probe("--target", mtls_server.target, *ca).returncode == 2  # no client certificate
    worker = ("--tls-client-cert", str(pki / "worker.pem"), "--tls-client-key", str(pki / "worker.key"))
    done = health_probe("--target", mtls_server.target, *ca, *worker)
    assert (done.returncode, done.stdout) == (0, f"{mtls_server.target}: SERVING\n")


def test_the_health_probe_needs_no_token(token_server: ServerProcess) -> None:
    assert health_probe("--target", token_server.target).returncode == 0

"""``initserve-health``: ask a server's gRPC health service whether it serves; exit 0 when it does.

For container HEALTHCHECKs, compose healthchecks and Kubernetes exec probes where the kubelet's own gRPC probe
cannot be used (it speaks plaintext only, so a TLS server needs this). It imports grpc and the health stubs,
never torch, so one probe costs a fraction of a second. Health is open without a token (see security.py);
a mutual-TLS server still needs a client certificate for the handshake.

Exit status: 0 SERVING, 1 answered but not SERVING (NOT_SERVING while draining, SERVICE_UNKNOWN), 2 no answer
(refused, timed out, TLS failed).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ENV_PREFIX = "INITSERVE_"
DEFAULT_PORT = 50051
DEFAULT_TIMEOUT_SECONDS = 3.0
EXIT_SERVING, EXIT_NOT_SERVING, EXIT_NO_ANSWER = 0, 1, 2


def _health_port() -> str | None:
    """The server's plaintext health port from its own env twin (INITSERVE_HEALTH_PORT), if it has one."""
    port = os.environ.get(ENV_PREFIX + "HEALTH_PORT", "").strip()
    return port if port and port.lower() not in ("off", "none", "0") else None


def _default_target() -> str:
    """This host's server, by the server's own env twins, so one environment serves both: its plaintext health
    port where it has one (a TLS server is then probed without certificates), else INITSERVE_PORT."""
    health_port = _health_port()
    if health_port is not None:
        return f"127.0.0.1:{health_port}"
    return f"127.0.0.1:{os.environ.get(ENV_PREFIX + 'PORT') or DEFAULT_PORT}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="initserve-health",
        description="Exit 0 when an initserve server's gRPC health service answers SERVING, 1 when it answers "
        "anything else, 2 when it does not answer. Every flag has an INITSERVE_HEALTH_<NAME> environment twin.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def option(flag: str, env: str, default: str, help_text: str) -> None:
        value = os.environ.get(f"{ENV_PREFIX}HEALTH_{env}") or default
        parser.add_argument(flag, default=value, help=f"{help_text} [env {ENV_PREFIX}HEALTH_{env}]")

    option(
        "--target",
        "TARGET",
        "",
        f"host:port of the server (default: {_default_target()}, from INITSERVE_HEALTH_PORT, the plaintext health "
        "port, whose default ignores the TLS options; else INITSERVE_PORT)",
    )
    option("--service", "SERVICE", "", "health service name: '' for the server, or initserve.v1.InitService")
    option("--timeout", "TIMEOUT", str(DEFAULT_TIMEOUT_SECONDS), "seconds to wait for the answer")
    option("--tls-ca", "TLS_CA", "", "PEM CA bundle: connect over TLS, trusting these CAs")
    option("--tls-server-name", "TLS_SERVER_NAME", "", "name to check the server's certificate against")
    option("--tls-client-cert", "TLS_CLIENT_CERT", "", "PEM client certificate, for a mutual-TLS server")
    option("--tls-client-key", "TLS_CLIENT_KEY", "", "PEM private key of --tls-client-cert")
    return parser


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if not args.tls_ca or (args.target == _default_target() and _health_port() is not None and not args.explicit):
        return grpc.insecure_channel(args.target)
    client_cert = Path(args.tls_client_cert).read_bytes() if args.tls_client_cert else None
    client_key = Path(args.tls_client_key).read_bytes() if args.tls_client_key else None
    credentials = grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes(), client_key, client_cert)
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(args.target, credentials, options=options)


def probe(args: argparse.Namespace) -> tuple[int, str]:
    """(exit status, one line saying why)."""
    args.explicit = bool(args.target)
    args.target = args.target or _default_target()
    try:
        timeout = float(args.timeout)
        channel = _channel(args)
    except (ValueError, OSError) as error:
        return EXIT_NO_ANSWER, f"cannot probe: {error}"
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=timeout)
        except grpc.RpcError as error:
            code = error.code()
            if code == grpc.StatusCode.NOT_FOUND:  # the server does not know the service name
                return EXIT_NOT_SERVING, f"{args.target}: SERVICE_UNKNOWN {args.service!r}"
            return EXIT_NO_ANSWER, f"{args.target}: {code.name if code else 'UNKNOWN'}: {error.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    return (EXIT_SERVING if status == "SERVING" else EXIT_NOT_SERVING), f"{args.target}: {status}"


def main(argv: Sequence[str] | None = None) -> int:
    status, line = probe(build_parser().parse_args(argv))
    print(line, file=sys.stdout if status == EXIT_SERVING else sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())

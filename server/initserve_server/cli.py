"""``initserve-server``: flags and INITSERVE_* environment variables into a ServerConfig, then serve until signalled."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from initserve_protocol.portable.triton_modules import TritonModulesError
from initserve_server import __version__
from initserve_server import config as defaults
from initserve_server.config import ServerConfig
from initserve_server.logs import configure_logging
from initserve_server.security import SecurityConfigError, check_token
from initserve_server.server import RunningServer, serve

ENV_PREFIX = "INITSERVE_"
STOP_MARGIN_SECONDS = 4.0  # after the grace period: the stop's own work, well inside the grace + 5 s


def _env(name: str, parse: Callable[[str], object], default: object) -> object:
    raw = os.environ.get(ENV_PREFIX + name)
    if raw is None or raw == "":
        return default
    try:
        return parse(raw)
    except ValueError:
        raise SystemExit(f"initserve-server: environment variable {ENV_PREFIX}{name}={raw!r} is not a valid value")


def _size(text: str) -> int:
    """Bytes, with an optional binary suffix: 1048576, 1024K, 64M, 4G."""
    text = text.strip()
    multipliers = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1].upper() in multipliers:
        return int(text[:-1]) * multipliers[text[-1].upper()]
    return int(text)


def _bool(text: str) -> bool:
    """1/0, true/false, yes/no, on/off (any case)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _optional_port(text: str) -> int | None:
    if text.strip().lower() in ("", "off", "none"):
        return None
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")
    return port


def _uids(text: str) -> tuple[int, ...]:
    uids = tuple(int(part) for part in text.split(",") if part.strip())
    if any(uid < 0 for uid in uids):
        raise ValueError(f"UIDs must be >= 0, got {text!r}")
    return uids


def _devices(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _log_format(text: str) -> str:
    if text not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="initserve-server",
        description="torch.nn.init as a gRPC service. Every flag has an INITSERVE_<NAME> environment twin; "
        "a flag given on the command line wins.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def option(flag: str, env: str, parse: Callable[[str], object], default: object, help_text: str) -> None:
        parser.add_argument(
            flag,
            type=parse,
            default=_env(env, parse, default),
            help=f"{help_text} [env {ENV_PREFIX}{env}]",
        )

    option("--host", "HOST", str, defaults.DEFAULT_HOST, "address to listen on (0.0.0.0 or :: for all interfaces)")
    option("--port", "PORT", int, defaults.DEFAULT_PORT, "port to listen on; 0 picks a free one and prints it")
    option(
        "--workers",
        "WORKERS",
        int,
        defaults.DEFAULT_WORKERS,
        "generations run at once (threads); small generations have one more of their own (default: usable CPUs, "
        "at least 2)",
    )
    option("--chunk-bytes", "CHUNK_BYTES", _size, defaults.DEFAULT_CHUNK_BYTES, "default payload bytes per chunk")
    option(
        "--max-message-bytes",
        "MAX_MESSAGE_BYTES",
        _size,
        defaults.DEFAULT_MAX_MESSAGE_BYTES,
        "largest message sent; bounds a request's chunk_bytes; at least the largest header and trailer "
        "(7205 bytes at 16 dims)",
    )
    option(
        "--max-tensor-bytes",
        "MAX_TENSOR_BYTES",
        _size,
        defaults.DEFAULT_MAX_TENSOR_BYTES,
        "largest tensor one request may ask for",
    )
    option("--max-dims", "MAX_DIMS", int, defaults.DEFAULT_MAX_DIMS, "most dimensions a requested shape may have")
    option(
        "--grace-seconds",
        "GRACE_SECONDS",
        float,
        defaults.DEFAULT_GRACE_SECONDS,
        "how long in-flight streams may finish after SIGTERM/SIGINT",
    )
    option(
        "--cache-bytes",
        "CACHE_BYTES",
        _size,
        defaults.DEFAULT_CACHE_BYTES,
        "byte budget of the LRU cache of finished tensors; 0 disables it (default: 1/8 of memory, at most 16G)",
    )
    option(
        "--max-inflight-bytes",
        "MAX_INFLIGHT_BYTES",
        _size,
        defaults.DEFAULT_MAX_INFLIGHT_BYTES,
        "bytes of tensors being generated or streamed outside the cache; past it RESOURCE_EXHAUSTED "
        "(default: 1/4 of memory, at least --max-tensor-bytes' default)",
    )
    option(
        "--preallocate-bytes",
        "PREALLOCATE_BYTES",
        _size,
        0,
        "tensor memory to write at start-up (in the background) and keep for generations to write into, so a fresh "
        "server's first generations skip page faults; at most --cache-bytes + --max-inflight-bytes; 0: none",
    )
    option(
        "--max-connection-age-seconds",
        "MAX_CONNECTION_AGE_SECONDS",
        float,
        defaults.DEFAULT_MAX_CONNECTION_AGE_SECONDS,
        "close each client connection after this long (its calls finish; the client reconnects), so clients of a "
        "DNS name reach replicas added since; 0: never",
    )
    option(
        "--shared-memory-socket",
        "SHARED_MEMORY_SOCKET",
        str,
        "",
        "Unix-domain socket where clients on this host hand the server sealed memory to write tensors into "
        "(Client(shared_memory=True)); off when empty",
    )
    option(
        "--shared-memory-uids",
        "SHARED_MEMORY_UIDS",
        _uids,
        (),
        "comma-separated UIDs allowed on --shared-memory-socket besides the server's own",
    )
    option("--tls-cert", "TLS_CERT", str, "", "PEM certificate chain: serve TLS (with --tls-key)")
    option("--tls-key", "TLS_KEY", str, "", "PEM private key of --tls-cert")
    option("--tls-client-ca", "TLS_CLIENT_CA", str, "", "PEM CA bundle: require client certificates it signed (mTLS)")
    option(
        "--auth-token-file",
        "AUTH_TOKEN_FILE",
        str,
        "",
        "file of bearer tokens, one per line, any of which every RPC but health may carry; re-read when it changes "
        f"(or one token itself in {ENV_PREFIX}AUTH_TOKEN)",
    )
    option(
        "--metrics-port",
        "METRICS_PORT",
        _optional_port,
        None,
        "serve Prometheus /metrics over HTTP on --host and this port (0: a free one, printed); off by default",
    )
    option(
        "--health-port",
        "HEALTH_PORT",
        _optional_port,
        None,
        "serve the gRPC health service alone, in plaintext and without a token, on --host and this port "
        "(for kubelet gRPC probes of a TLS server); off by default",
    )
    option(
        "--max-concurrent-calls",
        "MAX_CONCURRENT_CALLS",
        int,
        defaults.DEFAULT_MAX_CONCURRENT_CALLS,
        "Init calls served at once (threads); past it RESOURCE_EXHAUSTED. Describe and health have their own threads",
    )
    option(
        "--stall-seconds",
        "STALL_SECONDS",
        float,
        defaults.DEFAULT_STALL_SECONDS,
        "cancel a stream whose client has read nothing for this long, releasing what it held",
    )
    option(
        "--max-work-seconds",
        "MAX_WORK_SECONDS",
        float,
        defaults.DEFAULT_MAX_WORK_SECONDS,
        "refuse a request whose generation the cost model estimates above this many seconds of one core",
    )
    option(
        "--require-devices",
        "REQUIRE_DEVICES",
        _devices,
        (),
        "comma-separated devices (cpu, cuda, cuda:N) that must generate a probe tensor for the server to report "
        "ready, checked at start and every 30 s",
    )
    option(
        "--triton-modules",
        "TRITON_MODULES",
        str,
        "",
        "directory of Triton's C modules (python -m initserve_protocol.portable.triton_modules DIR) that the "
        "portable generator's GPU kernel uses instead of a C compiler; default: those built into this environment "
        "(the CUDA image's), if any; ignored without Triton",
    )
    option("--log-level", "LOG_LEVEL", str, "INFO", "logging level (INFO logs one access line per call)")
    option("--log-format", "LOG_FORMAT", _log_format, "text", "log lines as 'text' or 'json' objects")
    parser.add_argument("--version", action="version", version=f"initserve-server {__version__}")
    return parser


def _auth_token() -> str:
    """The one literal token of INITSERVE_AUTH_TOKEN, never a flag (so never in --help or a process listing). The
    tokens of --auth-token-file are the server's to read, and to read again when the file changes."""
    token = os.environ.get(ENV_PREFIX + "AUTH_TOKEN", "")
    return check_token(token, f"{ENV_PREFIX}AUTH_TOKEN") if token else ""


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    try:
        return ServerConfig(
            host=args.host,
            port=args.port,
            workers=args.workers,
            chunk_bytes=args.chunk_bytes,
            max_message_bytes=args.max_message_bytes,
            max_tensor_bytes=args.max_tensor_bytes,
            max_dims=args.max_dims,
            grace_seconds=args.grace_seconds,
            max_connection_age_seconds=args.max_connection_age_seconds,
            cache_bytes=args.cache_bytes,
            max_inflight_bytes=args.max_inflight_bytes,
            preallocate_bytes=args.preallocate_bytes,
            shared_memory_socket=args.shared_memory_socket,
            shared_memory_uids=args.shared_memory_uids,
            tls_cert_file=args.tls_cert,
            tls_key_file=args.tls_key,
            tls_client_ca_file=args.tls_client_ca,
            auth_token=_auth_token(),
            auth_token_file=args.auth_token_file,
            metrics_port=args.metrics_port,
            health_port=args.health_port,
            stall_seconds=args.stall_seconds,
            max_concurrent_calls=args.max_concurrent_calls,
            max_work_seconds=args.max_work_seconds,
            require_devices=args.require_devices,
            triton_modules=args.triton_modules,
        )
    except ValueError as error:
        raise SystemExit(f"initserve-server: {error}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    config = config_from_args(args)
    try:
        running = serve(config)
    except (SecurityConfigError, TritonModulesError, OSError) as error:  # bad TLS/token/Triton settings, a port
        raise SystemExit(f"initserve-server: {error}") from None
    stop_requested = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # One machine-readable line: tests and scripts started with --port 0 read the bound port from it.
    if running.metrics_port is not None:
        _announce(f"initserve metrics on {running.config.host}:{running.metrics_port}")
    if running.health_port is not None:
        _announce(f"initserve health on {running.config.host}:{running.health_port}")
    _announce(f"initserve listening on {running.target}")
    while not stop_requested.wait(timeout=1.0):
        pass
    return _stop(running, config.grace_seconds)


def _announce(line: str) -> None:
    """One line in one write: print() writes the newline apart, and unbuffered, another thread's log line can
    land between the two."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _stop(running: RunningServer, grace_seconds: float) -> int:
    """Drain for the grace period, then exit, within grace + STOP_MARGIN_SECONDS whatever is still running.

    Generations cannot be interrupted mid-call (a QR, a fill), and the interpreter's normal exit would wait for
    them, or crash finalizing beside them: with generations still running, the process ends with os._exit once
    its logs are flushed."""
    log = logging.getLogger("initserve.server")
    log.info("signal received; stopping within %.1fs", grace_seconds)
    outcome: list[int] = []
    stopper = threading.Thread(target=lambda: outcome.append(running.stop()), name="initserve-stop", daemon=True)
    stopper.start()
    stopper.join(grace_seconds + STOP_MARGIN_SECONDS)
    if outcome and outcome[0] == 0:
        return 0
    log.warning(
        "exiting with %s generation(s) still running",
        outcome[0] if outcome else "the drain unfinished and its",
    )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())

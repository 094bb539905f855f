"""The compose demo's client: fetch tensors through the balancer, check each against local torch, exit 1 if any differ.

    docker compose -f docker/compose.yaml up --build --exit-code-from client   # the `client` service, via Envoy
    python examples/compose_client.py --target 127.0.0.1:50051                 # or against any server

The target comes from ``--target``, else ``DEMO_TARGET``; a server that requires a bearer token gets the first token
of ``--token-file`` (``DEMO_TOKEN_FILE``, the servers' format: one a line, ``#`` comments), else the one in
``INITSERVE_AUTH_TOKEN`` (the server's own variable, so one environment serves both). ``--tls-ca`` (``DEMO_TLS_CA``)
connects over TLS trusting that CA bundle, checking the target's host or ``--tls-server-name``
(``DEMO_TLS_SERVER_NAME``): docker/compose.tls.yaml sets both files. The script waits up to
``--wait-seconds`` (``DEMO_WAIT_SECONDS``) for the target to answer, so it may start before the balancer has a
healthy replica. Exit status: 0 every tensor bit-exact, 1 a tensor differed, 2 the target never answered (or
refused the token).

The local reference must take the servers' CPU code paths: against servers run with ``MKL_CBWR`` and
``ATEN_CPU_CAPABILITY`` (compose.yaml and docker/k8s pin both), run this with the same two values, or
``orthogonal`` differs (a 1, correctly: those are other bytes than this machine's torch gives by default).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import torch

import initserve
from initserve_protocol.v1.initserve_pb2 import ServerInfo

torch.set_num_threads(1)  # the service's torch runs one intra-op thread (see docs/contract.md: orthogonal)

DEFAULT_TARGET = "localhost:8080"  # the balancer's listener in docker/envoy.yaml
DEFAULT_WAIT_SECONDS = 120.0
PROBE_TIMEOUT_SECONDS = 5.0
PROBE_INTERVAL_SECONDS = 1.0
FETCH_TIMEOUT_SECONDS = 120.0
BASE_SEED = 7
EXIT_EXACT, EXIT_MISMATCH, EXIT_NO_ANSWER = 0, 1, 2

# (scheme, shape, dtype, params): small answers (one InitUnary message) and multi-chunk streams.
REQUESTS: list[tuple[str, tuple[int, ...], torch.dtype, dict[str, object]]] = [
    ("kaiming_normal", (256, 128), torch.float32, {"mode": "fan_out", "nonlinearity": "relu"}),
    ("xavier_uniform", (64, 32, 3, 3), torch.float32, {"gain": initserve.calculate_gain("tanh")}),
    ("trunc_normal", (1024, 768), torch.bfloat16, {"std": 0.02}),
    ("orthogonal", (512, 256), torch.float64, {}),
    ("normal", (4096, 1024), torch.float32, {"std": 0.02}),
    ("dirac", (16, 16, 3, 3), torch.float32, {}),
]
# One InitMany call: a small model's parameters, each seed derived from BASE_SEED and its name.
MODEL = [
    initserve.TensorSpec("embed.weight", (1000, 64), "normal", {"std": 0.02}),
    initserve.TensorSpec("fc.weight", (128, 64), "kaiming_uniform", {"a": 5**0.5}),
    initserve.TensorSpec("fc.bias", (128,), "zeros"),
]


def local(
    scheme: str, shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float32, **params: object
) -> torch.Tensor:
    """The contract: torch.nn.init.<scheme>_ on torch.empty, with a generator seeded by the seed the server used."""
    function = getattr(torch.nn.init, f"{scheme}_")
    tensor = torch.empty(tuple(shape), dtype=dtype)
    if initserve.SCHEMES[scheme].seeded:
        return function(tensor, **params, generator=torch.Generator().manual_seed(seed))
    return function(tensor, **params)


def same_bytes(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Bit for bit (never allclose): shape, dtype and every byte."""
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return False
    return torch.equal(actual.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))


def wait_until_serving(client: initserve.Client, wait_seconds: float) -> ServerInfo:
    """Describe, retried until it answers or ``wait_seconds`` pass (a balancer with no healthy replica yet
    answers UNAVAILABLE); the last error when it never does."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            return client.describe(timeout=PROBE_TIMEOUT_SECONDS)
        except (initserve.Unavailable, initserve.DeadlineExceeded) as error:
            if time.monotonic() + PROBE_INTERVAL_SECONDS > deadline:
                raise
            print(f"waiting for {client.target}: {error}", file=sys.stderr, flush=True)
            time.sleep(PROBE_INTERVAL_SECONDS)


def check(result: initserve.InitResult, expected: torch.Tensor, label: str, shape: Sequence[int]) -> bool:
    exact = same_bytes(result.tensor, expected)
    mib = result.tensor.numel() * result.tensor.element_size() / (1 << 20)
    replicas = ",".join(result.server_ids)
    print(f"{label:<22}{str(tuple(shape)):<18}{mib:>8.2f}  {result.transport:<7}{replicas:<28}{exact}", flush=True)
    return exact


def first_token(path: str) -> str:
    """The first token of a token file: its first line that is neither blank nor a ``#`` comment."""
    with open(path) as lines:
        tokens = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not tokens:
        raise SystemExit(f"{path}: no token in it")
    return tokens[0]


def run(
    target: str,
    wait_seconds: float,
    token: str | None,
    tls_ca: str | None = None,
    tls_server_name: str | None = None,
) -> int:
    tls = {"root_certificates": tls_ca, "tls_server_name": tls_server_name} if tls_ca else {}
    with initserve.Client(target, timeout=FETCH_TIMEOUT_SECONDS, token=token, **tls) as client:
        try:
            info = wait_until_serving(client, wait_seconds)
        except initserve.Unauthenticated as error:
            print(f"{target} refused the call: {error}", file=sys.stderr)
            return EXIT_NO_ANSWER
        except initserve.InitServeError as error:
            print(f"{target} did not answer within {wait_seconds:.0f}s: {error}", file=sys.stderr)
            return EXIT_NO_ANSWER
        print(f"{target}: initserve {info.server_version}, torch {info.torch_version}\n", flush=True)
        print(f"{'what':<22}{'shape':<18}{'MiB':>8}  {'via':<7}{'replica':<28}bit-exact")
        results: list[bool] = []
        replicas: set[str] = set()
        for scheme, shape, dtype, params in REQUESTS:
            result = client.fetch(shape, scheme, seed=BASE_SEED, dtype=dtype, **params)
            replicas.update(result.server_ids)
            expected = local(scheme, shape, result.seed, dtype, **params)
            results.append(check(result, expected, scheme, shape))
        # The largest messages the server sends: whole max-size chunks must pass the balancer's buffers.
        largest_chunk = int(info.limits.max_chunk_bytes)
        shape = (2048, 2048)  # 16 MiB: several chunks of the largest size
        result = client.fetch(shape, "uniform", seed=BASE_SEED, chunk_bytes=largest_chunk, a=-1.0, b=1.0)
        replicas.update(result.server_ids)
        results.append(check(result, local("uniform", shape, result.seed, a=-1.0, b=1.0), "uniform, max chunks", shape))
        for name, result in client.fetch_many(MODEL, seed=BASE_SEED).items():
            spec = next(spec for spec in MODEL if spec.name == name)
            replicas.update(result.server_ids)
            expected = local(spec.scheme, spec.shape, result.seed, spec.dtype, **spec.params)
            results.append(check(result, expected, name, spec.shape))
    mismatched = results.count(False)
    print(f"\n{len(results)} tensors from {len(replicas)} replica(s): {', '.join(sorted(replicas))}")
    print("all bit-exact" if not mismatched else f"{mismatched} MISMATCHED")
    return EXIT_MISMATCH if mismatched else EXIT_EXACT


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target",
        default=os.environ.get("DEMO_TARGET") or DEFAULT_TARGET,
        help="host:port of the balancer or server [env DEMO_TARGET]",
    )
    parser.add_argument(
        "--wait-seconds",
        type=float,
        default=float(os.environ.get("DEMO_WAIT_SECONDS") or DEFAULT_WAIT_SECONDS),
        help="how long to wait for the target to answer [env DEMO_WAIT_SECONDS]",
    )
    parser.add_argument(
        "--token-file",
        default=os.environ.get("DEMO_TOKEN_FILE") or None,
        help="send the first token of this file (one a line) [env DEMO_TOKEN_FILE]; else INITSERVE_AUTH_TOKEN's",
    )
    parser.add_argument(
        "--tls-ca",
        default=os.environ.get("DEMO_TLS_CA") or None,
        help="connect over TLS, trusting this PEM CA bundle [env DEMO_TLS_CA]",
    )
    parser.add_argument(
        "--tls-server-name",
        default=os.environ.get("DEMO_TLS_SERVER_NAME") or None,
        help="check the certificate against this name, not the target's host [env DEMO_TLS_SERVER_NAME]",
    )
    args = parser.parse_args(argv)
    token = first_token(args.token_file) if args.token_file else os.environ.get("INITSERVE_AUTH_TOKEN") or None
    return run(args.target, args.wait_seconds, token, args.tls_ca, args.tls_server_name)


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: start a server, fetch several tensors, check each against local torch, print a table, stop."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import torch

import initserve

torch.set_num_threads(1)  # the service's torch runs one intra-op thread (see docs/contract.md: orthogonal)

REQUESTS = [
    ("kaiming_normal", (256, 128), {"mode": "fan_out", "nonlinearity": "relu"}),
    ("xavier_uniform", (64, 32, 3, 3), {"gain": initserve.calculate_gain("tanh")}),
    ("trunc_normal", (1024, 768), {"std": 0.02}),
    ("orthogonal", (512, 256), {}),
    ("normal", (4096, 1024), {"std": 0.02}),
    ("dirac", (16, 16, 3, 3), {}),
]


def start_server() -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "initserve_server", "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        text=True,
    )
    for line in process.stdout:  # type: ignore[union-attr]
        if line.startswith("initserve listening on "):
            return process, line.split()[-1]
    raise SystemExit(f"server exited with {process.wait()}")


def local(scheme: str, shape, seed: int, **params) -> torch.Tensor:
    tensor = torch.empty(shape)
    if initserve.SCHEMES[scheme].seeded:
        return getattr(torch.nn.init, f"{scheme}_")(tensor, **params, generator=torch.Generator().manual_seed(seed))
    return getattr(torch.nn.init, f"{scheme}_")(tensor, **params)


def main() -> int:
    process, target = start_server()
    failures = 0
    try:
        print(f"server at {target}\n")
        print(f"{'scheme':<16}{'shape':<18}{'MiB':>8}{'ms':>9}  {'seed':<22}bit-exact")
        with initserve.Client(target) as client:
            for scheme, shape, params in REQUESTS:
                started = time.perf_counter()
                result = client.fetch(shape, scheme, seed=7, **params)
                elapsed_ms = (time.perf_counter() - started) * 1000
                expected = local(scheme, shape, result.seed, **params)
                exact = torch.equal(result.tensor.view(torch.int32), expected.view(torch.int32))
                failures += not exact
                mib = result.tensor.numel() * result.tensor.element_size() / (1 << 20)
                print(f"{scheme:<16}{str(tuple(shape)):<18}{mib:>8.2f}{elapsed_ms:>9.1f}  {result.seed:<22}{exact}")
            unseeded = client.fetch((3, 5), "normal")
            print(f"\nno seed given: the server drew {unseeded.seed}; device {unseeded.device.fingerprint}")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    print("all bit-exact" if not failures else f"{failures} MISMATCHED")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

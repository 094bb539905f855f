"""CUDA benchmark: GPU generation rate and end-to-end fetch of GPU-generated tensors, verified byte for byte.

Runs where CUDA is present (exits 0 with a note elsewhere). Every figure is a median of several repetitions after
warm-up; every fetched tensor is compared bitwise with local torch on the same GPU, and one wrong byte fails the run.

    python bench/gpu.py [--sizes-mib 16 256 1024] [--repeats 5] [--json docs/bench/gpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import grpc
import torch

import initserve

SCHEMES = {
    "normal": {},
    "uniform": {},
    "kaiming_normal": {"mode": "fan_out", "nonlinearity": "relu"},
    "trunc_normal": {},
}
ROW = 1024  # float32 columns per row: a size of N MiB is (N * 256, 1024)


def median_seconds(action: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        action()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        action()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def generate(scheme: str, shape: tuple[int, ...], device: str, seed: int = 1) -> torch.Tensor:
    tensor = torch.empty(shape, device=device)
    generator = torch.Generator(device).manual_seed(seed)
    return getattr(torch.nn.init, f"{scheme}_")(tensor, **SCHEMES.get(scheme, {}), generator=generator)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def timed_fetches(
    client: initserve.Client, shape: tuple[int, ...], device: str, seeds: list[int]
) -> tuple[list[float], int]:
    """One fetch per seed, each timed alone and then checked bitwise against local torch on ``device``;
    returns the times and how many results were wrong."""
    times, wrong = [], 0
    for seed in seeds:
        torch.cuda.synchronize()
        start = time.perf_counter()
        tensor = client.normal(shape, seed=seed, device=device)
        times.append(time.perf_counter() - start)
        wrong += not bitwise_equal(tensor, generate("normal", shape, device, seed=seed).cpu())
        del tensor
    return times, wrong


def start_server(*flags: str) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "initserve_server", "--host", "127.0.0.1", "--port", "0", *flags]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:  # type: ignore[union-attr]
        if line.startswith("initserve listening on "):
            return process, line.split()[-1]
    raise RuntimeError(f"server exited with {process.wait()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[16, 256, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--fetch-only", action="store_true", help="skip the generation and copy ceilings")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    torch.set_num_threads(1)  # the server's setting (orthogonal's QR bits depend on it)
    props = torch.cuda.get_device_properties(0)
    env = {
        "gpu": props.name,
        "multiprocessors": props.multi_processor_count,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "grpcio": grpc.__version__,
    }
    print(" ".join(f"{key}={value}" for key, value in env.items()))
    rows: list[dict] = []

    def record(what: str, size_mib: float, seconds: float, **extra: object) -> None:
        rate = size_mib * (1 << 20) / seconds / 1e9
        rows.append({"what": what, "size_mib": size_mib, "seconds": seconds, "gb_per_s": rate, **extra})
        print(f"{what:<44} {size_mib:>7.0f} MiB {seconds * 1e3:>10.2f} ms {rate:>9.2f} GB/s")

    for size in [] if args.fetch_only else args.sizes_mib:
        shape = (size * 256, ROW)
        for scheme in SCHEMES:
            seconds = median_seconds(partial(generate, scheme, shape, "cuda"), args.repeats)
            record(f"generate on GPU: {scheme}", size, seconds)
        gpu = generate("normal", shape, "cuda")
        record("ceiling: device-to-host copy (pageable)", size, median_seconds(gpu.cpu, args.repeats))
        host = torch.zeros(shape)  # pageable, its pages already written: what the server copies into
        record(
            "ceiling: device-to-host copy (pageable, reused)",
            size,
            median_seconds(partial(host.copy_, gpu), args.repeats),
        )
        pinned = torch.empty(shape, pin_memory=True)
        seconds = median_seconds(partial(pinned.copy_, gpu), args.repeats)
        record("ceiling: device-to-host copy (pinned)", size, seconds)
        del gpu, host, pinned
        seconds = median_seconds(partial(generate, "normal", shape, "cpu"), max(1, args.repeats // 2), warmup=1)
        record("generate on CPU (1 thread): normal", size, seconds)

    if not args.fetch_only:
        square = (4096, 4096)
        seconds = median_seconds(partial(generate, "orthogonal", square, "cuda"), 3)
        record("orthogonal 4096x4096 on GPU", 64, seconds)
        seconds = median_seconds(partial(generate, "orthogonal", square, "cpu"), 1, warmup=0)
        record("orthogonal 4096x4096 on CPU (1 thread)", 64, seconds)

    # As deployed (docs/deploy.md): a cache, and preallocated host memory for it plus the largest tensor, which
    # a GPU-generated tensor is copied into. Uncached: a new seed every call (the cache of one tensor then evicts
    # the last, whose pages the next copy reuses); cached: one seed again and again. Each result is checked
    # against local torch on the same device and dropped, so the client reuses its destination memory.
    largest = max(args.sizes_mib)
    server, target = start_server("--cache-bytes", f"{largest}M", "--preallocate-bytes", f"{2 * largest}M")
    fresh = iter(range(100, 1 << 30))
    repeats = max(2, args.repeats // 2)
    try:
        with initserve.Client(target, timeout=600) as client:
            for size in args.sizes_mib:
                shape = (size * 256, ROW)
                for device in ("cuda", "cpu"):
                    for cached in (False, True):
                        seeds = [7] * (1 + repeats) if cached else [next(fresh) for _ in range(1 + repeats)]
                        times, wrong = timed_fetches(client, shape, device, seeds)
                        seconds = statistics.median(times[1:])  # the first call is warm-up (and fills the cache)
                        what = f"fetch normal {'cached' if cached else 'uncached'}, generated on {device}"
                        record(what, size, seconds, verified=len(times), wrong=wrong)
                        if wrong:
                            print(f"WRONG BYTES: {wrong} of {len(times)} fetches differ from local torch")
                            return 1
    finally:
        server.terminate()
        server.wait(30)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

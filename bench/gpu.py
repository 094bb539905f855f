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


def fetch_into(results: list[torch.Tensor], client: initserve.Client, shape: tuple[int, ...], device: str) -> None:
    results.append(client.normal(shape, seed=3, device=device))


def start_server() -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "initserve_server", "--host", "127.0.0.1", "--port", "0"]
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

    for size in args.sizes_mib:
        shape = (size * 256, ROW)
        for scheme in SCHEMES:
            seconds = median_seconds(partial(generate, scheme, shape, "cuda"), args.repeats)
            record(f"generate on GPU: {scheme}", size, seconds)
        gpu = generate("normal", shape, "cuda")
        record("ceiling: device-to-host copy (pageable)", size, median_seconds(gpu.cpu, args.repeats))
        pinned = torch.empty(shape, pin_memory=True)
        seconds = median_seconds(partial(pinned.copy_, gpu), args.repeats)
        record("ceiling: device-to-host copy (pinned)", size, seconds)
        del gpu, pinned
        seconds = median_seconds(partial(generate, "normal", shape, "cpu"), max(1, args.repeats // 2), warmup=1)
        record("generate on CPU (1 thread): normal", size, seconds)

    square = (4096, 4096)
    record("orthogonal 4096x4096 on GPU", 64, median_seconds(partial(generate, "orthogonal", square, "cuda"), 3))
    cpu_orthogonal = median_seconds(partial(generate, "orthogonal", square, "cpu"), 1, warmup=0)
    record("orthogonal 4096x4096 on CPU (1 thread)", 64, cpu_orthogonal)

    server, target = start_server()
    try:
        with initserve.Client(target, timeout=600) as client:
            for size in args.sizes_mib:
                shape = (size * 256, ROW)
                for device in ("cuda", "cpu"):
                    expected = generate("normal", shape, device, seed=3).cpu()
                    results: list[torch.Tensor] = []
                    fetch = partial(fetch_into, results, client, shape, device)
                    seconds = median_seconds(fetch, max(1, args.repeats // 2), warmup=1)
                    wrong = sum(not bitwise_equal(result, expected) for result in results)
                    record(f"fetch normal generated on {device}", size, seconds, verified=len(results), wrong=wrong)
                    if wrong:
                        print(f"WRONG BYTES: {wrong} of {len(results)} fetches differ from local torch")
                        return 1
                    del expected, results
    finally:
        server.terminate()
        server.wait(30)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

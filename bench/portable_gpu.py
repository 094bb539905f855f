"""`make bench`'s GPU rows for the portable generator (issue 20): the Triton kernel (portable/gpu.py) writing a
float32 ``normal`` of --size-mib on a CUDA device, in GB/s of output, against the device's own write ceiling
(``zero_`` of the same tensor) and torch's ``normal_`` on it, measured in the same run; then other kinds and
dtypes, the elementwise path, and the kernel's launch variants (pairs per program, warps). Every measured output
is checked: its first and last 2**20 elements against the CPU kernel, byte for byte.

Prediction (2026-12-04, before any run): the kernel is bound by float64 arithmetic, not memory. About 65 float64
operations per normal element (ln's 12-term series and a division, the 8-term sine and cosine series, a division
and a square root in software sequences, no fused multiply-adds); an H100/H200 issues about 1.7e13 float64
operations a second, so about 2.6e11 elements/s: ~1 TB/s of float32, a fifth of HBM's 4.8 TB/s, well above the
issue's 300 GB/s. trunc_normal (AS241 computes all three regions and a logarithm) about a third of that.

    python bench/portable_gpu.py [--json docs/bench/portable_gpu.json] [--size-mib 1024] [--repeats 10]

Without CUDA it says so and exits 0, writing nothing; ``--device cpu`` under TRITON_INTERPRET=1 runs it (slowly,
use --size-mib 1) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from initserve_protocol.portable import elementwise, tensors

TARGET_GBPS = 300.0  # issue 20: float32 normal on a GPU
CHECKED = 1 << 20  # elements checked at each end of every output
VARIANTS = ((128, 4), (256, 4), (512, 4), (1024, 4), (256, 8), (512, 8), (1024, 8))  # (pairs per program, warps)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(action: Callable[[], None], device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        action()
    _sync(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def check(out: torch.Tensor, scheme: str, params: dict, seed: int) -> None:
    """The output's first and last CHECKED elements are the CPU kernel's bytes: else SystemExit."""
    flat = out.view(-1)
    count = min(CHECKED, flat.numel())
    for first in sorted({0, flat.numel() - count}):
        expected = torch.empty(count, dtype=out.dtype)
        tensors.fill(expected, scheme, params, tuple(out.shape), seed, (), first)
        got = flat[first : first + count].cpu()
        if not torch.equal(got.view(torch.uint8), expected.view(torch.uint8)):
            raise SystemExit(f"WRONG BYTES: {scheme} {params} {out.dtype} at elements {first}..{first + count}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: the GPU rows are skipped")
        return 0
    from initserve_protocol.portable import gpu

    rows: dict[str, float | str] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    rows["torch"] = torch.__version__
    import triton

    rows["triton"] = triton.__version__
    seed = 2026

    def gbps(out: torch.Tensor, action: Callable[[], None]) -> float:
        return out.numel() * out.element_size() / median_seconds(action, device, args.repeats) / 1e9

    def measure(name: str, scheme: str, params: dict, dtype: torch.dtype, **launch: int) -> float:
        out = torch.empty(args.size_mib * 2**20 // torch.empty((), dtype=dtype).element_size(), dtype=dtype,
                          device=device)  # fmt: skip
        rate = gbps(out, lambda: gpu.fill(out, scheme, params, tuple(out.shape), seed, **launch))
        check(out, scheme, params, seed)
        rows[name] = round(rate, 1)
        print(f"{name:56s} {rate:9.1f} GB/s", flush=True)
        return rate

    plain = torch.empty(args.size_mib * 2**20 // 4, dtype=torch.float32, device=device)
    rows["ceiling: zero_ float32 (GB/s)"] = round(gbps(plain, plain.zero_), 1)
    generator = torch.Generator(device).manual_seed(seed)
    rows["torch normal_ float32 (GB/s)"] = round(gbps(plain, lambda: plain.normal_(generator=generator)), 1)
    for name in ("ceiling: zero_ float32 (GB/s)", "torch normal_ float32 (GB/s)"):
        print(f"{name:56s} {rows[name]:9.1f} GB/s", flush=True)

    normal = measure("portable normal float32 (GB/s)", "normal", {}, torch.float32)
    measure("portable normal bfloat16 (GB/s)", "normal", {}, torch.bfloat16)
    measure("portable normal float64 (GB/s)", "normal", {}, torch.float64)
    measure("portable uniform float32 (GB/s)", "uniform", {}, torch.float32)
    measure("portable trunc_normal float32 (GB/s)", "trunc_normal", {"std": 0.02, "a": -0.04, "b": 0.04},
            torch.float32)  # fmt: skip
    for block, warps in VARIANTS:
        measure(f"portable normal float32, {block} pairs x {warps} warps (GB/s)", "normal", {}, torch.float32,
                block=block, num_warps=warps)  # fmt: skip

    small = torch.empty(min(args.size_mib, 256) * 2**20 // 4, dtype=torch.float32, device=device)
    rate = gbps(small, lambda: elementwise.fill(small, "normal", {}, tuple(small.shape), seed))
    check(small, "normal", {}, seed)
    name = "elementwise normal float32 (GB/s)"
    rows[name] = round(rate, 1)
    print(f"{name:56s} {rate:9.1f} GB/s")

    rows["portable normal float32 / target 300 GB/s"] = round(normal / TARGET_GBPS, 2)
    rows["portable normal float32 / zero_ ceiling"] = round(normal / float(rows["ceiling: zero_ float32 (GB/s)"]), 3)
    print(json.dumps(rows, indent=1))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

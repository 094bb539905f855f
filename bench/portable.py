"""`make bench`'s portable-generator rows (issue 20): the CPU kernel against torch's own local ``normal_`` on
this machine's cores, a 1/64 shard of a 4 GiB tensor against the whole tensor's generation, and a 1 GiB tensor
made here and verified against the server's checksum-only answer (``local=True``) against its gRPC fetch (again
with ``MemoryPolicy(huge_pages=True)`` for both, and, with CUDA, made into a GPU tensor). Medians after warm-up,
ratios within one run; every measured output is checked (bytes against the reference on a sample of elements, the
shard against the whole tensor's rows).

    python bench/portable.py [--json docs/bench/portable.json] [--repeats 5] [--size-mib 256] [--whole-gib 4]
                             [--local-gib 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import initserve
from initserve import portable
from initserve_protocol.portable import reference, tensors
from initserve_protocol.slices import Shard, resolve

CPU_VS_TORCH = 1.5  # portable float32 normal at least this much faster than torch's local normal_
SHARD_FRACTION = 1 / 32  # a 1/64 shard in at most this fraction of the whole tensor's time
LOCAL_VS_FETCH = 3.0  # local generate-and-verify at least this much faster than the gRPC fetch
HUGE_PAGES = initserve.MemoryPolicy(huge_pages=True)
SAMPLE = 2_000  # elements checked against the pure-Python reference
sys.path.insert(0, str(Path(__file__).resolve().parent))


def median_seconds(action, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        action()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--whole-gib", type=int, default=4)
    parser.add_argument("--local-gib", type=int, default=1)
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    rows: dict[str, float] = {}

    # 1. float32 normal of --size-mib into an existing tensor: torch's local normal_ (all threads) against the
    # portable CPU kernel (both write the same memory; a new tensor's page faults are a row of their own).
    elements = args.size_mib * 2**20 // 4
    out = torch.empty(elements)
    generator = torch.Generator().manual_seed(1)
    torch_s = median_seconds(lambda: out.normal_(generator=generator), args.repeats)
    portable_s = median_seconds(lambda: tensors.fill(out, "normal", {}, (elements,), 7), args.repeats)
    new_s = median_seconds(lambda: portable.generate((elements,), "normal", seed=7), args.repeats)
    made = portable.generate((elements,), "normal", seed=7)
    expected = reference.generate("normal", {"mean": 0.0, "std": 1.0}, (elements,), "float32", 7, ((0, 0, SAMPLE),))
    assert made[:SAMPLE].numpy().tobytes() == expected, "portable bytes differ from the reference"
    del made
    rows["torch_normal_GBps"] = elements * 4 / torch_s / 1e9
    rows["portable_normal_GBps"] = elements * 4 / portable_s / 1e9
    rows["portable_vs_torch"] = torch_s / portable_s
    rows["portable_new_tensor_GBps"] = elements * 4 / new_s / 1e9

    # 2. a 1/64 shard (dim 0) of a --whole-gib float32 tensor against the whole tensor.
    rows_, cols = args.whole_gib * 2**30 // 4 // 8192, 8192
    shape = (rows_, cols)
    whole_s = median_seconds(lambda: portable.generate(shape, "normal", seed=9), max(1, args.repeats // 2), 1)
    shard = [Shard(0, 17, 64)]
    shard_s = median_seconds(lambda: portable.generate(shape, "normal", seed=9, slices=shard), args.repeats)
    piece = portable.generate(shape, "normal", seed=9, slices=shard)
    start, length = resolve(shape, shard)[0][1:]
    whole = portable.generate(shape, "normal", seed=9)
    assert torch.equal(piece.view(torch.int32), whole[start : start + length].view(torch.int32)), "shard differs"
    del whole
    rows["whole_s"] = whole_s
    rows["shard_s"] = shard_s
    rows["shard_vs_whole"] = shard_s / whole_s

    # 3. 1 GiB float32 normal from a server, cached there: fetched over gRPC, or made here and verified.
    from procs import initserve_server

    local_shape = (args.local_gib * 2**30 // 4 // 8192, 8192)
    with initserve_server("--cache-bytes", str((args.local_gib + 1) << 30)) as server:
        with initserve.Client(server.target, rng=portable.PHILOX, timeout=600) as client:
            fetched = client.fetch(local_shape, "normal", seed=11).tensor  # generated and cached by the server
            fetch_s = median_seconds(lambda: client.fetch(local_shape, "normal", seed=11), args.repeats, 0)
            local_s = median_seconds(lambda: client.fetch(local_shape, "normal", seed=11, local=True), args.repeats)
            made = client.fetch(local_shape, "normal", seed=11, local=True)
            assert made.transport == "local" and torch.equal(made.tensor.view(torch.int32), fetched.view(torch.int32))
            del made
            if torch.cuda.is_available():  # made on the GPU (the Triton kernel), its host copy checked
                target = torch.empty(local_shape, device="cuda")
                gpu = lambda: client.fetch(local_shape, "normal", seed=11, local=True, out=target)  # noqa: E731
                rows["local_gpu_s"] = median_seconds(gpu, args.repeats)
                assert torch.equal(target.cpu().view(torch.int32), fetched.view(torch.int32)), "GPU bytes differ"
                rows["local_gpu_vs_fetch"] = fetch_s / rows["local_gpu_s"]
                del target
        # The same pair with huge pages behind each fresh destination (a quarter of a fresh 1 GiB's making here is
        # page faults): one client's policy for both, so the ratio stays like for like.
        with initserve.Client(server.target, rng=portable.PHILOX, timeout=600, memory=HUGE_PAGES) as client:
            rows["grpc_fetch_huge_pages_s"] = median_seconds(
                lambda: client.fetch(local_shape, "normal", seed=11), args.repeats
            )
            rows["local_huge_pages_s"] = median_seconds(
                lambda: client.fetch(local_shape, "normal", seed=11, local=True), args.repeats
            )
            made = client.fetch(local_shape, "normal", seed=11, local=True)
            assert torch.equal(made.tensor.view(torch.int32), fetched.view(torch.int32)), "huge-page bytes differ"
            del made
        rows["local_huge_pages_vs_fetch"] = rows["grpc_fetch_huge_pages_s"] / rows["local_huge_pages_s"]
        del fetched
    rows["grpc_fetch_s"] = fetch_s
    rows["local_s"] = local_s
    rows["local_vs_fetch"] = fetch_s / local_s

    print(f"portable generator, {threads} threads, torch {torch.__version__}")
    print(
        f"float32 normal, {args.size_mib} MiB: torch normal_ {rows['torch_normal_GBps']:.2f} GB/s, portable "
        f"{rows['portable_normal_GBps']:.2f} GB/s: {rows['portable_vs_torch']:.2f}x (target >= {CPU_VS_TORCH}x); "
        f"into a new tensor each time (initserve.portable.generate) {rows['portable_new_tensor_GBps']:.2f} GB/s"
    )
    print(f"{args.whole_gib} GiB tensor {list(shape)}: whole {whole_s:.3f} s, 1/64 shard {shard_s * 1e3:.1f} ms: "
          f"{rows['shard_vs_whole']:.4f} of the whole (target <= {SHARD_FRACTION:.4f})")  # fmt: skip
    print(f"{args.local_gib} GiB normal, cached on the server: gRPC fetch {fetch_s:.3f} s, made here and verified "
          f"{local_s:.3f} s: {rows['local_vs_fetch']:.2f}x (target >= {LOCAL_VS_FETCH}x)")  # fmt: skip
    print(f"  with huge pages: gRPC fetch {rows['grpc_fetch_huge_pages_s']:.3f} s, made here and verified "
          f"{rows['local_huge_pages_s']:.3f} s: {rows['local_huge_pages_vs_fetch']:.2f}x")  # fmt: skip
    if "local_gpu_s" in rows:
        print(f"  made here into a CUDA tensor and verified {rows['local_gpu_s']:.3f} s: "
              f"{rows['local_gpu_vs_fetch']:.2f}x the gRPC fetch (target on CPU or GPU)")  # fmt: skip
    # local=True makes the bytes on the client's CPU or its GPU (issue 20): the target holds if either does
    best_local = max(rows["local_vs_fetch"], rows.get("local_gpu_vs_fetch", 0.0))
    met = (
        rows["portable_vs_torch"] >= CPU_VS_TORCH
        and rows["shard_vs_whole"] <= SHARD_FRACTION
        and best_local >= LOCAL_VS_FETCH
    )
    print("targets " + ("met" if met else "MISSED"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "threads": threads,
            "torch": torch.__version__,
            "size_mib": args.size_mib,
            "local_gib": args.local_gib,
        }
        args.json.write_text(json.dumps({**document, "whole_gib": args.whole_gib, **rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

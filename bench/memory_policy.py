"""What each of the client's memory tricks buys: cached fetches under each MemoryPolicy, each in a fresh process.

glibc's thresholds are process-wide and stay raised once raised, so every policy runs in an interpreter of its
own, against one server that holds the tensor in its cache. Each process fetches the same cached ``normal``
tensor ``--repeats`` times after two untimed fetches, freeing each result before the next (as a training job's
rebuilt model does), checks every result's bytes against torch's, and reports the median. The policies run in
turn, ``--rounds`` times in rotated order, so a slow minute of the machine falls on all of them.

    python bench/memory_policy.py [--mib 256] [--json docs/bench/memory_policy.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from procs import initserve_server

POLICIES = {
    "default": "initserve.MemoryPolicy()",
    "reuse_bytes=1G": "initserve.MemoryPolicy(reuse_bytes=1 << 30)",
    "prefault": "initserve.MemoryPolicy(prefault=True)",
    "malloc_thresholds": "initserve.MemoryPolicy(malloc_thresholds=True)",
    "huge_pages": "initserve.MemoryPolicy(huge_pages=True)",
    "fast()": "initserve.MemoryPolicy.fast()",
    "fast()+huge_pages": "dataclasses.replace(initserve.MemoryPolicy.fast(), huge_pages=True)",
}
FETCHER = """
import dataclasses, statistics, sys, time, torch, initserve
target, mib, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
shape, seed = (mib * 256, 1024), 5
expected = torch.nn.init.normal_(torch.empty(shape), generator=torch.Generator().manual_seed(seed))
seconds = []
with initserve.Client(target, timeout=600, memory=POLICY) as client:
    for attempt in range(2 + repeats):
        start = time.perf_counter()
        tensor = client.normal(shape, seed=seed)
        elapsed = time.perf_counter() - start
        if not torch.equal(tensor.view(torch.uint8), expected.view(torch.uint8)):
            raise SystemExit("WRONG BYTES")
        del tensor
        if attempt >= 2:
            seconds.append(elapsed)
print(statistics.median(seconds))
"""


def fetch_median(target: str, policy: str, mib: int, repeats: int) -> float:
    source = FETCHER.replace("POLICY", POLICIES[policy])
    done = subprocess.run(
        [sys.executable, "-c", source, target, str(mib), str(repeats)], capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        raise SystemExit(f"{policy}: {done.stderr.strip() or done.stdout.strip()}")
    return float(done.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="tensor size in MiB (float32 normal)")
    parser.add_argument("--repeats", type=int, default=7, help="timed fetches per process")
    parser.add_argument("--rounds", type=int, default=3, help="processes per policy, in rotated order")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    names = list(POLICIES)
    medians: dict[str, list[float]] = {name: [] for name in names}
    with initserve_server("--cache-bytes", f"{2 * args.mib}M") as server:
        for round_ in range(args.rounds):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                medians[name].append(fetch_median(server.target, name, args.mib, args.repeats))
    nbytes = args.mib << 20
    results = {
        name: {
            "policy": POLICIES[name],
            "median_seconds": statistics.median(values),
            "gb_per_s": nbytes / statistics.median(values) / 1e9,
            "process_medians_seconds": values,
        }
        for name, values in medians.items()
    }
    base = results["default"]["gb_per_s"]
    print(f"cached {args.mib} MiB normal fetch, median of {args.rounds} processes x {args.repeats} fetches:")
    for name, row in results.items():
        print(f"  {name:<18} {row['gb_per_s']:.2f} GB/s  ({row['gb_per_s'] / base:.2f}x default)")
    if args.json:
        report = {
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, Python {platform.python_version()}, {platform.platform()}",
            "mib": args.mib,
            "repeats": args.repeats,
            "rounds": args.rounds,
            "results": results,
        }
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

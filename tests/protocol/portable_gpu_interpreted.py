"""The Triton kernel (portable/gpu.py) under Triton's interpreter, on the CPU: its bytes against tensors.fill's
for the known answers, the self-check's cases, trunc_normal's tails and edges, NaN, deep slices and random
requests, in every dtype; and its ln and quantile at every constant they compare with (``gpu.function_differences``,
which placement runs compiled on each GPU). Prints one JSON line: what was compared and what differed.

Run by tests/protocol/test_portable_gpu.py as ``TRITON_INTERPRET=1 python -m tests.protocol.portable_gpu_interpreted``:
Triton picks the interpreter when a kernel is decorated, so the variable must be set before gpu.py is imported,
hence a process of its own. The interpreter does the kernel's float64 operations in numpy (correctly rounded,
as PTX's ``.rn`` ones are) and its integer ones with the same widths, so this holds the kernel's arithmetic and
layout to the spec; what only a GPU can show (its compiler's float code) the CUDA tests and placement's self-check
show there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys

import torch

from initserve_protocol import slices
from initserve_protocol.portable import gpu, placement, scales, tensors
from initserve_protocol.slices import Resolved
from tests.protocol.portable_known_answers import TORCH_DTYPES, load

SUPPORTED = tuple(sorted(scales.SERVED - {"sparse"}))
DTYPES = tuple(TORCH_DTYPES.values())
TRUNCATED = (
    {"a": 2.0, "b": 3.0},  # the upper tail: flipped
    {"a": -3.0, "b": -2.0},
    {"mean": 0.5, "std": 2.0, "a": -math.inf, "b": 1.0},
    {"a": 1.0, "b": 1.0},  # a == b: width 0
    {"a": -41.0, "b": -40.0},  # beyond 37.5 std: both CDF values 0
    {"a": 6.0, "b": 9.0},  # AS241's far region
    {"a": 30.0, "b": math.inf},  # subnormal CDF values
    {"mean": math.nan},
)
NAN = ({"mean": math.nan}, {"mean": math.inf, "std": math.inf}, {"mean": -math.inf, "std": math.inf})
SEEDS = (0, 1, -1, 1 << 63, (1 << 64) - 1, 0x5EED)

Request = tuple[str, dict, tuple[int, ...], Resolved, int]


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.view(-1).view(torch.uint8).numpy().tobytes()


def _made(fill, scheme: str, params: dict, shape: tuple[int, ...], resolved: Resolved, seed: int, dtype) -> bytes:
    out = torch.empty(slices.numel(shape, resolved), dtype=dtype)
    out.view(torch.uint8).fill_(0xA5)  # no value the kernel writes (not the one NaN): an unwritten element shows
    fill(out, scheme, params, shape, seed, resolved)
    return _bytes(out)


def _random_requests(count: int) -> list[Request]:
    rng = random.Random(20261204)
    requests = []
    for _ in range(count):
        scheme = rng.choice(SUPPORTED)
        dims = rng.randint(2, 4) if scheme.startswith(("xavier", "kaiming")) else rng.randint(0, 4)
        shape = tuple(rng.randint(1, 9) for _ in range(dims))
        if dims and rng.random() < 0.3:
            shape = (*shape[:-1], rng.randint(600, 2100))  # rows over several programs
        resolved = []
        for dim, size in enumerate(shape):
            if rng.random() < 0.5:
                start = rng.randint(0, size - 1)
                resolved.append((dim, start, rng.randint(1, size - start)))
        params: dict = {}
        if scheme == "uniform":
            params = {"a": rng.uniform(-3, 0), "b": rng.uniform(0, 3)}
        elif scheme == "normal":
            params = {"mean": rng.uniform(-2, 2), "std": rng.choice([0.02, 1.0, 3.5, 0.0])}
        elif scheme == "trunc_normal":
            a = rng.uniform(-4, 4)
            params = {"mean": rng.uniform(-1, 1), "std": rng.uniform(0.1, 3), "a": a, "b": a + rng.uniform(0, 3)}
        elif scheme.startswith("kaiming"):
            params = {"a": rng.uniform(0, 1), "mode": rng.choice(["fan_in", "fan_out"])}
        elif scheme.startswith("xavier"):
            params = {"gain": rng.uniform(0.1, 3)}
        requests.append((scheme, params, shape, tuple(resolved), rng.choice(SEEDS + (rng.getrandbits(64),))))
    return requests


def _requests() -> list[tuple[str, Request]]:
    named: list[tuple[str, Request]] = []
    for scheme, params, shape, resolved in placement.SELF_CHECK:
        named.append(("self-check", (scheme, params, shape, resolved, placement.SELF_CHECK_SEED)))
    for params in TRUNCATED:
        named.append(("trunc_normal edges", ("trunc_normal", params, (3, 347), ((1, 5, 300),), -3)))
    for params in NAN:
        named.append(("NaN", ("normal", params, (2, 41), (), 11)))
    deep = tuple(range(2, 12))  # ten dims: nine outer ones around each run
    named.append(("deep slice", ("kaiming_uniform", {}, deep, tuple((d, 1, 1) for d in range(9)) + ((9, 2, 7),), 5)))
    named.append(("odd starts", ("normal", {}, (5, 1001), ((0, 1, 3), (1, 1, 999)), 1 << 63)))
    named += [("random", request) for request in _random_requests(40)]
    return named


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("run with TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    differences: list[str] = []
    compared = 0
    for what, (scheme, params, shape, resolved, seed) in _requests():
        for dtype in DTYPES:
            expected = _made(tensors.fill, scheme, params, shape, resolved, seed, dtype)
            got = _made(gpu.fill, scheme, params, shape, resolved, seed, dtype)
            compared += 1
            if got != expected:
                differences.append(f"{what}: {scheme} {params} {shape} {resolved} seed={seed} {dtype}")
    differences += gpu.function_differences(torch.device("cpu"))
    known = 0
    for case in load()["cases"]:
        if case["scheme"] not in SUPPORTED:
            continue
        resolved = tuple(tuple(item) for item in case["slices"])
        data = _made(gpu.fill, case["scheme"], case["params"], tuple(case["shape"]), resolved, case["seed"],
                     TORCH_DTYPES[case["dtype"]])  # fmt: skip
        known += 1
        if hashlib.sha256(data).hexdigest() != case["sha256"]:
            differences.append(f"known answer: {case}")
    cpu = torch.device("cpu")
    checks = {
        "self_check": placement.self_check(cpu, gpu.fill),
        "damaged_self_check": placement.self_check(cpu, _damaged),
    }
    print(json.dumps({"compared": compared, "known": known, "differences": differences, **checks}))
    return 0


def _damaged(out: torch.Tensor, *args: object, **kwargs: object) -> None:
    gpu.fill(out, *args, **kwargs)
    flat = out.view(-1)
    flat[-1] = torch.nextafter(flat[-1], torch.tensor(-math.inf, dtype=flat.dtype))


if __name__ == "__main__":
    sys.exit(main())

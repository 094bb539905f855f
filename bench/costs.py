"""Calibrates the cost model (initserve_server.costs): each coefficient, each scheme's working memory, predictions.

Everything runs as the server runs it: one intra-op thread, glibc's mmap threshold pinned
(allocator.return_large_blocks_to_the_os), generation through the server's own ``initializers.generate``. Times
are the minimum of several repetitions (the machine may be shared: the minimum is the undisturbed cost), per
element, per flop, per column or per write as the model counts them. A coefficient's row shows the measured value
next to the model's; the model's should be the larger (rounded up with some margin). Working memory is measured
in a fresh interpreter per case: peak RSS (VmHWM, reset through /proc/self/clear_refs) over the RSS just before
the generation, less the tensor's bytes. The last table compares the model with whole generations.

    python bench/costs.py [--json PATH] [--mib 64] [--large] [--only coefficients memory requests]
    python bench/costs.py probe '[[scheme, shape, dtype, params], ...]'   # one process measures each in turn
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from initserve_server.allocator import return_large_blocks_to_the_os

MIB = 1 << 20
SECTIONS = ("coefficients", "memory", "requests")
HERE = Path(__file__).resolve().parent


# --- specs and measurements (also used by tests/server/test_costs.py, through the ``probe`` command) -----------------


def make_spec(scheme: str, shape: list[int], dtype: str = "float32", params: dict | None = None, device: str = "cpu"):
    """The InitSpec the server would build for this request (seed 1, no slices)."""
    import torch

    from initserve_protocol import dtypes
    from initserve_protocol.schemes import SCHEMES
    from initserve_server.spec import InitSpec

    entry = next(entry for entry in dtypes.DTYPES if entry.name == dtype)
    return InitSpec(
        scheme=SCHEMES[scheme],
        shape=tuple(shape),
        dtype=entry,
        params=tuple((params or {}).items()),
        seed=1 if SCHEMES[scheme].seeded else 0,
        device=torch.device(device),
        chunk_bytes=1 << 20,
    )


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def probe(cases: list[list]) -> list[dict]:
    """Generate each case in turn in this process; its peak RSS beyond the RSS before it and its tensor, and its
    time. Call only in a fresh interpreter (the allocator setting must come before torch's first allocation)."""
    return_large_blocks_to_the_os()
    import torch

    from initserve_server.initializers import generate

    torch.set_num_threads(1)
    results = []
    for scheme, shape, dtype, params in cases:
        spec = make_spec(scheme, shape, dtype, params)
        small = [min(size, 4) for size in shape]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            error = None
            try:
                generate(make_spec(scheme, small, dtype, params))  # loads what the scheme needs (LAPACK, ...)
            except Exception:  # noqa: BLE001 - the measured call below reports it
                pass
            gc.collect()
            _reset_peak()
            before = _status_bytes("VmRSS")
            start = time.thread_time()
            try:
                tensor = generate(spec)
                tensor_bytes = tensor.numel() * tensor.element_size()
            except Exception as raised:  # noqa: BLE001 - torch's error is a result here (half orthogonal)
                error, tensor_bytes = f"{type(raised).__name__}: {raised}", 0
            seconds = time.thread_time() - start
            peak = _status_bytes("VmHWM")
            tensor = None
            gc.collect()
        results.append(
            {
                "case": [scheme, shape, dtype, params],
                "tensor_bytes": math.prod(shape) * spec.dtype.itemsize,
                "extra_bytes": peak - before - tensor_bytes,
                "seconds": seconds,
                "error": error,
            }
        )
    return results


def run_probe(cases: list[list], timeout: float = 600.0) -> list[dict]:
    """:func:`probe` in a fresh interpreter."""
    repo = HERE.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(HERE / "costs.py"), "probe", json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"probe failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_cases(mib: int) -> list[list]:
    """Every scheme, both trunc_normal branches, orthogonal square/tall/wide, sparse tall/wide, each dtype where
    it matters; about ``mib`` MiB of float32 each (the same element count in the other dtypes)."""
    n = mib * MIB // 4
    side = math.isqrt(n)
    cases: list[list] = []
    for dtype in ("float32", "float64", "float16", "bfloat16"):
        cases += [
            ["normal", [n // 1024, 1024], dtype, {}],
            ["uniform", [n // 1024, 1024], dtype, {}],
            ["trunc_normal", [n // 1024, 1024], dtype, {}],
            ["trunc_normal", [n // 1024, 1024], dtype, {"a": 0.5, "b": 0.6}],
        ]
    cases += [  # trunc_normal's first round accepting everything, in both branches
        ["trunc_normal", [n // 1024, 1024], "float32", {"std": 0.02}],
        ["trunc_normal", [n // 1024, 1024], "float32", {"a": 0.5, "b": 0.5}],
    ]
    cases += [
        ["constant", [n // 1024, 1024], "float32", {"val": 0.5}],
        ["ones", [n // 1024, 1024], "float16", {}],
        ["zeros", [n // 1024, 1024], "float32", {}],
        ["eye", [side, side], "float32", {}],
        ["dirac", [64, 64, 64, n // (64 * 64 * 64)], "float32", {}],
        ["xavier_uniform", [n // 1024, 1024], "bfloat16", {}],
        ["xavier_normal", [n // 1024, 1024], "float32", {}],
        ["kaiming_uniform", [n // 1024, 1024], "float32", {"mode": "fan_out", "nonlinearity": "relu"}],
        ["kaiming_normal", [n // 1024, 1024], "float64", {}],
        ["orthogonal", [side, side], "float32", {}],
        ["orthogonal", [side // 2, side // 2], "float64", {}],
        ["orthogonal", [n // 1024, 1024], "float32", {}],
        ["orthogonal", [1024, n // 1024], "float32", {}],
        ["orthogonal", [n, 1], "float32", {}],
        ["orthogonal", [n // 1024, 1024], "float16", {}],
        ["sparse", [n // 4, 4], "float32", {"sparsity": 0.1}],
        ["sparse", [n, 1], "float16", {"sparsity": 0.9}],
        ["sparse", [256, n // 256], "float32", {"sparsity": 0.5}],
    ]
    return cases


def trunc_normal_rounds(elements: int, dtype: str, params: dict, seed: int) -> tuple[float, float]:
    """(rounds, CPU seconds) of one torch.nn.init.trunc_normal_ of ``elements``: its rounds are counted by its
    torch.where calls (one a round in the normal branch, two in the uniform one)."""
    import torch

    from initserve_server import costs

    class CountWhere(torch.overrides.TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.where:
                self.calls += 1
            return func(*args, **(kwargs or {}))

    spec = make_spec("trunc_normal", [elements], dtype, params)
    tensor = torch.empty(elements, dtype=spec.dtype.torch_dtype)
    generator = torch.Generator().manual_seed(seed)
    with CountWhere() as counter:
        start = time.thread_time()
        torch.nn.init.trunc_normal_(tensor, **params, generator=generator)
        seconds = time.thread_time() - start
    branch, _ = costs.trunc_normal_plan(*costs.trunc_normal_arguments(spec), dtype)
    return 1 + counter.calls / (1 if branch == "normal" else 2), seconds


def _minimum_seconds(function: Callable[[], object], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.thread_time()
        function()
        best = min(best, time.thread_time() - start)
    return best


# --- coefficients -----------------------------------------------------------------------------------------------


def measure_coefficients(large: bool) -> dict[str, dict]:
    """Each coefficient of the model, measured here, next to the model's value."""
    from initserve_server import costs
    from initserve_server.initializers import generate

    rows: dict[str, dict] = {}

    def row(name: str, measured: float, model: float, unit: str, note: str = "") -> None:
        rows[name] = {"measured": measured, "model": model, "unit": unit, "note": note}
        ratio = model / measured if measured > 0 else math.inf
        print(f"  {name:44s} {measured:10.3g} {unit:8s} model {model:10.3g}  model/measured {ratio:5.2f}  {note}")

    def timed(scheme: str, shape: list[int], dtype: str = "float32", params: dict | None = None, repeats: int = 3):
        spec = make_spec(scheme, shape, dtype, params)
        return _minimum_seconds(lambda: generate(spec), repeats)

    print("coefficients (minimum of repetitions; the model's value should be the larger)")
    small = max(
        timed(scheme, [4, 4], params=params, repeats=300)
        for scheme, params in (("normal", {}), ("uniform", {}), ("constant", {"val": 1.0}), ("eye", {}))
    )
    row("CALL_SECONDS", small, costs.CALL_SECONDS, "s", "slowest [4, 4] fill through generate()")

    elements = 1 << 24
    fills = (("uniform", "uniform", {}), ("normal", "normal", {}), ("fill", "constant", {"val": 0.5}))
    for method, scheme, params in fills:
        for dtype in ("float32", "float64", "float16", "bfloat16"):
            seconds = timed(scheme, [elements], dtype, params, repeats=5)
            row(f"FILL[{method},{dtype}]", seconds / elements, costs.FILL_SECONDS_PER_ELEMENT[(method, dtype)], "s/el")

    elements = 1 << 24  # well past the last-level cache, as large tensors are
    for branch, params in (("normal", {}), ("uniform", {"a": 0.5, "b": 0.6})):
        for dtype in ("float32", "float64", "float16", "bfloat16"):
            per_element = min(
                seconds / rounds / elements
                for rounds, seconds in (trunc_normal_rounds(elements, dtype, params, seed) for seed in range(2))
            )
            row(
                f"TRUNC_ROUND[{branch},{dtype}]",
                per_element,
                costs.TRUNC_NORMAL_SECONDS_PER_ELEMENT_ROUND[(branch, dtype)],
                "s/el",
            )
    far = {"a": 10.0, "b": 110.0}  # q ~ 1e-3: about a thousand rounds of one element
    one_element = (trunc_normal_rounds(1, "float32", far, seed) for seed in range(3))
    per_round = min(seconds / rounds for rounds, seconds in one_element)
    row("TRUNC_NORMAL_SECONDS_PER_ROUND", per_round, costs.TRUNC_NORMAL_SECONDS_PER_ROUND, "s", "1 element, a=10 b=110")
    print("  trunc_normal rounds, measured (5 seeds) vs the model's bound:")
    for elements, dtype, params in (
        (1 << 20, "float32", {}),
        (1 << 20, "float32", {"a": 0.5, "b": 0.6}),
        (1 << 20, "float32", {"a": 2.0, "b": 3.0}),
        (1, "float32", far),
        (1 << 12, "bfloat16", {"a": 10.0, "b": 1e9}),
    ):
        measured = [trunc_normal_rounds(elements, dtype, params, seed)[0] for seed in range(5)]
        spec = make_spec("trunc_normal", [elements], dtype, params)
        branch, q = costs.trunc_normal_plan(*costs.trunc_normal_arguments(spec), dtype)
        bound = costs.expected_rounds(elements, q)
        rows[f"rounds {elements} {dtype} {params}"] = {"measured": measured, "model": bound, "q": q}
        print(f"    n={elements} {dtype} {json.dumps(params)} q={q:.3g}: measured {measured}, bound {bound:.4g}")

    # orthogonal: QR seconds per flop (squares) and the element-linear rest (thin matrices), fitted in turn.
    qr_shapes = {
        "float32": [256, 512, 1024, 2048, 4096] + ([8192] if large else []),
        "float64": [256, 512, 1024, 2048] + ([4096] if large else []),
    }
    thin = [(1 << 22, 1), (1 << 20, 4), (1 << 18, 16), (1 << 16, 64), (1 << 14, 256)]
    tall = {"float32": (65536, 1024), "float64": (32768, 1024)}  # 256 MiB: memory-bound panels, slower per flop
    for dtype in ("float32", "float64"):
        square_seconds = {
            (side, side): timed("orthogonal", [side, side], dtype, repeats=3 if side <= 2048 else 1)
            for side in qr_shapes[dtype]
        }
        square_seconds[tall[dtype]] = timed("orthogonal", list(tall[dtype]), dtype, repeats=1)
        thin_seconds = {shape: timed("orthogonal", list(shape), dtype, repeats=3) for shape in thin}
        per_flop, per_element = 0.0, 0.0
        for _ in range(4):
            per_flop = max(
                (seconds - per_element * math.prod(shape)) / costs.qr_flops(*shape)
                for shape, seconds in square_seconds.items()
                if min(shape) >= 1024
            )
            per_element = max(
                (seconds - per_flop * costs.qr_flops(*shape)) / math.prod(shape)
                for shape, seconds in thin_seconds.items()
            )
        for shape, seconds in square_seconds.items():
            predicted = per_flop * costs.qr_flops(*shape) + per_element * math.prod(shape)
            print(f"    orthogonal {shape} {dtype}: {seconds:.3g} s, fit {predicted:.3g} s")
        row(f"QR_SECONDS_PER_FLOP[{dtype}]", per_flop, costs.QR_SECONDS_PER_FLOP[dtype], "s/flop", "k >= 1024")
        row(
            f"ORTHOGONAL_SECONDS_PER_ELEMENT[{dtype}]",
            per_element,
            costs.ORTHOGONAL_SECONDS_PER_ELEMENT[dtype],
            "s/el",
            "thin [m, k], k <= 256",
        )

    # sparse: the loop's fixed cost per column (16 rows: a non-empty index_put), then per row (randperm) and per
    # zero at growing row counts.
    columns = 200_000
    column = (timed("sparse", [16, columns], params={"sparsity": 0.1}) - small) / columns
    row("SPARSE_SECONDS_PER_COLUMN", column, costs.SPARSE_SECONDS_PER_COLUMN, "s", "[16, 200000], all of it")
    per_row, per_row_cached, per_zero = 0.0, 0.0, 0.0
    for rows_count, cols in ((1 << 16, 64), (1 << 20, 4), (1 << 24, 2)):
        per_column = {}
        for sparsity in (0.1, 0.9):
            fill = rows_count * cols * costs.FILL_SECONDS_PER_ELEMENT[("normal", "float32")]
            seconds = timed("sparse", [rows_count, cols], params={"sparsity": sparsity}, repeats=2)
            per_column[sparsity] = (seconds - fill) / cols - column
        zero = (per_column[0.9] - per_column[0.1]) / (0.8 * rows_count)
        per_zero = max(per_zero, zero)
        row_seconds = (per_column[0.1] - 0.1 * rows_count * zero) / rows_count
        if rows_count * costs.RANDPERM_ITEMSIZE <= costs.SPARSE_CACHED_PERMUTATION_BYTES:
            per_row_cached = max(per_row_cached, row_seconds)
        else:
            per_row = max(per_row, row_seconds)
        print(
            f"    sparse rows={rows_count}: {per_column[0.1] / rows_count * 1e9:.1f} ns/row at sparsity 0.1, "
            f"{zero * 1e9:.1f} ns/zero"
        )
    row("SPARSE_SECONDS_PER_ROW_CACHED", per_row_cached, costs.SPARSE_SECONDS_PER_ROW_CACHED, "s", "64K rows")
    row("SPARSE_SECONDS_PER_ROW", per_row, costs.SPARSE_SECONDS_PER_ROW, "s", "max over 1M, 16M rows")
    row("SPARSE_SECONDS_PER_ZERO", per_zero, costs.SPARSE_SECONDS_PER_ZERO, "s", "max over 64K..16M rows")

    groups = 1 << 22  # the writes, not the call, dominate: initializers.dirac_ sets them by indexed assignments
    write = max(timed("dirac", [groups] + [1] * (dims - 1), params={"groups": groups}) / groups for dims in (3, 4, 5))
    row("DIRAC_SECONDS_PER_WRITE", write, costs.DIRAC_SECONDS_PER_WRITE, "s", "[4M, 1, 1(, 1, 1)] groups=4M")
    return rows


# --- memory and whole requests ------------------------------------------------------------------------------


def measure_memory(mib: int) -> list[dict]:
    """Each case of :func:`memory_cases` in a fresh interpreter, against the model's working_bytes and time."""
    from initserve_server import costs

    print(f"working memory and time, ~{mib} MiB cases, a fresh interpreter each (extra = peak RSS - before - tensor)")
    results = []
    for case in memory_cases(mib):
        measured = run_probe([case])[0]
        cost = costs.estimate(make_spec(*case))
        measured["model_bytes"] = cost.working_bytes
        measured["model_seconds"] = cost.work_seconds
        results.append(measured)
        tensor = max(measured["tensor_bytes"], 1)
        scheme, shape, dtype, params = case
        print(
            f"  {scheme:16s} {str(shape):20s} {dtype:9s} {json.dumps(params):40s} "
            f"extra {measured['extra_bytes'] / MIB:7.1f} MiB ({measured['extra_bytes'] / tensor:4.2f}x) "
            f"model {cost.working_bytes / MIB:7.1f} MiB ({cost.working_bytes / tensor:4.2f}x)  "
            f"time {measured['seconds']:6.3f} s model {cost.work_seconds:6.3f} s "
            f"({measured['seconds'] / cost.work_seconds:4.2f})  {(measured['error'] or '')[:40]}"
        )
    return results


REFERENCE_REQUESTS: list[list] = [
    ["normal", [65536, 1024], "float32", {}],
    ["normal", [262144, 1024], "float32", {}],
    ["orthogonal", [4096, 4096], "float32", {}],
    ["orthogonal", [8192, 8192], "float32", {}],
    ["sparse", [16, 1 << 20], "float32", {"sparsity": 0.1}],
    ["dirac", [1024, 1, 3, 3], "float32", {"groups": 1024}],
    ["trunc_normal", [262144, 1024], "float32", {}],
    ["trunc_normal", [65536, 1024], "float32", {"a": 0.5, "b": 0.6}],
]
HEAVY_REQUESTS = (("orthogonal", (8192, 8192)), ("trunc_normal", (262144, 1024)))  # a minute, or GiBs: --large


def measure_requests(large: bool) -> list[dict]:
    """The reference requests of docs/limits.md: the model's estimate, and the measured generation where
    affordable (with --large: all)."""
    from initserve_server import costs

    print("reference requests: estimate vs one measured generation (a fresh interpreter)")
    results = []
    for case in REFERENCE_REQUESTS:
        cost = costs.estimate(make_spec(*case))
        heavy = (case[0], tuple(case[1])) in HEAVY_REQUESTS
        measured = run_probe([case])[0] if large or not heavy else None
        results.append(
            {
                "case": case,
                "model_seconds": cost.work_seconds,
                "model_bytes": cost.working_bytes,
                "explain": cost.explain,
                "measured": measured,
            }
        )
        shown = "not run"
        if measured:
            shown = f"measured {measured['seconds']:7.3f} s ({measured['seconds'] / cost.work_seconds:4.2f})"
        print(
            f"  {case[0]:13s} {str(case[1]):18s} {json.dumps(case[3]):26s} model {cost.work_seconds:9.4g} s  {shown}"
            f"  working {cost.working_bytes / MIB:.0f} MiB"
        )
    return results


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", choices=("probe",), help=argparse.SUPPRESS)
    parser.add_argument("cases", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None, help="write every measurement here")
    parser.add_argument("--mib", type=int, default=64, help="size of the memory cases (float32 MiB)")
    parser.add_argument("--large", action="store_true", help="also 8192^2 QR and the 1 GiB reference requests")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=SECTIONS)
    args = parser.parse_args(argv)
    if args.command == "probe":
        print(json.dumps(probe(json.loads(args.cases))))
        return 0

    return_large_blocks_to_the_os()
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    results: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": _cpu_model(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    print(json.dumps(results["machine"]))
    if "coefficients" in args.only:
        results["coefficients"] = measure_coefficients(args.large)
    if "memory" in args.only:
        results["memory"] = measure_memory(args.mib)
    if "requests" in args.only:
        results["requests"] = measure_requests(args.large)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

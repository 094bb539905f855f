"""Known answers of the portable generator (philox4x32-10/v1): SHA-256 of reference.generate's bytes for fixed
requests, checked in as tests/protocol/portable_known_answers.json.

The portable generator's bytes are a function of the request alone, so unlike tests/golden_digests.json there is
one table for every CPU, GPU and torch version, and it never changes: a change in it is a new generator version.
Another implementation (a GPU kernel, a client in another language) checks itself against this file.

``python -m tests.protocol.portable_known_answers --write`` regenerates the file from the reference (a few
seconds); without ``--write`` it only says whether the file is up to date. tests/protocol/test_portable_known_answers.py
checks the reference and the fast path (cpu.fill) against it, and that the file is what this module writes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from initserve_protocol import slices
from initserve_protocol.portable import reference, tensors
from initserve_protocol.schemes import SCHEMES

TABLE = Path(__file__).with_name("portable_known_answers.json")
GENERATOR = "philox4x32-10/v1"
HEAD_BYTES = 16
TORCH_DTYPES_16 = {"float16": torch.float16, "bfloat16": torch.bfloat16}
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, **TORCH_DTYPES_16}
U64_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class Case:
    scheme: str
    shape: tuple[int, ...]
    dtype: str
    seed: int
    params: dict = field(default_factory=dict)  # what differs from the scheme's torch defaults
    ranges: tuple[slices.Range, ...] = ()

    @property
    def all_params(self) -> dict:
        """Every parameter of the scheme: torch's defaults, then this case's."""
        return {param.name: param.default for param in SCHEMES[self.scheme].params} | self.params

    @property
    def resolved(self) -> slices.Resolved:
        return slices.resolve(self.shape, self.ranges)


def _r(dim: int, start: int, length: int) -> slices.Range:
    return slices.Range(dim, start, length)


CASES = (
    # uniform: 0 to 4 dims, a zero-size tensor, a degenerate range, a float16 overflow, a slice over many blocks
    Case("uniform", (16,), "float32", 0),
    Case("uniform", (), "float64", 1),
    Case("uniform", (7, 9), "float16", 1 << 63, {"a": -3.0, "b": 0.5}),
    Case("uniform", (5, 3, 4), "bfloat16", U64_MAX, {"a": -1.0, "b": 1.0}),
    Case("uniform", (6,), "float32", -7, {"a": 2.5, "b": 2.5}),
    Case("uniform", (3, 5, 7, 9), "float64", -1, ranges=(_r(1, 1, 3), _r(3, 2, 5))),
    Case("uniform", (0, 4), "float32", 1),
    Case("uniform", (65,), "float16", 2, {"a": -1e5, "b": 1e5}),
    Case("uniform", (4099,), "float64", U64_MAX, ranges=(_r(0, 1, 4097),)),
    # normal
    Case("normal", (1,), "float64", 0),
    Case("normal", (), "float32", 2),
    Case("normal", (17,), "float32", 1),
    Case("normal", (31, 33), "bfloat16", 1 << 63, {"mean": 0.5, "std": 0.02}),
    Case("normal", (4, 5, 6), "float16", U64_MAX, {"mean": -2.0, "std": 3.0}),
    Case("normal", (3, 4, 5, 6), "float64", -12345, ranges=(_r(1, 1, 2), _r(3, 3, 3))),
    Case("normal", (64,), "float16", 0, {"mean": 1e4, "std": 5e4}),
    Case("normal", (10001,), "float32", 1 << 32, ranges=(_r(0, 1, 9999),)),
    Case("normal", (3, 5, 7, 11), "float32", 2, {"std": 0.1}, (_r(0, 1, 2), _r(2, 3, 4), _r(3, 5, 5))),
    # NaN (docs/portable.md section 6): inf + (-inf) where z < 0 and inf * 0 where z = 0; a NaN mean
    Case("normal", (33,), "bfloat16", 3, {"mean": math.inf, "std": math.inf}),
    Case("normal", (9,), "float64", 4, {"mean": math.nan}),
    Case("trunc_normal", (2, 9), "float16", 5, {"mean": math.nan}),
    # subnormal outputs: float32 (and its bfloat16) and float16, which a flush-to-zero conversion would lose
    Case("normal", (40,), "float32", 6, {"std": 1e-39}),
    Case("normal", (40,), "float16", 7, {"std": 1e-6}),
    Case("uniform", (3, 7), "bfloat16", 8, {"a": -1e-38, "b": 1e-38}),
    # xavier_uniform, xavier_normal
    Case("xavier_uniform", (5, 7), "float32", 0),
    Case("xavier_uniform", (9, 4, 3, 3), "bfloat16", 1, {"gain": 1.6}, (_r(1, 1, 2),)),
    Case("xavier_uniform", (3, 1), "float64", U64_MAX),
    Case("xavier_uniform", (8, 16, 3), "float16", -1, {"gain": 0.5}),
    Case("xavier_uniform", (4, 6), "float32", 2, ranges=(_r(1, 2, 0),)),
    Case("xavier_normal", (6, 5), "float64", 1 << 63),
    Case("xavier_normal", (4, 3, 2, 5), "float32", 0, {"gain": 2.0}),
    Case("xavier_normal", (17, 19), "bfloat16", -(1 << 63), ranges=(_r(0, 3, 11),)),
    Case("xavier_normal", (7, 3, 5), "float16", 2, {"gain": 0.1}),
    # kaiming_uniform: every gain torch computes, both modes
    Case("kaiming_uniform", (8, 9), "float32", 1),
    Case("kaiming_uniform", (16, 8, 3, 3), "float32", 0, {"a": math.sqrt(5.0)}),  # nn.Linear / nn.Conv2d's own
    Case("kaiming_uniform", (5, 4, 3), "float64", 1 << 63, {"mode": "fan_out", "nonlinearity": "relu"}),
    Case("kaiming_uniform", (11, 13), "float16", U64_MAX, {"nonlinearity": "tanh"}),
    Case(
        "kaiming_uniform",
        (3, 4, 5, 2),
        "bfloat16",
        -1,
        {"mode": "fan_out", "nonlinearity": "selu"},
        (_r(0, 1, 2), _r(2, 1, 3)),
    ),
    Case("kaiming_uniform", (6, 10), "float64", 2, {"a": 0.2}),
    Case("kaiming_uniform", (3, 3, 3), "float32", 5, {"nonlinearity": "conv2d"}),
    Case("kaiming_uniform", (129, 256), "float16", 1 << 63, {"a": 1.0}),  # 33024 elements: blocks of 32768
    # kaiming_normal
    Case("kaiming_normal", (8, 9), "float64", 0),
    Case("kaiming_normal", (64, 32, 3, 3), "float32", 1, {"mode": "fan_out", "nonlinearity": "relu"}, (_r(0, 5, 20),)),
    Case("kaiming_normal", (10, 10), "bfloat16", 1 << 63, {"nonlinearity": "tanh"}),
    Case("kaiming_normal", (7, 5, 3), "float16", U64_MAX, {"nonlinearity": "selu"}),
    Case(
        "kaiming_normal",
        (4, 6, 2, 2),
        "float64",
        -99,
        {"a": 0.01, "mode": "fan_out"},
        (_r(1, 1, 4), _r(3, 1, 1)),
    ),
    Case("kaiming_normal", (3, 7), "float32", -1, {"nonlinearity": "sigmoid"}),
    Case("kaiming_normal", (129, 257), "float32", 2, {"a": 1.0}),  # 33153 elements: blocks of 32768
    # trunc_normal: torch's defaults, the upper tail (flipped), one infinite bound, a narrow interval, beyond 37.5
    # std (both CDF values 0), 16-bit dtypes, a slice
    Case("trunc_normal", (5, 7), "float32", 0),
    Case("trunc_normal", (33,), "float64", 1, {"a": 2.0, "b": 3.0}),
    Case("trunc_normal", (4, 9), "float32", U64_MAX, {"mean": 0.5, "std": 2.0, "a": -math.inf, "b": 1.0}),
    Case("trunc_normal", (17,), "float64", -1, {"mean": 0.1, "std": 0.02, "a": 0.1, "b": 0.1000001}),
    Case("trunc_normal", (6,), "float64", 2, {"a": -41.0, "b": -40.0}),
    Case("trunc_normal", (8, 8), "float16", 1 << 63, {"std": 0.02, "a": -0.04, "b": 0.04}),
    Case("trunc_normal", (3, 4, 5), "bfloat16", 7, {"mean": 1.0, "std": 3.0, "a": -1.0, "b": 10.0}),
    Case("trunc_normal", (6, 1031), "float64", 3, {"mean": -1.0, "a": -3.0, "b": 0.5}, (_r(0, 1, 4), _r(1, 3, 1027))),
    # sparse: sparsity 0, 1, torch's default std, slices along each dim, 16-bit dtypes
    Case("sparse", (10, 7), "float32", 0, {"sparsity": 0.1}),
    Case("sparse", (9, 4), "float64", 1, {"sparsity": 0.0}),
    Case("sparse", (9, 4), "float32", 1, {"sparsity": 1.0}),
    Case("sparse", (16, 12), "bfloat16", U64_MAX, {"sparsity": 0.5, "std": 1.0}),
    Case("sparse", (20, 6), "float64", -1, {"sparsity": 0.3, "std": 2.0}, (_r(0, 5, 10),)),
    Case("sparse", (20, 6), "float64", -1, {"sparsity": 0.3, "std": 2.0}, (_r(1, 1, 3),)),
    Case("sparse", (31, 29), "float16", 2, {"sparsity": 0.9, "std": 0.5}, (_r(0, 3, 20), _r(1, 7, 13))),
)


def reference_bytes(case: Case) -> bytes:
    return reference.generate(case.scheme, case.all_params, case.shape, case.dtype, case.seed, case.resolved)


def kernel_bytes(
    scheme: str, params: dict, shape: tuple[int, ...], dtype: str, seed: int, resolved: slices.Resolved = ()
) -> bytes:
    """The fast path's bytes: tensors.fill (scales.draw, cpu.fill into float32 or float64, sparse's zeros, torch's
    rounding to 16 bits), as the server and initserve.portable call it."""
    out = torch.empty(slices.numel(shape, resolved), dtype=TORCH_DTYPES[dtype])
    tensors.fill(out, scheme, params, shape, seed, resolved)
    if dtype in TORCH_DTYPES_16:
        return out.view(torch.int16).numpy().tobytes()
    return out.numpy().tobytes()


def entry(case: Case, data: bytes) -> dict:
    return {
        "scheme": case.scheme,
        "params": case.all_params,
        "shape": list(case.shape),
        "dtype": case.dtype,
        "seed": case.seed,
        "slices": [list(item) for item in case.resolved],
        "sha256": hashlib.sha256(data).hexdigest(),
        "head": data[:HEAD_BYTES].hex(),
    }


def render(entries: list[dict]) -> str:
    """The file's text: one case a line, so a diff names the cases that changed."""
    lines = ",\n".join(f"  {json.dumps(item)}" for item in entries)
    header = json.dumps({"generator": GENERATOR, "see": "tests/protocol/portable_known_answers.py"})[1:-1]
    return f'{{{header}, "cases": [\n{lines}\n]}}\n'


def load() -> dict:
    return json.loads(TABLE.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {TABLE.name} from the reference")
    args = parser.parse_args(argv)
    text = render([entry(case, reference_bytes(case)) for case in CASES])
    if args.write:
        TABLE.write_text(text)
        print(f"wrote {len(CASES)} cases to {TABLE}")
        return 0
    if TABLE.exists() and TABLE.read_text() == text:
        print(f"{TABLE.name} is up to date ({len(CASES)} cases)")
        return 0
    print(f"{TABLE.name} differs from the reference: run with --write, and review the diff", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

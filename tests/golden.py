"""Golden digests: SHA-256 of the contract's bytes for fixed requests, per torch build and CPU, checked in.

The contract is "torch's bytes under the server's torch", so a torch upgrade may change them; when it does, that
must fail loudly and say which requests changed, not pass because both sides moved together. The table
(tests/golden_digests.json) maps a CPU device fingerprint (architecture, ATen capability, the QR probe, torch's
version: what decides the bytes) to {case: SHA-256 of the tensor's little-endian bytes}.

``python -m tests.golden --write`` adds or replaces this machine's table and prints, for every other table of the
same CPU, which cases differ: the review a torch upgrade needs before its table is committed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from initserve_protocol.codec import tensor_bytes
from initserve_protocol.seeds import derive_seed
from initserve_server import devices
from tests.conftest import reference

TABLE = Path(__file__).with_name("golden_digests.json")


@dataclass(frozen=True)
class Case:
    scheme: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    seed: int = 7
    name: str = ""  # set: the seed is derive_seed(seed, name), as a request with derive_seed asks
    params: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        params = ",".join(f"{key}={value}" for key, value in sorted(self.params.items()))
        dtype = str(self.dtype).removeprefix("torch.")
        named = f" name={self.name}" if self.name else ""
        return f"{self.scheme}({params}) {list(self.shape)} {dtype} seed={self.seed}{named}"

    @property
    def seed_used(self) -> int:
        return derive_seed(self.seed, self.name) if self.name else self.seed

    def tensor(self) -> torch.Tensor:
        return reference(self.scheme, self.shape, dtype=self.dtype, seed=self.seed_used, **self.params)


# Every scheme; every dtype; sizes below and above torch's vectorized-fill threshold (16 elements); fans from
# 2-D and 4-D shapes; float16/bfloat16, whose bytes come from a float32 draw rounded.
CASES = (
    Case("uniform", (3, 5)),
    Case("uniform", (64, 33), torch.float64, params={"a": -2.0, "b": 0.5}),
    Case("normal", (15,)),
    Case("normal", (16,)),
    Case("normal", (257, 129), params={"mean": 1.0, "std": 0.02}),
    Case("normal", (1000,), torch.float64),
    Case("normal", (512, 64), torch.float16),
    Case("normal", (512, 64), torch.bfloat16),
    Case("normal", (300, 7), name="layers.3.mlp.weight"),
    Case("trunc_normal", (256, 256), params={"std": 0.02}),
    Case("trunc_normal", (100, 3), torch.float64, params={"mean": 0.5, "a": 0.0, "b": 1.0}),
    Case("constant", (4, 4), params={"val": 0.25}),
    Case("ones", (3, 3), torch.bfloat16),
    Case("zeros", (2, 8), torch.float16),
    Case("eye", (5, 7)),
    Case("dirac", (6, 3, 3, 3), params={"groups": 2}),
    Case("xavier_uniform", (128, 64), params={"gain": 1.5}),
    Case("xavier_normal", (64, 32, 3, 3)),
    Case("kaiming_uniform", (768, 768), params={"a": math.sqrt(5)}),
    Case("kaiming_normal", (64, 32, 3, 3), params={"mode": "fan_out", "nonlinearity": "relu"}),
    Case("kaiming_normal", (1024, 256), torch.bfloat16),
    Case("orthogonal", (64, 32)),
    Case("orthogonal", (300, 200), torch.float64, params={"gain": 2.0}),
    Case("sparse", (64, 48), params={"sparsity": 0.1}),
    Case("sparse", (100, 10), torch.float64, params={"sparsity": 0.5, "std": 0.5}),
)


def fingerprint() -> str:
    """The CPU device's fingerprint, as the server reports it: the bytes are a function of it."""
    return devices.device_info(torch.device("cpu")).fingerprint


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(tensor.contiguous())).hexdigest()


def load() -> dict[str, dict[str, str]]:
    return json.loads(TABLE.read_text()) if TABLE.exists() else {}


def same_cpu(a: str, b: str) -> bool:
    """Fingerprints of one CPU kind (architecture and capability), whatever the torch version or QR probe."""
    return a.split("/")[:3] == b.split("/")[:3]


def changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """The cases whose bytes differ between two tables, or that only one of them has."""
    return sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"add or replace this machine's table in {TABLE.name}")
    args = parser.parse_args()
    tables, here = load(), fingerprint()
    computed = {case.key: digest(case.tensor()) for case in CASES}
    for other, table in sorted(tables.items()):
        if other != here and same_cpu(other, here):
            changed = changes(table, computed)
            print(f"against {other}: {len(changed)} of {len(computed)} cases differ")
            for key in changed:
                print(f"  {key}")
    if args.write:
        tables[here] = computed
        TABLE.write_text(json.dumps(tables, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(computed)} digests for {here} to {TABLE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

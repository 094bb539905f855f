"""Checks this interpreter's torch against the portable generator's known answers: run by
tests/protocol/test_portable_torch_versions.py inside a virtualenv with another torch release.

    PYTHONPATH=.:proto python -m tests.protocol.portable_versions

Prints the torch version and the cases that match; exits 1 when any case's bytes differ from the file's.
"""

from __future__ import annotations

import hashlib
import sys

import torch

from tests.protocol.portable_known_answers import kernel_bytes, load


def main() -> int:
    table = load()
    wrong = []
    for number, case in enumerate(table["cases"]):
        resolved = tuple(tuple(item) for item in case["slices"])
        data = kernel_bytes(case["scheme"], case["params"], tuple(case["shape"]), case["dtype"], case["seed"], resolved)
        if hashlib.sha256(data).hexdigest() != case["sha256"]:
            wrong.append(f"case {number}: {case['scheme']} {case['shape']} {case['dtype']} seed {case['seed']}")
    print(f"torch {torch.__version__}: {len(table['cases']) - len(wrong)} of {len(table['cases'])} cases match")
    for line in wrong:
        print(line)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())

"""The contract's bytes pinned: a torch upgrade (or a server change) that alters them fails, naming the cases.

See tests/golden.py for the table and how to review and extend it.
"""

from __future__ import annotations

import pytest
import torch

import initserve
from tests.golden import CASES, TABLE, changes, digest, fingerprint, load

HERE = fingerprint()
TABLES = load()


def this_machines_table() -> dict[str, str]:
    if HERE not in TABLES:
        pytest.skip(f"no golden digests for this CPU ({HERE}); {TABLE.name} has {sorted(TABLES)}")
    return TABLES[HERE]


def test_this_torch_has_golden_digests() -> None:
    """A torch without a table is an upgrade nobody reviewed: fail, saying how to review it."""
    suffix = f"/torch-{torch.__version__}"
    assert any(key.endswith(suffix) for key in TABLES), (
        f"no golden digests for torch {torch.__version__} in {TABLE}: run `python -m tests.golden --write`, "
        "check the cases it lists as changed against the previous torch, and commit the table"
    )


def test_every_case_has_a_digest_and_every_digest_a_case() -> None:
    keys = [case.key for case in CASES]
    assert len(set(keys)) == len(keys)
    for table in TABLES.values():
        assert sorted(table) == sorted(keys)


def test_torchs_bytes_equal_the_golden_digests() -> None:
    table = this_machines_table()
    computed = {case.key: digest(case.tensor()) for case in CASES}
    assert changes(table, computed) == [], f"torch's bytes changed under {HERE} for these cases"


def test_the_server_serves_the_golden_bytes(client: initserve.Client) -> None:
    table = this_machines_table()
    served = {}
    for case in CASES:
        named = {"name": case.name, "derive": True} if case.name else {}
        result = client.fetch(case.shape, case.scheme, seed=case.seed, dtype=case.dtype, **named, **case.params)
        assert result.seed == (case.seed_used if initserve.SCHEMES[case.scheme].seeded else 0)
        assert result.header.device.fingerprint == HERE
        served[case.key] = digest(result.tensor)
    assert changes(table, served) == [], f"the server's bytes differ from the golden digests under {HERE}"

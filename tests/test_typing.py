"""Type checkers see Client's scheme methods: declared from the scheme table, equal to the ones made at run time."""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import initserve
from initserve._scheme_methods import SchemeMethods
from initserve_protocol.schemes import SCHEMES
from tests.scheme_methods import TARGET, render

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = textwrap.dedent(
    """
    import torch

    import initserve

    client = initserve.Client("localhost:50051")
    w: torch.Tensor = client.kaiming_normal((256, 128), seed=7, mode="fan_out", nonlinearity="relu")
    client.normal_(w, 0.0, 0.02, seed=3)
    c = client.constant((2, 2), val=0.5, dtype=torch.float64)
    client.kaiming_normal((4, 4), sed=7)
    client.constant((2, 2))
    client.kaiming_normall((4, 4))
    """
)


def test_the_declared_methods_are_generated_from_the_current_scheme_table() -> None:
    assert TARGET.read_text() == render(), "run `python -m tests.scheme_methods --write`"


@pytest.mark.parametrize("name", [name for scheme in SCHEMES for name in (scheme, f"{scheme}_")])
def test_each_declared_signature_is_the_one_made_at_run_time(name: str) -> None:
    declared = inspect.signature(getattr(SchemeMethods, name))
    made = inspect.signature(getattr(initserve.Client, name))
    assert [(p.name, p.kind, p.default) for p in declared.parameters.values()][1:] == [
        (p.name, p.kind, p.default) for p in made.parameters.values()
    ][1:]  # self: positional-only at run time, an ordinary self in the declaration


def test_mypy_checks_scheme_method_calls(tmp_path: Path) -> None:
    mypy = shutil.which("mypy", path=os.path.dirname(sys.executable))
    assert mypy is not None, "mypy is a dev dependency (requirements-dev.txt)"
    (tmp_path / "example.py").write_text(EXAMPLE)
    env = {**os.environ, "MYPYPATH": f"{ROOT / 'client'}{os.pathsep}{ROOT / 'proto'}"}  # editable installs
    done = subprocess.run(
        [mypy, "--no-incremental", "--ignore-missing-imports", "--follow-imports=silent", "--no-error-summary",
         "--cache-dir", str(tmp_path / "cache"), "example.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    errors = [line.split(" error: ")[1] for line in done.stdout.splitlines() if " error: " in line]
    lines = [int(line.split(":")[1]) for line in done.stdout.splitlines() if " error: " in line]
    assert lines == [10, 11, 12], done.stdout  # the last three lines, and only they
    assert errors[0].startswith('Unexpected keyword argument "sed" for "kaiming_normal"')
    assert errors[1].startswith('Missing named argument "val" for "constant"')
    assert errors[2].startswith('"Client" has no attribute "kaiming_normall"')

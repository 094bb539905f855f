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
import initserve.aio
from initserve._scheme_methods import AsyncSchemeMethods, SchemeMethods
from initserve_protocol.schemes import SCHEMES
from tests.scheme_methods import TARGET, render

ROOT = Path(__file__).resolve().parents[2]
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
ASYNC_EXAMPLE = textwrap.dedent(
    """
    import torch

    import initserve.aio


    async def main() -> None:
        client = initserve.aio.Client("localhost:50051")
        w: torch.Tensor = await client.kaiming_normal((256, 128), seed=7, mode="fan_out", nonlinearity="relu")
        await client.normal_(w, 0.0, 0.02, seed=3)
        await client.kaiming_normal((4, 4), sed=7)
        v: torch.Tensor = client.ones((2, 2))
    """
)


def test_the_declared_methods_are_generated_from_the_current_scheme_table() -> None:
    assert TARGET.read_text() == render(), "run `python -m tests.scheme_methods --write`"


@pytest.mark.parametrize("name", [name for scheme in SCHEMES for name in (scheme, f"{scheme}_")])
@pytest.mark.parametrize(
    ("declaring", "client"), [(SchemeMethods, initserve.Client), (AsyncSchemeMethods, initserve.aio.Client)]
)
def test_each_declared_signature_is_the_one_made_at_run_time(declaring: type, client: type, name: str) -> None:
    declared = inspect.signature(getattr(declaring, name))
    made = inspect.signature(getattr(client, name))
    assert [(p.name, p.kind, p.default) for p in declared.parameters.values()][1:] == [
        (p.name, p.kind, p.default) for p in made.parameters.values()
    ][1:]  # self: positional-only at run time, an ordinary self in the declaration


def mypy_errors(tmp_path: Path, source: str) -> tuple[list[int], list[str], str]:
    """(line numbers, messages, output) of mypy's errors on ``source``."""
    mypy = shutil.which("mypy", path=os.path.dirname(sys.executable))
    assert mypy is not None, "mypy is a dev dependency (requirements-dev.txt)"
    (tmp_path / "example.py").write_text(source)
    env = {**os.environ, "MYPYPATH": f"{ROOT / 'client'}{os.pathsep}{ROOT / 'proto'}"}  # editable installs
    done = subprocess.run(
        [mypy, "--no-incremental", "--ignore-missing-imports", "--follow-imports=silent", "--no-error-summary",
         "--cache-dir", str(tmp_path / "cache"), "example.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    errors = [line.split(" error: ")[1] for line in done.stdout.splitlines() if " error: " in line]
    lines = [int(line.split(":")[1]) for line in done.stdout.splitlines() if " error: " in line]
    return lines, errors, done.stdout


def test_mypy_checks_async_scheme_method_calls(tmp_path: Path) -> None:
    lines, errors, output = mypy_errors(tmp_path, ASYNC_EXAMPLE)
    assert lines == [11, 12], output  # the last two lines, and only they
    assert errors[0].startswith('Unexpected keyword argument "sed" for "kaiming_normal"')
    assert errors[1].startswith('Incompatible types in assignment (expression has type "Coroutine')


def test_mypy_checks_scheme_method_calls(tmp_path: Path) -> None:
    lines, errors, output = mypy_errors(tmp_path, EXAMPLE)
    assert lines == [10, 11, 12], output  # the last three lines, and only they
    assert errors[0].startswith('Unexpected keyword argument "sed" for "kaiming_normal"')
    assert errors[1].startswith('Missing named argument "val" for "constant"')
    assert errors[2].startswith('"Client" has no attribute "kaiming_normall"')

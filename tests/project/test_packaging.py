"""The packages' walls: the server stands on the contract and the memory package, never on the SDK."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

from tests.conftest import run_python

ROOT = Path(__file__).resolve().parents[2]


def dependencies(project: str) -> set[str]:
    declared = tomllib.loads((ROOT / project / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0] for requirement in declared}


def test_the_server_depends_on_the_contract_and_the_memory_package_not_on_the_sdk() -> None:
    assert {"initserve-protocol", "initserve-memory"} <= dependencies("server")
    assert "initserve" not in dependencies("server")
    assert not dependencies("proto") & {"initserve", "initserve-memory", "initserve-server"}
    assert not dependencies("memory") & {"initserve", "initserve-protocol", "initserve-server"}


def test_the_server_never_imports_the_sdk() -> None:
    sources = "\n".join(path.read_text() for path in (ROOT / "server" / "initserve_server").glob("*.py"))
    assert not re.findall(r"\binitserve\._|^\s*(?:from|import) initserve\b(?![_\w])", sources, flags=re.M)
    done = run_python(
        "import sys, initserve_server.server, initserve_server.cli, initserve_server.health_probe\n"
        "print(sorted(name for name in sys.modules if name == 'initserve' or name.startswith('initserve.')))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_contract_package_imports_neither_the_sdk_nor_the_memory_machinery() -> None:
    done = run_python(
        "import sys, initserve_protocol.codec, initserve_protocol.wire, initserve_protocol.schemes\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in ('initserve', 'initserve_memory', 'grpc')))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

"""Writes client/initserve/_scheme_methods.py: the scheme methods' signatures, from the scheme table.

``Client``'s scheme methods are made from the table at import time (``initserve._client``), which type checkers
cannot follow; the generated class declares them for checkers only. ``python -m tests.scheme_methods --write``
rewrites it after the table changes; tests/test_typing.py fails while it is stale.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from initserve_protocol.schemes import SCHEMES, Param

TARGET = Path(__file__).resolve().parent.parent / "client" / "initserve" / "_scheme_methods.py"
HEADER = '''"""Client's scheme methods as type checkers see them; generated: ``python -m tests.scheme_methods --write``.

At run time the methods are made from the scheme table (``initserve._client``); this class only declares their
signatures, so that ``client.kaiming_normal(...)`` is checked like any method. Do not edit by hand.
"""

from __future__ import annotations

import torch

from initserve._requests import ShapeLike


class SchemeMethods:
    """One new-tensor method and one in-place twin per scheme, with torch.nn.init's parameters and defaults."""
'''


def _parameter(param: Param) -> str:
    annotation = param.kind.__name__
    if param.required:
        return f"{param.name}: {annotation}"
    default = f'"{param.default}"' if isinstance(param.default, str) else repr(param.default)
    return f"{param.name}: {annotation} = {default}"


def render() -> str:
    methods = []
    for scheme in SCHEMES.values():
        params = [_parameter(param) for param in scheme.params]
        new = ["self", "shape: ShapeLike", "*", *params]
        if scheme.seeded:
            new.append("seed: int | None = None")
        new += ["dtype: torch.dtype = torch.float32", 'device: str = "cpu"', "timeout: float | None = None"]
        in_place = ["self", "tensor: torch.Tensor", *params]
        if scheme.seeded:
            in_place += ["generator: torch.Generator | None = None", "*", "seed: int | None = None"]
        else:
            in_place.append("*")
        in_place += ['device: str = "cpu"', "timeout: float | None = None"]
        for name, arguments, doc in (
            (scheme.name, new, f"A new CPU tensor of ``shape`` filled by ``{scheme.torch_function}`` on the server."),
            (f"{scheme.name}_", in_place, f"Drop-in for ``{scheme.torch_function}``: fills ``tensor`` in place."),
        ):
            listed = "".join(f"        {argument},\n" for argument in arguments)  # one a line: ruff keeps it
            methods.append(
                f"\n    def {name}(\n{listed}    ) -> torch.Tensor:\n"
                f'        """{doc}"""\n        raise NotImplementedError  # made from the scheme table at import\n'
            )
    return HEADER + "".join(methods)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {TARGET.name}")
    args = parser.parse_args()
    if args.write:
        TARGET.write_text(render())
        print(f"wrote {TARGET}")
    else:
        print(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

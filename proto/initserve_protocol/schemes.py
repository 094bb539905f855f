"""The scheme table: every torch.nn.init function the service serves, its parameters and torch's defaults.

Validation on the server, the Describe call and the client's method signatures are all derived from this
table, so adding a scheme is one entry here (plus, on the server, nothing unless torch needs a fix-up).
"""

from __future__ import annotations

from dataclasses import dataclass

ParamValue = float | int | str


class _Required:
    """Marker for a parameter torch declares without a default (``constant_``'s ``val``)."""

    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()


@dataclass(frozen=True)
class Param:
    """One keyword argument of a torch.nn.init function, with torch's own default."""

    name: str
    kind: type  # float, int or str: how the value travels in InitParams
    default: object = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class Scheme:
    """One torch.nn.init function: ``torch.nn.init.<name>_``."""

    name: str
    params: tuple[Param, ...] = ()
    seeded: bool = True  # takes ``generator=``; unseeded schemes ignore the request's seed
    shapes: str = "any number of dims"
    note: str = ""  # where the service departs from calling torch directly, and why

    @property
    def torch_function(self) -> str:
        return f"torch.nn.init.{self.name}_"

    def param(self, name: str) -> Param | None:
        for param in self.params:
            if param.name == name:
                return param
        return None

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(param.name for param in self.params)


def _kaiming(name: str) -> Scheme:
    return Scheme(
        name,
        (Param("a", float, 0), Param("mode", str, "fan_in"), Param("nonlinearity", str, "leaky_relu")),
        shapes="at least 2 dims",
    )


SCHEMES: dict[str, Scheme] = {
    scheme.name: scheme
    for scheme in (
        Scheme("uniform", (Param("a", float, 0.0), Param("b", float, 1.0))),
        Scheme("normal", (Param("mean", float, 0.0), Param("std", float, 1.0))),
        Scheme(
            "trunc_normal",
            (Param("mean", float, 0.0), Param("std", float, 1.0), Param("a", float, -2.0), Param("b", float, 2.0)),
        ),
        Scheme("constant", (Param("val", float),), seeded=False),
        Scheme("ones", seeded=False),
        Scheme("zeros", seeded=False),
        Scheme("eye", seeded=False, shapes="exactly 2 dims"),
        Scheme("dirac", (Param("groups", int, 1),), seeded=False, shapes="3, 4 or 5 dims"),
        Scheme("xavier_uniform", (Param("gain", float, 1.0),), shapes="at least 2 dims"),
        Scheme("xavier_normal", (Param("gain", float, 1.0),), shapes="at least 2 dims"),
        _kaiming("kaiming_uniform"),
        _kaiming("kaiming_normal"),
        Scheme(
            "orthogonal",
            (Param("gain", float, 1),),
            shapes="at least 2 dims",
            note="The QR runs with one intra-op thread: MKL's blocked QR gives thread-count-dependent bits.",
        ),
        Scheme(
            "sparse",
            (Param("sparsity", float), Param("std", float, 0.01)),
            shapes="exactly 2 dims",
            note=(
                "torch's sparse_ takes its row permutations from the global RNG; the service draws them from the "
                "request's generator (torch.randperm(rows, generator=g), same loop order), so the seed alone "
                "decides the bytes."
            ),
        ),
    )
}

# Every parameter name the wire carries (the fields of InitParams).
PARAM_NAMES: tuple[str, ...] = ("a", "b", "mean", "std", "gain", "val", "sparsity", "groups", "mode", "nonlinearity")

# Non-finite values are refused for every float parameter except these, where torch gives them a meaning
# (trunc_normal with a=-inf, b=inf is an untruncated normal).
INFINITE_ALLOWED: frozenset[tuple[str, str]] = frozenset({("trunc_normal", "a"), ("trunc_normal", "b")})

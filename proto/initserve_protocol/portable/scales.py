"""Each portable scheme as one of three draws with float64 scales: what docs/portable.md section 5 specifies.

Fans come from the full shape (as torch's ``_calculate_fan_in_and_fan_out``), and every bound and standard
deviation is computed in float64 in the order written here, with ``math.sqrt`` (correctly rounded) and no
``pow``. A scheme is then ``("uniform", low, high)``: ``low + (high - low) * U``; ``("normal", mean, std)``:
``mean + std * Z``; ``("trunc_normal", mean, std, a, b)``: ``mean + std * Z`` with Z the truncated standard
normal by inverse CDF, clamped to ``[a, b]``; ``("sparse", 0.0, std, zeros)``: the normal draw with ``zeros``
elements of each column set to zero; or ``("fill", None, None)``: no random draw, the bytes are torch's
(constant, ones, zeros, eye, dirac). Pure Python, no torch: the server, the SDK and the reference all take their
scales from here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

FILLS = frozenset({"constant", "ones", "zeros", "eye", "dirac"})
SERVED = frozenset(
    {
        "uniform",
        "normal",
        "trunc_normal",
        "xavier_uniform",
        "xavier_normal",
        "kaiming_uniform",
        "kaiming_normal",
        "sparse",
    }
)
NOT_PORTABLE = {
    "orthogonal": (
        "orthogonal has no portable form: its QR runs in LAPACK/cuSOLVER, whose bits differ between devices "
        "and releases"
    ),
}
LINEAR_GAINS = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")

Draw = tuple  # (kind, p, q, *more): see the module's docstring


def is_drawn(scheme: str) -> bool:
    """Whether the scheme draws random values (else it is a fill: torch's bytes, on every generator)."""
    return scheme not in FILLS


def fans(shape: Sequence[int]) -> tuple[int, int]:
    """(fan_in, fan_out) of a shape with at least 2 dims, as torch computes them."""
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def gain(nonlinearity: str, a: float) -> float:
    """torch.nn.init.calculate_gain, with a * a where torch writes a ** 2."""
    if nonlinearity in LINEAR_GAINS or nonlinearity == "sigmoid":
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3.0
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        return math.sqrt(2.0 / (1.0 + a * a))
    if nonlinearity == "selu":
        return 3.0 / 4.0
    raise ValueError(f"Unsupported nonlinearity {nonlinearity}")


def sparse_zeros(sparsity: float, rows: int) -> int:
    """How many elements of each column sparse_ sets to zero: torch's ``num_zeros = math.ceil(sparsity * rows)``
    (float64), then as many rows as ``randperm(rows)[:num_zeros]`` holds (Python's slice: a negative count keeps
    all but that many, a count above ``rows`` keeps all)."""
    return len(range(rows)[: math.ceil(sparsity * rows)])


def draw(scheme: str, params: Mapping[str, object], shape: Sequence[int]) -> Draw:
    """The draw and its float64 scales for a scheme whose parameters torch has already accepted."""
    if scheme in FILLS:
        return ("fill", None, None)
    if scheme == "uniform":
        return ("uniform", float(params["a"]), float(params["b"]))  # type: ignore[arg-type]
    if scheme == "normal":
        return ("normal", float(params["mean"]), float(params["std"]))  # type: ignore[arg-type]
    if scheme == "trunc_normal":
        mean, std, a, b = (float(params[name]) for name in ("mean", "std", "a", "b"))  # type: ignore[arg-type]
        return ("trunc_normal", mean, std, a, b)
    if scheme == "sparse":
        zeros = sparse_zeros(float(params["sparsity"]), shape[0])  # type: ignore[arg-type]
        return ("sparse", 0.0, float(params["std"]), zeros)  # type: ignore[arg-type]
    if scheme in ("xavier_uniform", "xavier_normal"):
        fan_in, fan_out = fans(shape)
        std = float(params["gain"]) * math.sqrt(2.0 / float(fan_in + fan_out))  # type: ignore[arg-type]
        if scheme == "xavier_normal":
            return ("normal", 0.0, std)
        bound = math.sqrt(3.0) * std
        return ("uniform", -bound, bound)
    if scheme in ("kaiming_uniform", "kaiming_normal"):
        fan_in, fan_out = fans(shape)
        fan = fan_in if params["mode"] == "fan_in" else fan_out
        std = gain(str(params["nonlinearity"]), float(params["a"])) / math.sqrt(fan)  # type: ignore[arg-type]
        if scheme == "kaiming_normal":
            return ("normal", 0.0, std)
        bound = math.sqrt(3.0) * std
        return ("uniform", -bound, bound)
    raise ValueError(NOT_PORTABLE.get(scheme, f"unknown scheme {scheme!r}"))

"""Where a portable tensor is made: on the CPU by the Numba kernel, or on another device (a GPU) by the
elementwise path, once that path has given the CPU kernel's bytes on that device.

The elementwise path (``elementwise``) is the generator in torch operations, each one correctly rounded on CPUs
and, by IEEE-754, on CUDA; but a device's kernels are not checked here until they run there. So the first
portable tensor a process makes on a device first makes a few small tensors both ways (every kind of draw, every
dtype, a slice) and compares the bytes: equal, and that device's tensors are made there from then on; different,
and a warning says so and that device's tensors are made by the CPU kernel and copied, which costs time, never
bytes. sparse and the fills are always made on the CPU (sparse's zero positions need a partition the elementwise
path does not have).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping, Sequence

import torch

from initserve_protocol.portable import elementwise, tensors
from initserve_protocol.slices import Resolved, sliced_shape

ON_DEVICE = frozenset({"uniform", "normal", "trunc_normal", "xavier_uniform", "xavier_normal", "kaiming_uniform",
                       "kaiming_normal"})  # fmt: skip
SELF_CHECK = (
    ("normal", {"mean": 0.5, "std": 3.0}, (7, 301), ((1, 5, 290),)),
    ("uniform", {"a": -2.0, "b": 0.5}, (129,), ()),
    ("trunc_normal", {"a": 1.0, "b": 2.5}, (65, 3), ()),
    ("trunc_normal", {"a": -30.0, "b": -29.0}, (33,), ()),
    ("kaiming_uniform", {}, (17, 5, 3), ()),
)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_verified: dict[str, bool] = {}
_lock = threading.Lock()


def verified(device: torch.device | str) -> bool:
    """Whether the elementwise path gives the CPU kernel's bytes on ``device`` (checked once per process)."""
    key = str(torch.device(device))
    with _lock:
        if key not in _verified:
            _verified[key] = _self_check(torch.device(device))
            if not _verified[key]:
                warnings.warn(
                    f"initserve: the portable generator's elementwise path gives other bytes on {key} than the CPU "
                    f"kernel; portable tensors for {key} are made by the CPU kernel and copied",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return _verified[key]


def _self_check(device: torch.device) -> bool:
    for scheme, params, shape, resolved in SELF_CHECK:
        for dtype in DTYPES:
            expected = torch.empty(sliced_shape(shape, resolved), dtype=dtype)
            tensors.fill(expected, scheme, params, shape, 12345, resolved)
            made = torch.empty(expected.shape, dtype=dtype, device=device)
            elementwise.fill(made, scheme, params, shape, 12345, resolved)
            if not torch.equal(made.cpu().view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8)):
                return False
    return True


def generate(
    scheme: str,
    params: Mapping[str, object],
    shape: Sequence[int],
    dtype: torch.dtype,
    seed: int,
    resolved: Resolved = (),
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``full[slices]`` as a new tensor on ``device``, after ``tensors.check``: made there by the elementwise path
    where it is verified, else by the CPU kernel and copied."""
    target = torch.device(device)
    if target.type == "cpu" or scheme not in ON_DEVICE or not verified(target):
        return tensors.generate(scheme, params, shape, dtype, seed, resolved, target)
    tensors.check(scheme, params, shape, dtype)
    out = torch.empty(sliced_shape(shape, resolved), dtype=dtype, device=target)
    elementwise.fill(out, scheme, params, shape, seed, resolved)
    return out

"""Where a portable tensor is made: on the CPU by the Numba kernel; on a GPU by the first of these that has given
the CPU kernel's bytes on that device in this process:

1. **The Triton kernel** (``gpu``), where Triton imports and the device is CUDA: one pass over memory. It is
   compiled per kind of draw (uniform, normal, trunc_normal) and dtype, so each (device, kind, dtype) is checked
   on its first use, by the SELF_CHECK cases of that kind made both ways and compared byte for byte, after the
   kernel's ln and quantile are checked once per device at every constant they compare with
   (``gpu.function_differences``: a draw meets those edges about once in 10**8 elements, which no small case
   reaches).
2. **The elementwise path** (``elementwise``): torch operations, about 150 passes over memory. Checked once per
   device, every case in every dtype.
3. Otherwise the CPU kernel, and a copy: it costs time, never bytes.

A path that fails its check, or raises while being checked (a Triton that cannot compile the kernel, say), is
named in a RuntimeWarning once and not used on that device again. sparse and the fills are always made on the
CPU (sparse's zero positions need a partition neither device path has).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import ModuleType

import torch

from initserve_protocol.portable import elementwise, tensors
from initserve_protocol.slices import Resolved, sliced_shape

ON_DEVICE = frozenset({"uniform", "normal", "trunc_normal", "xavier_uniform", "xavier_normal", "kaiming_uniform",
                       "kaiming_normal"})  # fmt: skip
SELF_CHECK = (
    ("normal", {"mean": 0.5, "std": 3.0}, (7, 301), ((1, 5, 290),)),
    ("uniform", {"a": -2.0, "b": 0.5}, (129,), ()),
    ("trunc_normal", {"a": 1.0, "b": 2.5}, (65, 3), ()),  # the upper tail: drawn flipped
    ("trunc_normal", {"a": -30.0, "b": -29.0}, (33,), ()),
    ("kaiming_uniform", {}, (17, 5, 3), ()),
    # Subnormal float32 (and bfloat16) outputs, and float16 ones: a compiler that flushes them to zero fails here.
    ("normal", {"std": 1e-39}, (129,), ()),
    ("normal", {"std": 1e-6}, (129,), ()),
    ("uniform", {"a": -1e-38, "b": 1e-38}, (129,), ()),
    ("trunc_normal", {"std": 1e-38, "a": -2e-38, "b": 2e-38}, (129,), ()),
)
SELF_CHECK_SEED = 12345
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

Fill = Callable[..., None]  # fill(out, scheme, params, shape, seed, resolved): gpu.fill, elementwise.fill

_checked: dict[tuple[object, ...], bool] = {}
_lock = threading.Lock()


def kind_of(scheme: str, params: Mapping[str, object], shape: Sequence[int]) -> str:
    """The draw a drawn scheme makes: "uniform", "normal", "trunc_normal" or "sparse"."""
    return tensors.plan(scheme, params, shape).kind


def self_check(
    device: torch.device, fill: Fill, kinds: Iterable[str] | None = None, dtypes: Iterable[torch.dtype] = DTYPES
) -> bool:
    """Whether ``fill`` on ``device`` gives tensors.fill's bytes for the SELF_CHECK cases of ``kinds`` (all when
    None), in every one of ``dtypes``."""
    wanted = None if kinds is None else set(kinds)
    for scheme, params, shape, resolved in SELF_CHECK:
        if wanted is not None and kind_of(scheme, params, shape) not in wanted:
            continue
        for dtype in dtypes:
            expected = torch.empty(sliced_shape(shape, resolved), dtype=dtype)
            tensors.fill(expected, scheme, params, shape, SELF_CHECK_SEED, resolved)
            made = torch.empty(expected.shape, dtype=dtype, device=device)
            fill(made, scheme, params, shape, SELF_CHECK_SEED, resolved)
            if not torch.equal(made.cpu().view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8)):
                return False
    return True


def _passes(key: tuple[object, ...], what: str, check: Callable[[], bool]) -> bool:
    """``check()``'s verdict, computed once per process for ``key``; a failure or an exception is warned once."""
    with _lock:
        if key not in _checked:
            reason = "gives other bytes than the CPU kernel"
            try:
                _checked[key] = check()
            except Exception as error:  # noqa: BLE001 - any failure of a path only means it is not used
                _checked[key], reason = False, f"failed its check ({type(error).__name__}: {error})"
            if not _checked[key]:
                warnings.warn(
                    f"initserve: the portable generator's {what} {reason}; it is not used there", RuntimeWarning,
                    stacklevel=4,
                )  # fmt: skip
        return _checked[key]


def verified(device: torch.device | str) -> bool:
    """Whether the elementwise path gives the CPU kernel's bytes on ``device`` (checked once per process)."""
    target = torch.device(device)
    return _passes(
        (str(target), "elementwise"), f"elementwise path on {target}", lambda: self_check(target, elementwise.fill)
    )


def _triton() -> ModuleType | None:
    """The Triton kernel's module, or None where Triton does not import (a CPU-only install)."""
    try:
        from initserve_protocol.portable import gpu
    except ImportError:
        return None
    return gpu


def kernel_verified(device: torch.device | str, kind: str, dtype: torch.dtype) -> bool:
    """Whether the Triton kernel is present and gives the CPU kernel's bytes on ``device`` for draws of ``kind`` in
    ``dtype`` (checked once per process for each)."""
    target = torch.device(device)
    gpu = _triton() if target.type == "cuda" else None
    if gpu is None:
        return False
    device = str(target)
    return _kernel_passes(device, "ln and quantile", lambda: not gpu.function_differences(target)) and _kernel_passes(
        device, f"{kind} {dtype}", lambda: self_check(target, gpu.fill, (kind,), (dtype,))
    )


_kernel_broken: set[str] = set()  # devices where checking the kernel raised: it cannot be built or launched there


def _kernel_passes(device: str, what: str, check: Callable[[], bool]) -> bool:
    """The kernel's verdict for ``what`` (its float functions once, then each kind and dtype) on ``device``. A
    check that raises (no C compiler for Triton's launcher, no writable cache, as in the read-only server image)
    rules the kernel out on that device for every kind and dtype, so the others do not each pay a compilation to
    fail the same way."""
    if device in _kernel_broken:
        return False

    def checked() -> bool:
        try:
            return check()
        except Exception:
            _kernel_broken.add(device)
            raise

    return _passes((device, "triton", what), f"Triton kernel for {what} on {device}", checked)


def device_fill(
    scheme: str, params: Mapping[str, object], shape: Sequence[int], dtype: torch.dtype, device: torch.device | str
) -> Fill | None:
    """The fill that makes this request on ``device`` with the CPU kernel's bytes, or None: make it on the CPU."""
    target = torch.device(device)
    if target.type == "cpu" or scheme not in ON_DEVICE:
        return None
    if kernel_verified(target, kind_of(scheme, params, shape), dtype):
        gpu = _triton()
        assert gpu is not None
        return gpu.fill
    if verified(target):
        return elementwise.fill
    return None


def generate(
    scheme: str,
    params: Mapping[str, object],
    shape: Sequence[int],
    dtype: torch.dtype,
    seed: int,
    resolved: Resolved = (),
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``full[slices]`` as a new tensor on ``device``, after ``tensors.check``: made there by the Triton kernel or
    the elementwise path where verified, else by the CPU kernel and copied."""
    target = torch.device(device)
    if target.type == "cpu" or scheme not in ON_DEVICE:
        return tensors.generate(scheme, params, shape, dtype, seed, resolved, target)
    tensors.check(scheme, params, shape, dtype)  # before kind_of, which needs a request torch accepts
    fill = device_fill(scheme, params, shape, dtype, target)
    out = torch.empty(sliced_shape(shape, resolved), dtype=dtype, device=target if fill is not None else "cpu")
    (fill or tensors.fill)(out, scheme, params, shape, seed, resolved)
    return out.to(target)

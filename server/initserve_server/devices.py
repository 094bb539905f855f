"""Generation devices: parsing a request's device string, checking it exists, and its fingerprint.

CUDA random kernels cap their launch grid by the multiprocessor count, so the same seed gives different bytes
on different GPU models (and MIG slices); the fingerprint names everything the bytes depend on. On the CPU,
orthogonal's QR runs in MKL, whose code path follows the CPU more finely than ATen's capability does (and
follows MKL_CBWR when set), so the CPU fingerprint carries a hash of a fixed QR probe run once.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import re

import torch

from initserve_protocol.codec import tensor_bytes
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_server.initializers import configure_torch

_DEVICE_PATTERN = re.compile(r"cpu|cuda(?::(\d{1,4}))?")
# torch.device keeps its index in an int8: cuda:128 reads back as cuda:-128 and cuda:256 as cuda:0.
_MAX_DEVICE_INDEX = 127


class DeviceUnavailable(Exception):
    """The request names a device this server does not have (FAILED_PRECONDITION, never a substitute)."""


def parse_device(text: str) -> torch.device:
    """``""``/``"cpu"`` → cpu, ``"cuda"`` → cuda:0, ``"cuda:N"`` → cuda:N; ValueError for anything else."""
    if text in ("", "cpu"):
        return torch.device("cpu")
    match = _DEVICE_PATTERN.fullmatch(text)
    if match is None:
        shown = text if len(text) <= 32 else text[:32] + "..."
        raise ValueError(f"device {shown!r} is not one of 'cpu', 'cuda', 'cuda:N'")
    index = int(match.group(1) or 0)
    if index > _MAX_DEVICE_INDEX:  # no machine has it; refuse by the name asked for, never a wrapped index
        _require_cuda_index(index)
    return torch.device("cuda", index)


def require_available(device: torch.device) -> None:
    """DeviceUnavailable unless this server can generate on ``device``."""
    if device.type == "cuda":
        _require_cuda_index(device.index)


def _require_cuda_index(index: int) -> None:
    if not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"device 'cuda:{index}' requested but this server has no CUDA (torch {torch.__version__}, "
            f"cuda available: False); generating elsewhere would give different bytes"
        )
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceUnavailable(f"device 'cuda:{index}' requested but this server has {count} CUDA device(s)")


def available_devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    return devices


QR_PROBE_SIZE = 256  # large enough for MKL's blocked QR, the path large orthogonal tensors take (5 ms here)


@functools.cache
def cpu_qr_probe() -> str:
    """8 hex digits of SHA-256 over orthogonal_'s bytes for a fixed seed, in float32 and float64 (single and double
    precision QR are separate MKL kernels): equal on replicas whose MKL takes the same code paths (measured here:
    MKL_CBWR unset, AVX2 and COMPATIBLE give three different probes)."""
    configure_torch()  # the contract's thread count, on whichever thread asks first
    digest = hashlib.sha256()
    for dtype in (torch.float32, torch.float64):
        probe = torch.empty(QR_PROBE_SIZE, QR_PROBE_SIZE, dtype=dtype)
        digest.update(tensor_bytes(torch.nn.init.orthogonal_(probe, generator=torch.Generator().manual_seed(0))))
    return digest.hexdigest()[:8]


def device_info(device: torch.device) -> pb.DeviceInfo:
    """Name, capability and fingerprint of a generation device; equal fingerprints give equal bytes."""
    if device.type == "cpu":
        capability = torch.backends.cpu.get_cpu_capability()
        name = platform.machine()
        fingerprint = f"cpu/{name}/{capability}/qr-{cpu_qr_probe()}/torch-{torch.__version__}"
        return pb.DeviceInfo(device="cpu", name=name, capability=capability, fingerprint=fingerprint)
    props = torch.cuda.get_device_properties(device)
    capability = f"sm_{props.major}{props.minor}"
    fingerprint = f"cuda/{props.name}/{capability}/{props.multi_processor_count}mp/torch-{torch.__version__}"
    return pb.DeviceInfo(
        device=str(device),
        name=props.name,
        multiprocessor_count=props.multi_processor_count,
        capability=capability,
        fingerprint=fingerprint,
    )

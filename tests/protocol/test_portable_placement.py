"""Where portable tensors are made: the CPU kernel, or a device's elementwise path once it has shown the CPU
kernel's bytes there. Without a GPU the device cases skip; the self-check itself runs on the CPU device."""

from __future__ import annotations

import pytest
import torch

from initserve_protocol.portable import elementwise, placement, tensors

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def test_the_self_check_passes_where_the_elementwise_path_is_exact() -> None:
    assert placement._self_check(torch.device("cpu"))
    assert {scheme for scheme, *_ in placement.SELF_CHECK} >= {"normal", "uniform", "trunc_normal"}


def test_the_self_check_fails_where_a_path_differs_by_one_bit() -> None:
    """A device whose bytes differ anywhere must fail the check: here the CPU device with one element changed
    after the elementwise fill (the real elementwise path, its output then damaged by one ulp)."""
    original = elementwise.fill

    def damaged(out: torch.Tensor, *args: object, **kwargs: object) -> None:
        original(out, *args, **kwargs)
        flat = out.view(-1)
        flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf"), dtype=flat.dtype))

    try:
        elementwise.fill = damaged
        assert not placement._self_check(torch.device("cpu"))
    finally:
        elementwise.fill = original


def test_cpu_requests_are_the_kernels_bytes() -> None:
    made = placement.generate("kaiming_normal", {}, (33, 7), torch.bfloat16, 9, ((0, 3, 20),))
    expected = torch.empty(20, 7, dtype=torch.bfloat16)
    tensors.fill(expected, "kaiming_normal", {}, (33, 7), 9, ((0, 3, 20),))
    assert raw(made) == raw(expected)


@CUDA
@pytest.mark.parametrize("scheme", ["normal", "trunc_normal", "kaiming_uniform", "sparse"])
def test_a_gpus_tensors_are_the_cpu_kernels_bytes(scheme: str) -> None:
    params = {"sparsity": 0.3} if scheme == "sparse" else {}
    assert placement.verified("cuda")
    made = placement.generate(scheme, params, (300, 257), torch.float32, 5, (), "cuda")
    assert made.device.type == "cuda"
    assert raw(made) == raw(tensors.generate(scheme, params, (300, 257), torch.float32, 5))


def test_making_portable_bytes_leaves_torchs_thread_count_alone() -> None:
    """Numba's OpenMP layer shares libgomp with torch: its parallel launch used to set the calling thread's
    OpenMP thread count, which is torch's too, and orthogonal's QR gave other bytes after it (caught by the
    golden digests in a fresh clone's full run). The kernel now restores it."""

    def orthogonal() -> torch.Tensor:
        return torch.nn.init.orthogonal_(torch.empty(96, 40), generator=torch.Generator().manual_seed(123))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        before = orthogonal()
        placement.generate("normal", {}, (1000, 1000), torch.float32, 1)  # the kernel on every core
        assert torch.get_num_threads() == 1
        assert raw(orthogonal()) == raw(before)
    finally:
        torch.set_num_threads(threads)

"""Where portable tensors are made: the CPU kernel, or a device's elementwise path once it has shown the CPU
kernel's bytes there. Without a GPU the device cases skip; the self-check itself runs on the CPU device."""

from __future__ import annotations

import pytest
import torch

from initserve_protocol.portable import draws, elementwise, placement, tensors

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def test_the_self_check_passes_where_the_elementwise_path_is_exact() -> None:
    assert placement.self_check(torch.device("cpu"), elementwise.fill)
    kinds = {placement.kind_of(scheme, params, shape) for scheme, params, shape, _ in placement.SELF_CHECK}
    assert kinds == {"normal", "uniform", "trunc_normal"}
    flips = {draws.truncation(0.0, 1.0, params["a"], params["b"])[0] for scheme, params, *_ in placement.SELF_CHECK
             if scheme == "trunc_normal"}  # fmt: skip
    assert flips == {True, False}  # both of the kernel's trunc_normal branches


def _damaged(out: torch.Tensor, *args: object, **kwargs: object) -> None:
    """The real elementwise path, its output then damaged by one ulp in its first element."""
    elementwise.fill(out, *args, **kwargs)
    flat = out.view(-1)
    flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf"), dtype=flat.dtype))


@pytest.mark.parametrize("kind", ["normal", "uniform", "trunc_normal"])
def test_the_self_check_fails_where_a_path_differs_by_one_bit(kind) -> None:
    """A path whose bytes differ anywhere must fail the check of every kind and every dtype."""
    assert not placement.self_check(torch.device("cpu"), _damaged, (kind,))
    assert not placement.self_check(torch.device("cpu"), _damaged, (kind,), (torch.bfloat16,))


def test_a_path_that_fails_or_raises_is_warned_once_and_not_used() -> None:
    key = ("test-device", "test-path")
    with pytest.warns(RuntimeWarning, match="test path failed its check \\(RuntimeError: no compiler\\)"):
        assert not placement._passes(key, "test path", lambda: (_ for _ in ()).throw(RuntimeError("no compiler")))
    assert not placement._passes(key, "test path", lambda: True)  # the verdict stands for the process
    with pytest.warns(RuntimeWarning, match="other path gives other bytes"):
        assert not placement._passes(("test-device", "other"), "other path", lambda: False)


def test_a_kernel_that_cannot_be_built_is_not_tried_again_for_another_kind_or_dtype() -> None:
    def cannot_build() -> bool:
        raise RuntimeError("Failed to find C compiler")

    tried = []
    with pytest.warns(RuntimeWarning, match="Triton kernel for normal torch.float32 on test-gpu failed its check"):
        assert not placement._kernel_passes("test-gpu", "normal torch.float32", cannot_build)
    assert not placement._kernel_passes("test-gpu", "uniform torch.bfloat16", lambda: tried.append(1) or True)
    assert tried == []  # ruled out without another compilation
    assert placement._kernel_passes("other-gpu", "uniform torch.bfloat16", lambda: True)  # per device


def test_without_cuda_or_triton_no_triton_kernel_is_chosen() -> None:
    assert not placement.kernel_verified("cpu", "normal", torch.float32)
    assert placement.device_fill("normal", {}, (4, 4), torch.float32, "cpu") is None
    assert placement.device_fill("sparse", {}, (4, 4), torch.float32, "cuda") is None


def test_cpu_requests_are_the_kernels_bytes() -> None:
    made = placement.generate("kaiming_normal", {}, (33, 7), torch.bfloat16, 9, ((0, 3, 20),))
    expected = torch.empty(20, 7, dtype=torch.bfloat16)
    tensors.fill(expected, "kaiming_normal", {}, (33, 7), 9, ((0, 3, 20),))
    assert raw(made) == raw(expected)


@CUDA
@pytest.mark.parametrize("scheme", ["normal", "trunc_normal", "kaiming_uniform", "sparse"])
def test_a_gpus_tensors_are_the_cpu_kernels_bytes_on_cuda(scheme: str) -> None:
    params = {"sparsity": 0.3} if scheme == "sparse" else {}
    assert placement.verified("cuda")
    if scheme != "sparse" and placement._triton() is not None:  # the Triton kernel makes them where it imports
        assert placement.device_fill(scheme, params, (300, 257), torch.float32, "cuda") is placement._triton().fill
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

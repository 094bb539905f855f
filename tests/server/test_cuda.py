"""CUDA generation: bit-exact with local torch on the same GPU, fingerprinted; skipped cleanly without CUDA."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import initserve
from tests.conftest import page_faults, preallocated, reference, same_bytes, start_server

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SEED = 11
MIB = 1 << 20
# One case per scheme (the test below checks the list covers them all), shapes that are not chunk multiples.
CASES = [
    ("uniform", (4097,), {"a": -0.5, "b": 0.25}),
    ("normal", (1024, 513), {"mean": 0.5, "std": 2.0}),
    ("trunc_normal", (512, 511), {"a": -1.0, "b": 1.0}),
    ("constant", (7, 9), {"val": 0.3}),
    ("ones", (3, 5), {}),
    ("zeros", (3, 5), {}),
    ("eye", (5, 7), {}),
    ("dirac", (6, 3, 3, 3), {"groups": 2}),
    ("xavier_uniform", (300, 200), {}),
    ("xavier_normal", (64, 32, 3), {"gain": 2.0}),
    ("kaiming_uniform", (128, 64, 5, 5), {"a": 0.1}),
    ("kaiming_normal", (256, 128, 3, 3), {"mode": "fan_out", "nonlinearity": "relu"}),
    ("orthogonal", (256, 128), {"gain": 0.5}),
    ("sparse", (257, 31), {"sparsity": 0.3, "std": 0.02}),
]


def test_the_cases_cover_every_scheme() -> None:
    assert sorted(case[0] for case in CASES) == sorted(initserve.SCHEMES)


def cuda_reference(scheme: str, shape, dtype: torch.dtype, seed: int, **params) -> torch.Tensor:
    return reference(scheme, shape, dtype=dtype, seed=seed, device="cuda", **params).cpu()


@pytest.mark.parametrize("scheme, shape, params", CASES, ids=[case[0] for case in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_cuda_bytes_equal_local_torch_on_the_same_gpu(client, scheme, shape, params, dtype) -> None:
    try:
        expected = cuda_reference(scheme, shape, dtype, SEED, **params)
    except Exception as error:  # noqa: BLE001 - the service must raise exactly what torch raised
        with pytest.raises(type(error)) as raised:
            client.fetch(shape, scheme, seed=SEED, dtype=dtype, device="cuda", **params)
        assert str(raised.value) == str(error)
        return
    result = client.fetch(shape, scheme, seed=SEED, dtype=dtype, device="cuda", **params)
    assert same_bytes(result.tensor, expected)
    assert result.device.device == "cuda:0"


def test_cuda_and_cpu_bytes_differ_so_the_device_is_never_substituted(client) -> None:
    on_gpu = client.normal((4096,), seed=SEED, device="cuda")
    on_cpu = client.normal((4096,), seed=SEED)
    assert same_bytes(on_gpu, cuda_reference("normal", (4096,), torch.float32, SEED))
    assert not same_bytes(on_gpu, on_cpu)


def test_a_large_cuda_tensor_of_many_chunks_is_exact(client) -> None:
    shape = (3 * 1024 + 1, 4099)  # ~48 MiB of float32, a ragged last chunk
    result = client.fetch(shape, "kaiming_normal", seed=5, device="cuda", chunk_bytes=(1 << 20) + 3)
    assert same_bytes(result.tensor, cuda_reference("kaiming_normal", shape, torch.float32, 5))


def test_concurrent_cuda_requests_are_each_exact(client) -> None:
    seeds = list(range(16))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda seed: client.normal((512, 1031), seed=seed, device="cuda"), seeds))
    for seed, tensor in zip(seeds, results, strict=True):
        assert same_bytes(tensor, cuda_reference("normal", (512, 1031), torch.float32, seed)), seed


def test_in_place_fill_of_a_cuda_tensor(client) -> None:
    local = torch.empty(64, 48, device="cuda")
    assert client.xavier_uniform_(local, seed=2, device="cuda") is local
    assert same_bytes(local.cpu(), cuda_reference("xavier_uniform", (64, 48), torch.float32, 2))
    client.xavier_uniform_(local, seed=2)  # generated on the server's CPU, copied onto the local GPU tensor
    assert same_bytes(local.cpu(), reference("xavier_uniform", (64, 48), seed=2))


def test_cuda_fingerprint_names_the_gpu_model_and_multiprocessors(client) -> None:
    info = client.fetch((4,), "normal", seed=0, device="cuda:0").device
    props = torch.cuda.get_device_properties(0)
    assert info.name == props.name and info.multiprocessor_count == props.multi_processor_count
    assert f"{props.multi_processor_count}mp" in info.fingerprint
    exact = client.fetch((4,), "normal", seed=0, device="cuda", require_device_fingerprint=info.fingerprint)
    assert exact.device.fingerprint == info.fingerprint
    with pytest.raises(initserve.FailedPrecondition, match="device fingerprint mismatch"):
        client.fetch((4,), "normal", seed=0, device="cuda", require_device_fingerprint="cuda/another-gpu")
    missing = torch.cuda.device_count()
    with pytest.raises(initserve.FailedPrecondition, match=f"has {missing} CUDA device"):
        client.normal((4,), device=f"cuda:{missing}")


def test_a_gpu_tensor_is_copied_into_preallocated_host_memory_without_page_faults() -> None:
    """The host copy of a GPU-generated tensor takes the server's pooled (here preallocated) memory: no page
    fault per page, as a fresh host tensor would take (4,096 for 16 MiB of 4 KiB pages), and the same bytes."""
    shape = (4096, 1024)  # 16 MiB
    running = start_server("--cache-bytes", "32M", "--max-inflight-bytes", "64M", "--preallocate-bytes", "48M")
    try:
        with running.client() as client:
            assert preallocated(client, 48 * MIB) == 48 * MIB
            for seed in range(2):  # the first call pays CUDA's own set-up in the server
                faults = page_faults(running.process.pid)
                result = client.fetch(shape, "normal", seed=seed, device="cuda")
                faults = page_faults(running.process.pid) - faults
                assert same_bytes(result.tensor, cuda_reference("normal", shape, torch.float32, seed))
            assert faults <= 16 * MIB // 4096 // 8, faults
            assert client.describe().stats.buffer_pool_bytes == 16 * MIB  # two 16 MiB tensors took their pages
    finally:
        running.stop()

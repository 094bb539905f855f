"""CUDA generation: bit-exact with local torch on the same GPU, fingerprinted; skipped cleanly without CUDA."""

from __future__ import annotations

import pytest
import torch

import initserve
from tests.conftest import same_bytes

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CASES = [
    ("normal", (1024, 513), {"mean": 0.5, "std": 2.0}),
    ("uniform", (4097,), {}),
    ("kaiming_normal", (256, 128, 3, 3), {"mode": "fan_out", "nonlinearity": "relu"}),
    ("xavier_uniform", (300, 200), {}),
    ("trunc_normal", (512, 512), {"a": -1.0, "b": 1.0}),
    ("orthogonal", (256, 128), {}),
    ("eye", (5, 7), {}),
]


def cuda_reference(scheme: str, shape, dtype: torch.dtype, seed: int, **params) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype, device="cuda")
    function = getattr(torch.nn.init, f"{scheme}_")
    if initserve.SCHEMES[scheme].seeded:
        function(tensor, **params, generator=torch.Generator("cuda").manual_seed(seed))
    else:
        function(tensor, **params)
    return tensor.cpu()


@pytest.mark.parametrize("scheme, shape, params", CASES, ids=[case[0] for case in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_bytes_equal_local_torch_on_the_same_gpu(client, scheme, shape, params, dtype) -> None:
    try:
        expected = cuda_reference(scheme, shape, dtype, 11, **params)
    except Exception as error:  # noqa: BLE001 - the service must raise exactly what torch raised
        with pytest.raises(type(error)) as raised:
            client.fetch(shape, scheme, seed=11, dtype=dtype, device="cuda", **params)
        assert str(raised.value) == str(error)
        return
    result = client.fetch(shape, scheme, seed=11, dtype=dtype, device="cuda", **params)
    assert same_bytes(result.tensor, expected)
    assert result.device.device == "cuda:0"


def test_sparse_on_cuda_is_a_function_of_the_seed(client) -> None:
    first = client.sparse((64, 32), sparsity=0.5, seed=3, device="cuda")
    second = client.sparse((64, 32), sparsity=0.5, seed=3, device="cuda")
    assert same_bytes(first, second)


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

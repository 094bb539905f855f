"""The portable generator's Triton kernel (portable/gpu.py): the CPU kernel's bytes under Triton's interpreter here
(tests/protocol/portable_gpu_interpreted.py, in a process of its own), and on CUDA where there is a GPU: the known
answers, large tensors against the CPU kernel, and placement's check of every kind and dtype."""

from __future__ import annotations

import hashlib
import json
import re
import struct

import pytest
import torch

from initserve_protocol import slices
from initserve_protocol.portable import placement, scales, tensors, triton_modules
from tests.conftest import run_python
from tests.protocol.portable_known_answers import TORCH_DTYPES, load

gpu = pytest.importorskip("initserve_protocol.portable.gpu", reason="Triton is not installed")
from tests.protocol import portable_gpu_interpreted  # noqa: E402 - it imports gpu, so Triton, too

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SUPPORTED = tuple(sorted(scales.SERVED - {"sparse"}))
KNOWN = [case for case in load()["cases"] if case["scheme"] in SUPPORTED]


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.skipif(
    triton_modules.release(gpu.triton.__version__) < (3, 7),
    reason="Triton 3.6's interpreter loads a scalar as a one-element array, which range() refuses (seen on the "
    "GPU machine); the compiled kernel there is held by the CUDA tests",
)
@pytest.mark.timeout(600)
def test_under_the_interpreter_the_kernel_gives_the_cpu_kernels_bytes() -> None:
    done = run_python(  # a process of its own: Triton takes TRITON_INTERPRET when gpu.py is imported
        "from tests.protocol.portable_gpu_interpreted import main; raise SystemExit(main())",
        env={"TRITON_INTERPRET": "1"},
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["differences"] == []
    assert report["compared"] == len(portable_gpu_interpreted._requests()) * 4 >= 200  # in every dtype
    assert report["known"] == len(KNOWN) >= 50
    assert report["self_check"] is True
    assert report["damaged_self_check"] is False  # one ulp in one element fails the check


# Each kind of draw and each dtype once, compiled to PTX for an H100/H200 (sm_90) and one for an A100 (sm_80).
COMPILED = [("uniform", torch.bfloat16, 90), ("normal", torch.float32, 90), ("normal", torch.float16, 90),
            ("trunc_normal", torch.float64, 90), ("normal", torch.float32, 80)]  # fmt: skip
POINTERS = {torch.float64: "*i64", torch.float32: "*i32", torch.float16: "*i16", torch.bfloat16: "*i16"}


def _ptx(kind: str, dtype: torch.dtype, arch: int) -> str:
    """The kernel's PTX as Triton compiles it for a launch (no GPU needed: ptxas ships with Triton)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {"out_ptr": POINTERS[dtype], "scalars_ptr": "*fp64", "ints_ptr": "*i64"}
    constexprs = {"KIND": gpu.KINDS.index(kind), "DTYPE": gpu.DTYPES.index(dtype), "BLOCK": gpu.BLOCK}
    source = ASTSource(gpu._fill, {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=gpu.COMPILE_OPTIONS)
    return compiled.asm["ptx"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("kind", "dtype", "arch"), COMPILED, ids=[f"{k}-{d}-sm{a}" for k, d, a in COMPILED])
def test_the_compiled_kernel_uses_only_correctly_rounded_float_operations(kind, dtype, arch) -> None:
    """What the interpreter cannot show: the GPU code. Every float64 + - * / sqrt and every float conversion is
    PTX's round-to-nearest form (.rn), nothing is fused (fma), approximated (.approx) or flushed to zero (.ftz,
    which would lose subnormal outputs)."""
    ptx = _ptx(kind, dtype, arch)
    instructions = re.findall(r"^\s*(?:@%p\d+\s+)?([a-z][a-z0-9_.]*)", ptx, re.MULTILINE)
    floats = [op for op in instructions if re.search(r"\.(f64|f32|f16|bf16)\b", op)]
    assert not [op for op in floats if op.startswith("fma") or ".approx" in op or ".ftz" in op]
    arithmetic = [op for op in floats if op.split(".")[0] in ("add", "sub", "mul", "div", "sqrt")]
    assert arithmetic and all(".rn." in op and op.endswith(".f64") for op in arithmetic), sorted(set(arithmetic))
    narrowing = [op for op in floats if op.startswith("cvt.") and re.search(r"\.(f32|f16|bf16)\.f(64|32)$", op)]
    assert all(".rn." in op for op in narrowing), sorted(set(narrowing))
    if kind != "uniform":
        assert "div.rn.f64" in instructions and "sqrt.rn.f64" in instructions
    # Every float64 constant in the code is one of the kernel's constants, exactly: Triton's comparisons round a
    # Python float to float32 first (sqrt(2) became 0x3FF6A09E60000000 before gpu._f64), which no other check saw.
    constants = {abs(c.value) for c in vars(gpu).values() if isinstance(c, gpu.tl.constexpr) and type(c.value) is float}
    immediates = {abs(struct.unpack(">d", bytes.fromhex(h))[0]) for h in re.findall(r"\b0d([0-9A-F]{16})\b", ptx)}
    assert immediates and immediates - constants <= {0.0, 0.5, 1.0, 2.0}, sorted(immediates - constants)


@pytest.mark.parametrize("scheme", sorted({"sparse", *scales.FILLS}))
def test_sparse_and_the_fills_are_not_made_here(scheme) -> None:
    with pytest.raises(NotImplementedError, match=scheme):
        gpu.fill(torch.empty(4, 4), scheme, {}, (4, 4), 0)


def test_what_it_refuses() -> None:
    with pytest.raises(ValueError, match="LAPACK"):
        gpu.fill(torch.empty(4, 4), "orthogonal", {}, (4, 4), 0)
    with pytest.raises(ValueError, match="contiguous"):
        gpu.fill(torch.empty(4, 4).t(), "normal", {}, (4, 4), 0)
    with pytest.raises(ValueError, match="float32, float64"):
        gpu.fill(torch.empty(4, dtype=torch.int32), "normal", {}, (4,), 0)
    with pytest.raises(ValueError, match="out has 12 elements; the slice has 8"):
        gpu.fill(torch.empty(12), "normal", {}, (4, 5), 0, ((1, 0, 2),))
    gpu.fill(torch.empty(0), "normal", {}, (0, 5), 7)  # nothing to write: no launch


@CUDA
def test_the_known_answers_on_cuda() -> None:
    wrong = []
    for number, case in enumerate(KNOWN):
        resolved = tuple(tuple(item) for item in case["slices"])
        shape = tuple(case["shape"])
        out = torch.empty(slices.numel(shape, resolved), dtype=TORCH_DTYPES[case["dtype"]], device="cuda")
        gpu.fill(out, case["scheme"], case["params"], shape, case["seed"], resolved)
        if hashlib.sha256(_bytes(out)).hexdigest() != case["sha256"]:
            wrong.append((number, case["scheme"], case["dtype"]))
    assert not wrong


@CUDA
def test_on_cuda_ln_and_the_quantile_take_every_comparison_as_the_spec_does() -> None:
    """The compiled float functions at each constant they compare with, its float32 rounding and their neighbours
    (placement's check asks the same; the interpreter's run holds them there)."""
    assert gpu.function_differences(torch.device("cuda")) == []


@CUDA
@pytest.mark.parametrize("dtype", list(TORCH_DTYPES.values()), ids=str)
@pytest.mark.parametrize(
    ("scheme", "params", "shape", "resolved"),
    [
        ("normal", {"mean": 0.1, "std": 0.02}, (4099, 2053), ()),
        ("uniform", {"a": -3.0, "b": 1.0}, (3001, 1999), ((0, 7, 2900), (1, 3, 1001))),
        ("trunc_normal", {"std": 0.02, "a": -0.04, "b": 0.04}, (1000, 4097), ()),
        ("trunc_normal", {"a": 2.0, "b": 6.0}, (64, 3, 3, 1000), ((1, 1, 2), (3, 11, 900))),
        ("kaiming_normal", {"mode": "fan_out"}, (256, 128, 3, 3), ((0, 17, 100),)),
    ],
)
def test_large_tensors_on_cuda_are_the_cpu_kernels_bytes(scheme, params, shape, resolved, dtype) -> None:
    expected = torch.empty(slices.numel(shape, resolved), dtype=dtype)
    tensors.fill(expected, scheme, params, shape, 2026, resolved)
    out = torch.empty(expected.shape, dtype=dtype, device="cuda")
    gpu.fill(out, scheme, params, shape, 2026, resolved)
    assert _bytes(out) == _bytes(expected)


@CUDA
def test_placement_chooses_the_kernel_for_every_kind_and_dtype_on_cuda() -> None:
    for kind in ("uniform", "normal", "trunc_normal"):
        for dtype in TORCH_DTYPES.values():
            assert placement.kernel_verified("cuda", kind, dtype), (kind, dtype)
    assert placement.device_fill("kaiming_uniform", {}, (8, 8), torch.bfloat16, "cuda") is gpu.fill

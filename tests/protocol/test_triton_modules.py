"""Triton's C modules built ahead of time (portable/triton_modules.py): built here with Triton's own sources and
flags against a stub libcuda, then served to a Triton that may not compile (CC=/bin/false), in processes of
their own (Triton caches its driver set-up per process); and, on CUDA, the GPU kernel run with no compiler."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from initserve_protocol.portable import triton_modules
from tests.conftest import run_python

triton = pytest.importorskip("triton", reason="Triton is not installed")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
NO_COMPILER = {"CC": "/bin/false"}  # Triton's build takes CC first: any compile it tries fails
pytestmark = [
    pytest.mark.skipif(shutil.which("gcc") is None and "CC" not in os.environ, reason="needs a C compiler"),
    pytest.mark.skipif(
        triton_modules.release(triton.__version__) < triton_modules.FIRST_TRITON,
        reason=f"Triton {triton.__version__} compiles a launcher per kernel: its modules cannot be built ahead",
    ),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("triton-modules")
    done = subprocess.run(
        [sys.executable, "-m", "initserve_protocol.portable.triton_modules", str(directory)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return directory


def _driver_source() -> bytes:
    from triton.backends.nvidia import driver

    return Path(driver.dirname, "driver.c").read_bytes()


def test_build_keeps_tritons_driver_module_linked_to_the_cuda_driver(built: Path) -> None:
    manifest = json.loads((built / triton_modules.MANIFEST).read_text())
    digest = hashlib.sha256(_driver_source()).hexdigest()
    assert manifest["triton"] == triton.__version__
    assert [(m["name"], m["source_sha256"]) for m in manifest["modules"]] == [("cuda_utils", digest)]
    module = built / manifest["modules"][0]["file"]
    assert sorted(path.name for path in built.iterdir()) == sorted([module.name, triton_modules.MANIFEST])
    # It calls the driver (cuInit, cuLaunchKernelEx, ...) and names libcuda.so.1 for the loader to find them in.
    assert {"cuModuleLoadData", "cuDeviceGetAttribute"} <= set(triton_modules._driver_symbols(str(module)))
    assert "libcuda.so.1" in triton_modules._needed_libraries(str(module))


# Triton's CUDA driver set-up, as on a GPU host: it needs a libcuda.so.1 to exist (here an empty file) and then
# compiles cuda_utils, or takes it from the modules; loading it here fails for want of the real driver.
SET_UP = """
    import os, sys
    from pathlib import Path
    from triton.backends.nvidia import driver
    from initserve_protocol.portable import triton_modules
    if len(sys.argv) > 1:
        assert triton_modules.use(Path(sys.argv[1]))
    try:
        driver.CudaUtils()
    except Exception as error:
        print(type(error).__name__, error)
    cached = [path for path in Path(os.environ["TRITON_CACHE_DIR"]).rglob("*.so")]
    print("cached", *cached)
"""


def _set_up(tmp_path: Path, *modules: Path) -> list[str]:
    fake = tmp_path / "driver"
    fake.mkdir(exist_ok=True)
    (fake / "libcuda.so.1").touch()
    env = {**NO_COMPILER, "TRITON_CACHE_DIR": str(tmp_path / "cache"), "TRITON_LIBCUDA_PATH": str(fake)}
    done = run_python(SET_UP, *map(str, modules), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def test_without_a_compiler_triton_takes_the_built_module(built: Path, tmp_path: Path) -> None:
    """The module is handed over, copied into Triton's cache and loaded: it fails only on the absent driver."""
    outcome, cached = _set_up(tmp_path, built)
    assert outcome == "ImportError libcuda.so.1: cannot open shared object file: No such file or directory"
    module = next(path for path in built.iterdir() if path.suffix == ".so")
    (copy,) = cached.split()[1:]
    assert Path(copy).read_bytes() == module.read_bytes()


def test_without_a_compiler_or_the_modules_triton_cannot_set_up(tmp_path: Path) -> None:
    """The control: the same process without :func:`use` tries to compile, and the compiler fails."""
    outcome, cached = _set_up(tmp_path)
    assert outcome.startswith("CalledProcessError Command '['/bin/false', ") and cached == "cached"


def test_a_source_the_modules_do_not_hold_is_an_error_not_a_compile(built: Path, tmp_path: Path) -> None:
    other = tmp_path / "cuda_utils.c"
    other.write_bytes(_driver_source() + b"/* another Triton */\n")
    done = run_python(
        f"""
        from pathlib import Path
        from triton import knobs
        from initserve_protocol.portable import triton_modules
        assert triton_modules.use(Path({str(built)!r}))
        try:
            knobs.build.impl("cuda_utils", {str(other)!r}, {str(tmp_path)!r}, [], [], [])
        except RuntimeError as error:
            print(error)
        """,
        env=NO_COMPILER,
    )
    digest = hashlib.sha256(other.read_bytes()).hexdigest()[:16]
    assert done.stdout.strip() == (
        f"Triton {triton.__version__} would compile its C module 'cuda_utils' (source sha256 {digest}), which the "
        f"modules in {built} do not include; rebuild them with this Triton "
        f"(python -m initserve_protocol.portable.triton_modules {built})"
    ), done.stderr[-2000:]


def test_use_refuses_a_directory_without_modules_or_for_another_triton(built: Path, tmp_path: Path) -> None:
    with pytest.raises(triton_modules.TritonModulesError, match=re.escape(f"{tmp_path} holds no Triton modules")):
        triton_modules.use(tmp_path)
    other = tmp_path / "other"
    shutil.copytree(built, other)
    manifest = json.loads((other / triton_modules.MANIFEST).read_text())
    (other / triton_modules.MANIFEST).write_text(json.dumps({**manifest, "triton": "0.0.1"}))
    message = f"the Triton modules in {other} are for Triton 0.0.1, this is Triton {triton.__version__}"
    with pytest.raises(triton_modules.TritonModulesError, match=re.escape(message)):
        triton_modules.use(other)
    from triton import knobs

    assert knobs.build.impl is None  # a refusal changes nothing


@pytest.mark.parametrize("version", ["3.6.0", "2.3.1"])
def test_a_triton_that_compiles_a_launcher_per_kernel_is_refused(
    built: Path, version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found on the first GPU run (Triton 3.6): its modules served, every kernel's own launcher still needed a
    compiler, so placement set the kernel aside everywhere. Now neither the build nor the server's start takes it."""
    monkeypatch.setattr(triton, "__version__", version)
    message = f"Triton {version} compiles a C launcher for each kernel at its first launch"
    with pytest.raises(triton_modules.TritonModulesError, match=re.escape(message)):
        triton_modules.use(built)
    with pytest.raises(triton_modules.TritonModulesError, match=re.escape(message)):
        triton_modules.build(built / "again")
    assert not (built / "again").exists()
    from triton import knobs

    assert knobs.build.impl is None


def test_use_installed_takes_the_environments_own_modules_where_it_has_them(built: Path, tmp_path: Path) -> None:
    bare, image = tmp_path / "bare", tmp_path / "image"
    shutil.copytree(built, image / triton_modules.INSTALLED)
    (bare / triton_modules.INSTALLED).mkdir(parents=True)  # the CPU image's: an empty directory
    done = run_python(
        f"""
        from triton import knobs
        from initserve_protocol.portable import triton_modules
        print(triton_modules.use_installed({str(bare)!r}), knobs.build.impl is None)
        print(triton_modules.use_installed({str(image)!r}), knobs.build.impl is None)
        """
    )
    assert done.stdout.splitlines() == ["None True", f"{image / triton_modules.INSTALLED} False"], done.stderr


def test_use_without_triton_changes_nothing(tmp_path: Path) -> None:
    done = run_python(
        f"""
        import sys
        sys.modules["triton"] = None  # as where Triton is not installed
        from pathlib import Path
        from initserve_protocol.portable import triton_modules
        print(triton_modules.use(Path({str(tmp_path)!r})))
        """
    )
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def test_a_server_given_the_modules_serves(built: Path) -> None:
    from tests.conftest import reference, same_bytes, start_server

    running = start_server("--triton-modules", str(built))
    try:
        with running.client() as client:
            assert same_bytes(client.normal((64, 8), seed=3), reference("normal", (64, 8), seed=3))
    finally:
        assert running.stop() == 0


@CUDA
@pytest.mark.timeout(600)
def test_on_cuda_the_kernel_runs_with_the_modules_and_no_compiler(built: Path, tmp_path: Path) -> None:
    """A fresh Triton cache, no compiler: placement's check of the kernel passes and its bytes are the CPU's."""
    done = run_python(
        f"""
        import torch
        from pathlib import Path
        from initserve_protocol.portable import gpu, placement, tensors, triton_modules
        assert triton_modules.use(Path({str(built)!r}))
        for dtype in (torch.float32, torch.bfloat16):
            assert placement.kernel_verified("cuda", "normal", dtype), dtype
        fill = placement.device_fill("normal", {{}}, (1000, 333), torch.float32, "cuda")
        assert fill is gpu.fill
        out = torch.empty((1000, 333), device="cuda")
        fill(out, "normal", {{}}, (1000, 333), 5)
        here = torch.empty((1000, 333))
        tensors.fill(here.view(-1), "normal", {{}}, (1000, 333), 5)
        print(torch.equal(out.cpu().view(torch.int32), here.view(torch.int32)))
        """,
        env={**NO_COMPILER, "TRITON_CACHE_DIR": str(tmp_path / "cache")},
        timeout=540,
    )
    assert done.stdout.strip().splitlines()[-1:] == ["True"], done.stderr[-3000:]

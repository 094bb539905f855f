"""The portable generator's bytes under another torch release: torch 2.14.1 (the other release on this
machine's disk, a CUDA build that runs here on the CPU) in a virtualenv of its own, checked against the
known-answer file that torch 2.13 passes. Slow (`make test-all`): the first run builds the virtualenv in
build/portable-torch-2.14.1 (several GB: torch's CUDA libraries from PyPI), later runs reuse it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OTHER_TORCH = "2.14.1"
VENV = ROOT / "build" / f"portable-torch-{OTHER_TORCH}"
# What initserve_protocol.portable needs beside torch, pinned as in constraints.txt.
NEEDS = ("numba==0.68.1", "llvmlite==0.50.0", "numpy==2.4.6", "grpcio==1.85.1", "protobuf==7.36.2", "zlib-ng==1.1.0")
BUILD_SECONDS = 3600
RUN_SECONDS = 600


def other_torch_python() -> Path:
    python = VENV / "bin" / "python"
    marker = VENV / ".installed"
    if not marker.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True, timeout=120)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, f"torch=={OTHER_TORCH}", *NEEDS], check=True, timeout=BUILD_SECONDS)
        marker.touch()
    return python


@pytest.mark.slow
@pytest.mark.timeout(BUILD_SECONDS + RUN_SECONDS)
def test_the_known_answers_hold_under_another_torch_release() -> None:
    python = other_torch_python()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'proto'}", "NUMBA_CACHE_DIR": str(VENV / "numba")}
    done = subprocess.run(
        [str(python), "-m", "tests.protocol.portable_versions"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_SECONDS,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"torch {OTHER_TORCH}"), done.stdout
    assert " cases match" in done.stdout


@pytest.mark.slow
@pytest.mark.timeout(BUILD_SECONDS + RUN_SECONDS)
def test_the_triton_kernel_holds_under_another_torch_and_triton_release() -> None:
    """The GPU kernel under Triton's interpreter with torch 2.14.1's own Triton (3.8.0; the dev venv has 3.7.1)."""
    python = other_torch_python()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'proto'}", "NUMBA_CACHE_DIR": str(VENV / "numba"),
           "TRITON_INTERPRET": "1"}  # fmt: skip
    done = subprocess.run(
        [str(python), "-m", "tests.protocol.portable_gpu_interpreted"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_SECONDS,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["differences"] == [] and report["compared"] >= 200 and report["known"] >= 50
    assert report["self_check"] is True and report["damaged_self_check"] is False

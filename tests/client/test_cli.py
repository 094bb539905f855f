"""``initserve fetch``: tensors from a real server into .safetensors and .pt files, with the contract's bytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import initserve
from tests.conftest import reference, same_bytes

CLI = [str(Path(sys.executable).parent / "initserve"), "fetch"]
CLI_SECONDS = 120


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=CLI_SECONDS)


def test_one_tensor_into_a_safetensors_file(server, tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    done = run("--target", server.target, "--shape", "64", "32", "--scheme", "kaiming_normal", "--seed", "7",
               "--param", "mode=fan_out", "--param", "a=0.1", "-o", str(path))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote 1 tensor(s), {64 * 32 * 4} bytes, to {path} (safetensors)\n"
    tensors = load_file(str(path))
    assert same_bytes(tensors["tensor"], reference("kaiming_normal", (64, 32), seed=7, mode="fan_out", a=0.1))
    with safe_open(str(path), "pt") as opened:
        metadata = opened.metadata()
    described = json.loads(metadata["initserve"])["tensor"]
    assert described == {
        "scheme": "kaiming_normal", "params": {"mode": "fan_out", "a": 0.1}, "shape": [64, 32], "slices": [],
        "seed_used": 7, "base_seed": None, "generator": "torch",
    }  # fmt: skip
    assert metadata["torch_version"] == torch.__version__


SPEC = {
    "seed": 11,
    "tensors": [
        {"name": "embed.weight", "shape": [3000, 64], "scheme": "normal", "params": {"std": 0.02}},
        {"name": "head.weight", "shape": [256, 64], "scheme": "xavier_uniform", "dtype": "bfloat16",
         "slices": [{"shard": [0, 1, 4]}]},
        {"name": "norm.weight", "shape": [64], "scheme": "ones"},
        {"name": "fixed", "shape": [5, 5], "scheme": "uniform", "seed": 3, "derive": False},
    ],
}  # fmt: skip


def expected_spec_tensors() -> dict[str, torch.Tensor]:
    derived = {name: initserve.derive_seed(11, name) for name in ("embed.weight", "head.weight")}
    return {
        "embed.weight": reference("normal", (3000, 64), seed=derived["embed.weight"], std=0.02),
        "head.weight": reference("xavier_uniform", (256, 64), dtype=torch.bfloat16, seed=derived["head.weight"])[
            64:128
        ],
        "norm.weight": torch.ones(64),
        "fixed": reference("uniform", (5, 5), seed=3),
    }


def test_a_spec_file_into_safetensors_and_pt(server, tmp_path: Path) -> None:
    spec = tmp_path / "model.json"
    spec.write_text(json.dumps(SPEC))
    expected = expected_spec_tensors()
    for name in ("model.safetensors", "model.pt"):
        path = tmp_path / name
        done = run("--target", server.target, "--spec", str(spec), "-o", str(path), "--quiet")
        assert done.returncode == 0, done.stderr
        assert done.stdout == ""
        if path.suffix == ".pt":
            tensors = torch.load(path, weights_only=True)["tensors"]  # a file written here, not network bytes
        else:
            tensors = load_file(str(path))
        assert list(tensors) == list(expected) if path.suffix == ".pt" else set(tensors) == set(expected)
        for key, tensor in expected.items():
            assert same_bytes(tensors[key], tensor), key


def test_the_portable_generator_from_the_spec_file_and_local_bytes(server, tmp_path: Path) -> None:
    from initserve import portable

    spec = tmp_path / "model.json"
    spec.write_text(json.dumps({**SPEC, "rng": portable.PHILOX}))
    for local in ((), ("--local",)):
        path = tmp_path / "model.safetensors"
        done = run("--target", server.target, "--spec", str(spec), "-o", str(path), "--quiet", *local)
        assert done.returncode == 0, done.stderr
        tensors = load_file(str(path))
        head = portable.generate((256, 64), "xavier_uniform", seed=11, name="head.weight", dtype=torch.bfloat16)
        assert same_bytes(tensors["head.weight"], head[64:128])
        assert same_bytes(tensors["fixed"], portable.generate((5, 5), "uniform", seed=3))
        with safe_open(str(path), "pt") as opened:
            described = json.loads(opened.metadata()["initserve"])
        assert {entry["generator"] for entry in described.values()} == {portable.PHILOX}
    spec.write_text(json.dumps({**SPEC, "generator": portable.PHILOX}))
    done = run("--target", server.target, "--spec", str(spec), "-o", str(tmp_path / "x.safetensors"))
    assert done.returncode == 2
    assert "unknown keys ['generator'] (known: rng, seed, tensors)" in done.stderr


def test_a_large_fetch_shows_a_progress_bar(server, tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    done = run(
        "--target", server.target, "--shape", "16384", "1024", "--scheme", "normal", "--seed", "1", "-o", str(path)
    )  # fmt: skip  (64 MiB: the bar's threshold)
    assert done.returncode == 0, done.stderr
    assert "fetch: 100%" in done.stderr and "64.0M/64.0M" in done.stderr
    assert same_bytes(load_file(str(path))["tensor"], reference("normal", (16384, 1024), seed=1))


def test_errors_say_what_is_wrong_and_exit_2(server, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tensors": [{"name": "w", "shape": [2], "scheme": "normal", "std": 1}]}))
    done = run("--target", server.target, "--spec", str(bad), "-o", str(tmp_path / "x.safetensors"))
    assert done.returncode == 2
    assert done.stderr == (
        f"initserve: error: {bad}: tensors[0]: unknown keys ['std'] "
        "(known: ['derive', 'dtype', 'name', 'params', 'scheme', 'seed', 'shape', 'slices'])\n"
    )
    done = run("--target", server.target, "--shape", "4", "--scheme", "orthogonal", "-o", str(tmp_path / "x.pt"))
    assert done.returncode == 2
    assert done.stderr.startswith("initserve: error: tensors[0] ('tensor'): Only tensors with 2 or more dimensions")
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "x.safetensors").exists()

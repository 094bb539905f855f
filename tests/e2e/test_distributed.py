"""Sharded materialization: each rank fetches only its shards, and the shards make the single-process model."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import initserve
from initserve import Sharding

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "torchrun_sharded.py"
TORCHRUN_SECONDS = 240


def load_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("torchrun_sharded", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_ranks_shards_make_the_whole_model(client: initserve.Client, world: int) -> None:
    example = load_example()
    reference = client.init_module(example.Model(), seed=7)
    ranks = []
    for rank in range(world):
        with torch.device("meta"):
            model = example.Model()
        client.materialize(model, seed=7, shard=Sharding(rank, world, example.SHARD_DIMS))
        ranks.append(dict(model.named_parameters()))
    for name, whole in reference.named_parameters():
        shard = Sharding(0, world, example.SHARD_DIMS).shard(name)
        if shard is None:
            assert all(torch.equal(r[name].detach(), whole.detach()) for r in ranks), name
            continue
        parts = [r[name].detach() for r in ranks]
        assert [p.shape[shard.dim] for p in parts] == [
            initserve.shard_bounds(whole.shape[shard.dim], rank, world)[1] for rank in range(world)
        ]
        assert torch.equal(torch.cat(parts, shard.dim), whole.detach()), name


def test_sharding_refuses_a_rank_outside_the_world() -> None:
    with pytest.raises(ValueError, match="rank must be in 0..world_size-1, got rank 2 of 2"):
        Sharding(2, 2, {})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_torchrun_example_gathers_the_single_process_model(server) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [
        str(torchrun), "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        str(EXAMPLE), "--target", server.target,
    ]  # fmt: skip
    # PYTHONFAULTHANDLER: a rank that aborts (gloo's teardown did, once in some 30 runs, after every check had
    # passed) prints every thread's Python stack into the failure message
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=TORCHRUN_SECONDS, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: the gathered model equals a single-process init (" in done.stdout
    assert "rank 1/2: fetched" in done.stdout


OWN_INIT_SCRIPT = Path(__file__).resolve().parent / "own_init_sharded.py"


@pytest.mark.parametrize(
    ("layout", "ranks", "how"),
    [("fsdp", 2, "init_module"), ("fsdp", 4, "materialize"), ("tp", 2, "init_module"), ("tp", 4, "materialize"),
     ("2d", 4, "init_module"), ("2d", 4, "portable-local")],
)  # fmt: skip
def test_own_init_code_under_fsdp2_and_tensor_parallelism_equals_a_one_process_init(
    server, layout: str, ranks: int, how: str
) -> None:
    """torchtitan's flow: built on meta, sharded (FSDP2's fully_shard, TP's parallelize_module, or both on a 2-D
    mesh), to_empty, then the model's own init_weights through init_module. Uneven shards at 4 ranks (50 rows,
    30 columns). Each rank must receive exactly its shards' bytes, and the gathered model equal a one-process
    init bit for bit (tests/e2e/own_init_sharded.py checks both and exits 0 only then)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [
        str(torchrun), "--nnodes", "1", "--nproc-per-node", str(ranks),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        str(OWN_INIT_SCRIPT), "--target", server.target, "--layout", layout,
        *(["--materialize"] if how == "materialize" else []),
        *(["--rng", "philox4x32-10/v1", "--make-here"] if how == "portable-local" else []),
    ]  # fmt: skip
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=TORCHRUN_SECONDS, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"OK: {layout} on {ranks} ranks equals a one-process init (10 tensors)" in done.stdout
    # the ranks' lines may interleave on the shared stdout: found by pattern, not by line
    received = re.findall(r"rank (\d+): received (\d+) bytes, its shards' are (\d+)", done.stdout)
    assert sorted(int(rank) for rank, _, _ in received) == list(range(ranks)), done.stdout
    for rank, got, own in received:
        assert int(got) == int(own) < 8800, (rank, got, own)  # 8,800: every drawn byte of the model


def test_the_torchrun_example_without_a_server_says_so_in_one_line() -> None:
    port = free_port()  # nothing listens there
    command = [sys.executable, str(EXAMPLE), "--target", f"127.0.0.1:{port}", "--connect-timeout", "5"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr == (
        f"no initserve server answered at 127.0.0.1:{port} (UNAVAILABLE): start one with `make serve`, "
        "or pass --target host:port\n"
    )


FSDP_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
import initserve

dist.init_process_group("gloo", rank=0, world_size=1)
client = initserve.Client(sys.argv[1], timeout=60)
def build():
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Sequential(nn.Linear(16, 4)))
with torch.device("meta"):
    model = build()
names = {module: name for name, module in model.named_modules()}
def param_init_fn(module):  # FSDP calls it per module with meta parameters: names relative to the whole model
    client.materialize(module, seed=3, prefix=names[module] + "." if names[module] else "")
wrapped = FSDP(model, param_init_fn=param_init_fn, device_id=torch.device("cpu"), use_orig_params=True)
reference = dict(client.init_module(build(), seed=3).named_parameters())
with FSDP.summon_full_params(wrapped):
    got = {name.replace("_fsdp_wrapped_module.", ""): p for name, p in wrapped.named_parameters()}
    assert got.keys() == reference.keys(), (sorted(got), sorted(reference))
    equal = all(torch.equal(got[name].detach(), reference[name].detach()) for name in reference)
print("equal" if equal else "DIFFERENT")
dist.destroy_process_group()
"""


def test_materialize_as_fsdps_param_init_fn(server) -> None:
    env = {
        **os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONFAULTHANDLER": "1",
    }  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", FSDP_SCRIPT, server.target], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "equal"

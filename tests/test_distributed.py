"""Sharded materialization: each rank fetches only its shards, and the shards make the single-process model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import initserve
from initserve import Sharding

ROOT = Path(__file__).resolve().parent.parent
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
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=TORCHRUN_SECONDS, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: the gathered model equals a single-process init (" in done.stdout
    assert "rank 1/2: fetched" in done.stdout

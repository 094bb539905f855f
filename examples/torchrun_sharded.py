"""Tensor-parallel init with initserve: every rank fetches only its own shard of each parameter.

    make serve &                                   # a server on 127.0.0.1:50051 (or give --target)
    torchrun --nproc-per-node 2 examples/torchrun_sharded.py --target 127.0.0.1:50051

It needs a running server: where none answers within ``--connect-timeout`` seconds, every rank says so in one
line and exits with status 2.
Each rank builds the model on the meta device (nothing allocated), then ``materialize`` allocates and fetches
its shard of every matched parameter: column-parallel rows of the projections, embedding columns; norms stay
whole. Fans come from the whole shapes, so the model is the same whatever the number of ranks. To show it,
the shards are gathered on rank 0 (gloo, CPU) and compared, byte for byte, with a single-process init of the
whole model; the exit status says whether they are equal.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

import initserve

SEED = 2026


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)


class Model(nn.Module):
    def __init__(self, vocab: int = 1000, width: int = 64, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, vocab, bias=False)


# Rows of every projection's weight and bias (dim 0), columns of the embedding (dim 1); norms stay whole.
SHARD_DIMS = {"*.up.*": 0, "*.down.weight": 1, "head.weight": 0, "embed.weight": 1}


def gather(local: torch.Tensor, whole_shape: torch.Size, shard: initserve.Shard | None, world: int) -> torch.Tensor:
    """The whole parameter from every rank's shard (shards may differ in size: padded to the largest)."""
    if shard is None:
        return local
    dim = shard.dim
    largest = initserve.shard_bounds(whole_shape[dim], 0, world)[1]
    padded_shape = list(local.shape)
    padded_shape[dim] = largest
    padded = torch.zeros(padded_shape, dtype=local.dtype)
    padded.narrow(dim, 0, local.shape[dim]).copy_(local)
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded)
    lengths = [initserve.shard_bounds(whole_shape[dim], rank, world)[1] for rank in range(world)]
    return torch.cat([piece.narrow(dim, 0, length) for piece, length in zip(pieces, lengths, strict=True)], dim)


def let_gloo_release(tensor: torch.Tensor, timeout: float = 10.0) -> None:
    """Wait until torch's gloo worker threads hold no reference to ``tensor``, the last collective's.

    A worker drops a collective's tensors just after completing it. In a process that exits before then, the
    worker needs the GIL of an interpreter that is shutting down, and the process aborts ("terminate called
    without an active exception"; a core showed gloo's runLoop in ~AsyncBroadcastWork). Seen about once in 30
    runs on 2 busy cores. While this process still holds ``tensor``, the worker's drop needs no GIL.
    """
    deadline = time.monotonic() + timeout
    while tensor._use_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.001)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for the server")
    args = parser.parse_args()
    with initserve.Client(args.target, retry=initserve.RetryPolicy(max_attempts=1)) as probe:
        try:
            probe.describe(timeout=args.connect_timeout)
        except initserve.InitServeError as error:
            print(f"no initserve server answered at {args.target} ({error.code}): start one with `make serve`, "
                  "or pass --target host:port", file=sys.stderr, flush=True)  # fmt: skip
            return 2
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sharding = initserve.Sharding.from_process_group(SHARD_DIMS)
    with torch.device("meta"):
        model = Model()
    whole_shapes = {name: p.shape for name, p in model.named_parameters()}
    with initserve.Client(args.target) as client:
        client.materialize(model, seed=SEED, shard=sharding)
        local_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        print(f"rank {rank}/{world}: fetched {local_bytes} bytes of its shards", flush=True)
        gathered = {
            name: gather(p.detach(), whole_shapes[name], sharding.shard(name), world)
            for name, p in model.named_parameters()
        }
        status = torch.zeros(1)
        if rank == 0:
            reference = client.init_module(Model(), seed=SEED)  # one process, the whole model
            differing = [n for n, p in reference.named_parameters() if not torch.equal(gathered[n], p.detach())]
            if differing:
                print(f"MISMATCH: {', '.join(differing)}", flush=True)
                status += 1
            else:
                total = sum(p.numel() * p.element_size() for p in reference.parameters())
                print(f"OK: the gathered model equals a single-process init ({len(gathered)} parameters, "
                      f"{total} bytes, {world} ranks)", flush=True)  # fmt: skip
        dist.broadcast(status, 0)
        let_gloo_release(status)
    dist.destroy_process_group()
    return int(status.item())


if __name__ == "__main__":
    sys.exit(main())

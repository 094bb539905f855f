"""Run under torchrun (gloo, CPU) by tests/e2e/test_distributed.py: a model's own ``init_weights`` under FSDP2,
tensor parallelism or both, every rank fetching only its shards; gathered, the model equals a one-process init.

    torchrun --nproc-per-node 2 tests/e2e/own_init_sharded.py --target 127.0.0.1:50051 --layout fsdp

``--rng philox4x32-10/v1 --make-here``: the portable generator, each rank making its shards' bytes itself against the
server's checksums. Prints one line per rank ("rank R: received B bytes, its shards' are S") and, on rank 0, "OK ..." or
"MISMATCH ..."; exits 0 only when the model is equal and every rank received exactly its own bytes.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import initserve

SEED = 4242
VOCAB, WIDTH, DEPTH = 50, 10, 2  # uneven shards on 4 ranks: 50 rows, 30 columns


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(WIDTH, 3 * WIDTH)
        self.down = nn.Linear(3 * WIDTH, WIDTH, bias=False)
        self.norm = nn.RMSNorm(WIDTH)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))
        self.out = nn.Linear(WIDTH, VOCAB, bias=False)

    def init_weights(self) -> None:
        """torchtitan's pattern: depth-scaled truncated normals, zero biases, norms reset."""
        nn.init.normal_(self.tok.weight)
        for depth, block in enumerate(self.blocks):
            nn.init.trunc_normal_(block.up.weight, std=0.02)
            nn.init.zeros_(block.up.bias)
            nn.init.trunc_normal_(block.down.weight, std=0.02 / (2 * (depth + 1)) ** 0.5)
            block.norm.reset_parameters()
        final = WIDTH**-0.5
        nn.init.trunc_normal_(self.out.weight, std=final, a=-3 * final, b=3 * final)


DRAWN = ("tok.weight", "out.weight", *(f"blocks.{d}.{p}.weight" for d in range(DEPTH) for p in ("up", "down")))


def shard(model: Model, layout: str, world: int) -> None:
    if layout == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return
    if layout == "tp":
        tp = init_device_mesh("cpu", (world,))
    else:  # "2d": data parallel x tensor parallel
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        tp = mesh["tp"]
    for block in model.blocks:
        parallelize_module(block, tp, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    if layout == "2d":
        for block in model.blocks:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])


def own_bytes(model: nn.Module) -> int:
    """The bytes this rank's draws should bring: its local shard of each drawn DTensor (FSDP's strided shards of a
    TP shard included), all of each plain tensor."""
    total = 0
    for name, parameter in model.named_parameters():
        if name in DRAWN:
            local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
            total += local.numel() * local.element_size()
    return total


def let_gloo_release(tensor: torch.Tensor, timeout: float = 10.0) -> None:
    """Wait until gloo's worker threads drop ``tensor``, the last collective's, before the process exits: a worker
    that drops it during interpreter shutdown aborts the process ("terminate called without an active
    exception"; seen here once in five 4-rank runs, after every check had passed). The same wait as
    examples/torchrun_sharded.py's, which documents it."""
    deadline = time.monotonic() + timeout
    while tensor._use_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.001)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--layout", choices=("fsdp", "tp", "2d"), required=True)
    parser.add_argument("--materialize", action="store_true", help="materialize the meta model, not to_empty + init")
    parser.add_argument("--rng", default="torch", help='the generator: "torch" or "philox4x32-10/v1"')
    parser.add_argument("--make-here", action="store_true", help="portable: each rank makes its shards' bytes itself")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    with torch.device("meta"):
        model = Model()
    shard(model, args.layout, world)
    received = [0]
    with initserve.Client(args.target, rng=args.rng, local=args.make_here) as client:
        if args.materialize or args.make_here:  # bytes counted from the results' sizes (made here: no progress)
            original = client.fetch_many

            def counted(specs, **kwargs):
                results = original(specs, **kwargs)
                received[0] = sum(r.tensor.numel() * r.tensor.element_size() for r in results.values())
                return results

            client.fetch_many = counted
        if args.materialize:
            client.materialize(model, seed=SEED, init_fn=model.init_weights)
        elif args.make_here:
            model.to_empty(device="cpu")
            client.init_module(model, seed=SEED, init_fn=model.init_weights)
        else:
            model.to_empty(device="cpu")
            client.init_module(
                model, seed=SEED, init_fn=model.init_weights, progress=lambda got, total: received.__setitem__(0, total)
            )
        expected_bytes = own_bytes(model)
        print(f"rank {rank}: received {received[0]} bytes, its shards' are {expected_bytes}", flush=True)
        gathered = {
            name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for name, p in model.named_parameters()
        }
        status = torch.tensor([0 if received[0] == expected_bytes else 1])
        if rank == 0:
            reference = Model()
            client.init_module(reference, seed=SEED, init_fn=reference.init_weights)
            differing = [n for n, p in reference.named_parameters() if not torch.equal(gathered[n], p.detach())]
            if differing:
                print(f"MISMATCH: {', '.join(differing)}", flush=True)
                status += 1
            else:
                print(
                    f"OK: {args.layout} on {world} ranks equals a one-process init ({len(gathered)} tensors)",
                    flush=True,
                )
        dist.all_reduce(status)
        let_gloo_release(status)
    dist.destroy_process_group()
    return int(status.item() != 0)


if __name__ == "__main__":
    sys.exit(main())

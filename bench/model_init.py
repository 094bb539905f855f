"""`make bench`'s model row: a GPT-2-small-sized model (about 124M parameters) initialized by its own
``_init_weights``, locally and through the service (uncached: a fresh seed; cached: the seed again).

Local is what a user runs today, ``model.apply(model._init_weights)`` with torch's global RNG, on all of this
process's threads. The served runs are ``client.init_module(model, seed=..., init_fn=model._init_weights)``:
the dry run, one InitMany call for every draw, the real run. One served result is verified bit for bit against
the contract (the same code run locally with per-call generators), and every later served run against that one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import initserve

# GPT-2 small (the 124M model): 12 layers, 768 wide, 12 heads, its vocabulary and context.
GPT2_SMALL = {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
CACHED_VS_LOCAL = 1.5  # the goal: a cached served init within 1.5x of the local init's time


def gpt2_small() -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_SMALL))


def state_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def same_state(model: nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return list(state) == list(expected) and all(
        torch.equal(state[name].view(torch.uint8), expected[name].view(torch.uint8)) for name in expected
    )


def timed(action: Callable[[], Any]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def contract_reference(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The contract's bytes: ``_init_weights`` run locally with each random call given its derived generator."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.own_init_reference import per_call_generators

    with per_call_generators(model, seed):
        model.apply(model._init_weights)
    return snapshot(model)


def measure(target: str, seeds: Any, repeats: int, warmup: int) -> dict[str, Any]:
    """Local, uncached and cached inits of GPT-2 small: their samples (seconds) and the model's size."""
    model = gpt2_small()
    nbytes = state_bytes(model)
    samples: dict[str, list[float]] = {"local": [], "uncached": [], "cached": []}
    for repetition in range(warmup + repeats):
        seconds = timed(lambda: model.apply(model._init_weights))
        if repetition >= warmup:
            samples["local"].append(seconds)
    with initserve.Client(target, timeout=600, memory=initserve.MemoryPolicy.fast()) as client:
        cached_seed = seeds.take()
        expected = contract_reference(model, cached_seed)
        client.init_module(model, seed=cached_seed, init_fn=model._init_weights)  # generates; then cached
        if not same_state(model, expected):
            raise AssertionError(f"model init seed {cached_seed}: WRONG BYTES against the contract's local run")
        for repetition in range(warmup + repeats):
            seed = seeds.take()
            seconds = timed(lambda s=seed: client.init_module(model, seed=s, init_fn=model._init_weights))
            if repetition >= warmup:
                samples["uncached"].append(seconds)
            seconds = timed(lambda: client.init_module(model, seed=cached_seed, init_fn=model._init_weights))
            if not same_state(model, expected):
                raise AssertionError(f"cached model init seed {cached_seed}: WRONG BYTES")
            if repetition >= warmup:
                samples["cached"].append(seconds)
    return {"nbytes": nbytes, "parameters": sum(p.numel() for p in model.parameters()), "samples": samples}

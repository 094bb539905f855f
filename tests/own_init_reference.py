"""The contract of a model's own init code, run locally: each random call given its derived generator.

Independent of the SDK's record-and-replay (tests/client/test_own_init.py compares the two, bench/model_init.py
verifies its served model against it): torch.nn.init's random functions are wrapped where this module knows they
are bound, and a torch function mode hands ``generator=`` to every random tensor method made outside them, each
seeded by the contract: ``derive_seed(base, fqn)`` for a tensor's first random call, ``derive_seed(base,
f"{fqn}#{k}")`` for its k-th.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import initserve
from tests.conftest import reference_sparse

RANDOM_INIT = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
)


class PerCallGenerators(TorchFunctionMode):
    """The contract's local twin: each random call on a parameter or buffer of ``model`` gets its own generator."""

    def __init__(self, model: nn.Module, base: int) -> None:
        super().__init__()
        self.base = base
        self.names = {id(t): name for name, t in [*model.named_parameters(), *model.named_buffers()]}
        self.views = {
            (t.data_ptr(), tuple(t.shape), t.dtype): name
            for name, t in [*model.named_parameters(), *model.named_buffers()]
            if t.numel()
        }
        self.counts: dict[str, int] = {}
        self.inside = 0  # > 0 while a wrapped torch.nn.init function runs (it was given its generator)
        self.originals: dict[Any, Any] = {}  # wrapper -> torch's function
        self.wrappers: dict[Any, Any] = {}  # torch's function -> wrapper

    def name_of(self, tensor: torch.Tensor) -> str:
        name = self.names.get(id(tensor)) or self.views.get((tensor.data_ptr(), tuple(tensor.shape), tensor.dtype))
        assert name is not None, f"a random call on a tensor that is not a parameter: {tuple(tensor.shape)}"
        return name

    def generator(self, tensor: torch.Tensor) -> torch.Generator:
        name = self.name_of(tensor)
        k = self.counts.get(name, 0)
        self.counts[name] = k + 1
        return torch.Generator().manual_seed(initserve.derive_seed(self.base, name if k == 0 else f"{name}#{k}"))

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        # torch.nn.init's uniform_, normal_ and kaiming_uniform_ hand themselves to the mode under the name they
        # are bound to, which is the wrapper while it is installed: that call already has its generator.
        func = self.originals.get(func, func)
        if not self.inside and func in self.wrappers:  # torch's own function, bound where no wrapper was put
            return self.wrappers[func](*args, **kwargs)
        if not self.inside and func in (torch.Tensor.normal_, torch.Tensor.uniform_):
            kwargs["generator"] = self.generator(args[0])
        return func(*args, **kwargs)

    def wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
            kwargs.pop("generator", None)
            generator = self.generator(tensor)
            self.inside += 1
            try:
                if name == "sparse_":  # the service's sparse: its row permutations from the same generator
                    seed = generator.initial_seed()
                    bound = dict(zip(("sparsity", "std"), args, strict=False)) | kwargs
                    with torch.no_grad():
                        return tensor.copy_(reference_sparse(torch.empty_like(tensor), seed=seed, **bound))
                return original(tensor, *args, **kwargs, generator=generator)
            finally:
                self.inside -= 1

        self.originals[wrapped] = original
        self.wrappers[original] = wrapped
        return wrapped


@contextlib.contextmanager
def per_call_generators(model: nn.Module, base: int) -> Iterator[None]:
    """Run init code under the contract's generators (torch.nn.init's functions wrapped where torch binds them)."""
    mode = PerCallGenerators(model, base)
    places: list[tuple[Any, str, Any]] = []
    for module in (torch.nn.init, torch.nn.modules.activation):
        for name in RANDOM_INIT:
            if hasattr(module, name):
                places.append((module, name, getattr(module, name)))
    try:
        for module, name, original in places:
            setattr(module, name, mode.wrap(name, original))
        with mode:
            yield
    finally:
        for module, name, original in places:
            setattr(module, name, original)

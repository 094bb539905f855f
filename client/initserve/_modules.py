"""Whole modules: each parameter's scheme from its layer's own ``reset_parameters`` (or from rules), one
InitMany call per model, the bytes written straight into the parameters; meta-device modules materialized.

Every parameter's seed is ``derive_seed(seed, prefix + qualified_name)``, so a model's values do not depend on
the order of its layers, and adding or renaming one leaves the others alone. The defaults follow torch's
layers (``init_module`` with no rules reproduces their ``reset_parameters`` calls, each with its own seed):

- Linear and Conv*/ConvTranspose*: weight ``kaiming_uniform(a=sqrt(5))``; bias ``uniform(-1/sqrt(fan_in),
  1/sqrt(fan_in))`` with the weight's fan_in (0 when fan_in is 0);
- Bilinear: weight and bias ``uniform(-1/sqrt(in1_features), ...)``;
- Embedding, EmbeddingBag: weight ``normal``, then the ``padding_idx`` row zeroed, as torch does;
- LayerNorm, GroupNorm, RMSNorm, BatchNorm*, InstanceNorm*: weight ``ones``, bias ``zeros``;
- MultiheadAttention: in-projection weights ``xavier_uniform``, in-projection and out_proj biases ``zeros``,
  bias_k and bias_v ``xavier_normal`` (out_proj's weight is its Linear's);
- RNN, LSTM, GRU: every parameter ``uniform(-1/sqrt(hidden_size), 1/sqrt(hidden_size))``;
- PReLU: ``constant(init)``.

A parameter that neither a rule nor a default covers is an error naming it: nothing is left with values that
nobody chose.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from initserve._many import TensorSpec
from initserve._schemes import SCHEMES, ParamValue

if TYPE_CHECKING:
    from initserve._client import Client

DEFAULT_CALL_BYTES = 256 << 20  # parameters not written in place are fetched in calls of about this many bytes


@dataclass(frozen=True)
class Rule:
    """``scheme`` (with ``params``) for every parameter that matches: a ``module`` type (the parameter's own
    module, subclasses included) and/or a ``name`` pattern (``fnmatch`` on the qualified name, e.g. ``"*.bias"``).
    The first rule that matches wins; a rule with neither matches every parameter."""

    scheme: str
    params: Mapping[str, ParamValue] = field(default_factory=dict)
    module: type | tuple[type, ...] | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r}; use one of: {', '.join(SCHEMES)}")

    def matches(self, qualified_name: str, module: nn.Module) -> bool:
        if self.module is not None and not isinstance(module, self.module):
            return False
        return self.name is None or fnmatch.fnmatchcase(qualified_name, self.name)


Choice = tuple[str, dict[str, ParamValue]]


def _bias_bound(weight: torch.Tensor) -> float:
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
    return 1 / math.sqrt(fan_in) if fan_in > 0 else 0


def default_choice(module: nn.Module, name: str) -> Choice | None:
    """The scheme torch's own ``reset_parameters`` gives parameter ``name`` of ``module``; None if unknown."""
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        if name == "weight":
            return "kaiming_uniform", {"a": math.sqrt(5)}
        if name == "bias":
            bound = _bias_bound(module.weight)
            return "uniform", {"a": -bound, "b": bound}
    if isinstance(module, nn.Bilinear) and name in ("weight", "bias"):
        bound = 1 / math.sqrt(module.weight.size(1))
        return "uniform", {"a": -bound, "b": bound}
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and name == "weight":
        return "normal", {}
    norms = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
    if isinstance(module, norms) and name in ("weight", "bias"):
        return ("ones" if name == "weight" else "zeros"), {}
    if isinstance(module, nn.MultiheadAttention):
        if name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            return "xavier_uniform", {}
        if name == "in_proj_bias":
            return "zeros", {}
        if name in ("bias_k", "bias_v"):
            return "xavier_normal", {}
    if isinstance(module, nn.RNNBase):
        bound = 1.0 / math.sqrt(module.hidden_size) if module.hidden_size > 0 else 0
        return "uniform", {"a": -bound, "b": bound}
    if isinstance(module, nn.PReLU) and name == "weight":
        return "constant", {"val": float(module.init)}
    return None


@dataclass
class _Parameter:
    name: str  # qualified, with the prefix
    module: nn.Module
    tensor: nn.Parameter
    choice: Choice


def _zeroed_out_proj_biases(model: nn.Module) -> set[int]:
    """MultiheadAttention zeros its out_proj's bias (a Linear's) when it has in-projection biases."""
    return {
        id(module.out_proj.bias)
        for module in model.modules()
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_bias is not None
    }


def plan(model: nn.Module, rules: Sequence[Rule] = (), prefix: str = "") -> list[_Parameter]:
    """Every parameter of ``model`` (tied ones once) with the scheme it gets; ValueError naming those none
    covers."""
    zeroed = _zeroed_out_proj_biases(model)
    planned, seen, uncovered = [], set(), []
    for module_name, module in model.named_modules():
        for name, tensor in module.named_parameters(recurse=False):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            qualified = prefix + (f"{module_name}.{name}" if module_name else name)
            choice = next(((r.scheme, dict(r.params)) for r in rules if r.matches(qualified, module)), None)
            if choice is None:
                choice = ("zeros", {}) if id(tensor) in zeroed else default_choice(module, name)
            if choice is None:
                uncovered.append(f"{qualified} ({type(module).__name__})")
                continue
            planned.append(_Parameter(qualified, module, tensor, choice))
    if uncovered:
        raise ValueError(f"no rule and no default for: {', '.join(uncovered)}; pass rules=[initserve.Rule(...)]")
    return planned


def _writable_in_place(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.is_contiguous()


def _zero_padding_rows(planned: Sequence[_Parameter]) -> None:
    for parameter in planned:
        module = parameter.module
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and parameter.tensor is module.weight:
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].fill_(0)


def init_module(
    client: Client,
    model: nn.Module,
    *,
    seed: int,
    rules: Sequence[Rule] = (),
    prefix: str = "",
    device: str = "cpu",
    timeout: float | None = None,
    call_bytes: int = DEFAULT_CALL_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> nn.Module:
    """Initialize every parameter of ``model`` in place from the server (see the module's docs); returns it."""
    planned = plan(model, rules, prefix)
    in_place = [p for p in planned if _writable_in_place(p.tensor)]
    elsewhere = [p for p in planned if not _writable_in_place(p.tensor)]

    def spec(parameter: _Parameter, out: torch.Tensor | None) -> TensorSpec:
        scheme, params = parameter.choice
        return TensorSpec(
            parameter.name, tuple(parameter.tensor.shape), scheme, params, dtype=parameter.tensor.dtype, out=out
        )

    with torch.no_grad():
        if in_place:  # one call, straight into the parameters' storage
            specs = [spec(p, p.tensor.detach()) for p in in_place]
            client.fetch_many(specs, seed=seed, device=device, timeout=timeout, progress=progress)
        batch: list[_Parameter] = []
        for position, parameter in enumerate(elsewhere):  # other devices: through the CPU, a bounded batch at once
            batch.append(parameter)
            batch_bytes = sum(p.tensor.numel() * p.tensor.element_size() for p in batch)
            if batch_bytes >= call_bytes or position == len(elsewhere) - 1:
                results = client.fetch_many([spec(p, None) for p in batch], seed=seed, device=device, timeout=timeout)
                for p in batch:
                    p.tensor.copy_(results[p.name].tensor)
                batch = []
    _zero_padding_rows(planned)
    return model


def materialize(
    client: Client,
    model: nn.Module,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    rules: Sequence[Rule] = (),
    prefix: str = "",
    leave_buffers: bool = False,
    timeout: float | None = None,
) -> nn.Module:
    """Allocate a meta-device ``model`` on ``device`` once (``to_empty``) and initialize it in place, as
    :func:`init_module` does; returns it. Usable as FSDP's ``param_init_fn`` (pass ``prefix`` for the wrapped
    module's place in the whole model, so its names, and so its seeds, are the whole model's).

    Buffers: the norms' running statistics are reset as torch resets them; any other buffer on the meta device
    has no value to restore, which is an error unless ``leave_buffers`` (they are then left uninitialized for
    the caller to fill).
    """
    plan(model, rules, prefix)  # refuse an uncovered parameter before allocating anything
    resettable = (nn.modules.batchnorm._NormBase,)
    unknown = [
        prefix + (f"{module_name}.{name}" if module_name else name)
        for module_name, module in model.named_modules()
        for name, buffer in module.named_buffers(recurse=False)
        if buffer is not None and buffer.is_meta and not isinstance(module, resettable)
    ]
    if unknown and not leave_buffers:
        raise ValueError(
            f"materialize: meta buffers {', '.join(unknown)} have no known initializer; fill them yourself "
            "after materialize(..., leave_buffers=True)"
        )
    model.to_empty(device=device)
    for module in model.modules():
        if isinstance(module, resettable):
            module.reset_running_stats()
    return init_module(client, model, seed=seed, rules=rules, prefix=prefix, timeout=timeout)

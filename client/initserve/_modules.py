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

This module plans and writes; it does no I/O and knows no client. :func:`init_module` and :func:`materialize`
return :class:`ModuleWork`: the ``fetch_many`` calls to make and what to do with each answer. A client (sync or
asyncio) makes the calls.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from initserve._pipeline import InitResult
from initserve._requests import TensorSpec
from initserve_protocol.schemes import SCHEMES, ParamValue
from initserve_protocol.slices import Shard, resolve, shard_bounds, sliced_shape

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


def _zero_padding_rows(planned: Sequence[_Parameter], shard: Sharding | None = None) -> None:
    """Embedding's padding row is zeroed after its normal_, as torch does (in this process's shard, if any)."""
    for parameter in planned:
        module = parameter.module
        if not isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or module.padding_idx is None:
            continue
        if module.weight is not parameter.tensor:
            continue
        row = module.padding_idx  # torch keeps it non-negative
        part = shard.shard(parameter.name) if shard is not None else None
        if part is not None and part.dim % 2 == 0:  # rows are split: the padding row is in one shard
            start, length = shard_bounds(module.num_embeddings, part.index, part.count)
            row -= start
            if not 0 <= row < length:
                continue
        with torch.no_grad():
            module.weight[row].fill_(0)


@dataclass
class FetchCall:
    """One ``fetch_many(specs, progress=progress)`` call of a :class:`ModuleWork`; :meth:`done` takes its answer."""

    specs: list[TensorSpec]
    targets: list[torch.Tensor | None] | None  # where the results are copied; None: they were fetched into them
    progress: Callable[[int, int], None] | None = None

    def made_in_place(self) -> FetchCall:
        """This call with its bytes made here (``local=True``): a contiguous GPU target is then made where it is,
        by the portable generator on its device, instead of made on the CPU and copied."""
        if self.targets is None:
            return self
        specs: list[TensorSpec] = []
        targets: list[torch.Tensor | None] = []
        for spec, target in zip(self.specs, self.targets, strict=True):
            assert target is not None
            on_device = target.device.type != "cpu" and target.is_contiguous()
            specs.append(dataclasses.replace(spec, out=target.detach()) if on_device else spec)
            targets.append(None if on_device else target)
        return FetchCall(specs, targets, self.progress)

    def done(self, results: Mapping[str, InitResult]) -> None:
        if self.targets is None:
            return
        with torch.no_grad():
            for spec, target in zip(self.specs, self.targets, strict=True):
                if target is not None:
                    target.copy_(results[spec.name].tensor)


@dataclass
class ModuleWork:
    """What initializing ``model`` takes: each call made with ``seed``, on the server's ``generate_on`` device,
    within ``timeout``, its answer given to :meth:`FetchCall.done`; then :meth:`finish`."""

    model: nn.Module
    calls: list[FetchCall]
    seed: int
    generate_on: str
    timeout: float | None
    finish_steps: list[Callable[[], None]] = field(default_factory=list)

    def finish(self) -> nn.Module:
        for step in self.finish_steps:
            step()
        return self.model


def _calls(
    specs: Sequence[TensorSpec],
    targets: Sequence[torch.Tensor],
    progress: Callable[[int, int], None] | None = None,
    call_bytes: int = DEFAULT_CALL_BYTES,
) -> list[FetchCall]:
    """The calls that fetch each spec into its target: CPU-contiguous targets in one call, straight into their
    storage; the others through the CPU, in calls of about ``call_bytes``, each copied into its target."""
    pairs = list(zip(specs, targets, strict=True))
    in_place = [(spec, target) for spec, target in pairs if _writable_in_place(target)]
    elsewhere = [(spec, target) for spec, target in pairs if not _writable_in_place(target)]
    calls = []
    if in_place:
        direct = [dataclasses.replace(spec, out=target.detach()) for spec, target in in_place]
        calls.append(FetchCall(direct, None, progress))
    batch: list[tuple[TensorSpec, torch.Tensor]] = []
    for position, item in enumerate(elsewhere):
        batch.append(item)
        if sum(t.numel() * t.element_size() for _, t in batch) >= call_bytes or position == len(elsewhere) - 1:
            calls.append(FetchCall([spec for spec, _ in batch], [target for _, target in batch]))
            batch = []
    return calls


def _spec(parameter: _Parameter, shape: tuple[int, ...], slices: Sequence[Shard] = ()) -> TensorSpec:
    scheme, params = parameter.choice
    return TensorSpec(parameter.name, shape, scheme, params, slices=slices, dtype=parameter.tensor.dtype)


def init_module(
    model: nn.Module,
    *,
    seed: int,
    rules: Sequence[Rule] = (),
    prefix: str = "",
    generate_on: str = "cpu",
    timeout: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ModuleWork:
    """The work that initializes every parameter of ``model`` in place (see the module's docs).
    ``generate_on`` is the server's device."""
    planned = plan(model, rules, prefix)
    specs = [_spec(p, tuple(p.tensor.shape)) for p in planned]
    targets = [p.tensor for p in planned]
    calls = _calls(specs, targets, progress)
    return ModuleWork(model, calls, seed, generate_on, timeout, [lambda: _zero_padding_rows(planned)])


@dataclass(frozen=True)
class Sharding:
    """Which shard of each parameter this process holds: parameters whose qualified name matches a pattern of
    ``dims`` (``fnmatch``, first match wins) are split along that dim into ``world_size`` shards as
    ``torch.chunk`` splits (:class:`initserve.Shard`), and this process gets shard ``rank``; the others are whole.
    """

    rank: int
    world_size: int
    dims: Mapping[str, int]

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in 0..world_size-1, got rank {self.rank} of {self.world_size}")

    @classmethod
    def from_process_group(cls, dims: Mapping[str, int], group: object = None) -> Sharding:
        """This process's rank and the world size of ``group`` (the default group when None)."""
        import torch.distributed as dist

        return cls(dist.get_rank(group), dist.get_world_size(group), dims)

    def shard(self, qualified_name: str) -> Shard | None:
        for pattern, dim in self.dims.items():
            if fnmatch.fnmatchcase(qualified_name, pattern):
                return Shard(dim, self.rank, self.world_size)
        return None


def _replace(model: nn.Module, old: torch.Tensor, new: torch.Tensor) -> None:
    """Every reference to parameter or buffer ``old`` in ``model`` (tied ones included) becomes ``new``."""
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, value in table.items():
                if value is old:
                    table[name] = new


def materialize(
    model: nn.Module,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    rules: Sequence[Rule] = (),
    prefix: str = "",
    shard: Sharding | None = None,
    leave_buffers: bool = False,
    generate_on: str = "cpu",
    timeout: float | None = None,
) -> ModuleWork:
    """Allocate each parameter of a meta-device ``model`` once on ``device`` (now), and the work that fills it in
    place, as :func:`init_module`'s does. With ``shard``, each parameter it matches is allocated and fetched
    as this process's shard only (fans still from the whole shape), and stays that shape. Usable as FSDP's
    ``param_init_fn`` (pass ``prefix`` for the wrapped module's place in the whole model, so its names, and so
    its seeds, are the whole model's).

    Buffers: the norms' running statistics are reset as torch resets them; any other buffer on the meta device
    has no value to restore, which is an error unless ``leave_buffers`` (they are then left uninitialized for
    the caller to fill).
    """
    planned = plan(model, rules, prefix)  # refuses an uncovered parameter before allocating anything
    resettable = (nn.modules.batchnorm._NormBase,)
    meta_buffers = [
        (module, prefix + (f"{module_name}.{name}" if module_name else name), buffer)
        for module_name, module in model.named_modules()
        for name, buffer in module.named_buffers(recurse=False)
        if buffer is not None and buffer.is_meta
    ]
    unknown = [name for module, name, _ in meta_buffers if not isinstance(module, resettable)]
    if unknown and not leave_buffers:
        raise ValueError(
            f"materialize: meta buffers {', '.join(unknown)} have no known initializer; fill them yourself "
            "after materialize(..., leave_buffers=True)"
        )
    specs, targets = [], []
    for parameter in planned:
        meta = parameter.tensor
        part = shard.shard(parameter.name) if shard is not None else None
        slices = [part] if part is not None else []
        local = torch.empty(sliced_shape(meta.shape, resolve(meta.shape, slices)), dtype=meta.dtype, device=device)
        parameter.tensor = nn.Parameter(local, requires_grad=meta.requires_grad)
        _replace(model, meta, parameter.tensor)
        specs.append(_spec(parameter, tuple(meta.shape), slices))
        targets.append(local)
    for _, _, buffer in meta_buffers:
        _replace(model, buffer, torch.empty_like(buffer, device=device))
    for module in model.modules():
        if isinstance(module, resettable) and module.track_running_stats:
            module.reset_running_stats()
    calls = _calls(specs, targets)
    return ModuleWork(model, calls, seed, generate_on, timeout, [lambda: _zero_padding_rows(planned, shard)])

"""A model's own init code, run with every random draw on its parameters and buffers served.

The init code (each submodule's ``reset_parameters``, or a function the caller gives) runs twice:

1. **A dry run records the draws.** Each random call on a parameter or buffer becomes a request (its scheme and
   parameters, the tensor's shape and dtype, a name that fixes its seed) and draws nothing. Every in-place
   operation on a parameter or buffer is skipped, so no value changes, and attributes the code sets on modules
   and tensors (flags such as Hugging Face's ``_is_hf_initialized``) are rolled back afterwards.
2. **One InitMany call** fetches every draw.
3. **The real run** executes the code as written, in the order written; each random call copies its served
   bytes into the tensor instead of drawing, and every other operation (``zero_``, ``fill_``, ``mul_``, indexing
   writes, copies) runs locally.

A *random call* is a call of one of torch.nn.init's random functions (:data:`RANDOM_INIT_FUNCTIONS`, served as
that scheme: orthogonal's QR runs once, on the server, and is cached), or of a random in-place tensor method
made outside them (``normal_`` and ``uniform_``, served as the ``normal`` and ``uniform`` schemes). The k-th random
call (from 0, in execution order) on the tensor whose fully qualified name is ``fqn`` has the seed
``derive_seed(base, fqn)`` for k = 0 and ``derive_seed(base, f"{fqn}#{k}")`` for k >= 1: the result equals the
same code run locally with each random call given ``generator=torch.Generator().manual_seed(<that seed>)``
(``sparse_`` as the service's contract defines it, its row permutations from the same generator).

A random call on anything else (a temporary tensor, ``torch.randn``, a view of part of a parameter, a random
method the service does not serve such as ``bernoulli_``) is an error naming the call, unless ``local_draws``:
it then runs locally with ``generator=torch.Generator().manual_seed(derive_seed(base, f"{module}@local#{n}"))``,
``module`` the name of the submodule whose init code made it and ``n`` the count of such calls in it so far.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from initserve._pipeline import InitResult
from initserve._requests import TensorSpec
from initserve_protocol import dtypes
from initserve_protocol.seeds import derive_seed
from initserve_protocol.slices import Range

# torch.nn.init's functions that draw random numbers, each served as the scheme of its name.
RANDOM_INIT_FUNCTIONS = (
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
# Random in-place tensor methods the service serves: (scheme, its parameter names for the method's arguments).
SERVED_METHODS: dict[Any, tuple[str, tuple[str, str], tuple[str, str], tuple[float, float]]] = {
    torch.Tensor.normal_: ("normal", ("mean", "std"), ("mean", "std"), (0.0, 1.0)),
    torch.Tensor.uniform_: ("uniform", ("from", "to"), ("a", "b"), (0.0, 1.0)),
}
UNSERVED_METHODS = frozenset(
    {
        torch.Tensor.bernoulli_,
        torch.Tensor.random_,
        torch.Tensor.exponential_,
        torch.Tensor.cauchy_,
        torch.Tensor.log_normal_,
        torch.Tensor.geometric_,
    }
)
RANDOM_FACTORIES = frozenset(
    {
        torch.rand,
        torch.randn,
        torch.randint,
        torch.randperm,
        torch.normal,
        torch.bernoulli,
        torch.multinomial,
        torch.poisson,
        torch.rand_like,
        torch.randn_like,
        torch.randint_like,
        torch.Tensor.bernoulli,
        torch.Tensor.multinomial,
    }
)
_SETITEM = torch.Tensor.__setitem__
# Calls that read a tensor's layout, not its values: they do not make a parameter "read before its draw".
_LAYOUT_ONLY = frozenset(
    {
        "__get__",
        "dim",
        "ndimension",
        "size",
        "numel",
        "nelement",
        "stride",
        "storage_offset",
        "is_contiguous",
        "element_size",
        "data_ptr",
        "untyped_storage",
        "__len__",
        "is_floating_point",
        "is_complex",
        "detach",
        "requires_grad_",
    }
)


def draw_name(fqn: str, k: int) -> str:
    """The name whose derived seed the k-th random call on ``fqn`` uses."""
    return fqn if k == 0 else f"{fqn}#{k}"


def _is_dtensor(tensor: Any) -> bool:
    return hasattr(tensor, "_local_tensor") and hasattr(tensor, "placements")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank; any other tensor itself."""
    return tensor._local_tensor if _is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def _storage(tensor: torch.Tensor) -> int:
    return _local(tensor).untyped_storage().data_ptr()


def _has_memory(tensor: torch.Tensor) -> bool:
    local = _local(tensor)
    return local.numel() > 0 and not local.is_meta


@dataclass(frozen=True)
class Part:
    """Where a random call's bytes go: the slices of the whole tensor this rank holds (none: all of it), and the
    tensor they are written into."""

    slices: tuple[Range, ...]
    local: torch.Tensor


def part_of(tensor: torch.Tensor, name: str) -> Part:
    """This rank's part of ``tensor``: all of a plain tensor; a DTensor's local shard, as ranges of the whole
    tensor (so the server sends only those bytes). Its placements must be ``Shard``, ``Replicate`` or the
    ``_StridedShard`` FSDP2 makes of a TP-sharded dim, whose shards are ranges too; any other is refused."""
    if not _is_dtensor(tensor):
        return Part((), tensor)
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor import Shard as DShard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import _StridedShard

    placements = tensor.placements  # type: ignore[attr-defined]
    unserved = [placement for placement in placements if type(placement) not in (DShard, Replicate, _StridedShard)]
    if unserved:
        raise NotImplementedError(f"{name}: a DTensor placed {unserved[0]} has no range of the whole tensor to draw")
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, placements)  # type: ignore[attr-defined]
    ranges = tuple(Range(dim, offset[dim], shape[dim]) for dim in range(len(shape)) if shape[dim] != tensor.shape[dim])
    return Part(ranges, tensor._local_tensor)  # type: ignore[attr-defined]


class Targets:
    """The model's parameters and buffers by fully qualified name, found from any tensor that views all of one."""

    def __init__(self, model: nn.Module, prefix: str) -> None:
        self.by_id: dict[int, str] = {}
        self.by_layout: dict[tuple, str] = {}
        self.by_storage: dict[int, str] = {}
        named = [*model.named_parameters(), *model.named_buffers()]
        self.names = [prefix + name for name, _ in named]
        self.tensors = {prefix + name: tensor for name, tensor in named}
        for name, tensor in named:
            fqn = prefix + name
            self.by_id.setdefault(id(tensor), fqn)
            if _has_memory(tensor):
                self.by_layout.setdefault(self._layout(tensor), fqn)
                self.by_storage.setdefault(_storage(tensor), fqn)

    @staticmethod
    def _layout(tensor: torch.Tensor) -> tuple:
        local = _local(tensor)
        return (_storage(local), local.storage_offset(), tuple(tensor.shape), tuple(local.stride()), tensor.dtype)

    def whole(self, tensor: torch.Tensor) -> str | None:
        """The name of the parameter or buffer ``tensor`` is (or views whole, as ``.data`` and ``.detach()`` do)."""
        found = self.by_id.get(id(tensor))
        if found is None and isinstance(tensor, torch.Tensor) and _has_memory(tensor):
            found = self.by_layout.get(self._layout(tensor))
        return found

    def touched(self, tensor: Any) -> str | None:
        """The name of a parameter or buffer whose memory ``tensor`` shares (all or part of it), or None."""
        if not isinstance(tensor, torch.Tensor):
            return None
        found = self.by_id.get(id(tensor))
        if found is None and _has_memory(tensor):
            found = self.by_storage.get(_storage(tensor))
        return found


def _first(args: tuple, kwargs: dict) -> Any:
    """The tensor a call acts on: its first argument, or (a function that handed itself to the mode with keyword
    arguments, as torch.nn.init's do) its ``tensor`` or ``self``."""
    if args:
        return args[0]
    return kwargs.get("tensor", kwargs.get("self"))


def _describe(tensor: Any) -> str:
    if isinstance(tensor, torch.Tensor):
        return f"a {tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')} tensor"
    return type(tensor).__name__


class OwnInit(TorchFunctionMode):
    """The mode under which init code runs: ``record`` (the dry run) or ``replay`` (the real run, with ``served``)."""

    def __init__(self, targets: Targets, base_seed: int, *, local_draws: bool) -> None:
        super().__init__()
        self.targets = targets
        self.base_seed = base_seed
        self.local_draws = local_draws
        self.recording = True
        self.served: Mapping[str, InitResult] = {}
        self.specs: list[TensorSpec] = []
        self.written: set[str] = set()
        self.reads: dict[str, int] = {}  # calls that used each tensor so far (dry run)
        self.draws: dict[str, list[tuple[str, int]]] = {}  # each tensor's draws: (name, its reads before it)
        self.dead: set[str] = set()  # draws overwritten by the next before anything used them: never fetched
        self.direct: set[str] = set()  # fetched straight into the tensor: the real run skips the copy
        self.parts: dict[str, Part] = {}  # each draw's place (the dry run's)
        self.module_name = ""  # the submodule whose init code runs now
        self._counts: dict[str, int] = {}
        self._local_counts: dict[str, int] = {}
        # torch.nn.init's random functions, each with the function that serves it. Some of them (uniform_,
        # normal_, kaiming_uniform_) hand themselves to this mode when called: a reference to the original that
        # patching missed still comes here.
        self.init_functions = {
            getattr(torch.nn.init, name): _patched_init_function(self, name, getattr(torch.nn.init, name))
            for name in RANDOM_INIT_FUNCTIONS
        }

    def start(self, *, recording: bool, served: Mapping[str, InitResult] | None = None) -> None:
        self.recording = recording
        self.served = served or {}
        self._counts = {}
        self._local_counts = {}
        self.written = set()
        if recording:
            self.specs = []
            self.reads = {}
            self.draws = {}
            self.dead = set()
            self.direct = set()
            self.parts = {}

    # --- draws ---------------------------------------------------------------------------------------------------

    def draw(self, tensor: torch.Tensor, scheme: str, params: dict[str, Any], call: str) -> torch.Tensor | None:
        """A served random call on ``tensor``: recorded, or its served bytes copied in. None when ``tensor`` is no
        whole parameter or buffer (the caller then runs it locally, or refuses it)."""
        fqn = self.targets.whole(tensor) if isinstance(tensor, torch.Tensor) else None
        if fqn is None:
            return None
        k = self._counts.get(fqn, 0)
        self._counts[fqn] = k + 1
        self.written.add(fqn)
        name = draw_name(fqn, k)
        if tensor.numel() == 0:
            return tensor
        part = part_of(tensor, name)
        if part.local.numel() == 0:  # an uneven DTensor's empty shard on this rank
            return tensor
        if not part.local.is_contiguous():
            # torch fills a strided tensor in memory order, the served bytes are in logical order: they would differ
            raise NotImplementedError(
                f"init code called {call} on {name!r}, whose layout is not contiguous (strides "
                f"{tuple(part.local.stride())}, e.g. channels_last): torch fills it in memory order, which the "
                "service does not serve yet; initialize the model before changing its memory format"
            )
        if self.recording:
            try:
                dtypes.from_torch(tensor.dtype)  # an unserved dtype is refused now, before anything is fetched
            except (TypeError, ValueError) as error:
                raise type(error)(f"init code called {call} on {name!r}: {error}") from error
            spec = TensorSpec(name, tuple(tensor.shape), scheme, params, slices=part.slices, dtype=tensor.dtype)
            self.specs.append(spec)
            self.parts[name] = part
            self.draws.setdefault(fqn, []).append((name, self.reads.get(fqn, 0)))
            return tensor
        if name in self.dead or name in self.direct:
            return tensor  # overwritten by a later draw before any use; or its bytes were fetched into it
        served = self.served[name].tensor
        with torch.no_grad():
            part.local.copy_(served)
        return tensor

    def run_locally(self, call: str, target: Any, run: Callable[[torch.Generator], Any]) -> Any:
        """A random call the service does not serve: an error naming it, or (``local_draws``) run here, torch
        functions reaching no mode, with a derived generator. In the dry run, one that writes into a parameter or
        buffer is counted and skipped."""
        touched = self.targets.touched(target)
        if not self.local_draws:
            where = f"part of {touched!r}" if touched is not None else _describe(target)
            raise ValueError(
                f"init code called {call} on {where}, which is not a whole parameter or buffer of the model, or is a "
                "random call the service does not serve; pass local_draws=True to run such calls locally with a "
                "derived generator (docs/models.md, 'Own init code')"
            )
        count = self._local_counts.get(self.module_name, 0)
        self._local_counts[self.module_name] = count + 1
        if touched is not None:
            self.written.add(touched)
            if self.recording:
                return target
        seed = derive_seed(self.base_seed, f"{self.module_name}@local#{count}")
        with torch._C.DisableTorchFunction():
            return run(torch.Generator().manual_seed(seed))

    # --- the torch function hook ---------------------------------------------------------------------------------

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        patched = self.init_functions.get(func)
        if patched is not None:
            return patched(*args, **kwargs)
        served = SERVED_METHODS.get(func)
        if served is not None:
            scheme, method_names, param_names, defaults = served
            values = list(defaults)
            for position, value in enumerate(args[1:3]):
                values[position] = value
            for position, method_name in enumerate(method_names):
                if method_name in kwargs:
                    values[position] = kwargs[method_name]
            params = {param_names[0]: float(values[0]), param_names[1]: float(values[1])}
            done = self.draw(args[0], scheme, params, func.__name__)
            if done is not None:
                return done
        if served is not None or func in UNSERVED_METHODS or func in RANDOM_FACTORIES:
            in_place = getattr(func, "__name__", "").endswith("_")
            target = args[0] if in_place and args else None
            call = getattr(func, "__qualname__", str(func))
            arguments = {key: value for key, value in kwargs.items() if key != "generator"}
            return self.run_locally(call, target, lambda generator: func(*args, **arguments, generator=generator))
        if self.recording:  # the real run runs everything as written: only the dry run looks at what a call does
            if getattr(func, "__name__", "") not in _LAYOUT_ONLY:
                self._note_reads(args, kwargs)
            written = self._written_by(func, args, kwargs)
            if written is not None:
                self.written.add(written)
                return None if func is _SETITEM else _first(args, kwargs)
        return func(*args, **kwargs)

    def _note_reads(self, args: tuple, kwargs: dict) -> None:
        """Count the calls that use each parameter or buffer (writes included): a draw nothing used before the next
        draw of the same tensor is dead, and a tensor nothing used before its last draw can take that draw's
        bytes before the real run."""
        for value in (*args, *kwargs.values()):
            for item in value if isinstance(value, (list, tuple)) else (value,):
                name = self.targets.touched(item)
                if name is not None:
                    self.reads[name] = self.reads.get(name, 0) + 1

    def plan_direct(self, made_here: bool = False) -> list[TensorSpec]:
        """The dry run's requests, less the dead draws (overwritten by the next draw of their tensor before any call
        used them); a tensor's last draw, where nothing used the tensor before it, fetched straight into it
        (:attr:`direct`: on the CPU, or on any device when ``made_here``, whose bytes are then made on that
        device); the others into new tensors, copied in by the real run."""
        for draws in self.draws.values():
            for (name, reads), (_, next_reads) in zip(draws, draws[1:], strict=False):
                if reads == next_reads:
                    self.dead.add(name)
            last, reads_before = draws[-1]
            part = self.parts[last]
            if reads_before == 0 and (made_here or part.local.device.type == "cpu"):  # draw() refuses non-contiguous
                self.direct.add(last)
        planned = []
        for spec in self.specs:
            if spec.name in self.dead:
                continue
            if spec.name in self.direct:
                spec = dataclasses.replace(spec, out=self.parts[spec.name].local.detach())
            planned.append(spec)
        return planned

    def _written_by(self, func: Any, args: tuple, kwargs: dict) -> str | None:
        """The parameter or buffer ``func`` writes into, if any: an in-place method, function (``fill_``,
        ``torch.nn.init.zeros_``) or setter on one, an indexing write into one, or an ``out=`` that is one."""
        name = getattr(func, "__name__", "")
        if func is _SETITEM or name == "__set__" or (name.endswith("_") and not name.startswith("__")):
            found = self.targets.touched(_first(args, kwargs))
            if found is not None:
                return found
        return self.targets.touched(kwargs["out"]) if "out" in kwargs else None


def _patched_init_function(mode: OwnInit, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)
    scheme = name.removesuffix("_")

    def patched(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        tensor = arguments.pop("tensor")
        arguments.pop("generator", None)
        params = {key: value for key, value in arguments.items() if value is not None}
        if isinstance(tensor, torch.Tensor) and tensor.numel() == 0 and mode.targets.whole(tensor) is not None:
            mode.draw(tensor, scheme, params, f"torch.nn.init.{name}")  # counted as a call; draws nothing
            with torch._C.DisableTorchFunction():
                return original(tensor, **params)  # torch's own warning, if it gives one, and nothing else
        done = mode.draw(tensor, scheme, params, f"torch.nn.init.{name}")
        if done is not None:
            return done
        return mode.run_locally(
            f"torch.nn.init.{name}", tensor, lambda generator: original(tensor, **params, generator=generator)
        )

    patched.__wrapped__ = original  # type: ignore[attr-defined]
    return patched


# Where torch.nn.init's random functions are bound, per module: (its namespace's size when scanned, the tables and
# keys that held one). A module is scanned again when its namespace changes size; a known place is patched only
# while it still holds torch's function. Scanning every module of a process with transformers imported took
# 0.24 s per run; this makes a run's patching a walk over sys.modules.
_BOUND: dict[int, tuple[int, list[tuple[dict, Any]]]] = {}


def _bound_places(namespace: dict, originals: set[int]) -> list[tuple[dict, Any]]:
    places = [(namespace, key) for key, value in namespace.items() if id(value) in originals]
    for value in list(namespace.values()):
        if type(value) is dict and value is not namespace:
            places += [(value, key) for key, item in list(value.items()) if id(item) in originals]
    return places


@contextlib.contextmanager
def patched_init_functions(mode: OwnInit) -> Iterator[None]:
    """torch.nn.init's random functions replaced by ones that go through ``mode``, wherever they are bound: on
    torch.nn.init, as a module's global (``from torch.nn.init import xavier_uniform_``), or as a value of a
    module-level dict (a table of init functions captured at import). Everything is put back on exit."""
    replacements = {id(original): patched for original, patched in mode.init_functions.items()}
    originals = set(replacements)
    undo: list[tuple[dict, Any, Any]] = []
    try:
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if type(namespace) is not dict:
                continue
            known = _BOUND.get(id(namespace))
            if known is None or known[0] != len(namespace):
                known = (len(namespace), _bound_places(namespace, originals))
                _BOUND[id(namespace)] = known
            for table, key in known[1]:
                value = table.get(key)
                patched = replacements.get(id(value))
                if patched is not None:
                    undo.append((table, key, value))
                    table[key] = patched
        yield
    finally:
        for table, key, value in reversed(undo):
            table[key] = value


@contextlib.contextmanager
def rolled_back_attributes(model: nn.Module) -> Iterator[None]:
    """Attributes the dry run sets on the model's modules, parameters and buffers (not their values) are undone."""
    modules = list(model.modules())
    saved = [(module, dict(module.__dict__), dict(module._parameters), dict(module._buffers)) for module in modules]
    tensors = [tensor for module in modules for tensor in (*module._parameters.values(), *module._buffers.values())]
    saved_tensors = [(tensor, dict(tensor.__dict__)) for tensor in tensors if tensor is not None]
    try:
        yield
    finally:
        for module, attributes, parameters, buffers in saved:
            module.__dict__.clear()
            module.__dict__.update(attributes)
            module._parameters.clear()
            module._parameters.update(parameters)
            module._buffers.clear()
            module._buffers.update(buffers)
        for tensor, attributes in saved_tensors:
            tensor.__dict__.clear()
            tensor.__dict__.update(attributes)


InitCode = Callable[[OwnInit], None]


def reset_parameters_code(model: nn.Module, prefix: str) -> InitCode:
    """Each submodule's own ``reset_parameters`` (or torch's private ``_reset_parameters``, which
    MultiheadAttention and Transformer have instead), children before parents: the order in which constructing
    the model ran them, a parent's ``__init__`` making (and so resetting) its children before resetting itself."""
    order: list[tuple[str, Callable[[], None]]] = []

    def visit(name: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)
        reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
        if callable(reset):
            order.append((name, reset))

    visit("", model)

    def run(mode: OwnInit) -> None:
        for name, reset in order:
            mode.module_name = prefix + name
            reset()

    return run


def function_code(model: nn.Module, init_fn: Callable[..., Any], prefix: str) -> InitCode:
    """``init_fn``: called once when it takes no argument (``model.init_weights``), else applied to every
    submodule, children first, as ``model.apply(init_fn)`` applies it (``model._init_weights``)."""
    required = [
        p
        for p in inspect.signature(init_fn).parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if not required:

        def run_once(mode: OwnInit) -> None:
            mode.module_name = prefix.removesuffix(".")
            init_fn()

        return run_once
    names = {id(module): prefix + name for name, module in model.named_modules(remove_duplicate=False)}

    def apply(mode: OwnInit) -> None:
        def each(module: nn.Module) -> None:
            mode.module_name = names.get(id(module), "")
            init_fn(module)

        model.apply(each)

    return apply


@dataclass
class OwnInitWork:
    """The two runs of a model's own init code around one InitMany call (see the module's docs)."""

    model: nn.Module
    code: InitCode
    mode: OwnInit
    seed: int
    generate_on: str
    timeout: float | None
    progress: Callable[[int, int], None] | None = None
    leave_unwritten: bool = False
    must_write: set[str] = field(default_factory=set)  # buffers allocated empty (materialize): code must fill them
    undo: Callable[[], None] | None = None  # puts back what materialize allocated, when the dry run refuses

    def record(self, made_here: bool = False) -> list[TensorSpec]:
        """The dry run: every draw's request, in call order. Raises, before anything is fetched or written, when
        the code leaves a parameter (or a buffer ``materialize`` allocated) unwritten. ``made_here``: the bytes
        will be made in this process (``local=True``), so a GPU tensor can take them where it is."""
        self.mode.start(recording=True)
        with rolled_back_attributes(self.model), patched_init_functions(self.mode), self.mode:
            self.code(self.mode)
        parameters = {self.mode.targets.by_id.get(id(p)) for p in self.model.parameters()}
        required = parameters | self.must_write
        unwritten = [name for name in self.mode.targets.names if name in required and name not in self.mode.written]
        if unwritten and not self.leave_unwritten:
            if self.undo is not None:
                self.undo()
            raise ValueError(
                f"no init code wrote {', '.join(unwritten)} (their modules have no reset_parameters, or the init "
                "function skipped them): their values would be whatever memory held; pass init_fn= or rules=, or "
                "leave_unwritten=True to fill them yourself"
            )
        return self.mode.plan_direct(made_here)

    def replay(self, served: Mapping[str, InitResult]) -> nn.Module:
        """The real run, each draw's bytes from ``served``."""
        self.mode.start(recording=False, served=served)
        with patched_init_functions(self.mode), self.mode:
            self.code(self.mode)
        return self.model


def allocate(model: nn.Module, device: str | torch.device) -> tuple[set[str], Callable[[], None]]:
    """Every meta parameter and buffer of ``model`` allocated (uninitialized) on ``device``, ties kept; the names
    of the buffers so allocated (no code has filled them yet), and a function that puts the meta tensors back."""
    if any(_is_dtensor(p) for p in model.parameters()):  # sharded (FSDP2, TP): its own to_empty keeps the DTensors
        buffers = {name for name, buffer in model.named_buffers() if buffer.is_meta}
        model.to_empty(device=device)
        return buffers, lambda: None
    replaced: dict[int, torch.Tensor] = {}
    buffers = set()
    undo: list[tuple[dict, str, torch.Tensor]] = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        for table, is_buffer in ((module._parameters, False), (module._buffers, True)):
            for name, value in table.items():
                if value is None or not value.is_meta:
                    continue
                new = replaced.get(id(value))
                if new is None:
                    local = torch.empty_like(value, device=device)
                    new = nn.Parameter(local, requires_grad=value.requires_grad) if not is_buffer else local
                    replaced[id(value)] = new
                    if is_buffer:
                        buffers.add(f"{module_name}.{name}" if module_name else name)
                undo.append((table, name, value))
                table[name] = new

    def put_back() -> None:
        for table, name, value in undo:
            table[name] = value

    return buffers, put_back


def own_init_work(
    model: nn.Module,
    *,
    seed: int,
    init_fn: Callable[..., Any] | None,
    prefix: str,
    generate_on: str,
    timeout: float | None,
    progress: Callable[[int, int], None] | None,
    local_draws: bool,
    leave_unwritten: bool,
    must_write: set[str] | None = None,
    undo: Callable[[], None] | None = None,
) -> OwnInitWork:
    """The work of running ``model``'s own init code (``init_fn``, or each submodule's ``reset_parameters``)."""
    code = reset_parameters_code(model, prefix) if init_fn is None else function_code(model, init_fn, prefix)
    mode = OwnInit(Targets(model, prefix), seed, local_draws=local_draws)
    written = {prefix + name for name in must_write or ()}
    return OwnInitWork(model, code, mode, seed, generate_on, timeout, progress, leave_unwritten, written, undo)

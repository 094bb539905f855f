"""The initializer table: each scheme's torch.nn.init function, called exactly as the contract states.

For every spec the result equals
``torch.nn.init.<scheme>_(torch.empty(shape, dtype=dtype, device=device), **params,
generator=torch.Generator(device).manual_seed(seed))``; the only departure is ``sparse``, whose row
permutations torch draws from the global RNG and the service draws from the request's generator.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Sequence

import torch
from torch.overrides import TorchFunctionMode

from initserve_protocol.schemes import SCHEMES
from initserve_server.spec import InitSpec

# The portable generator's kernel runs on one thread per generation, as torch does: the pool's workers are as many
# as the usable CPUs, so more would oversubscribe them (Numba's thread count is per calling thread).
PORTABLE_THREADS = 1

# One intra-op thread: MKL's blocked QR (orthogonal_) gives different bits with different thread counts, and
# a replica's bytes must not depend on its core count. Every other scheme is thread-count invariant.
TORCH_THREADS = 1


_configured = threading.local()


def configure_torch() -> None:
    """Put the calling thread's torch in the state the contract is defined under.

    Per thread, not per process: OpenMP's and MKL's thread counts are per-thread settings, and a fresh gRPC
    worker thread would run its first QR on every core (different bits) if only the main thread were set.
    """
    torch.set_num_threads(TORCH_THREADS)
    _configured.done = True


Stop = Callable[[], None]  # raises to stop a generation nobody wants any more (Production.check_cancelled)


SPARSE_COLUMNS_PER_CALL = 1024  # columns zeroed per call of the compiled loop; stop() is called between calls


def _zero_columns(
    tensor: torch.Tensor, first: int, last: int, num_zeros: int, generator: torch.Generator
) -> None:  # pragma: no cover - compiled by torch.jit.script, run by TorchScript's interpreter
    rows = tensor.size(0)
    for col_idx in range(first, last):
        row_indices = torch.randperm(rows, generator=generator, device=tensor.device)
        tensor[row_indices[:num_zeros], col_idx] = 0.0


@functools.cache
def _compiled_zero_columns() -> Callable[..., None]:
    """sparse_'s column loop, compiled on first use (about 0.1 s): TorchScript runs it without the GIL, where
    the Python loop, a few short torch calls per column, held the GIL between them and slowed every other call
    the server was serving (measured: a cached 256 MiB fetch at 0.39 of its idle speed beside two sparse
    generations, 0.50-0.55 with this loop)."""
    return torch.jit.script(_zero_columns)


def sparse_(
    tensor: torch.Tensor,
    sparsity: float,
    std: float = 0.01,
    generator: torch.Generator | None = None,
    stop: Stop | None = None,
) -> torch.Tensor:
    """torch.nn.init.sparse_ with the permutations drawn from ``generator`` (torch uses the global RNG).

    Same algorithm and loop order as torch 2.13: fill N(0, std), then for each column zero the rows named by
    the first ``ceil(sparsity * rows)`` entries of a random permutation of the rows. The column loop runs
    compiled (TorchScript, the same torch calls in the same order), SPARSE_COLUMNS_PER_CALL columns at a time;
    ``stop()`` is called before each batch: it raises to abandon a generation nobody wants.
    """
    if tensor.ndimension() != 2:
        raise ValueError("Only tensors with 2 dimensions are supported")
    rows, cols = tensor.shape
    num_zeros = math.ceil(sparsity * rows)
    if generator is None:
        generator = torch.default_generator if tensor.device.type == "cpu" else torch.cuda.default_generators[0]
    zero_columns = _compiled_zero_columns()
    with torch.no_grad():
        tensor.normal_(0, std, generator=generator)
        for first in range(0, cols, SPARSE_COLUMNS_PER_CALL):
            if stop is not None:
                stop()
            zero_columns(tensor, first, min(first + SPARSE_COLUMNS_PER_CALL, cols), num_zeros, generator)
    return tensor


DIRAC_WRITES_PER_CALL = 1 << 20  # diagonal elements set per indexed assignment: 16 MiB of int64 indices


def dirac_(tensor: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """torch.nn.init.dirac_, its diagonal written by indexed assignments instead of one torch call per element.

    torch 2.13 zeroes the tensor and then, in a Python loop, sets ``tensor[g * out_per_group + d, d, centers] = 1``
    for every group ``g`` and ``d < min(out_per_group, in_channels)``: a torch call per element, holding the GIL
    between them (12 µs each: hours for the largest groups). The same elements set here by indexed assignments
    of up to DIRAC_WRITES_PER_CALL elements (about 40 ns each) give the same bytes (tests/e2e/test_exactness.py
    compares them with torch's). Every case where torch raises (dims, groups, a zero-size spatial dim), or writes
    nothing, is torch's own function: its errors and messages are torch's."""
    sizes = tensor.size()
    if tensor.ndimension() not in (3, 4, 5) or tensor.is_meta or groups <= 0 or sizes[0] % groups != 0:
        return torch.nn.init.dirac_(tensor, groups)
    out_per_group = sizes[0] // groups
    per_group = min(out_per_group, sizes[1])
    if per_group == 0:  # torch's loop writes nothing (but may iterate over every group to find out)
        with torch.no_grad():
            return tensor.zero_()
    if 0 in sizes[2:]:  # torch raises IndexError at its first write, at once
        return torch.nn.init.dirac_(tensor, groups)
    centers = tuple(size // 2 for size in sizes[2:])
    groups_per_call = max(1, DIRAC_WRITES_PER_CALL // per_group)  # index tensors of at most ~that many writes
    with torch.no_grad():
        tensor.zero_()
        diagonal = torch.arange(per_group, device=tensor.device)
        for first in range(0, groups, groups_per_call):
            count = min(groups_per_call, groups - first)
            starts = torch.arange(first, first + count, device=tensor.device)[:, None] * out_per_group
            tensor[((starts + diagonal).reshape(-1), diagonal.repeat(count), *centers)] = 1
    return tensor


INITIALIZERS: dict[str, Callable[..., torch.Tensor]] = {name: getattr(torch.nn.init, f"{name}_") for name in SCHEMES}
INITIALIZERS["sparse"] = sparse_
INITIALIZERS["dirac"] = dirac_

# Schemes whose torch function computes its bounds or std from the full shape and then makes one fill of the
# whole tensor, Tensor.normal_ or Tensor.uniform_, as its last step. On the CPU such a fill draws from the
# generator element after element (normal_ transforms pairs of uniforms in blocks of 16 and redraws a short
# tail), so filling consecutive pieces that are multiples of 16 elements, the last at least 16, with the same
# generator writes the same bytes as one call: the tensor can be streamed while the rest is generated.
# tests/server/test_production.py checks every scheme and dtype against one call.
PIECEWISE_SCHEMES = frozenset(
    {"normal", "uniform", "xavier_normal", "xavier_uniform", "kaiming_normal", "kaiming_uniform"}
)
PIECE_MULTIPLE = 16  # elements
PIECE_BYTES = 4 << 20  # a piece as long as 4 of the checksum's blocks: long enough that a call's cost vanishes


class _Stoppable(TorchFunctionMode):
    """Calls ``stop()`` before every torch function the generation calls, so a scheme whose Python loop runs
    many torch calls (trunc_normal's rejection rounds) can be abandoned between them. About
    1.5 µs a call; the result is unchanged (every call is made exactly as it would be)."""

    def __init__(self, stop: Stop) -> None:
        super().__init__()
        self._stop = stop

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        self._stop()
        return func(*args, **(kwargs or {}))


# Schemes whose torch function loops in Python over torch calls: generated under _Stoppable (sparse and dirac are
# ours: sparse checks between batches of columns itself, dirac makes one call; every other scheme is one or a
# few calls, or stops between pieces).
STOPPABLE_SCHEMES = frozenset({"trunc_normal"})

OnPiece = Callable[[torch.Tensor, int], None]  # (the tensor, how many of its leading bytes are final)
Allocate = Callable[[Sequence[int], torch.dtype], torch.Tensor]  # a CPU torch.empty(shape, dtype=dtype)


def piece_bounds(numel: int, piece_elements: int) -> list[tuple[int, int]]:
    """Consecutive ``(start, end)`` element ranges covering ``numel``: whole multiples of 16 elements, and a
    last piece of at least 16 (a short remainder joins the piece before it). Under 16 elements: one piece."""
    if piece_elements <= 0 or piece_elements % PIECE_MULTIPLE:
        raise ValueError(f"piece_elements must be a positive multiple of {PIECE_MULTIPLE}, got {piece_elements}")
    bounds = []
    start = 0
    while start < numel:
        end = min(numel, start + piece_elements)
        if numel - end < PIECE_MULTIPLE:
            end = numel
        bounds.append((start, end))
        start = end
    return bounds


class _FilledInPieces(torch.Tensor):
    """What torch.nn.init fills: its one normal_/uniform_ call runs piece by piece, reporting each prefix."""

    _on_piece: OnPiece
    _piece_elements: int
    _filled: bool

    def normal_(self, *args: object, **kwargs: object) -> torch.Tensor:
        return self._fill(torch.Tensor.normal_, args, kwargs)

    def uniform_(self, *args: object, **kwargs: object) -> torch.Tensor:
        return self._fill(torch.Tensor.uniform_, args, kwargs)

    def _fill(self, method: Callable[..., torch.Tensor], args: tuple, kwargs: dict) -> torch.Tensor:
        if self._filled:  # a torch whose scheme fills twice: its bytes would not be final after the first
            raise RuntimeError("initserve: a piecewise scheme filled its tensor twice; this torch needs a new table")
        self._filled = True
        tensor = self.as_subclass(torch.Tensor)
        flat = tensor.view(-1)
        itemsize = tensor.element_size()
        for start, end in piece_bounds(flat.numel(), self._piece_elements):
            method(flat[start:end], *args, **kwargs)
            self._on_piece(tensor, end * itemsize)
        return self


def generate(
    spec: InitSpec,
    on_piece: OnPiece | None = None,
    *,
    piece_bytes: int = PIECE_BYTES,
    allocate: Allocate | None = None,
    stop: Stop | None = None,
) -> torch.Tensor:
    """The contract tensor for ``spec``, on ``spec.device``; raises whatever torch raises.

    ``on_piece(tensor, final_bytes)``, when given, is called as leading bytes of a CPU tensor become final:
    piece by piece for a scheme of :data:`PIECEWISE_SCHEMES`, otherwise never (the caller takes the result).
    ``allocate`` makes a CPU tensor's memory in place of ``torch.empty`` (whose contents no scheme reads).
    ``stop()``, called at every point where the generation can be abandoned, raises to abandon it.
    """
    if not getattr(_configured, "done", False):
        configure_torch()
    if spec.direct:
        return _generate_portable(spec, on_piece, piece_bytes=piece_bytes, allocate=allocate, stop=stop)
    if allocate is not None and spec.device.type == "cpu":
        tensor = allocate(spec.shape, spec.dtype.torch_dtype)
    else:
        tensor = torch.empty(spec.shape, dtype=spec.dtype.torch_dtype, device=spec.device)
    kwargs = spec.kwargs()
    if spec.scheme.seeded:
        kwargs["generator"] = torch.Generator(spec.device).manual_seed(spec.seed)
    target = tensor
    if on_piece is not None and spec.scheme.name in PIECEWISE_SCHEMES and tensor.device.type == "cpu":
        target = tensor.as_subclass(_FilledInPieces)
        target._on_piece = on_piece
        target._piece_elements = max(
            PIECE_MULTIPLE, piece_bytes // tensor.element_size() // PIECE_MULTIPLE * PIECE_MULTIPLE
        )
        target._filled = False
    if stop is not None and spec.scheme.name == "sparse":
        kwargs["stop"] = stop
    if stop is not None and spec.scheme.name in STOPPABLE_SCHEMES:
        with _Stoppable(stop):
            INITIALIZERS[spec.scheme.name](target, **kwargs)
    else:
        INITIALIZERS[spec.scheme.name](target, **kwargs)
    return tensor


def _generate_portable(
    spec: InitSpec, on_piece: OnPiece | None, *, piece_bytes: int, allocate: Allocate | None, stop: Stop | None
) -> torch.Tensor:
    """The portable generator's bytes for ``spec`` (its slice alone, when sliced): on the CPU by the kernel, piece
    by piece; on a GPU by its Triton kernel or elementwise path where verified (``placement``), whole, then copied
    to the host."""
    import numba  # the kernel's modules load with the first portable request: a server that sees none never pays

    from initserve_protocol.portable import placement
    from initserve_protocol.portable import tensors as portable

    kwargs = spec.kwargs()
    if spec.device.type != "cpu":  # made on the device where a path of its is verified, else copied there
        return placement.generate(
            spec.scheme.name, kwargs, spec.shape, spec.dtype.torch_dtype, spec.seed, spec.slices, spec.device
        )
    portable.check(spec.scheme.name, kwargs, spec.shape, spec.dtype.torch_dtype)  # torch's errors and warnings
    numba.set_num_threads(PORTABLE_THREADS)
    shape, dtype = spec.out_shape, spec.dtype.torch_dtype
    tensor = allocate(shape, dtype) if allocate is not None else torch.empty(shape, dtype=dtype)
    flat = tensor.view(-1)
    piece_elements = max(PIECE_MULTIPLE, piece_bytes // tensor.element_size())
    for start in range(0, flat.numel(), piece_elements):
        if stop is not None:
            stop()
        end = min(flat.numel(), start + piece_elements)
        portable.fill(flat[start:end], spec.scheme.name, kwargs, spec.shape, spec.seed, spec.slices, first=start)
        if on_piece is not None:
            on_piece(tensor, end * tensor.element_size())
    return tensor

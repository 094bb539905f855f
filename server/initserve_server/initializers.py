"""The initializer table: each scheme's torch.nn.init function, called exactly as the contract states.

For every spec the result equals
``torch.nn.init.<scheme>_(torch.empty(shape, dtype=dtype, device=device), **params,
generator=torch.Generator(device).manual_seed(seed))``; the only departure is ``sparse``, whose row
permutations torch draws from the global RNG and the service draws from the request's generator.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch

from initserve._schemes import SCHEMES
from initserve_server.spec import InitSpec

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


def sparse_(
    tensor: torch.Tensor, sparsity: float, std: float = 0.01, generator: torch.Generator | None = None
) -> torch.Tensor:
    """torch.nn.init.sparse_ with the permutations drawn from ``generator`` (torch uses the global RNG).

    Same algorithm and loop order as torch 2.13: fill N(0, std), then for each column zero the rows named by
    the first ``ceil(sparsity * rows)`` entries of a random permutation of the rows.
    """
    if tensor.ndimension() != 2:
        raise ValueError("Only tensors with 2 dimensions are supported")
    rows, cols = tensor.shape
    num_zeros = math.ceil(sparsity * rows)
    device = generator.device if generator is not None else tensor.device
    with torch.no_grad():
        tensor.normal_(0, std, generator=generator)
        for col_idx in range(cols):
            row_indices = torch.randperm(rows, generator=generator, device=device)
            zero_indices = row_indices[:num_zeros]
            tensor[zero_indices, col_idx] = 0
    return tensor


INITIALIZERS: dict[str, Callable[..., torch.Tensor]] = {name: getattr(torch.nn.init, f"{name}_") for name in SCHEMES}
INITIALIZERS["sparse"] = sparse_


def generate(spec: InitSpec) -> torch.Tensor:
    """The contract tensor for ``spec``, on ``spec.device``; raises whatever torch raises."""
    if not getattr(_configured, "done", False):
        configure_torch()
    tensor = torch.empty(spec.shape, dtype=spec.dtype.torch_dtype, device=spec.device)
    kwargs = spec.kwargs()
    if spec.scheme.seeded:
        kwargs["generator"] = torch.Generator(spec.device).manual_seed(spec.seed)
    INITIALIZERS[spec.scheme.name](tensor, **kwargs)
    return tensor

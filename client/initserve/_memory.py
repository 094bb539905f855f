"""How a client gets the host memory its fetches write: plain ``torch.empty`` unless the user asks for more.

By default a fetched tensor is ``torch.empty``'s, nothing is kept after it is freed and nothing process-wide
changes. :class:`MemoryPolicy` turns on, one by one, the Linux tricks that make repeated large fetches faster
where page faults are dear (docs/performance.md measures what each buys, and where):

- ``reuse_bytes``: large tensors (8 MiB or more) are made over mappings that, once the tensor is freed, wait
  for the next tensor (``buffer_pool``); up to this many free bytes are kept per client. Such a tensor's storage
  cannot be resized.
- ``prefault``: a large fresh destination's pages are made resident by another thread ahead of the chunks
  (``prefault``).
- ``malloc_thresholds``: glibc's dynamic malloc thresholds are raised once for the whole process, so the memory
  gRPC receives into is reused rather than faulted in again (``malloc_thresholds``). Process-wide: it changes how every
  later allocation of the process is served.
- ``huge_pages``: a large fresh destination (8 MiB or more) asks the kernel for transparent huge pages before its
  first write (``huge_pages``), so it is faulted in 2 MiB at a time rather than 4 KiB; resident memory then grows
  in 2 MiB steps. Needs the kernel's transparent huge pages set to ``always`` or ``madvise``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from initserve_memory import buffer_pool, huge_pages, malloc_thresholds
from initserve_memory.prefault import prefault_async

FAST_REUSE_BYTES = 1 << 30  # MemoryPolicy.fast(): the pool size v1 clients had by default


@dataclass(frozen=True)
class MemoryPolicy:
    """Which host-memory tricks a :class:`~initserve.Client` uses; all off by default."""

    reuse_bytes: int = 0
    prefault: bool = False
    malloc_thresholds: bool = False
    huge_pages: bool = False

    def __post_init__(self) -> None:
        if self.reuse_bytes < 0:
            raise ValueError(f"reuse_bytes must be at least 0, got {self.reuse_bytes}")

    @classmethod
    def fast(cls, reuse_bytes: int = FAST_REUSE_BYTES) -> MemoryPolicy:
        """The reuse pool, prefaulting and the malloc thresholds on (what v1 clients did by default): for a process
        that fetches large tensors again and again, on Linux with glibc, and can spare ``reuse_bytes`` of memory.
        ``huge_pages`` stays a choice of its own (``dataclasses.replace(MemoryPolicy.fast(), huge_pages=True)``)."""
        return cls(reuse_bytes=reuse_bytes, prefault=True, malloc_thresholds=True)


DEFAULT_MEMORY = MemoryPolicy()


class HostMemory:
    """One client's allocator under its policy: makes the tensors its fetches write."""

    def __init__(self, policy: MemoryPolicy) -> None:
        self.policy = policy
        self._pool = (
            buffer_pool.BufferPool(lambda: policy.reuse_bytes, make_room_on_miss=True) if policy.reuse_bytes else None
        )
        if policy.malloc_thresholds:
            malloc_thresholds.raise_thresholds()

    def allocate(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        if self._pool is not None:
            tensor, resident = self._pool.allocate(shape, dtype)
        else:
            tensor, resident = torch.empty(tuple(shape), dtype=dtype), False
        if self.policy.huge_pages and not resident:
            huge_pages.advise(tensor)  # before any write: the faults to come are then huge pages
        if self.policy.prefault and not resident:
            prefault_async(tensor)  # its fresh pages, faulted in on another core ahead of the chunks
        return tensor

    def free_bytes(self) -> int:
        """Bytes of freed tensors' memory kept for reuse."""
        return self._pool.free_bytes() if self._pool is not None else 0

    def release(self) -> int:
        """Give back the memory kept for reuse now; returns the bytes released."""
        return self._pool.release() if self._pool is not None else 0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

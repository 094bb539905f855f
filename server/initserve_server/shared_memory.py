"""The same-host transport, server side: write a tensor into a shared-memory object the client created.

A client on the server's host creates ``/dev/shm/initserve-<32 hex digits>`` of exactly the tensor's size and
names it in ``InitRequest.shared_memory``; the server (started with ``--shared-memory``) maps it and copies the
tensor's bytes in, then answers with the header and the trailer, whose checksum the client verifies over the
region as it would over a stream. No payload crosses gRPC: one copy, from the server's tensor into the pages
the client then owns.

What the server trusts: nothing but the name's form. It opens the object without following links, requires a
regular file of exactly the tensor's size, and only ever writes the contract bytes of the client's own request
into it. A name it cannot find means the client is on another host (or does not share /dev/shm with this
container): FAILED_PRECONDITION, and the client falls back to gRPC.

Before writing, the server allocates whatever part of the object has no pages yet (``posix_fallocate``): a
write into a mapping of a full tmpfs (Docker's /dev/shm is 64 MiB unless told otherwise) would kill the server
with SIGBUS, where the allocation fails with ENOSPC, answered RESOURCE_EXHAUSTED (the client fetches that
tensor over gRPC). The allocated object is then mapped with ``MAP_POPULATE``: its pages are entered in one
pass instead of one fault per 4 KiB page. A client that reuses a region skips the allocation too.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import stat
import threading
from collections.abc import Callable

import torch

SHARED_MEMORY_DIR = "/dev/shm"
NAME_PATTERN = re.compile(r"initserve-[0-9a-f]{32}")
COPY_PIECE_BYTES = 64 << 20  # copied as the production makes them final, in pieces this long
COPY_THREADS = 2


def advise_huge_pages(region: mmap.mmap) -> None:
    """Ask for huge pages: where the host's shmem THP setting is "advise", the copy then faults in 2 MiB pages
    instead of 4 KiB ones (page faults are most of its cost); elsewhere a no-op."""
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass


class SharedMemoryUnavailable(Exception):
    """FAILED_PRECONDITION: this server does not write shared memory, or the object is not on its host."""


class SharedMemoryNoSpace(Exception):
    """RESOURCE_EXHAUSTED: the shared-memory filesystem has no room for the object's pages."""


class SharedMemoryInvalid(ValueError):
    """INVALID_ARGUMENT: a malformed name, or an object that is not a regular file of the tensor's size."""


def _map_allocated(fd: int, name: str, directory: str, nbytes: int, allocated_bytes: int) -> mmap.mmap:
    """The object mapped for writing, every page of it allocated (or SharedMemoryNoSpace)."""
    flags = mmap.MAP_SHARED | mmap.MAP_POPULATE  # allocated pages entered in one pass: 0.06 s per GiB, where
    # the copy's page faults on them took 0.12 s more (two threads)
    if allocated_bytes < nbytes:
        try:
            os.posix_fallocate(fd, 0, nbytes)  # 0.24 s per GiB here, about what faulting the pages in costs
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
                raise SharedMemoryNoSpace(
                    f"no space in {directory} for shared-memory object {name} ({nbytes} bytes): {error.strerror}"
                ) from None
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            flags = mmap.MAP_SHARED  # no fallocate here: the copy's writes allocate, in two threads
    region = mmap.mmap(fd, nbytes, flags, mmap.PROT_READ | mmap.PROT_WRITE)
    advise_huge_pages(region)
    return region


class SharedRegion:
    """A client's shared-memory object, mapped for writing; close it (or use ``with``) when done."""

    def __init__(self, name: str, nbytes: int, directory: str = SHARED_MEMORY_DIR) -> None:
        if not NAME_PATTERN.fullmatch(name):
            raise SharedMemoryInvalid(
                f"shared_memory name {name[:80]!r} is not of the form initserve-<32 lowercase hex digits>"
            )
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SharedMemoryUnavailable(
                f"no shared-memory object {name} in {directory} on this server's host: the client is on another "
                "host or does not share its /dev/shm; use gRPC"
            ) from None
        except OSError as error:  # a link (ELOOP), no permission: refused, and said why
            raise SharedMemoryInvalid(f"cannot open shared-memory object {name}: {error.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise SharedMemoryInvalid(f"shared-memory object {name} is not a regular file")
            if info.st_size != nbytes:
                raise SharedMemoryInvalid(
                    f"shared-memory object {name} is {info.st_size} bytes; the tensor is {nbytes} bytes"
                )
            self._map = _map_allocated(fd, name, directory, nbytes, info.st_blocks * 512) if nbytes else None
        finally:
            os.close(fd)
        self.name = name
        self.nbytes = nbytes
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8) if self._map is not None else None

    def write(
        self, source: torch.Tensor, start: int, end: int, ready: Callable[[int], None] = lambda end: None
    ) -> None:
        """Copy bytes ``[start, end)`` of the contiguous CPU tensor ``source`` to the same offsets of the region,
        piece by piece, each once ``ready(piece_end)`` returns (the bytes are final)."""
        if self._bytes is None:
            ready(end)
            return
        flat = source.reshape(-1).view(torch.uint8)
        for piece_start in range(start, end, COPY_PIECE_BYTES):
            piece_end = min(piece_start + COPY_PIECE_BYTES, end)
            ready(piece_end)
            self._copy(flat, piece_start, piece_end)
        ready(end)

    def _copy(self, flat: torch.Tensor, start: int, end: int) -> None:
        """Copy in COPY_THREADS threads: most of the time goes to faulting in the region's fresh pages, which
        the kernel zeroes first (measured: 1 GiB in 0.49 s in one thread, 0.31 s in two; 0.16 s once faulted)."""
        assert self._bytes is not None
        bounds = [start + (end - start) * k // COPY_THREADS for k in range(COPY_THREADS + 1)]

        def copy(k: int) -> None:
            self._bytes[bounds[k] : bounds[k + 1]].copy_(flat[bounds[k] : bounds[k + 1]])  # releases the GIL

        workers = [threading.Thread(target=copy, args=(k,)) for k in range(1, COPY_THREADS)]
        for worker in workers:
            worker.start()
        copy(0)
        for worker in workers:
            worker.join()

    def close(self) -> None:
        self._bytes = None
        if self._map is not None:
            self._map.close()
            self._map = None

    def __enter__(self) -> SharedRegion:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

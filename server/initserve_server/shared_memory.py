"""The same-host transport, server side: clients hand it sealed memfds over a Unix socket; it writes tensors there.

A client on the server's host registers a region on the socket at ``--shared-memory-socket`` (the protocol, its
checks and its limits are specified in proto/initserve/v1/initserve.proto, "The same-host transport", and in
docs/shared-memory.md): it passes a memfd of exactly the size it wants, every page allocated, sealed against
shrinking and growing, and gets back a token. ``InitUnary`` with ``shared_memory_region=<token>`` then writes the
tensor's bytes into that region and answers with the header and the trailer, whose checksum the client verifies
over the region as it would over a stream. No payload crosses gRPC: one copy, into pages the client owns.

What the server trusts: nothing it is told. It writes only memory a process handed it over a connection whose
peer UID (``SO_PEERCRED``) it allows; it never opens a name or a path. Each region is a memfd (the file system
the server's own memfds are on) that it maps, then seals with ``F_SEAL_FUTURE_WRITE | F_SEAL_SEAL``: with the
client's ``F_SEAL_SHRINK | F_SEAL_GROW`` the region can then never shrink (no SIGBUS), lose pages (no hole can be
punched: the server's writes never allocate memory, which stays charged to the client), nor be mapped writable
by anyone else. Tokens are 128 random bits, valid until their connection releases them or closes.

One daemon thread serves the socket with ``selectors``; every input a client controls is bounded (packet size,
descriptors per packet, regions and bytes per connection and in all, connections). Writes run in the caller's
thread under a :class:`RegionLease`, and a released region is unmapped only once no write into it is running.
The server maps regions with ctypes rather than ``mmap.mmap``, which would keep a duplicate descriptor open
per region.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import re
import secrets
import selectors
import socket
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from google.protobuf.message import DecodeError

from initserve_memory import c_library
from initserve_protocol.errors import CONNECTION_LIMIT, NO_SUCH_REGION, SHARED_MEMORY_OFF, TOO_MANY_CONNECTIONS
from initserve_protocol.v1 import initserve_pb2 as pb

log = logging.getLogger("initserve.server.shared_memory")

COPY_PIECE_BYTES = 64 << 20  # copied as the production makes them final, in pieces this long
COPY_THREADS = 2
TOKEN_PATTERN = re.compile(r"region-[0-9a-f]{32}")
MAX_REQUEST_BYTES = 4096  # one RegionRequest packet: a RegisterRegion is a dozen bytes, 64 released tokens 2.6 KB
MAX_RELEASES_PER_PACKET = 64
MAX_ERROR_CHARS = 1024  # a RegionReply's error, cut to this
RECEIVED_FDS_ROOM = 8  # descriptors one read can take in (the excess closed); a packet must carry 0 or 1
ACCEPTS_PER_WAKEUP = 16  # connections accepted per readiness event of the listening socket
LISTEN_BACKLOG = 64
SOCKET_MODE_OWNER_ONLY = 0o600  # only the server's UID may connect
SOCKET_MODE_ANY_USER = 0o666  # --shared-memory-uids: every user may connect; SO_PEERCRED decides who stays
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_MAX_CONNECTION_REGIONS = 1024
DEFAULT_MAX_CONNECTION_BYTES = 16 << 30
DEFAULT_MAX_REGIONS = 8192  # VMAs: far below vm.max_map_count (65530), which torch's allocations share
MAPPED_BYTES_PER_CONNECTION_BYTES = 4  # max_mapped_bytes = this x max_connection_bytes: 2 MiB page tables per GiB

F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)  # linux/fcntl.h; Linux 5.1
MADV_POPULATE_WRITE = 23  # linux/mman.h; Linux 5.14: page tables filled in one pass, and EFAULT, never SIGBUS
PROT_READ_WRITE = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_FAILED = ctypes.c_void_p(-1).value
_PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid

_mmap = c_library.function(
    "mmap", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
)
_munmap = c_library.function("munmap", ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
_madvise = c_library.function("madvise", ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
# A memoryview over raw memory: unlike a ctypes array type per length (cached by ctypes for ever), it leaves
# nothing behind for a client to grow by registering many sizes.
_PyBUF_WRITE = 0x200
_memory_view = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)(
    ("PyMemoryView_FromMemory", ctypes.pythonapi)
)


class SharedMemoryUnavailable(Exception):
    """FAILED_PRECONDITION: this server does not write shared memory (off, or asked by name), or holds no such
    region (the client fetches over gRPC); ``refusal`` says which (errors.SHARED_MEMORY_OFF, NO_SUCH_REGION)."""

    def __init__(self, message: str, refusal: str) -> None:
        super().__init__(message)
        self.refusal = refusal


class SharedMemoryInvalid(ValueError):
    """INVALID_ARGUMENT: a malformed region token, or a region whose size is not the tensor's."""


class RegionRefused(Exception):
    """A registration (or a connection) the server refuses; the message is the RegionReply's ``error``, and
    ``refusal`` its ``refusal`` where a client acts on it (errors.CONNECTION_LIMIT)."""

    def __init__(self, message: str, refusal: str = "") -> None:
        super().__init__(message)
        self.refusal = refusal


class ProtocolViolation(Exception):
    """A packet that breaks the registration protocol: answered with this message, then the connection closed."""


@dataclass(frozen=True)
class RegionLimits:
    """What one client may register, and everyone together (each refusal names its limit)."""

    max_region_bytes: int  # one region: the server's max_tensor_bytes
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connection_regions: int = DEFAULT_MAX_CONNECTION_REGIONS
    max_connection_bytes: int = DEFAULT_MAX_CONNECTION_BYTES
    max_regions: int = DEFAULT_MAX_REGIONS
    max_mapped_bytes: int = MAPPED_BYTES_PER_CONNECTION_BYTES * DEFAULT_MAX_CONNECTION_BYTES

    @classmethod
    def for_tensors(cls, max_tensor_bytes: int) -> RegionLimits:
        """The defaults for a server whose largest tensor is ``max_tensor_bytes``."""
        per_connection = max(DEFAULT_MAX_CONNECTION_BYTES, max_tensor_bytes)
        return cls(
            max_region_bytes=max_tensor_bytes,
            max_connection_bytes=per_connection,
            max_mapped_bytes=MAPPED_BYTES_PER_CONNECTION_BYTES * per_connection,
        )


def socket_path(configured: str) -> str:
    """The registration socket's path as served and reported in Describe: absolute; "" when off."""
    return os.path.abspath(configured) if configured else ""


def memfd_device() -> int:
    """The device number of the kernel's memfd file system (where a memfd made now lives): only regions there
    are taken, so never a file of another file system, a hugetlbfs memfd or a /dev/shm object."""
    fd = os.memfd_create("initserve-probe", os.MFD_CLOEXEC)
    try:
        return os.fstat(fd).st_dev
    finally:
        os.close(fd)


class _Mapping:
    """``nbytes`` of a file mapped shared and writable at ``address`` (no descriptor kept), and a uint8 tensor
    over it; :meth:`unmap` once nothing uses the tensor."""

    def __init__(self, fd: int, nbytes: int) -> None:
        if _mmap is None or _munmap is None or _madvise is None:
            raise RegionRefused("this server cannot map shared memory here (no mmap in its C library)")
        address = _mmap(None, nbytes, PROT_READ_WRITE, mmap.MAP_SHARED, fd, 0)
        if address in (None, _MAP_FAILED):
            code = ctypes.get_errno()
            if code in (errno.EACCES, errno.EPERM):
                raise RegionRefused(
                    "the memfd cannot be mapped writable: pass it read-write, sealed with neither F_SEAL_WRITE "
                    "nor F_SEAL_FUTURE_WRITE"
                )
            raise RegionRefused(f"the memfd cannot be mapped: {os.strerror(code)}")
        self.address = address
        self.nbytes = nbytes
        self.bytes: torch.Tensor | None = torch.frombuffer(
            _memory_view(address, nbytes, _PyBUF_WRITE), dtype=torch.uint8
        )

    def advise(self, advice: int) -> int:
        """``madvise`` over the whole mapping: 0, or the errno."""
        assert _madvise is not None
        return 0 if _madvise(self.address, self.nbytes, advice) == 0 else ctypes.get_errno()

    def unmap(self) -> None:
        if self.bytes is not None:
            self.bytes = None
            assert _munmap is not None
            _munmap(self.address, self.nbytes)


def map_region(fd: int, size: int, device: int) -> _Mapping:
    """The client's memfd ``fd`` checked, mapped, sealed for good and found fully allocated (else RegionRefused).

    The order matters: the mapping is made before F_SEAL_FUTURE_WRITE forbids new writable ones, and the
    allocation is checked after that seal (no hole can be punched any more) and after truncating to the same
    size, which drops pages allocated past the end before F_SEAL_GROW (those would count in st_blocks).
    """
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_dev != device:
        raise RegionRefused("the descriptor is not a memfd (memfd_create with MFD_ALLOW_SEALING)")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise RegionRefused("the memfd cannot be sealed: create it with MFD_ALLOW_SEALING") from None
    if seals & fcntl.F_SEAL_SEAL:
        raise RegionRefused(
            "the memfd is sealed with F_SEAL_SEAL: seal only F_SEAL_SHRINK | F_SEAL_GROW, the server adds "
            "F_SEAL_FUTURE_WRITE | F_SEAL_SEAL"
        )
    if seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) != fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW:
        raise RegionRefused("the memfd is not sealed against shrinking and growing (F_SEAL_SHRINK | F_SEAL_GROW)")
    if info.st_size != size:
        raise RegionRefused(f"the memfd is {info.st_size} bytes; the request says {size}")
    mapping = _Mapping(fd, size)
    try:
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL)
            os.ftruncate(fd, size)  # the same size: only pages past the end go
        except OSError as error:
            raise RegionRefused(f"the memfd cannot be sealed by the server: {error.strerror}") from None
        allocated = os.fstat(fd).st_blocks * 512
        if allocated < size:
            raise RegionRefused(
                f"the memfd has {allocated} of its {size} bytes allocated: posix_fallocate all of it before "
                "registering (the server's writes must never allocate memory)"
            )
        if mapping.advise(MADV_POPULATE_WRITE) not in (0, errno.EINVAL):  # EINVAL: before Linux 5.14, faulted later
            raise RegionRefused("the memfd's pages cannot be mapped")
        mapping.advise(mmap.MADV_HUGEPAGE)  # where the host's shmem THP setting is "advise"; elsewhere a no-op
    except BaseException:
        mapping.unmap()
        raise
    return mapping


class _Region:
    """A registered region: its mapping, its owner (a connection id) and the writes running into it."""

    def __init__(self, token: str, owner: int, mapping: _Mapping) -> None:
        self.token = token
        self.owner = owner
        self.mapping = mapping
        self.nbytes = mapping.nbytes
        self.leases = 0
        self.released = False
        self.unmapped = False


class RegionLease:
    """A region held for one write: it stays mapped until :meth:`close` (or the end of ``with``)."""

    def __init__(self, table: RegionTable, region: _Region) -> None:
        self._table = table
        self._region: _Region | None = region
        self.nbytes = region.nbytes

    def _bytes(self) -> torch.Tensor:
        assert self._region is not None and self._region.mapping.bytes is not None, "the lease is closed"
        return self._region.mapping.bytes

    def write(
        self, source: torch.Tensor, start: int, end: int, ready: Callable[[int], None] = lambda end: None
    ) -> None:
        """Copy bytes ``[start, end)`` of ``source`` to the same offsets of the region, piece by piece, each once
        ``ready(piece_end)`` returns (the bytes are final)."""
        for piece_start in range(start, end, COPY_PIECE_BYTES):
            piece_end = min(piece_start + COPY_PIECE_BYTES, end)
            ready(piece_end)
            self.copy(source, piece_start, piece_end)
        ready(end)

    def copy(self, source: torch.Tensor, start: int, end: int) -> None:
        """Copy bytes ``[start, end)`` of the contiguous CPU tensor ``source`` (any dtype, viewed as bytes) to the
        same offsets of the region, in COPY_THREADS threads (the copy releases the GIL; measured into a mapped
        fresh region: 1 GiB in 0.49 s in one thread, 0.31 s in two; 0.16 s once its pages were faulted in)."""
        if not 0 <= start <= end <= self.nbytes:
            raise ValueError(f"bytes [{start}, {end}) are outside the region's {self.nbytes}")
        region = self._bytes()
        flat = source.reshape(-1).view(torch.uint8)
        bounds = [start + (end - start) * k // COPY_THREADS for k in range(COPY_THREADS + 1)]

        def copy(k: int) -> None:
            region[bounds[k] : bounds[k + 1]].copy_(flat[bounds[k] : bounds[k + 1]])

        workers = [threading.Thread(target=copy, args=(k,)) for k in range(1, COPY_THREADS)]
        for worker in workers:
            worker.start()
        copy(0)
        for worker in workers:
            worker.join()

    def close(self) -> None:
        region, self._region = self._region, None
        if region is not None:
            self._table._end_lease(region)

    def __enter__(self) -> RegionLease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass
class _Owner:
    regions: int = 0
    bytes: int = 0


class RegionTable:
    """The registered regions by token, with the limits' accounting; no sockets (see SharedMemoryServer).

    ``register``, ``release`` and ``release_all`` come from one thread (the socket's); ``lease`` from any."""

    def __init__(self, limits: RegionLimits) -> None:
        self.limits = limits
        self._device = memfd_device()
        self._lock = threading.Lock()
        self._regions: dict[str, _Region] = {}
        self._owners: dict[int, _Owner] = {}
        self._mapped_bytes = 0
        self._closed = False

    def register(self, owner: int, fd: int, size: int) -> str:
        """A new token for the memfd ``fd`` of ``size`` bytes (the caller closes ``fd``), or RegionRefused."""
        limits = self.limits
        if not 0 < size <= limits.max_region_bytes:
            raise RegionRefused(f"a region of {size} bytes is outside 1..{limits.max_region_bytes} (max_region_bytes)")
        with self._lock:
            held = self._owners.setdefault(owner, _Owner())
            if held.regions >= limits.max_connection_regions:
                raise RegionRefused(
                    f"this connection holds {held.regions} regions, the most one may (max_connection_regions)",
                    CONNECTION_LIMIT,
                )
            if held.bytes + size > limits.max_connection_bytes:
                raise RegionRefused(
                    f"this connection holds {held.bytes} bytes of regions; {size} more would pass "
                    f"{limits.max_connection_bytes} (max_connection_bytes)",
                    CONNECTION_LIMIT,
                )
            if len(self._regions) >= limits.max_regions:
                raise RegionRefused(f"the server holds {len(self._regions)} regions, the most it may (max_regions)")
            if self._mapped_bytes + size > limits.max_mapped_bytes:
                raise RegionRefused(
                    f"the server holds {self._mapped_bytes} bytes of regions; {size} more would pass "
                    f"{limits.max_mapped_bytes} (max_mapped_bytes)"
                )
        mapping = map_region(fd, size, self._device)  # slow for a large region: outside the lock
        token = f"region-{secrets.token_hex(16)}"
        with self._lock:
            if self._closed:
                mapping.unmap()
                raise RegionRefused("the server is stopping")
            self._regions[token] = _Region(token, owner, mapping)
            held.regions += 1
            held.bytes += size
            self._mapped_bytes += size
        return token

    def release(self, owner: int, token: str) -> None:
        """Drop ``token`` if ``owner`` registered it (anything else is ignored)."""
        with self._lock:
            region = self._regions.get(token)
            if region is None or region.owner != owner:
                return
            self._drop_locked(region)
        self._unmap_if_idle(region)

    def release_all(self, owner: int) -> None:
        """Drop every region ``owner`` registered (its connection closed)."""
        with self._lock:
            dropped = [region for region in self._regions.values() if region.owner == owner]
            for region in dropped:
                self._drop_locked(region)
            self._owners.pop(owner, None)
        for region in dropped:
            self._unmap_if_idle(region)

    def lease(self, token: str, nbytes: int) -> RegionLease:
        """The region ``token`` held for writing a tensor of ``nbytes``; close the lease when done."""
        if not TOKEN_PATTERN.fullmatch(token):
            raise SharedMemoryInvalid(
                f"shared_memory_region {token[:80]!r} is not a region token (region- and 32 lowercase hex digits)"
            )
        with self._lock:
            region = self._regions.get(token)
            if region is None:
                raise SharedMemoryUnavailable(
                    f"no shared-memory region {token} on this server: released, its connection closed, or "
                    "registered with another server; fetch over gRPC",
                    NO_SUCH_REGION,
                )
            if region.nbytes != nbytes:
                raise SharedMemoryInvalid(
                    f"shared-memory region {token} is {region.nbytes} bytes; the tensor is {nbytes} bytes"
                )
            region.leases += 1
        return RegionLease(self, region)

    def counts(self) -> tuple[int, int]:
        """(regions, bytes) registered now."""
        with self._lock:
            return len(self._regions), self._mapped_bytes

    def close(self) -> None:
        """Drop every region; those being written are unmapped when their writes end."""
        with self._lock:
            self._closed = True
            dropped = list(self._regions.values())
            for region in dropped:
                self._drop_locked(region)
            self._owners.clear()
        for region in dropped:
            self._unmap_if_idle(region)

    def _drop_locked(self, region: _Region) -> None:
        del self._regions[region.token]
        region.released = True
        held = self._owners.get(region.owner)
        if held is not None:
            held.regions -= 1
            held.bytes -= region.nbytes
        self._mapped_bytes -= region.nbytes

    def _end_lease(self, region: _Region) -> None:
        with self._lock:
            region.leases -= 1
        self._unmap_if_idle(region)

    def _unmap_if_idle(self, region: _Region) -> None:
        with self._lock:
            if not region.released or region.leases or region.unmapped:
                return
            region.unmapped = True  # decided once, under the lock: a second munmap could hit a new mapping
        region.mapping.unmap()


def open_lease(server: SharedMemoryServer | None, by_name: str, token: str, nbytes: int) -> RegionLease:
    """The lease an InitUnary request asks for: ``by_name`` is the deprecated InitRequest.shared_memory (never
    opened), ``token`` InitRequest.shared_memory_region. FAILED_PRECONDITION and INVALID_ARGUMENT as
    SharedMemoryUnavailable and SharedMemoryInvalid, the former with its refusal for the client to act on."""
    if by_name:
        raise SharedMemoryUnavailable(
            "this server does not write shared memory by name (InitRequest.shared_memory is deprecated): register "
            "a sealed memfd on its socket (ServerInfo.shared_memory_socket) and send InitRequest.shared_memory_region",
            SHARED_MEMORY_OFF,
        )
    if server is None:
        raise SharedMemoryUnavailable(
            "this server does not write shared memory (start it with --shared-memory-socket)", SHARED_MEMORY_OFF
        )
    return server.table.lease(token, nbytes)


def parse_request(data: bytes, fd_count: int, flags: int) -> pb.RegionRequest:
    """One packet (``flags`` as recvmsg returned them, ``fd_count`` descriptors with it) as a RegionRequest, or
    ProtocolViolation."""
    if flags & socket.MSG_TRUNC:
        raise ProtocolViolation(f"a packet over {MAX_REQUEST_BYTES} bytes (a RegionRequest is far smaller)")
    if flags & socket.MSG_CTRUNC:
        raise ProtocolViolation("a packet with too many file descriptors (a registration carries exactly one)")
    try:
        request = pb.RegionRequest.FromString(data)
    except (DecodeError, ValueError):
        raise ProtocolViolation(f"a packet of {len(data)} bytes that is not a RegionRequest") from None
    kind = request.WhichOneof("kind")
    if kind is None:
        raise ProtocolViolation("a RegionRequest that neither registers nor releases a region")
    if kind == "release" and len(request.release.regions) > MAX_RELEASES_PER_PACKET:
        raise ProtocolViolation(f"a release of more than {MAX_RELEASES_PER_PACKET} regions in one packet")
    wanted = 1 if kind == "register" else 0
    if fd_count != wanted:
        raise ProtocolViolation(f"a {kind} request with {fd_count} file descriptors (it takes exactly {wanted})")
    return request


class _Connection:
    def __init__(self, sock: socket.socket, uid: int, pid: int) -> None:
        self.sock = sock
        self.uid = uid
        self.pid = pid


def _peer(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of a connected Unix-socket peer, as the kernel recorded them at connect()."""
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size)
    pid, uid, _ = _PEER_CREDENTIALS.unpack(credentials)
    return pid, uid


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[: len(data) - len(data) % received.itemsize])
            fds.extend(received)
    return fds


def _reply(region: str = "", server_id: str = "", error: str = "", closed: bool = False, refusal: str = "") -> bytes:
    reply = pb.RegionReply(
        region=region, server_id=server_id, error=error[:MAX_ERROR_CHARS], closed=closed, refusal=refusal
    )
    return reply.SerializeToString()


class SharedMemoryServer:
    """The registration socket at ``path`` and the regions registered on it, served by one daemon thread.

    ``allowed_uids``: peer UIDs accepted besides this process's effective UID. :meth:`start` binds and starts
    serving; :meth:`close` stops, removes the socket file (if it is still this server's) and drops every region.
    """

    def __init__(self, path: str, server_id: str, limits: RegionLimits, allowed_uids: tuple[int, ...] = ()) -> None:
        self.path = socket_path(path)
        self.server_id = server_id
        self.table = RegionTable(limits)
        self.allowed_uids = frozenset((os.geteuid(), *allowed_uids))
        self._extra_uids = bool(self.allowed_uids - {os.geteuid()})
        self._listener: socket.socket | None = None
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file this server made
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._connections: dict[int, _Connection] = {}
        self._next_owner = 0
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="initserve-shared-memory", daemon=True)

    def start(self) -> SharedMemoryServer:
        self._listener = self._bind()
        self._selector.register(self._listener, selectors.EVENT_READ, "listener")
        self._selector.register(self._wake_reader, selectors.EVENT_READ, "wake")
        self._thread.start()
        log.info("shared memory: registration socket %s (uids %s)", self.path, sorted(self.allowed_uids))
        return self

    def _bind(self) -> socket.socket:
        """The listening socket at ``path``: a stale socket file is replaced, anything else is left alone."""
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise OSError(errno.EEXIST, f"{self.path} exists and is not a socket; not replaced")
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
                try:
                    probe.connect(self.path)
                except ConnectionRefusedError:
                    os.unlink(self.path)  # a socket nobody listens on: left by a server that died
                else:
                    raise OSError(errno.EADDRINUSE, f"another server listens on {self.path}")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            os.fchmod(listener.fileno(), SOCKET_MODE_OWNER_ONLY)  # bind makes the file with this mode (less umask)
            listener.bind(self.path)
            bound = os.lstat(self.path)
            self._bound = (bound.st_dev, bound.st_ino)
            if self._extra_uids:
                self._chmod_bound(SOCKET_MODE_ANY_USER)
            listener.listen(LISTEN_BACKLOG)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            self._unlink()
            raise
        return listener

    def _chmod_bound(self, mode: int) -> None:
        """chmod the socket file this server bound, never what a path swapped in meanwhile leads to."""
        fd = os.open(self.path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino) != self._bound:
                raise OSError(errno.EEXIST, f"{self.path} was replaced while the server bound it")
            os.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)

    def _unlink(self) -> None:
        with contextlib.suppress(OSError):
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self._bound:
                os.unlink(self.path)

    def close(self) -> None:
        """Stop serving, remove the socket file and drop every region (writes in progress finish first)."""
        if self._closing.is_set():
            return
        self._closing.set()
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")
        if self._thread.is_alive():
            self._thread.join()
        for connection in list(self._connections.values()):
            connection.sock.close()
        self._connections.clear()
        if self._listener is not None:
            self._listener.close()
            self._unlink()
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()
        self.table.close()

    def _serve(self) -> None:
        while not self._closing.is_set():
            for key, _ in self._selector.select():
                try:
                    if key.data == "listener":
                        self._accept()
                    elif key.data == "wake":
                        return
                    else:
                        self._receive(key.data)
                except Exception:  # noqa: BLE001 - one connection's failure never stops the socket
                    log.exception("shared memory: unexpected error on the registration socket")
                    if isinstance(key.data, int):
                        self._disconnect(key.data)

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # EMFILE and the like: the pending peer waits in the backlog
                log.warning("shared memory: cannot accept a connection: %s", error.strerror)
                return
            sock.setblocking(False)
            pid, uid = _peer(sock)
            if uid not in self.allowed_uids:
                log.warning("shared memory: refused a connection from uid %d (pid %d): not an allowed uid", uid, pid)
                self._refuse(
                    sock,
                    f"uid {uid} may not use this server's shared memory (allowed: the server's uid and "
                    "--shared-memory-uids); fetch over gRPC",
                )
                continue
            if len(self._connections) >= self.table.limits.max_connections:
                log.warning("shared memory: refused a connection from uid %d (pid %d): too many connections", uid, pid)
                self._refuse(
                    sock,
                    f"too many connections: the server has {len(self._connections)} "
                    f"(max_connections); try again later or fetch over gRPC",
                    TOO_MANY_CONNECTIONS,
                )
                continue
            self._next_owner += 1
            owner = self._next_owner
            self._connections[owner] = _Connection(sock, uid, pid)
            self._selector.register(sock, selectors.EVENT_READ, owner)

    def _refuse(self, sock: socket.socket, error: str, refusal: str = "") -> None:
        with contextlib.suppress(OSError):
            sock.send(
                _reply(server_id=self.server_id, error=error, closed=True, refusal=refusal),
                socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL,
            )
        sock.close()

    def _receive(self, owner: int) -> None:
        """Read and answer one packet of connection ``owner``."""
        connection = self._connections[owner]
        try:
            data, ancillary, flags, _ = connection.sock.recvmsg(
                MAX_REQUEST_BYTES, socket.CMSG_SPACE(RECEIVED_FDS_ROOM * 4), socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._disconnect(owner)
            return
        fds = _received_fds(ancillary)
        try:
            if not data and not fds and not ancillary:
                self._disconnect(owner)  # EOF (an empty RegionRequest is never sent: `kind` is always set)
                return
            try:
                request = parse_request(data, len(fds), flags)
            except ProtocolViolation as violation:
                log.warning(
                    "shared memory: disconnected uid %d (pid %d): %s", connection.uid, connection.pid, violation
                )
                self._send(owner, _reply(server_id=self.server_id, error=str(violation), closed=True))
                self._disconnect(owner)
                return
            if request.WhichOneof("kind") == "release":
                for token in request.release.regions:
                    self.table.release(owner, token)
                return
            try:
                token = self.table.register(owner, fds[0], request.register.size)
            except RegionRefused as refused:
                self._send(owner, _reply(server_id=self.server_id, error=str(refused), refusal=refused.refusal))
                return
            if not self._send(owner, _reply(region=token, server_id=self.server_id)):
                self.table.release(owner, token)
        finally:
            for fd in fds:
                os.close(fd)

    def _send(self, owner: int, reply: bytes) -> bool:
        """Send ``reply``; a client that does not read its replies (the socket's buffer full) is disconnected."""
        connection = self._connections.get(owner)
        if connection is None:
            return False
        try:
            connection.sock.send(reply, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except OSError:
            self._disconnect(owner)
            return False
        return True

    def _disconnect(self, owner: int) -> None:
        connection = self._connections.pop(owner, None)
        if connection is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(connection.sock)
        connection.sock.close()
        self.table.release_all(owner)

"""The same-host transport, client side: a region registered with the server, filled by it, verified, lent as a tensor.

The client registers each new region (``_regions``: a sealed, allocated memfd of exactly the tensor's size) once,
over one Unix-socket connection per Client (the protocol: proto/initserve/v1/initserve.proto, "The same-host
transport"), and keeps its token while the region lives, pooled or lent out. A fetch asks InitUnary to fill the
region named by its token; the answer carries the header and the trailer. The client checks the header against
its request and the whole-tensor checksum over the region, as for a stream, and returns a tensor over the region's
pages: the payload never crosses gRPC and is copied once, by the server. A region of a failed attempt is never
used again.

Where shared memory cannot be used the fetch goes over gRPC: for good (this client) when the socket cannot be
reached, refuses this UID, belongs to another server than Describe's, or the server writes no shared memory;
for one fetch when the server holds no such region (the call reached another replica), refuses this region (a
limit), or has too many connections (retried after RECONNECT_SECONDS).
"""

from __future__ import annotations

import array
import collections
import errno
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence

from initserve._errors import FailedPrecondition, InitServeError
from initserve._pipeline import Fetch, InitResult
from initserve._regions import RegionPool, SharedRegion
from initserve_memory.fork_hooks import ForkHooks
from initserve_protocol.errors import CONNECTION_LIMIT, NO_SUCH_REGION, SHARED_MEMORY_OFF, TOO_MANY_CONNECTIONS
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_protocol.wire import UnaryPart

VERIFY_THREADS = 2  # the region's block CRCs are computed in this many threads
REGISTRATION_TIMEOUT_SECONDS = 10.0  # one registration's round trip, at most (and never past the fetch's deadline)
RECONNECT_SECONDS = 5.0  # after "too many connections", shared memory is tried again this much later
MAX_REPLY_BYTES = 4096  # a RegionReply: a token, a server id, an error of at most 1024 characters
RELEASES_PER_PACKET = 64  # tokens released in one packet (the server's limit)
# memfd_create or its seals refused outright (an old kernel, a seccomp filter): off for good.
_NO_MEMFDS = (errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.EOPNOTSUPP)
UNAVAILABLE, NOT_NOW = "unavailable", "not now"  # why SharedMemory.fetch gave up: for good, or for this fetch


class ConnectionLost(Exception):
    """The registration connection broke (the server went, or a reply did not come in time)."""


class Connection:
    """One registration connection: register regions and release them, one request at a time.

    Releases come from wherever a region is closed, a garbage-collection finalizer included, maybe in a thread
    that holds this connection's lock: they are queued, and sent without waiting by whoever holds the lock next
    (or now, if it is free). Where the server is behind (its socket buffer full), a thread of their own sends
    the rest, waiting, so that released memory is never held for want of a next call. In a forked child the
    connection is the parent's: it is never used there.
    """

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.pid = os.getpid()
        self.expected_server_id = ""  # Describe's server id, when the path came from Describe
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
        except BaseException:
            self._sock.close()
            raise
        self._lock = threading.Lock()
        self._releases: collections.deque[str] = collections.deque()
        self._sender: threading.Thread | None = None  # sends releases the server could not take at once
        self.closed = False

    def alive(self) -> bool:
        """Open, this process's, and not hung up by the server (which sends nothing unasked but a last reply)."""
        if self.closed or os.getpid() != self.pid:
            return False
        with self._lock:
            try:
                self._sock.settimeout(0.0)
                self._sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                return True
            except OSError:
                pass
        return False  # EOF, or a reply nobody asked for: the server closed this connection

    def register(self, region: SharedRegion, timeout: float) -> pb.RegionReply:
        """The server's reply to registering ``region`` (its descriptor passed), or ConnectionLost."""
        assert region.fd is not None
        request = pb.RegionRequest(register=pb.RegisterRegion(size=region.nbytes)).SerializeToString()
        try:
            with self._lock:
                return self._register_locked(request, region.fd, timeout)
        finally:
            self._flush_if_free()  # releases queued while the lock was held

    def _register_locked(self, request: bytes, fd: int, timeout: float) -> pb.RegionReply:
        if self.closed:
            raise ConnectionLost(f"the shared-memory socket {self.path}: connection closed")
        try:
            self._flush_locked()
            self._sock.settimeout(timeout)
            try:
                self._sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server closed first: its last reply, if it sent one, says why
            try:
                data = self._sock.recv(MAX_REPLY_BYTES)
            except ConnectionResetError:
                # The server closed with our request unread: Linux reports that before the last reply it sent,
                # which is still queued behind the error (else this reads EOF).
                data = self._sock.recv(MAX_REPLY_BYTES)
            if not data:
                raise ConnectionLost(f"the shared-memory socket {self.path} closed")
            reply = pb.RegionReply.FromString(data)
        except (OSError, ValueError) as error:  # a timeout, a reset, a reply that does not parse
            self._close_locked()
            raise ConnectionLost(f"the shared-memory socket {self.path}: {error}") from None
        if reply.closed:
            self._close_locked()
        self._flush_locked()
        return reply

    def release(self, region: SharedRegion) -> None:
        """Tell the server that ``region`` (registered here) is gone; queued, sent when the lock is next free."""
        if region.token and os.getpid() == self.pid:
            self._releases.append(region.token)
            self._flush_if_free()

    def _flush_if_free(self) -> None:
        while self._releases and self._lock.acquire(blocking=False):
            try:
                self._flush_locked()
            finally:
                self._lock.release()

    def _flush_locked(self, wait: bool = False) -> None:
        """Send the queued releases; without ``wait``, what the socket cannot take now goes to a sender thread."""
        if self.closed or os.getpid() != self.pid:
            self._releases.clear()
            return
        while self._releases:
            tokens = [self._releases.popleft() for _ in range(min(len(self._releases), RELEASES_PER_PACKET))]
            message = pb.RegionRequest(release=pb.ReleaseRegion(regions=tokens)).SerializeToString()
            try:
                if wait:
                    self._sock.settimeout(REGISTRATION_TIMEOUT_SECONDS)
                    self._sock.send(message)
                else:
                    self._sock.send(message, socket.MSG_DONTWAIT)
            except BlockingIOError:
                self._releases.extendleft(reversed(tokens))
                if self._sender is None or not self._sender.is_alive():
                    self._sender = threading.Thread(target=self._send_waiting, name="initserve-release", daemon=True)
                    self._sender.start()
                return
            except OSError:  # gone, or stuck past the timeout: closing releases every region of this connection
                self._close_locked()
                return

    def _send_waiting(self) -> None:
        with self._lock:
            self._flush_locked(wait=True)

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        self.closed = True
        self._releases.clear()
        self._sock.close()  # in a forked child, only the child's copy of the descriptor

    def after_fork_in_child(self) -> None:
        """The parent's connection: closed here without a word to the server (the parent's copy stays open, and
        the server sees it close when the parent closes it); the lock, maybe held at the fork, replaced."""
        self._lock = threading.Lock()
        self._close_locked()


class SharedMemory:
    """One Client's same-host transport: its region pool, its registration connection (opened on first use) and
    the fetch. ``path``: the socket, or None for the one Describe names (then the registration reply must come
    from the server Describe did)."""

    def __init__(self, describe: Callable[[float | None], pb.ServerInfo], path: str | None, pool_bytes: int) -> None:
        self.pool = RegionPool(pool_bytes)
        self.path = path
        self.off_reason = ""  # why shared memory is off for good for this client; "" while it is on
        self._describe = describe
        self._connection: Connection | None = None
        self._lock = threading.Lock()
        self._retry_at = 0.0
        _FORK_HOOKS.track(self)

    @property
    def enabled(self) -> bool:
        return not self.off_reason

    def _off(self, reason: str) -> str:
        self.off_reason = reason
        self._drop_connection()
        return UNAVAILABLE

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def _connect(self, timeout: float) -> Connection | str:
        """The live registration connection, made if need be; or why there is none (UNAVAILABLE, NOT_NOW)."""
        with self._lock:
            if self.off_reason:
                return UNAVAILABLE
            if self._connection is not None and self._connection.alive():
                return self._connection
            self._drop_connection()  # the server went (a restart): every token it issued is dead
            if time.monotonic() < self._retry_at:
                return NOT_NOW
            path, expected_server_id = self.path, ""
            if path is None:
                try:
                    info = self._describe(timeout)
                except InitServeError:
                    return NOT_NOW  # the fetch over gRPC reports what is wrong
                if not info.shared_memory_socket:
                    return self._off("the server writes no shared memory (started without --shared-memory-socket)")
                path, expected_server_id = info.shared_memory_socket, info.server_id
            try:
                connection = Connection(path, timeout)
            except OSError as error:
                return self._off(f"cannot connect to the shared-memory socket {path}: {error.strerror or error}")
            connection.expected_server_id = expected_server_id
            self._connection = connection
            return connection

    def _usable(self, region: SharedRegion) -> bool:
        """Registered on the live connection (a pooled region of a closed one is dead: its fd is long closed)."""
        connection = self._connection
        return connection is not None and region.registration is connection and not connection.closed

    def _region(self, nbytes: int, remaining: float | None) -> SharedRegion | str:
        """A registered region of ``nbytes``: a pooled one, or a new one registered now; or why there is none."""
        timeout = REGISTRATION_TIMEOUT_SECONDS if remaining is None else min(remaining, REGISTRATION_TIMEOUT_SECONDS)
        connection = self._connect(timeout)
        if isinstance(connection, str):
            return connection
        try:
            region = self.pool.take(nbytes, self._usable)
        except OSError as error:
            if error.errno in _NO_MEMFDS:
                return self._off(f"this process cannot make sealed memfds: {error.strerror}")
            return NOT_NOW  # no memory for it now (ENOMEM, ENOSPC: a cgroup's limit): this fetch over gRPC
        if region.token:
            return region
        refused = self._register(connection, region, timeout)
        if refused:
            self.pool.discard(region)
            return refused
        return region

    def _register(self, connection: Connection, region: SharedRegion, timeout: float) -> str:
        """Register ``region`` on ``connection``: "" when done, else why not (UNAVAILABLE, NOT_NOW)."""
        try:
            reply = connection.register(region, timeout)
            # This connection's limits: its lent regions' registrations are dropped, then one retry.
            if reply.refusal == CONNECTION_LIMIT and self._forget_lent(connection):
                reply = connection.register(region, timeout)
        except ConnectionLost:
            with self._lock:
                self._drop_connection()
            return NOT_NOW
        if reply.closed:  # a refused UID, too many connections, a protocol error
            with self._lock:
                self._drop_connection()
            if reply.refusal == TOO_MANY_CONNECTIONS:
                self._retry_at = time.monotonic() + RECONNECT_SECONDS
                return NOT_NOW
            return self._off(f"the shared-memory socket {connection.path} refused this client: {reply.error}")
        if reply.error:
            return NOT_NOW  # this region refused (a limit): this fetch over gRPC
        if connection.expected_server_id and reply.server_id != connection.expected_server_id:
            return self._off(
                f"the shared-memory socket {connection.path} belongs to server {reply.server_id!r}, not to "
                f"{connection.expected_server_id!r} (Describe's); give Client(shared_memory=PATH) to choose"
            )
        region.token = reply.region
        region.registration = connection
        region.on_close = connection.release
        region.close_fd()
        return ""

    def _forget_lent(self, connection: Connection) -> bool:
        """Release the registrations of regions lent out as tensors (the server needs them only once they come
        back, and then they are not pooled again): room for new ones. Whether there were any."""
        forgotten = False
        for region in self.pool.lent():
            if region.registration is connection and region.token:
                region.poolable = False
                on_close, region.on_close = region.on_close, None
                if on_close is not None:
                    on_close(region)
                forgotten = True
        return forgotten

    def fetch(
        self,
        call: Callable[[pb.InitRequest, str, float | None], Sequence[UnaryPart]],
        fetch: Fetch,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> InitResult | str:
        """``fetch``'s tensor through shared memory, retried as a stream would be, ``call(request, token, remaining
        seconds)`` making the InitUnary call; or why not (:data:`UNAVAILABLE`: for good, :data:`NOT_NOW`: for this
        fetch): the caller then uses gRPC."""
        prepared = fetch.prepared[0]
        while True:
            attempt = fetch.next_attempt()
            region = self._region(prepared.total_bytes, attempt.timeout)
            if isinstance(region, str):
                return region
            try:
                assert isinstance(attempt.request, pb.InitRequest)
                parts = call(attempt.request, region.token, attempt.timeout)
                fetch.filled(parts, memoryview(region.map), threads=VERIFY_THREADS)
            except BaseException as error:
                if isinstance(error, FailedPrecondition) and error.refusal == NO_SUCH_REGION:
                    # Nothing was written. Another replica answered (the region stays good), or the server lost
                    # this connection: the next fetch finds out.
                    self.pool.give(region)
                    return NOT_NOW
                self.pool.discard(region)  # the server may still be writing into it
                if isinstance(error, FailedPrecondition) and error.refusal == SHARED_MEMORY_OFF:
                    return self._off(str(error))
                if not isinstance(error, InitServeError):
                    raise
                pause = fetch.failed(error)
                assert pause is not None  # a region's answer is verified whole: no failure comes after it
                sleep(pause)
                continue
            tensor = self.pool.lend(region, prepared.dtype, prepared.out_shape)
            return fetch.result(0, "shared_memory", tensor)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # a lock another thread held at the fork would never be released
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.after_fork_in_child()  # the child registers its own regions on a connection of its own

    def release_memory(self) -> int:
        """Close the free regions now; returns their bytes."""
        return self.pool.release()

    def close(self) -> None:
        """Close the pool and the connection (the server then releases every region of this client)."""
        self.pool.close()
        with self._lock:
            self._drop_connection()


# Every live transport, told in a forked child (the hook registered with the first transport, never on import).
_FORK_HOOKS = ForkHooks(before=False)

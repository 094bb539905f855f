"""The same-host transport: clients register sealed memfds on a Unix socket; the server writes tensors into them.

Every hostile case of issue 17 item 5 is here, against real servers: a region that could shrink (SIGBUS), a
region another client registered, and names or links planted for the server to follow.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import fcntl
import mmap
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

import initserve
from initserve import _regions
from initserve._errors import IntegrityError
from initserve._pipeline import Fetch
from initserve._requests import prepare
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_server import shared_memory
from tests.conftest import ServerProcess, reference, run_python, same_bytes, start_server

SERVICE = "initserve.v1.InitService"
CALL_TIMEOUT_SECONDS = 60.0
SETTLE_SECONDS = 10.0
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
ALL_SEALS = SEALS | shared_memory.F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
NOBODY = 65534
MIB = 1 << 20

_fallocate = ctypes.CDLL(None, use_errno=True).fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)


def refusal_of(error: grpc.RpcError) -> str | None:
    """The server's machine-readable reason (trailing metadata initserve-refusal), as a client acts on it."""
    return dict(error.trailing_metadata() or ()).get("initserve-refusal")


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2): 0, or the errno."""
    return 0 if _fallocate(fd, mode, offset, length) == 0 else ctypes.get_errno()


def socket_dir() -> str:
    """A directory every user may enter (the socket's own mode decides who may connect)."""
    directory = tempfile.mkdtemp(prefix="initserve-shm-")
    os.chmod(directory, 0o755)
    return directory


@pytest.fixture(scope="module")
def shm_server() -> Iterator[ServerProcess]:
    directory = socket_dir()
    running = start_server("--shared-memory-socket", os.path.join(directory, "shm.sock"))
    yield running
    running.stop()
    shutil.rmtree(directory, ignore_errors=True)


def path_of(server: ServerProcess) -> str:
    with server.client() as client:
        return client.describe().shared_memory_socket


def memfd(size: int, *, allocate: bool = True, seals: int = SEALS, sealing: bool = True) -> int:
    fd = os.memfd_create("test-region", (os.MFD_ALLOW_SEALING if sealing else 0) | os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if allocate and size:
        os.posix_fallocate(fd, 0, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(CALL_TIMEOUT_SECONDS)
    sock.connect(path)
    return sock


def send(sock: socket.socket, data: bytes, fds: tuple[int, ...] = ()) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary)


def reply(sock: socket.socket) -> pb.RegionReply | None:
    """The next reply, or None at EOF."""
    data = sock.recv(4096)
    return pb.RegionReply.FromString(data) if data else None


def register(sock: socket.socket, fd: int, size: int) -> pb.RegionReply:
    send(sock, pb.RegionRequest(register=pb.RegisterRegion(size=size)).SerializeToString(), (fd,))
    answer = reply(sock)
    assert answer is not None
    return answer


def release(sock: socket.socket, *tokens: str) -> None:
    send(sock, pb.RegionRequest(release=pb.ReleaseRegion(regions=tokens)).SerializeToString())


def unary(target: str, request: pb.InitRequest) -> pb.InitUnaryResponse:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            f"/{SERVICE}/InitUnary",
            request_serializer=pb.InitRequest.SerializeToString,
            response_deserializer=pb.InitUnaryResponse.FromString,
        )
        return call(request, timeout=CALL_TIMEOUT_SECONDS)


def unary_error(target: str, request: pb.InitRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        unary(target, request)
    return raised.value


def open_fds(server: ServerProcess) -> list[str]:
    """What the server's descriptors lead to, sorted."""
    found = []
    for fd in os.listdir(f"/proc/{server.process.pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            found.append(os.readlink(f"/proc/{server.process.pid}/fd/{fd}"))
    return sorted(found)


def no_more_fds(server: ServerProcess, before: list[str]) -> bool:
    """No more descriptors than ``before``, and no memfd (a region's) among the new ones."""
    now = open_fds(server)
    return len(now) <= len(before) and sum("memfd:" in target for target in now) <= sum(
        "memfd:" in target for target in before
    )


def settle(condition, what: str) -> None:
    deadline = time.monotonic() + SETTLE_SECONDS
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


# -- the client: exact bytes, reuse, fallbacks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheme, shape, dtype, params",
    [
        ("normal", (2048, 1024), torch.float32, {"std": 0.02}),  # 8 MiB: generated in pieces, copied as they land
        ("kaiming_uniform", (300, 70), torch.bfloat16, {"a": 5**0.5}),
        ("orthogonal", (96, 64), torch.float64, {}),
        ("trunc_normal", (3, 5), torch.float16, {"a": -1.0, "b": 1.0}),
        ("eye", (5, 7), torch.float32, {}),
    ],
)
def test_a_shared_memory_fetch_is_the_contract_tensor(shm_server, scheme, shape, dtype, params) -> None:
    with shm_server.client(shared_memory=True) as client:
        for _ in range(2):  # generated, then from the cache
            result = client.fetch(shape, scheme, seed=17, dtype=dtype, **params)
            assert result.transport == "shared_memory"
            assert same_bytes(result.tensor, reference(scheme, shape, dtype=dtype, seed=17, **params))


def test_shared_memory_into_out_unseeded_and_by_explicit_path(shm_server) -> None:
    path = path_of(shm_server)
    with shm_server.client(shared_memory=path) as client:
        info = client.describe()
        assert info.shared_memory_socket == path and os.path.isabs(path) and info.shared_memory_dir == ""
        out = torch.empty(64, 32)
        result = client.fetch((64, 32), "xavier_normal", seed=3, out=out)
        assert result.tensor is out and same_bytes(out, reference("xavier_normal", (64, 32), seed=3))
        assert result.transport == "shared_memory"
        drawn = client.fetch((40, 40), "uniform")  # the server draws the seed and reports it
        assert drawn.transport == "shared_memory"
        assert same_bytes(drawn.tensor, reference("uniform", (40, 40), seed=drawn.seed))
        zero = client.fetch((0, 4), "normal", seed=1)  # nothing to share: an ordinary unary call
        assert zero.transport == "unary" and zero.tensor.shape == (0, 4)


def test_a_server_without_shared_memory_is_used_over_grpc(server) -> None:
    with server.client(shared_memory=True) as client:
        assert client.describe().shared_memory_socket == ""
        result = client.fetch((1024, 512), "normal", seed=5)  # 2 MiB: streamed
        assert result.transport == "stream"
        assert same_bytes(result.tensor, reference("normal", (1024, 512), seed=5))
        assert not client.shared_memory and "without --shared-memory-socket" in client._shared.off_reason
        assert client.fetch((8, 8), "normal", seed=5).transport == "unary"


def test_a_socket_that_is_not_there_or_another_server_s_turns_shared_memory_off(shm_server, server) -> None:
    with server.client(shared_memory="/nonexistent/initserve.sock") as client:
        result = client.fetch((64, 64), "normal", seed=2)
        assert result.transport == "unary" and same_bytes(result.tensor, reference("normal", (64, 64), seed=2))
        assert "cannot connect to the shared-memory socket /nonexistent/initserve.sock" in client._shared.off_reason
    with server.client(shared_memory=True) as client:  # Describe's server id must be the socket's
        client._shared._describe = lambda timeout: pb.ServerInfo(
            shared_memory_socket=path_of(shm_server), server_id="elsewhere:1"
        )
        assert client.fetch((64, 64), "normal", seed=2).transport == "unary"
        assert "not to 'elsewhere:1' (Describe's)" in client._shared.off_reason
    with server.client(shared_memory=path_of(shm_server)) as client:  # the gRPC server writes no shared memory
        assert client.fetch((64, 64), "normal", seed=2).transport == "unary"
        assert client._shared.off_reason.startswith("this server does not write shared memory")
    other = start_server("--shared-memory-socket", os.path.join(os.path.dirname(path_of(shm_server)), "other.sock"))
    try:  # another replica with shared memory: it holds no region by this client's token
        with other.client(shared_memory=path_of(shm_server)) as client:
            result = client.fetch((64, 64), "normal", seed=2)
            assert result.transport == "unary" and client.shared_memory  # this fetch over gRPC, not the next ones
            assert same_bytes(result.tensor, reference("normal", (64, 64), seed=2))
            assert client._shared.pool.free_bytes() == 64 * 64 * 4  # the region, never written, was kept
    finally:
        other.stop()


def test_a_region_that_differs_from_the_trailer_raises(shm_server) -> None:
    """The checksum is computed over the region: a byte changed after the server wrote it is caught."""
    shape = (16, 16)
    with shm_server.client(shared_memory=True) as client:
        shared = client._shared
        region = shared._region(16 * 16 * 4, CALL_TIMEOUT_SECONDS)
        assert isinstance(region, _regions.SharedRegion) and shared_memory.TOKEN_PATTERN.fullmatch(region.token)
        request = pb.InitRequest(scheme="normal", shape=shape, seed=9)
        messages = client._transport.init_shared(request, region.token, CALL_TIMEOUT_SECONDS)

        def filled(parts) -> Fetch:
            prepared = prepare(shape, "normal", seed=9)
            fetch = Fetch([prepared], [prepared.assembler()], initserve.RetryPolicy(), None, many=False)
            fetch.next_attempt()
            fetch.filled(parts, memoryview(region.map))
            return fetch

        assert filled(messages).done
        assert same_bytes(
            torch.frombuffer(region.map, dtype=torch.float32).view(shape), reference("normal", shape, seed=9)
        )
        region.map[100] ^= 0x01
        with pytest.raises(IntegrityError, match="checksum mismatch: the shared-memory region differs") as raised:
            filled(messages)
        assert raised.value.recovery == "restart"
        with pytest.raises(IntegrityError, match="exactly a header and a trailer"):
            filled(messages[:1])


def test_freed_regions_are_reused_and_a_failed_attempt_s_region_is_not(shm_server, monkeypatch) -> None:
    created: list[_regions.SharedRegion] = []

    class Counted(_regions.SharedRegion):
        def __init__(self, nbytes: int) -> None:
            super().__init__(nbytes)
            created.append(self)

    monkeypatch.setattr(_regions, "SharedRegion", Counted)
    shape = (256, 512)  # 512 KiB
    with shm_server.client(shared_memory=True, shared_memory_pool_bytes=4 * MIB) as client:
        first = client.fetch(shape, "normal", seed=1).tensor
        second = client.fetch(shape, "normal", seed=2).tensor  # the first is alive: its region is not reused
        assert len(created) == 2 and created[0].token != created[1].token
        assert same_bytes(first, reference("normal", shape, seed=1))
        assert same_bytes(second, reference("normal", shape, seed=2))
        del first, second
        assert client._shared.pool.free_bytes() == 2 * 512 * 1024
        for seed in (3, 4, 1):  # each into a region that held other bytes
            result = client.fetch(shape, "normal", seed=seed)
            assert result.transport == "shared_memory"
            assert same_bytes(result.tensor, reference("normal", shape, seed=seed))
            del result
        out = torch.empty(shape)
        assert client.fetch(shape, "normal", seed=5, out=out).tensor is out  # copied out: the region goes back
        assert same_bytes(out, reference("normal", shape, seed=5))
        assert len(created) == 2  # no region made (or registered) after the first two
        with pytest.raises(RuntimeError, match="normal expects std >= 0.0"):
            client.fetch(shape, "normal", seed=6, std=-1.0)
        assert client._shared.pool.free_bytes() == 512 * 1024  # the failed attempt's region was closed, not pooled
        failed = next(region for region in created if region.map.closed)
        settle(  # and released on the server: its token is dead
            lambda: (
                "no shared-memory region"
                in unary_error(
                    shm_server.target,
                    pb.InitRequest(scheme="normal", shape=shape, seed=1, shared_memory_region=failed.token),
                ).details()
            ),
            "the failed attempt's region was not released",
        )


def test_a_region_that_cannot_be_made_now_sends_that_fetch_over_grpc(shm_server, monkeypatch) -> None:
    """No memory for a region (a cgroup's limit: ENOMEM, ENOSPC): this fetch over gRPC, later ones try again."""
    with shm_server.client(shared_memory=True) as client:
        with monkeypatch.context() as patched:
            patched.setattr(os, "posix_fallocate", lambda fd, offset, length: (_ for _ in ()).throw(OSError(28, "no")))
            result = client.fetch((128, 128), "normal", seed=4)
        assert result.transport == "unary" and same_bytes(result.tensor, reference("normal", (128, 128), seed=4))
        assert client.fetch((128, 128), "normal", seed=4).transport == "shared_memory"


# -- (a) a region can never shrink under the server; bad memfds are refused at registration ---------------------


def test_a_registered_region_cannot_shrink_and_the_server_survives_trying(shm_server) -> None:
    shape, size = (64, 64), 64 * 64 * 4
    fd = memfd(size)
    region = mmap.mmap(fd, size)
    with connect(path_of(shm_server)) as sock:
        answer = register(sock, fd, size)
        assert answer.error == "" and shared_memory.TOKEN_PATTERN.fullmatch(answer.region)
        with shm_server.client() as client:
            assert answer.server_id == client.describe().server_id
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == ALL_SEALS  # the server sealed it for good
        for attempt in (lambda: os.ftruncate(fd, 0), lambda: os.ftruncate(fd, size * 2)):
            with pytest.raises(PermissionError):
                attempt()
        assert fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, size) == 1  # EPERM: no page can go
        with pytest.raises(PermissionError):
            region.madvise(mmap.MADV_REMOVE)
        with pytest.raises(PermissionError):
            mmap.mmap(fd, size)  # nobody maps it writable any more
        stop = threading.Event()

        def hostile() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, size)

        shrinker = threading.Thread(target=hostile)
        shrinker.start()
        try:
            for seed in range(20):  # the SIGBUS of issue 17 came within a few writes
                request = pb.InitRequest(scheme="normal", shape=shape, seed=seed, shared_memory_region=answer.region)
                assert unary(shm_server.target, request).trailer.checksum
                assert torch.equal(
                    torch.frombuffer(region, dtype=torch.uint8),
                    reference("normal", shape, seed=seed).view(-1).view(torch.uint8),
                )
        finally:
            stop.set()
            shrinker.join()
        assert os.fstat(fd).st_size == size and shm_server.alive()
    os.close(fd)


def _unsealed(size: int) -> int:
    return memfd(size, seals=0)


def _shrink_only(size: int) -> int:
    return memfd(size, seals=fcntl.F_SEAL_SHRINK)


def _seal_sealed(size: int) -> int:
    return memfd(size, seals=SEALS | fcntl.F_SEAL_SEAL)


def _no_sealing(size: int) -> int:
    return memfd(size, seals=0, sealing=False)


def _sparse(size: int) -> int:
    return memfd(size, allocate=False)


def _half_allocated(size: int) -> int:
    fd = memfd(size, allocate=False, seals=0)
    os.posix_fallocate(fd, 0, size // 2)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd


def _allocated_past_the_end(size: int) -> int:
    """st_blocks says "all allocated", but every page lies past the end (fallocate KEEP_SIZE before F_SEAL_GROW)."""
    fd = memfd(size, allocate=False, seals=0)
    assert fallocate(fd, FALLOC_FL_KEEP_SIZE, size, size) == 0
    assert os.fstat(fd).st_blocks * 512 >= size
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd


def _write_sealed(size: int) -> int:
    return memfd(size, seals=SEALS | shared_memory.F_SEAL_FUTURE_WRITE)


def _read_only(size: int) -> int:
    fd = memfd(size)
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)


def _dev_shm_file(size: int) -> int:
    fd, path = tempfile.mkstemp(dir="/dev/shm")
    os.unlink(path)
    os.ftruncate(fd, size)
    return fd


def _disk_file(size: int) -> int:
    fd, path = tempfile.mkstemp()
    os.unlink(path)
    os.ftruncate(fd, size)
    return fd


def _pipe(size: int) -> int:
    reader, writer = os.pipe()
    os.close(writer)
    return reader


NOT_A_MEMFD = "the descriptor is not a memfd (memfd_create with MFD_ALLOW_SEALING)"
NOT_SEALED = "the memfd is not sealed against shrinking and growing (F_SEAL_SHRINK | F_SEAL_GROW)"
SEAL_SEALED = "the memfd is sealed with F_SEAL_SEAL"
NOT_WRITABLE = "the memfd cannot be mapped writable: pass it read-write, sealed with neither F_SEAL_WRITE nor"


@pytest.mark.parametrize(
    "make, declared, message",
    [
        (_unsealed, MIB, NOT_SEALED),
        (_shrink_only, MIB, NOT_SEALED),
        (_seal_sealed, MIB, SEAL_SEALED),
        (_no_sealing, MIB, SEAL_SEALED),
        (_sparse, MIB, f"the memfd has 0 of its {MIB} bytes allocated: posix_fallocate all of it"),
        (_half_allocated, MIB, f"the memfd has {MIB // 2} of its {MIB} bytes allocated"),
        (_allocated_past_the_end, MIB, f"the memfd has 0 of its {MIB} bytes allocated"),
        (_write_sealed, MIB, NOT_WRITABLE),
        (_read_only, MIB, NOT_WRITABLE),
        (_dev_shm_file, MIB, NOT_A_MEMFD),
        (_disk_file, MIB, NOT_A_MEMFD),
        (_pipe, MIB, NOT_A_MEMFD),
        (_unsealed, MIB + 1, NOT_SEALED),
        (lambda size: memfd(MIB), MIB + 1, f"the memfd is {MIB} bytes; the request says {MIB + 1}"),
        (lambda size: memfd(0), 0, "a region of 0 bytes is outside 1..4294967296 (max_region_bytes)"),
        (lambda size: memfd(size, allocate=False), (4 << 30) + 1, "a region of 4294967297 bytes is outside"),
    ],
)
def test_a_memfd_that_could_hurt_the_server_is_refused_at_registration(shm_server, make, declared, message) -> None:
    if make is _dev_shm_file and not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    fd = make(declared)
    try:
        with connect(path_of(shm_server)) as sock:
            answer = register(sock, fd, declared)
            assert answer.region == "" and not answer.closed and answer.error.startswith(message), answer.error
            good = memfd(4096)
            assert register(sock, good, 4096).region  # the connection stays usable
            os.close(good)
    finally:
        os.close(fd)
    assert shm_server.alive()


# -- (b) nobody but the registering connection's process can have a region written --------------------------------


def test_another_connection_cannot_make_the_server_write_into_a_region_it_did_not_register(shm_server) -> None:
    shape, size = (32, 32), 32 * 32 * 4
    victim_fd = memfd(size)
    victim = mmap.mmap(victim_fd, size)
    victim_sock = connect(path_of(shm_server))
    token = register(victim_sock, victim_fd, size).region
    os.close(victim_fd)
    unary(shm_server.target, pb.InitRequest(scheme="normal", shape=shape, seed=8, shared_memory_region=token))
    expected = reference("normal", shape, seed=8).view(-1).view(torch.uint8).clone()

    def untouched() -> bool:
        return torch.equal(torch.frombuffer(victim, dtype=torch.uint8), expected)

    assert untouched()
    hostile = pb.InitRequest(scheme="constant", shape=shape, params=pb.InitParams(val=1234.5))
    with connect(path_of(shm_server)) as attacker:
        release(attacker, token)  # not the attacker's to release: ignored
        attacker_fd = memfd(size)
        own = register(attacker, attacker_fd, size).region
        assert own and own != token
        hostile.shared_memory_region = own
        unary(shm_server.target, hostile)  # the attacker's own region: written, and only it
        assert untouched()
        flipped = token[:-1] + ("0" if token[-1] != "0" else "1")
        for guess in [f"region-{secrets.token_hex(16)}" for _ in range(50)] + [flipped]:
            hostile.shared_memory_region = guess
            error = unary_error(shm_server.target, hostile)
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error.details().startswith(f"no shared-memory region {guess} on this server")
        assert untouched()
        hostile.shared_memory_region = token
        del hostile.shape[:]
        hostile.shape.extend([16, 16])  # the victim's token with another size: refused before any byte is written
        assert unary_error(shm_server.target, hostile).code() == grpc.StatusCode.INVALID_ARGUMENT
        assert untouched()
        request = pb.InitRequest(scheme="normal", shape=shape, seed=8, shared_memory_region=token)
        unary(shm_server.target, request)  # the release did not take the victim's token away
        victim_sock.close()  # the victim's connection ends: its token dies with it
        del hostile.shape[:]
        hostile.shape.extend(shape)
        settle(
            lambda: unary_error(shm_server.target, hostile).code() == grpc.StatusCode.FAILED_PRECONDITION,
            "a token outlived its connection",
        )
        assert untouched()
        os.close(attacker_fd)


def _nobody_registers(path: str) -> subprocess.CompletedProcess[str]:
    """As uid 65534, connect to ``path`` and register a good memfd: prints the reply's fields, or the error."""
    source = f"""
import array, fcntl, os, socket, sys
fd = os.memfd_create("r", os.MFD_ALLOW_SEALING)
os.ftruncate(fd, 4096); os.posix_fallocate(fd, 0, 4096)
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, {SEALS})
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    sock.connect({path!r})
except OSError as error:
    print("connect", error.errno); sys.exit()
try:
    sock.sendmsg([bytes.fromhex({pb.RegionRequest(register=pb.RegisterRegion(size=4096)).SerializeToString().hex()!r})],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
except OSError:
    pass
try:
    first = sock.recv(4096)
except ConnectionResetError:  # the server closed with the request unread: its reply is queued behind the error
    first = sock.recv(4096)
sock.settimeout(2)
try:
    last = sock.recv(4096).hex() or "closed"
except ConnectionResetError:  # closed, with the request unread
    last = "closed"
except TimeoutError:
    last = "open"
print("reply", first.hex(), last)
"""
    return subprocess.run(
        [_nobody_python(), "-I", "-c", source], user=NOBODY, group=NOBODY, capture_output=True, text=True, timeout=60
    )


def _nobody_python() -> str:
    """An interpreter uid 65534 may run (this one may live under /root); its standard library is enough."""
    for candidate in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        if candidate is None:
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            probe = subprocess.run([candidate, "-I", "-c", "pass"], user=NOBODY, group=NOBODY, timeout=60)
            if probe.returncode == 0:
                return candidate
    pytest.skip("no Python interpreter that uid 65534 may run")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a peer under another uid")
def test_a_peer_of_another_uid_is_refused() -> None:
    directory = socket_dir()
    path = os.path.join(directory, "shm.sock")
    try:
        owner_only = start_server("--shared-memory-socket", path)
        try:
            assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)
            assert _nobody_registers(path).stdout.split() == ["connect", "13"]  # EACCES: the file's mode
        finally:
            owner_only.stop()
        assert not os.path.exists(path)  # removed on exit
        others = start_server("--shared-memory-socket", path, "--shared-memory-uids", "12345")
        try:
            assert oct(os.stat(path).st_mode & 0o777) == oct(0o666)  # anyone may connect: SO_PEERCRED decides
            fds = open_fds(others)
            done = _nobody_registers(path)
            assert done.stdout.startswith("reply "), done.stdout + done.stderr
            word, first, last = done.stdout.split()
            refused = pb.RegionReply.FromString(bytes.fromhex(first))
            assert refused.closed and refused.region == ""
            assert refused.error.startswith(f"uid {NOBODY} may not use this server's shared memory")
            assert last == "closed"
            settle(lambda: no_more_fds(others, fds), "a refused connection left a descriptor open")
            assert any(f"refused a connection from uid {NOBODY}" in line for line in others.output)
        finally:
            others.stop()
        allowed = start_server("--shared-memory-socket", path, "--shared-memory-uids", str(NOBODY))
        try:
            done = _nobody_registers(path)
            word, first, last = done.stdout.split()
            granted = pb.RegionReply.FromString(bytes.fromhex(first))
            assert shared_memory.TOKEN_PATTERN.fullmatch(granted.region) and not granted.error and last == "open"
        finally:
            allowed.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_client_whose_uid_the_server_refuses_falls_back_to_grpc_for_good(server) -> None:
    """The socket's server (in this process) allows one other uid only: this client's is refused by SO_PEERCRED."""
    directory = socket_dir()
    path = os.path.join(directory, "shm.sock")
    refusing = shared_memory.SharedMemoryServer(path, "refusing:1", shared_memory.RegionLimits.for_tensors(1 << 30))
    refusing.allowed_uids = frozenset({NOBODY})
    refusing.start()
    try:
        with server.client(shared_memory=path) as client:
            result = client.fetch((64, 64), "normal", seed=6)
            assert result.transport == "unary" and same_bytes(result.tensor, reference("normal", (64, 64), seed=6))
            assert not client.shared_memory
            assert f"refused this client: uid {os.geteuid()} may not use" in client._shared.off_reason
            assert client.fetch((64, 64), "normal", seed=6).transport == "unary"  # for good: not asked again
        assert refusing.table.counts() == (0, 0)
    finally:
        refusing.close()
        shutil.rmtree(directory, ignore_errors=True)
    assert not os.path.exists(path)


# -- (c) names and paths are never opened ---------------------------------------------------------------------------


def test_names_and_planted_links_are_never_opened(shm_server, server, tmp_path) -> None:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    victim = os.path.join("/dev/shm", f"victim-{secrets.token_hex(8)}")  # another application's file
    elsewhere = tmp_path / "elsewhere"
    names = [f"initserve-{secrets.token_hex(16)}" for _ in range(2)]
    token = f"region-{secrets.token_hex(16)}"
    planted = [os.path.join("/dev/shm", name) for name in (*names, token)]
    try:
        with open(victim, "wb") as file:
            file.write(b"\x5a" * 64)
        elsewhere.write_bytes(b"\xa5" * 64)
        os.link(victim, planted[0])  # a hard link: O_NOFOLLOW would not have stopped it
        os.symlink(elsewhere, planted[1])
        os.link(victim, planted[2])  # named like a token
        listing = sorted(os.listdir("/dev/shm"))
        for target in (shm_server, server):
            for name in (*names, victim, str(elsewhere), "../../etc/passwd"):
                request = pb.InitRequest(scheme="constant", shape=[4, 4], params=pb.InitParams(val=1234.5))
                request.shared_memory = name
                error = unary_error(target.target, request)
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert error.details().startswith("this server does not write shared memory by name")
                assert refusal_of(error) == "shared-memory-off"
        request = pb.InitRequest(scheme="constant", shape=[4, 4], params=pb.InitParams(val=1234.5))
        for malformed in (*names, victim, "../../etc/passwd", token.upper(), token + "0", "region-" + "0" * 31):
            request.shared_memory_region = malformed
            error = unary_error(shm_server.target, request)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "is not a region token (region- and 32 lowercase hex digits)" in error.details()
        request.shared_memory_region = token
        error = unary_error(shm_server.target, request)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error.details().startswith(f"no shared-memory region {token} on this server")
        assert refusal_of(error) == "no-such-region"
        off = unary_error(server.target, request)
        assert off.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert off.details() == "this server does not write shared memory (start it with --shared-memory-socket)"
        assert refusal_of(off) == "shared-memory-off"
        with (
            initserve.Client(shm_server.target) as client,
            pytest.raises(
                initserve.InvalidArgument, match="shared_memory is answered by InitUnary, not by the Init stream"
            ),
        ):
            list(client._transport.init_stream(request, CALL_TIMEOUT_SECONDS))
        assert sorted(os.listdir("/dev/shm")) == listing  # nothing created
        with open(victim, "rb") as file:
            assert file.read() == b"\x5a" * 64  # nothing written
        assert elsewhere.read_bytes() == b"\xa5" * 64
    finally:
        for path in (*planted, victim):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


# -- the registration socket under hostile peers ----------------------------------------------------------------------


def _violation(path: str, data: bytes, fds: tuple[int, ...] = ()) -> str:
    """What the server answers a packet that breaks the protocol; it must then close the connection."""
    with connect(path) as sock:
        send(sock, data, fds)
        answer = reply(sock)
        assert answer is not None and answer.closed and answer.region == ""
        assert reply(sock) is None  # closed
        return answer.error


def test_the_registration_socket_survives_hostile_peers(shm_server) -> None:
    path = path_of(shm_server)
    fds_before = open_fds(shm_server)
    good = memfd(4096)
    extra = [memfd(4096) for _ in range(20)]
    register_bytes = pb.RegionRequest(register=pb.RegisterRegion(size=4096)).SerializeToString()
    try:
        assert _violation(path, b"\xff\xfe not a protobuf") == "a packet of 17 bytes that is not a RegionRequest"
        assert _violation(path, b"\x1a\x00") == "a RegionRequest that neither registers nor releases a region"
        assert _violation(path, b"\x0a" + b"\x7f" * 5000).startswith("a packet over 4096 bytes")
        assert _violation(path, register_bytes) == "a register request with 0 file descriptors (it takes exactly 1)"
        assert _violation(path, register_bytes, (good, extra[0], extra[1])).startswith("a register request with 3")
        assert _violation(path, register_bytes, tuple(extra)).startswith("a packet with too many file descriptors")
        release_bytes = pb.RegionRequest(release=pb.ReleaseRegion(regions=["x"])).SerializeToString()
        assert _violation(path, release_bytes, (good,)).startswith("a release request with 1 file descriptors")
        many = pb.RegionRequest(release=pb.ReleaseRegion(regions=["x"] * 65)).SerializeToString()
        assert _violation(path, many) == "a release of more than 64 regions in one packet"
        # A peer that never reads its replies is dropped once they fill its socket, not buffered for.
        with connect(path) as deaf:
            bad_size = pb.RegionRequest(register=pb.RegisterRegion(size=0)).SerializeToString()
            with pytest.raises(OSError):
                for _ in range(100_000):
                    send(deaf, bad_size, (good,))
        # A flood of connections: the first max_connections are taken, the rest refused at once.
        flood = [connect(path) for _ in range(shared_memory.DEFAULT_MAX_CONNECTIONS)]
        try:
            for sock in flood[:3]:
                fresh = memfd(4096)
                assert register(sock, fresh, 4096).region  # each of them usable
                os.close(fresh)
            with connect(path) as late:
                refused = reply(late)
                assert refused is not None and refused.closed
                assert refused.error.startswith("too many connections: the server has 64 (max_connections)")
                assert refused.refusal == "too-many-connections"
        finally:
            for sock in flood:
                sock.close()
        settle(lambda: no_more_fds(shm_server, fds_before), "the hostile peers left descriptors open in the server")
        with shm_server.client(shared_memory=True) as client:  # and a good client is served
            result = client.fetch((128, 64), "normal", seed=11)
            assert result.transport == "shared_memory"
            assert same_bytes(result.tensor, reference("normal", (128, 64), seed=11))
        assert shm_server.alive()
    finally:
        for fd in (good, *extra):
            os.close(fd)


def test_a_connection_s_region_limits_are_named_and_a_client_makes_room(shm_server) -> None:
    limit = shared_memory.DEFAULT_MAX_CONNECTION_REGIONS

    def fresh_token(sock: socket.socket) -> pb.RegionReply:
        fd = memfd(4096)
        try:
            return register(sock, fd, 4096)
        finally:
            os.close(fd)

    with connect(path_of(shm_server)) as sock:
        tokens = [fresh_token(sock).region for _ in range(limit)]
        assert all(tokens) and len(set(tokens)) == limit
        refused = fresh_token(sock)
        assert refused.error == f"this connection holds {limit} regions, the most one may (max_connection_regions)"
        assert refused.refusal == "connection-limit" and not refused.closed
        release(sock, *tokens[:64])
        assert fresh_token(sock).region  # room again
        used = memfd(4096)
        assert register(sock, used, 4096).region
        assert register(sock, used, 4096).error.startswith(SEAL_SEALED)  # a memfd is registered once, for good
        os.close(used)


@pytest.mark.slow
def test_a_client_holding_more_tensors_than_a_connection_may_register_keeps_using_shared_memory(shm_server) -> None:
    """Past max_connection_regions lent tensors, the client drops the lent regions' registrations for new ones."""
    count = shared_memory.DEFAULT_MAX_CONNECTION_REGIONS + 50
    with shm_server.client(shared_memory=True, shared_memory_pool_bytes=0) as client:
        kept = [client.fetch((1024,), "normal", seed=seed) for seed in range(count)]
        assert {result.transport for result in kept} == {"shared_memory"}
        assert all(same_bytes(result.tensor, reference("normal", (1024,), seed=k)) for k, result in enumerate(kept))


def test_region_limits_and_leases_in_process() -> None:
    """The table alone: every limit refuses with its name; a region released mid-write stays mapped until then."""
    table = shared_memory.RegionTable(
        shared_memory.RegionLimits(
            max_region_bytes=8192,
            max_connection_regions=2,
            max_connection_bytes=8192,
            max_regions=3,
            max_mapped_bytes=12288,
        )
    )
    small = [memfd(4096) for _ in range(4)]
    big = memfd(8192)
    try:
        first = table.register(1, small[0], 4096)
        with pytest.raises(
            shared_memory.RegionRefused, match=r"4096 bytes of regions; 8192 more .*\(max_connection_bytes\)$"
        ) as refused:
            table.register(1, big, 8192)
        assert refused.value.refusal == "connection-limit"
        table.register(1, small[1], 4096)
        with pytest.raises(
            shared_memory.RegionRefused, match=r"holds 2 regions, .*\(max_connection_regions\)$"
        ) as refused:
            table.register(1, small[2], 4096)
        assert refused.value.refusal == "connection-limit"
        region = mmap.mmap(small[2], 4096)  # the client's mapping, made before the server's seal
        held = table.register(2, small[2], 4096)
        with pytest.raises(shared_memory.RegionRefused, match=r"the server holds 3 regions, .*\(max_regions\)$") as no:
            table.register(3, small[3], 4096)
        assert no.value.refusal == ""  # the server's limit: nothing for this client to release
        table.release(2, first)  # not owner 2's: ignored
        table.release(1, first)
        with pytest.raises(
            shared_memory.RegionRefused, match=r"8192 bytes of regions; 8192 more .*\(max_mapped_bytes\)$"
        ):
            table.register(3, big, 8192)
        with pytest.raises(shared_memory.RegionRefused, match=r"outside 1\.\.8192 \(max_region_bytes\)$"):
            table.register(3, big, 8193)
        with pytest.raises(shared_memory.SharedMemoryInvalid, match="is 4096 bytes; the tensor is 8192 bytes"):
            table.lease(held, 8192)
        lease = table.lease(held, 4096)
        table.release_all(2)
        with pytest.raises(shared_memory.SharedMemoryUnavailable, match="no shared-memory region"):
            table.lease(held, 4096)
        source = torch.arange(1024, dtype=torch.int32)
        lease.copy(source, 0, 4096)  # still mapped: the write in progress finishes
        assert torch.equal(torch.frombuffer(region, dtype=torch.int32), source)
        lease.close()
        assert table.counts() == (1, 4096)
        table.close()
        assert table.counts() == (0, 0)
    finally:
        for fd in (*small, big):
            os.close(fd)


def test_the_socket_file_is_replaced_only_when_nobody_listens_and_removed_on_exit(shm_server, tmp_path) -> None:
    live = path_of(shm_server)
    with pytest.raises(RuntimeError, match=f"another server listens on {live}"):
        start_server("--shared-memory-socket", live)
    assert shm_server.alive() and os.path.exists(live)
    not_a_socket = tmp_path / "file.sock"
    not_a_socket.write_bytes(b"someone's data")
    with pytest.raises(RuntimeError, match="exists and is not a socket; not replaced"):
        start_server("--shared-memory-socket", str(not_a_socket))
    assert not_a_socket.read_bytes() == b"someone's data"
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as dead:
        dead.bind(str(stale))  # bound, never listened on, closed: what a killed server leaves
    restarted = start_server("--shared-memory-socket", str(stale))
    try:
        with restarted.client(shared_memory=True) as client:
            assert client.fetch((32, 32), "ones").transport == "shared_memory"
    finally:
        restarted.stop()
    assert not stale.exists()


def test_a_forked_child_drops_the_parent_s_connection_and_the_parent_keeps_it(shm_server) -> None:
    """In a process of its own: the child closes its copy of the socket (the server would otherwise keep the
    parent's regions while the child lives) and replaces the lock another thread may have held at the fork."""
    done = run_python(
        """
        import os, sys
        import initserve

        client = initserve.Client(sys.argv[1], shared_memory=True, timeout=60)
        first = client.fetch((64, 64), "normal", seed=1)
        assert first.transport == "shared_memory"
        connection = client._shared._connection
        fd = connection._sock.fileno()
        del first  # pooled, registered
        client._shared._lock.acquire()  # as if another thread were inside at the fork
        child = os.fork()
        if child == 0:
            ok = client._shared._connection is None and connection.closed
            ok = ok and client._shared._lock.acquire(timeout=1)
            try:
                os.fstat(fd)
                ok = False  # the inherited descriptor must be closed
            except OSError:
                pass
            os._exit(0 if ok else 1)
        client._shared._lock.release()
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "child checks failed"
        second = client.fetch((64, 64), "normal", seed=2)
        assert second.transport == "shared_memory" and client._shared._connection is connection
        client.close()
        print("ok")
        """,
        shm_server.target,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"

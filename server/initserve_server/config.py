"""The server's frozen configuration and its defaults, with their units."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from initserve_protocol.limits import MAX_UNARY_BYTES
from initserve_protocol.seeds import MAX_NAME_CHARS
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_server.cpu_limit import usable_cpus
from initserve_server.memory_limit import usable_memory_bytes
from initserve_server.torch_warnings import MAX_WARNING_BYTES, MAX_WARNINGS

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
# Generation threads: one per usable CPU (torch runs one intra-op thread each), at least 2; apart from the threads
# that serve calls (max_concurrent_calls), which mostly wait: on bytes being generated, or on their client.
DEFAULT_WORKERS = max(2, usable_cpus())
DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 4 << 20  # gRPC's own default receive limit, so any stock client can read chunks
DEFAULT_MAX_TENSOR_BYTES = 4 << 30
DEFAULT_MAX_DIMS = 16
DEFAULT_GRACE_SECONDS = 10.0
DEFAULT_MAX_CONNECTION_AGE_SECONDS = 0.0  # off; the Kubernetes manifests set 300
# Init calls served at once (each holds a gRPC thread while it runs; Describe and health checks have threads of
# their own beyond these): past it, RESOURCE_EXHAUSTED. A stalled stream gives its thread back after stall_seconds.
DEFAULT_MAX_CONCURRENT_CALLS = 256
# A stream whose client reads nothing for this long is cancelled and what it held is released.
DEFAULT_STALL_SECONDS = 30.0
# A request whose generation the cost model (initserve_server.costs) puts above this many seconds of one core
# of the reference machine is refused, whatever its size: nothing admitted can run for hours.
DEFAULT_MAX_WORK_SECONDS = 60.0
# Sized for the machine, or the container's memory limit where that is smaller: the cache may hold 1/8 of it
# (at most 16 GiB), tensors being generated or streamed outside it 1/4 (at least one largest tensor). Peak RSS
# stays under idle + both + gRPC buffers.
_USABLE_MEMORY_BYTES = usable_memory_bytes()  # read once: /proc and the cgroup files
DEFAULT_CACHE_BYTES = min(_USABLE_MEMORY_BYTES // 8, 16 << 30)
DEFAULT_MAX_INFLIGHT_BYTES = max(_USABLE_MEMORY_BYTES // 4, DEFAULT_MAX_TENSOR_BYTES)
# Per-message framing a Chunk adds around its payload (field tags, offset, length prefixes), rounded up.
CHUNK_OVERHEAD_BYTES = 64
# A stream never has more chunks than this: a tiny requested chunk size is raised for a large tensor.
MAX_CHUNKS_PER_STREAM = 1 << 20
# Requests are small (a shape, a few parameters; an InitMany call a few hundred bytes per tensor of a model);
# anything larger is refused by gRPC before parsing.
MAX_REQUEST_BYTES = 4 << 20
MAX_TENSORS_PER_CALL = 16384  # tensors of one InitMany call
MAX_STRING_PARAM_CHARS = 64
# InitUnary answers a tensor of at most MAX_UNARY_BYTES in one message, less where the room left for its header
# and trailer (header_room_bytes) needs it.
# The strings the server itself puts in a header take less than this: a device name (CUDA's is at most 256 bytes)
# twice, with the fingerprint, a hostname (at most 64) in server_id, two torch versions, the checksum algorithm,
# the scheme and the server's version; tests/server/test_config.py checks this server's own.
SERVER_STRINGS_BYTES = 1 << 10
# Serialized InitUnary answers to repeated cached requests (initserve_server.answers), apart from cache_bytes.
MAX_ANSWER_MEMO_BYTES = 64 << 20
MAX_CONNECTION_AGE_SECONDS = 2**31 / 1000
# Streams' messages on their way out: each stream holds its current chunk twice while gRPC sends it (the encoded
# message and gRPC's copy), outside the tensor budgets, so streams are admitted against this budget of their own
# (RESOURCE_EXHAUSTED past it): 128 stalled default-chunk streams at once, released after stall_seconds.
STREAM_BUFFER_BYTES = 256 << 20
MESSAGE_COPIES = 2  # gRPC takes it in int32 milliseconds


def header_bytes_bound(max_dims: int) -> int:
    """The most bytes one header message can take, framing included: a name of MAX_NAME_CHARS four-byte characters,
    max_dims dims in shape, full_shape and slices, every number at its widest, and SERVER_STRINGS_BYTES for the
    server's own strings. A client controls the name and the dims, so every message limit must leave this much
    room (a name of 1024 emoji is 4 KiB of it)."""
    widest = 2**64 - 1
    header = pb.Header(
        shape=[-1] * max_dims, full_shape=[-1] * max_dims,  # a negative int64 is its widest varint, 10 bytes
        slices=[pb.Slice(dim=2**32 - 1, start=widest, length=widest)] * max_dims,
        dtype=max(pb.DType.values()), total_bytes=widest, seed_used=widest, seeded=True, chunk_bytes=widest,
        offset=widest, cache_hit=True, crc32=2**32 - 1, name="\U0010ffff" * MAX_NAME_CHARS, base_seed=widest,
        device=pb.DeviceInfo(multiprocessor_count=-1),
    )  # fmt: skip
    # InitMany's framing: the header as field 1 and the tensor's index as field 4.
    return pb.InitManyResponse(header=header, tensor=2**32 - 1).ByteSize() + SERVER_STRINGS_BYTES


@functools.cache  # on InitUnary's path
def header_room_bytes(max_dims: int) -> int:
    """What InitUnary keeps of max_message_bytes for its header, trailer and the chunk's framing."""
    warnings = ["x" * MAX_WARNING_BYTES] * MAX_WARNINGS  # the most torch_warnings keeps
    trailer = pb.InitResponse(trailer=pb.Trailer(checksum=bytes(64), warnings=warnings)).ByteSize()
    return header_bytes_bound(max_dims) + trailer + CHUNK_OVERHEAD_BYTES


@dataclass(frozen=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT  # 0 picks a free port; RunningServer.port says which
    workers: int = DEFAULT_WORKERS  # generations running at once (threads); small ones also have a lane of their own
    chunk_bytes: int = DEFAULT_CHUNK_BYTES  # default payload per Chunk message
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # largest message the server sends
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES  # largest tensor one request may ask for
    max_dims: int = DEFAULT_MAX_DIMS
    grace_seconds: float = DEFAULT_GRACE_SECONDS  # in-flight streams get this long after SIGTERM
    cache_bytes: int = DEFAULT_CACHE_BYTES  # LRU cache budget for finished tensors; 0 disables the cache
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES  # tensors generated/streamed outside the cache
    preallocate_bytes: int = 0  # tensor memory written at start-up for generations to reuse; within both budgets
    # Same-host transport: a Unix-domain socket where local clients hand the server sealed memfds to fill
    # (initserve_server.shared_memory); "" off.
    shared_memory_socket: str = ""
    shared_memory_uids: tuple[int, ...] = ()  # peer UIDs allowed on that socket besides the server's own
    tls_cert_file: str = ""  # PEM certificate chain: serve TLS (with tls_key_file)
    tls_key_file: str = ""
    tls_client_ca_file: str = ""  # PEM CA bundle: require client certificates it signed (mutual TLS)
    auth_token: str = field(default="", repr=False)  # bearer token every RPC but health must carry; "" for none
    # A file of bearer tokens, one per line, any of which is accepted; re-read when it changes (rotation).
    auth_token_file: str = ""
    metrics_port: int | None = None  # Prometheus /metrics on host:metrics_port (0: a free port); None: off
    # Close each client connection after this long (GOAWAY: its calls finish, new ones reconnect), so clients
    # of a DNS name re-resolve it and reach replicas added since; 0: never.
    max_connection_age_seconds: float = DEFAULT_MAX_CONNECTION_AGE_SECONDS
    # The gRPC health service alone, in plaintext and without a token, on host:health_port (kubelet's gRPC
    # probes speak plaintext only); None: off.
    health_port: int | None = None
    stall_seconds: float = DEFAULT_STALL_SECONDS
    max_concurrent_calls: int = DEFAULT_MAX_CONCURRENT_CALLS
    max_work_seconds: float = DEFAULT_MAX_WORK_SECONDS
    # Devices that must generate a probe tensor before the server reports ready (and keep doing so): a CUDA
    # pool whose GPU does not work is not ready. Each "cpu", "cuda" or "cuda:N".
    require_devices: tuple[str, ...] = ()
    # A directory of Triton's C modules (initserve_protocol.portable.triton_modules), which Triton then takes
    # instead of compiling them: the portable GPU kernel runs on a host with no C compiler. "": the ones built
    # into this environment (<sys.prefix>/share/initserve/triton-modules, as in the CUDA image), if any.
    triton_modules: str = ""

    @property
    def shared_memory(self) -> bool:
        return bool(self.shared_memory_socket)

    @property
    def max_chunk_bytes(self) -> int:
        return self.max_message_bytes - CHUNK_OVERHEAD_BYTES

    @property
    def answer_memo_bytes(self) -> int:
        """The InitUnary answer memo's budget: none without a tensor cache, never more than the cache."""
        return min(MAX_ANSWER_MEMO_BYTES, self.cache_bytes)

    @property
    def max_unary_bytes(self) -> int:
        return max(0, min(MAX_UNARY_BYTES, self.max_message_bytes - header_room_bytes(self.max_dims)))

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.cache_bytes < 0 or self.max_inflight_bytes < 0:
            raise ValueError("cache_bytes and max_inflight_bytes must not be negative")
        if not 0 <= self.preallocate_bytes <= self.cache_bytes + self.max_inflight_bytes:
            raise ValueError(
                "preallocate_bytes must be in 0..cache_bytes + max_inflight_bytes "
                f"({self.cache_bytes + self.max_inflight_bytes}), got {self.preallocate_bytes}"
            )
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.max_dims < 0:
            raise ValueError(f"max_dims must be >= 0, got {self.max_dims}")
        least = header_room_bytes(self.max_dims)
        if self.max_message_bytes < least:
            raise ValueError(
                f"max_message_bytes must be at least {least} (the largest header, trailer and chunk framing with "
                f"max_dims={self.max_dims}), got {self.max_message_bytes}"
            )
        if not 1 <= self.chunk_bytes <= self.max_chunk_bytes:
            raise ValueError(
                f"chunk_bytes must be in 1..{self.max_chunk_bytes} (max_message_bytes - {CHUNK_OVERHEAD_BYTES}), "
                f"got {self.chunk_bytes}"
            )
        if self.max_tensor_bytes < 0:
            raise ValueError(f"max_tensor_bytes must be >= 0, got {self.max_tensor_bytes}")
        if self.grace_seconds < 0:
            raise ValueError(f"grace_seconds must be >= 0, got {self.grace_seconds}")
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            raise ValueError(f"health_port must be in 0..65535, got {self.health_port}")
        if self.max_concurrent_calls < 1:
            raise ValueError(f"max_concurrent_calls must be at least 1, got {self.max_concurrent_calls}")
        if not self.stall_seconds > 0:
            raise ValueError(f"stall_seconds must be > 0, got {self.stall_seconds}")
        if not self.max_work_seconds > 0:
            raise ValueError(f"max_work_seconds must be > 0, got {self.max_work_seconds}")
        if not 0 <= self.max_connection_age_seconds <= MAX_CONNECTION_AGE_SECONDS:
            raise ValueError(
                f"max_connection_age_seconds must be in 0..{MAX_CONNECTION_AGE_SECONDS:.0f}, "
                f"got {self.max_connection_age_seconds}"
            )

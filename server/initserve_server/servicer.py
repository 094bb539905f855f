"""The gRPC servicer: request → spec → validate → generate → encode, with every error mapped in one place."""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc
import torch
from google.protobuf.message import DecodeError

from initserve import _dtypes
from initserve._checksum import CHECKSUM_ALGORITHM
from initserve._codec import encode_stream, seal_header, tensor_bytes
from initserve._errors import TORCH_EXCEPTION_KEY, TORCH_EXCEPTION_TYPES
from initserve._schemes import SCHEMES
from initserve._slices import index
from initserve._wire import encode_unary, serialize_response, tensor_tag
from initserve.v1 import initserve_pb2 as pb
from initserve.v1 import initserve_pb2_grpc as pb_grpc
from initserve_server import __version__, devices
from initserve_server.answers import AnswerMemo
from initserve_server.buffers import BufferPool
from initserve_server.cache import Abandoned, Overloaded, TensorCache
from initserve_server.config import (
    MAX_CHUNKS_PER_STREAM,
    MAX_REQUEST_BYTES,
    MAX_STRING_PARAM_CHARS,
    MAX_TENSORS_PER_CALL,
    ServerConfig,
)
from initserve_server.initializers import Allocate, configure_torch, generate
from initserve_server.logs import AccessLog
from initserve_server.metrics import CallRecord, Metrics
from initserve_server.production import Production
from initserve_server.shared_memory import (
    RegionLease,
    SharedMemoryInvalid,
    SharedMemoryServer,
    SharedMemoryUnavailable,
    open_lease,
    socket_path,
)
from initserve_server.spec import InitSpec
from initserve_server.validation import InvalidRequest, OffsetOutOfRange, check_finite, validate_request

API_VERSION = "initserve.v1"
# Which replica served a stream: in every header and in Describe.
SERVER_ID = f"{socket.gethostname()}:{os.getpid()}"
log = logging.getLogger("initserve.server")


def draw_seed() -> int:
    """A fresh seed for a request that gave none; reported in the header so the result can be reproduced."""
    return secrets.randbits(64)


def _torch_exception_name(error: BaseException) -> str | None:
    """The allowlisted builtin exception type nearest to what torch raised (torch's subclasses included)."""
    for cls in type(error).__mro__:
        if cls.__name__ in TORCH_EXCEPTION_TYPES and getattr(builtins, cls.__name__, None) is cls:
            return cls.__name__
    return None


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def _abort(context: grpc.ServicerContext, error: BaseException, label: str = "") -> None:
    """Every failure of an Init call becomes its status here, and only here; ``label`` names the tensor of an
    InitMany call (its message's prefix)."""
    if isinstance(error, Abandoned):
        context.abort(grpc.StatusCode.CANCELLED, f"{label}{error}")
    if isinstance(error, Overloaded):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{label}{error}")
    if isinstance(error, OffsetOutOfRange):
        context.abort(grpc.StatusCode.OUT_OF_RANGE, f"{label}{error}")
    if isinstance(error, (InvalidRequest, SharedMemoryInvalid)):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{label}{error}")
    if isinstance(error, (devices.DeviceUnavailable, TooLargeForUnary, SharedMemoryUnavailable)):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{label}{error}")
    if _is_out_of_memory(error):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{label}out of memory generating the tensor: {error}")
    torch_exception = _torch_exception_name(error)
    if torch_exception is not None:
        context.set_trailing_metadata(((TORCH_EXCEPTION_KEY, torch_exception),))
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{label}{error}")
    log.exception("unexpected error generating a tensor", exc_info=error)
    context.abort(grpc.StatusCode.INTERNAL, f"{label}internal error generating the tensor ({type(error).__name__})")


def _tensor_label(position: int, name: str) -> str:
    """How an InitMany error names its tensor: ``tensors[3] ('layer.weight'): ``."""
    return f"tensors[{position}] ({name!r}): " if name else f"tensors[{position}]: "


def _header(spec: InitSpec, cache_hit: bool) -> pb.Header:
    return seal_header(
        pb.Header(
            shape=spec.out_shape,
            dtype=spec.dtype.wire,
            total_bytes=spec.total_bytes,
            seed_used=spec.seed,
            seeded=spec.scheme.seeded,
            torch_version=torch.__version__,
            device=devices.device_info(spec.device),
            checksum_algorithm=CHECKSUM_ALGORITHM,
            chunk_bytes=spec.chunk_bytes,
            scheme=spec.scheme.name,
            server_version=__version__,
            server_id=SERVER_ID,
            offset=spec.offset,
            cache_hit=cache_hit,
            name=spec.name,
            base_seed=spec.base_seed,
            full_shape=spec.shape if spec.slices else (),
            slices=[pb.Slice(dim=dim, start=start, length=length) for dim, start, length in spec.slices],
        )
    )


DEVICE_COPY_PIECE_BYTES = 16 << 20  # one device-to-host copy: long enough that its call and sync cost vanish


def produce(spec: InitSpec, production: Production, allocate: Allocate | None = None) -> None:
    """Generate the contract tensor for ``spec`` into ``production``, piece by piece where the scheme allows;
    ``allocate`` makes a CPU tensor's memory (see ``buffers``)."""

    def on_piece(tensor: torch.Tensor, final_bytes: int) -> None:
        if production.tensor is None:
            production.attach(tensor)
        production.advance(final_bytes)

    try:
        tensor = generate(spec, on_piece, allocate=allocate)
        if production.tensor is None and tensor.device.type == "cpu":
            production.attach(tensor.contiguous())
        elif production.tensor is None:  # generated on a GPU: into pooled host memory, streamed as it lands
            host = allocate(tensor.shape, tensor.dtype) if allocate else torch.empty(tensor.shape, dtype=tensor.dtype)
            production.copy_from(tensor, host, DEVICE_COPY_PIECE_BYTES)
        del tensor
        production.finish()
    except BaseException as error:  # noqa: BLE001 - the streams waiting on it re-raise it
        production.fail(error)


def _write_shared(
    region: RegionLease, spec: InitSpec, shared: bool, production: Production, ready: Callable[[int], None]
) -> Iterator[pb.InitResponse]:
    """The shared-memory answer: the bytes into the client's region as they become final, then the header and
    the trailer."""
    assert production.tensor is not None
    region.write(production.tensor, spec.offset, spec.total_bytes, ready)
    yield pb.InitResponse(header=_header(spec, shared))
    yield pb.InitResponse(trailer=pb.Trailer(checksum=production.final_checksum()))


METHODS = {"stream": "Init", "unary": "InitUnary", "shared": "InitUnary"}  # _serve's modes, as RPC names


class TooLargeForUnary(Exception):
    """FAILED_PRECONDITION: the client falls back to the Init stream on it."""


def _unary(spec: InitSpec, config: ServerConfig) -> InitSpec:
    """The spec of an InitUnary call: its bytes in one chunk, if they fit the unary limit."""
    size = spec.total_bytes - spec.offset
    if size > config.max_unary_bytes:
        raise TooLargeForUnary(
            f"InitUnary answers at most {config.max_unary_bytes} bytes (max_unary_bytes); this request is "
            f"{size} bytes from its offset: use Init, which streams"
        )
    return dataclasses.replace(spec, chunk_bytes=max(size, 1))


@dataclasses.dataclass
class _Call:
    """An RPC in progress: ``ended`` is set when it is cancelled, expires, disconnects or finishes; the rest is
    what its access-log line and metrics will say."""

    ended: threading.Event
    finished: bool = False  # its last tensor was sent whole
    scheme: str = ""
    shape: tuple[int, ...] = ()
    tensors: int = 0
    bytes_sent: int = 0
    cache_hit: bool = False

    def is_active(self) -> bool:
        return not self.ended.is_set()

    def answered(self, spec: InitSpec, cache_hit: bool) -> None:
        self.tensors += 1
        self.bytes_sent += spec.total_bytes - spec.offset
        self.cache_hit = cache_hit if self.tensors == 1 else self.cache_hit and cache_hit


def _request_id(context: grpc.ServicerContext) -> str:
    """The caller's ``x-request-id`` (at most 64 printable characters), else a new one."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and 0 < len(value) <= 64 and value.isprintable():
            return value
    return secrets.token_hex(8)


class MalformedRequest:
    """Request bytes that do not parse: answered INVALID_ARGUMENT by the servicer, never INTERNAL by grpc."""

    def __init__(self, error: Exception, size: int) -> None:
        self.message = f"request is not a valid initserve.v1 message ({size} bytes): {error}"


def _parser(message_type: type) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            return message_type.FromString(data)
        except (DecodeError, ValueError) as error:  # grpc would answer INTERNAL for an exception here
            return MalformedRequest(error, len(data))

    return parse


_parse_init_request = _parser(pb.InitRequest)


def _reusable(messages: list[pb.InitResponse | bytes]) -> bool:
    """A whole answer (header, chunk, trailer) served from the cache: the same request bytes get the same one."""
    first, last = messages[0], messages[-1]
    return (
        len(messages) == 3
        and isinstance(first, pb.InitResponse)
        and first.header.cache_hit
        and isinstance(last, pb.InitResponse)
        and last.WhichOneof("part") == "trailer"
    )


class _Gauge:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, delta: int) -> None:
        with self._lock:
            self.value += delta


class InitServicer(pb_grpc.InitServiceServicer):
    def __init__(self, config: ServerConfig, shared_memory: SharedMemoryServer | None = None) -> None:
        self._config = config
        self.shared_memory = shared_memory  # the same-host transport's regions (started and closed by serve)
        self.cache = TensorCache(config.cache_bytes, config.max_inflight_bytes)
        self.buffers = BufferPool(self.cache.spare_bytes)
        self.buffers.start_preallocating(config.preallocate_bytes)
        self.answers = AnswerMemo(config.answer_memo_bytes)
        self.inflight_requests = _Gauge()
        self.cancelled = _Gauge()
        # Generation runs here, beside the streams that send its bytes as they become final.
        self._producers = ThreadPoolExecutor(config.workers, "initserve-produce", initializer=configure_torch)
        # Last: registering reads the stats once (a collision check), so everything above must exist.
        self.metrics = Metrics(self.stats, lambda: [devices.device_info(d) for d in devices.available_devices()])
        self.access_log = AccessLog()

    def _start(self, spec: InitSpec, is_active: Callable[[], bool]) -> Production:
        """A production for ``spec``, once torch has accepted the request (its first bytes are final)."""
        production = Production(spec.total_bytes)
        self._producers.submit(self._produce, spec, production)
        try:
            production.wait_started(is_active)
            check_finite(spec)
        except BaseException:
            production.cancel()
            raise
        return production

    def _produce(self, spec: InitSpec, production: Production) -> None:
        started = time.perf_counter()
        produce(spec, production, self.buffers.empty)
        if production.error is None:
            self.metrics.generated(spec.scheme.name, str(spec.device), time.perf_counter() - started)

    def _cut(self, spec: InitSpec, is_active: Callable[[], bool]) -> Production:
        """A slice's production: the whole tensor from the cache (generated there if need be), then its slice
        copied out, so every slice of one tensor shares one generation."""
        whole = spec.whole()
        with self.cache.acquire(
            whole.key,
            whole.total_bytes,
            lambda: self._start(whole, is_active),
            cacheable=not whole.seed_drawn,
            is_active=is_active,
        ) as lease:
            lease.production.wait_for(whole.total_bytes, is_active)
            assert lease.production.tensor is not None
            piece = self.buffers.empty(spec.out_shape, spec.dtype.torch_dtype)
            piece.copy_(lease.production.tensor[index(spec.slices)])
        return Production.finished(piece)

    def Init(self, request: pb.InitRequest, context: grpc.ServicerContext) -> Iterator[pb.InitResponse | bytes]:
        return self._serve(request, context, mode="stream")

    def InitUnary(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        """The stream's messages in one serialized InitUnaryResponse (see initserve._wire.encode_unary).

        ``data`` is the request's bytes: a repeat of a request the cache served is answered from the memo."""
        started = time.perf_counter()
        kept = self.answers.get(data)
        if kept is not None:
            answer, (scheme, shape, nbytes) = kept
            seconds = time.perf_counter() - started
            self._record(
                context,
                lambda: CallRecord("InitUnary", _request_id(context), context.peer(), seconds, "OK", scheme, shape,
                                   1, nbytes, cache_hit=True),
            )  # fmt: skip
            return answer
        request = _parse_init_request(data)
        shared = not isinstance(request, MalformedRequest) and (request.shared_memory or request.shared_memory_region)
        mode = "shared" if shared else "unary"
        messages = list(self._serve(request, context, mode=mode))  # an abort raises out of this
        answer = encode_unary(messages)
        if mode == "unary" and _reusable(messages):
            header = messages[0].header
            self.answers.put(data, answer, (header.scheme, tuple(header.shape), header.total_bytes - header.offset))
        return answer

    def _serve(
        self, request: pb.InitRequest, context: grpc.ServicerContext, *, mode: str
    ) -> Iterator[pb.InitResponse | bytes]:
        """One Init call: ``mode`` "stream" (Init), "unary" (InitUnary: one chunk) or "shared" (InitUnary with
        shared_memory: the bytes go into the client's region, the messages carry header and trailer only)."""
        with self._call(context, METHODS[mode]) as call:
            region: RegionLease | None = None
            try:
                try:
                    if isinstance(request, MalformedRequest):
                        raise InvalidRequest(request.message)
                    spec = validate_request(request, self._config, draw_seed)
                    call.scheme, call.shape = spec.scheme.name, spec.shape
                    if mode == "unary":
                        spec = _unary(spec, self._config)
                    elif mode == "shared":
                        region = open_lease(
                            self.shared_memory, request.shared_memory, request.shared_memory_region, spec.total_bytes
                        )
                    elif request.shared_memory or request.shared_memory_region:
                        raise InvalidRequest("shared_memory is answered by InitUnary, not by the Init stream")
                except Exception as error:  # noqa: BLE001 - each kind is mapped to its status in _abort
                    _abort(context, error)
                    return
                yield from self._answer(spec, region, context, call)
            finally:
                if region is not None:
                    region.close()

    def InitMany(
        self, request: pb.InitManyRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.InitManyResponse | bytes]:
        """Every tensor of the request in order on one stream, each message tagged with its tensor's index.
        All are validated before the first byte is sent; an error names the tensor (index and name)."""
        with self._call(context, "InitMany") as call:
            call.scheme = "many"
            if isinstance(request, MalformedRequest):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            count = len(request.tensors)
            if count > MAX_TENSORS_PER_CALL:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{count} tensors in one InitMany call; the limit is {MAX_TENSORS_PER_CALL} (max_tensors_per_call)",
                )
            specs = []
            for position, tensor in enumerate(request.tensors):
                label = _tensor_label(position, tensor.name)
                try:
                    if tensor.shared_memory or tensor.shared_memory_region:
                        raise InvalidRequest("shared_memory is answered by InitUnary, not by InitMany")
                    specs.append(validate_request(tensor, self._config, draw_seed))
                except Exception as error:  # noqa: BLE001 - each kind is mapped to its status in _abort
                    _abort(context, error, label)
                    return
            for position, spec in enumerate(specs):
                tag = tensor_tag(position)
                label = _tensor_label(position, spec.name)
                for message in self._answer(spec, None, context, call, label):
                    yield tag + serialize_response(message)
                if call.ended.is_set():
                    return

    @contextlib.contextmanager
    def _call(self, context: grpc.ServicerContext, method: str) -> Iterator[_Call]:
        """One RPC's bookkeeping: its end as an event, the in-flight gauge, the cancelled count, and its
        access-log line and metrics once it ends."""
        started = time.perf_counter()
        call = _Call(threading.Event())
        context.add_callback(call.ended.set)  # cancelled, expired, disconnected or finished
        self.inflight_requests.add(1)
        try:
            yield call
        finally:
            self.inflight_requests.add(-1)
            cancelled = not call.finished and call.ended.is_set()
            if cancelled:
                self.cancelled.add(1)
            code = context.code()
            seconds = time.perf_counter() - started
            status = code.name if code is not None else "CANCELLED" if cancelled else "OK"
            self._record(
                context,
                lambda: CallRecord(
                    method=method,
                    request_id=_request_id(context),
                    peer=context.peer(),
                    seconds=seconds,
                    code=status,
                    scheme=call.scheme,
                    shape=call.shape,
                    tensors=call.tensors,
                    bytes_sent=call.bytes_sent,
                    cache_hit=call.cache_hit,
                ),
            )

    def _answer(
        self,
        spec: InitSpec,
        region: RegionLease | None,
        context: grpc.ServicerContext,
        call: _Call,
        label: str = "",
    ) -> Iterator[pb.InitResponse | bytes]:
        """One validated tensor's messages (header, chunks or a shared-memory write, trailer), from the cache or
        a new production; ``label`` prefixes every error's message."""
        call.finished = False
        is_active = call.is_active
        try:
            lease = self.cache.acquire(
                spec.key,
                spec.total_bytes,
                lambda: self._cut(spec, is_active) if spec.slices else self._start(spec, is_active),
                cacheable=not spec.seed_drawn,
                generates=not spec.slices,
                is_active=is_active,
            )
        except Exception as error:  # noqa: BLE001 - each kind is mapped to its status in _abort
            _abort(context, error, label)
            return
        with lease:
            production = lease.production
            assert production.tensor is not None

            def ready(end: int) -> None:
                production.wait_for(end, is_active)

            if region is not None:
                messages = _write_shared(region, spec, lease.shared, production, ready)
            else:
                messages = encode_stream(
                    _header(spec, lease.shared),
                    tensor_bytes(production.tensor),
                    spec.chunk_bytes,
                    offset=spec.offset,
                    checksum=production.final_checksum,
                    block_crcs=production.block_crcs,
                    ready=ready,
                )
            try:
                for message in messages:
                    if call.ended.is_set():
                        return
                    yield message
            except Abandoned:
                return  # this call ended while waiting for bytes
            except Exception as error:  # noqa: BLE001 - the production failed part-way
                _abort(context, error, label)
                return
        call.answered(spec, lease.shared)
        call.finished = True

    def _record(self, context: grpc.ServicerContext, make_record: Callable[[], CallRecord]) -> None:
        """Count the call and write its access-log line once the RPC has ended, after its answer went out (gRPC
        runs termination callbacks on its polling thread), so a small call's answer does not wait for them.
        ``make_record()`` runs then, so the request id and the peer are read then too."""
        if not context.add_callback(partial(self._record_now, make_record)):
            self._record_now(make_record)  # the RPC has already ended

    def _record_now(self, make_record: Callable[[], CallRecord]) -> None:
        record = make_record()
        self.metrics.record(record)
        self.access_log.write(record)

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.ServerInfo:
        started = time.perf_counter()
        if isinstance(request, MalformedRequest):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        info = describe(self._config)
        info.stats.CopyFrom(self.stats())
        seconds = time.perf_counter() - started
        self._record(context, lambda: CallRecord("Describe", _request_id(context), context.peer(), seconds, "OK"))
        return info

    def stats(self) -> pb.ServerStats:
        entries, cached_bytes, inflight_bytes = self.cache.gauges()
        counters = self.cache.stats
        reused = self.answers.hits  # each one a cache hit that skipped the tensor cache
        return pb.ServerStats(
            requests=counters.requests + reused,
            generations=counters.generations,
            cache_hits=counters.hits + reused,
            single_flight_joins=counters.joins,
            cache_misses=counters.misses,
            cache_evictions=counters.evictions,
            cache_entries=entries,
            cache_bytes_used=cached_bytes,
            inflight_requests=self.inflight_requests.value,
            inflight_bytes=inflight_bytes,
            refused_inflight_bytes=counters.refused,
            cancelled=self.cancelled.value,
            abandoned_generations=counters.abandoned,
            unary_answers_reused=reused,
            slices_cut=counters.slices_cut,
            buffer_pool_bytes=self.buffers.free_bytes(),
        )


def add_to_server(servicer: InitServicer, server: grpc.Server) -> None:
    """Register the service as the generated code would, but parse requests here: malformed bytes are the
    client's error (INVALID_ARGUMENT), where grpc's own deserializer failure would be INTERNAL."""
    handlers = {
        "Init": grpc.unary_stream_rpc_method_handler(
            servicer.Init,
            request_deserializer=_parser(pb.InitRequest),
            response_serializer=serialize_response,
        ),
        "InitUnary": grpc.unary_unary_rpc_method_handler(
            servicer.InitUnary,
            request_deserializer=None,  # InitUnary parses the request itself, after looking it up in its memo
            response_serializer=None,  # InitUnary returns the serialized response
        ),
        "InitMany": grpc.unary_stream_rpc_method_handler(
            servicer.InitMany,
            request_deserializer=_parser(pb.InitManyRequest),
            response_serializer=None,  # InitMany yields serialized messages (initserve._wire.tensor_tag)
        ),
        "Describe": grpc.unary_unary_rpc_method_handler(
            servicer.Describe,
            request_deserializer=_parser(pb.DescribeRequest),
            response_serializer=pb.ServerInfo.SerializeToString,
        ),
    }
    service = pb.DESCRIPTOR.services_by_name["InitService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def describe(config: ServerConfig) -> pb.ServerInfo:
    """What this server is and accepts, all derived from the scheme and dtype tables and the config."""
    schemes = [
        pb.SchemeInfo(
            name=scheme.name,
            torch_function=scheme.torch_function,
            params=[
                pb.ParamInfo(
                    name=param.name,
                    type=param.kind.__name__,
                    required=param.required,
                    default="" if param.required else repr(param.default),
                )
                for param in scheme.params
            ],
            seeded=scheme.seeded,
            shapes=scheme.shapes,
            note=scheme.note,
        )
        for scheme in SCHEMES.values()
    ]
    return pb.ServerInfo(
        server_version=__version__,
        torch_version=torch.__version__,
        devices=[devices.device_info(device) for device in devices.available_devices()],
        schemes=schemes,
        dtypes=[entry.wire for entry in _dtypes.DTYPES],
        limits=pb.Limits(
            max_tensor_bytes=config.max_tensor_bytes,
            max_dims=config.max_dims,
            default_chunk_bytes=config.chunk_bytes,
            max_chunk_bytes=config.max_chunk_bytes,
            max_chunks_per_stream=MAX_CHUNKS_PER_STREAM,
            max_message_bytes=config.max_message_bytes,
            max_string_param_chars=MAX_STRING_PARAM_CHARS,
            max_inflight_bytes=config.max_inflight_bytes,
            cache_bytes=config.cache_bytes,
            max_unary_bytes=config.max_unary_bytes,
            max_tensors_per_call=MAX_TENSORS_PER_CALL,
            max_request_bytes=MAX_REQUEST_BYTES,
        ),
        shared_memory_socket=socket_path(config.shared_memory_socket),
        checksum_algorithm=CHECKSUM_ALGORITHM,
        api_version=API_VERSION,
        server_id=SERVER_ID,
    )

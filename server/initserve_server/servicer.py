"""The gRPC servicer: request → engine → messages, every error mapped to its status in one place.

Each call runs in a thread of gRPC's pool (``max_concurrent_calls`` of them for Init calls, and a reserve that
Describe and health checks always find). A stream whose client reads nothing waits in gRPC's send, on HTTP/2
flow control; the stall watch (``stalls``) cancels it after ``stall_seconds``, and its thread then releases its
lease and its message. Streams' outgoing messages are admitted against a budget of their own
(``engine.stream_buffer``), so slow readers hold bounded memory, counted.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import torch
from google.protobuf.message import DecodeError

from initserve_protocol import API_VERSION, dtypes
from initserve_protocol.checksum import CHECKSUM_ALGORITHM
from initserve_protocol.errors import (
    REFUSAL_KEY,
    TORCH_EXCEPTION_KEY,
    TORCH_EXCEPTION_TYPES,
    UNARY_TOO_LARGE,
    tensor_label,
)
from initserve_protocol.schemes import SCHEMES
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_protocol.wire import encode_unary, serialize_response, tensor_tag
from initserve_server import __version__, devices
from initserve_server.budget import OverBudget
from initserve_server.cache import Overloaded
from initserve_server.config import (
    MAX_CHUNKS_PER_STREAM,
    MAX_REQUEST_BYTES,
    MAX_STRING_PARAM_CHARS,
    MAX_TENSORS_PER_CALL,
    ServerConfig,
)
from initserve_server.engine import SERVER_ID, Engine, TooLargeForUnary, unary_spec
from initserve_server.generation_pool import PoolClosed
from initserve_server.logs import AccessLog
from initserve_server.metrics import CallRecord, Metrics
from initserve_server.production import Abandoned
from initserve_server.shared_memory import (
    SharedMemoryInvalid,
    SharedMemoryServer,
    SharedMemoryUnavailable,
    open_lease,
    socket_path,
)
from initserve_server.stalls import StallWatch
from initserve_server.validation import InvalidRequest, OffsetOutOfRange

MAX_DETAILS_CHARS = 2048  # an error's message: gRPC refuses trailers past its metadata limit (8 KiB by default)
log = logging.getLogger("initserve.server")


class TooManyCalls(Exception):
    """RESOURCE_EXHAUSTED: max_concurrent_calls Init calls are in progress."""


def _torch_exception_name(error: BaseException) -> str | None:
    """The allowlisted builtin exception type nearest to what torch raised (torch's subclasses included)."""
    for cls in type(error).__mro__:
        if cls.__name__ in TORCH_EXCEPTION_TYPES and getattr(builtins, cls.__name__, None) is cls:
            return cls.__name__
    return None


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


Status = tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]  # code, details, trailing metadata


class _Labelled(Exception):
    """An InitMany tensor's failure: the status of its error, the message prefixed with the tensor's label."""

    def __init__(self, error: BaseException, label: str) -> None:
        code, details, trailing = status_of(error)
        super().__init__(label + details)
        self.status = (code, label + details, trailing)


def status_of(error: BaseException) -> Status:
    """Every failure of a call becomes its status here, and only here."""
    if isinstance(error, _Labelled):
        return error.status
    if isinstance(error, Abandoned):
        return grpc.StatusCode.CANCELLED, str(error), ()
    if isinstance(error, (Overloaded, OverBudget)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), ()
    if isinstance(error, TooManyCalls):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), ()
    if isinstance(error, PoolClosed):
        return grpc.StatusCode.UNAVAILABLE, str(error), ()
    if isinstance(error, OffsetOutOfRange):
        return grpc.StatusCode.OUT_OF_RANGE, str(error), ()
    if isinstance(error, TooLargeForUnary):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error), ((REFUSAL_KEY, UNARY_TOO_LARGE),)
    if isinstance(error, (InvalidRequest, SharedMemoryInvalid)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error), ()
    if isinstance(error, SharedMemoryUnavailable):
        return grpc.StatusCode.FAILED_PRECONDITION, str(error), ((REFUSAL_KEY, error.refusal),)
    if isinstance(error, devices.DeviceUnavailable):
        return grpc.StatusCode.FAILED_PRECONDITION, str(error), ()
    if _is_out_of_memory(error):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"out of memory generating the tensor: {error}", ()
    torch_exception = _torch_exception_name(error)
    if torch_exception is not None:
        return grpc.StatusCode.INVALID_ARGUMENT, str(error), ((TORCH_EXCEPTION_KEY, torch_exception),)
    log.error("unexpected error generating a tensor", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error generating the tensor ({type(error).__name__})", ()


def _shown(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class _Call:
    """One RPC: ``ended`` is set when it is cancelled, expires, disconnects or finishes; the rest is what its
    access-log line and metrics will say."""

    method: str
    started: float
    ended: threading.Event = field(default_factory=threading.Event)
    code: str = "OK"
    scheme: str = ""
    shape: tuple[int, ...] = ()
    tensors: int = 0
    bytes_sent: int = 0
    cache_hit: bool = False

    def is_active(self) -> bool:
        return not self.ended.is_set()

    def answered(self, sent_bytes: int, cache_hit: bool) -> None:
        self.tensors += 1
        self.bytes_sent += sent_bytes
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
        except (DecodeError, RuntimeError, ValueError) as error:  # RuntimeError: recursion too deep
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


class InitServicer:
    def __init__(self, config: ServerConfig, engine: Engine, shared_memory: SharedMemoryServer | None = None) -> None:
        self._config = config
        self.engine = engine
        self.shared_memory = shared_memory  # the same-host transport's regions (started and closed by serve)
        self._lock = threading.Lock()
        self.inflight_requests = 0  # Init calls being served
        self.cancelled = 0
        self.stalled = 0
        self.refused_unauthenticated = 0
        self.stalls = StallWatch(config.stall_seconds, self._count_stall)
        # Last: registering reads the stats once (a collision check), so everything above must exist.
        self.metrics = Metrics(self.stats, lambda: [devices.device_info(d) for d in devices.available_devices()])
        engine.on_generated = self.metrics.generated
        self.access_log = AccessLog()

    def _count_stall(self) -> None:
        with self._lock:
            self.stalled += 1

    # --- calls ---

    @contextlib.contextmanager
    def _call(self, context: grpc.ServicerContext, method: str, *, limited: bool = True) -> Iterator[_Call]:
        """One RPC's bookkeeping: its end as an event, the concurrent-call limit and gauge (Init calls), how it
        ended, and its access line and metrics once it has ended. Whatever the body raises becomes the call's
        status here."""
        call = _Call(method, time.perf_counter())
        context.add_callback(call.ended.set)  # cancelled, expired, disconnected or finished
        admitted = False
        try:
            if limited:
                with self._lock:
                    if self.inflight_requests >= self._config.max_concurrent_calls:
                        raise TooManyCalls(
                            f"{self.inflight_requests} calls in progress; the limit is "
                            f"{self._config.max_concurrent_calls} (max_concurrent_calls); retry later"
                        )
                    self.inflight_requests += 1
                    admitted = True
            yield call
        except GeneratorExit:  # gRPC dropped the stream: cancelled, expired, disconnected or stalled
            call.code = "CANCELLED"
            raise
        except Exception as error:  # noqa: BLE001 - each kind is mapped to its status in status_of
            code, details, trailing = status_of(error)
            call.code = "CANCELLED" if call.ended.is_set() else code.name
            if trailing:
                context.set_trailing_metadata(trailing)
            context.abort(code, _shown(details, MAX_DETAILS_CHARS))  # raises: the call ends with this status
        finally:
            if admitted:
                with self._lock:
                    self.inflight_requests -= 1
            if call.code == "CANCELLED":
                with self._lock:
                    self.cancelled += 1
            self._record(context, call)

    def _stream(
        self, context: grpc.ServicerContext, call: _Call, chunk_bytes: int, messages: Iterator[bytes]
    ) -> Iterator[bytes]:
        """``messages`` handed to gRPC one by one, each watched for stalls, within the stream-buffer budget."""
        release = self.engine.stream_buffer(chunk_bytes)
        sending = self.stalls.add(context.cancel)
        try:
            for data in messages:
                sending.handed()
                yield data  # gRPC sends it (waiting on flow control) before asking for the next
                sending.taken()
        finally:
            self.stalls.remove(sending)
            release()

    def _spec(self, request: pb.InitRequest | MalformedRequest, call: _Call):  # noqa: ANN202
        if isinstance(request, MalformedRequest):
            raise InvalidRequest(request.message)
        spec = self.engine.validate(request)
        call.scheme, call.shape = spec.scheme.name, spec.shape
        return spec

    def Init(self, request: pb.InitRequest | MalformedRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        with self._call(context, "Init") as call:
            spec = self._spec(request, call)
            if request.shared_memory or request.shared_memory_region:
                raise InvalidRequest("shared_memory is answered by InitUnary, not by the Init stream")
            cache_hit = False

            def messages() -> Iterator[bytes]:
                nonlocal cache_hit
                for message in self.engine.answer(spec, call.is_active):
                    if isinstance(message, pb.InitResponse) and message.HasField("header"):
                        cache_hit = message.header.cache_hit
                    yield serialize_response(message)

            yield from self._stream(context, call, spec.chunk_bytes, messages())
            call.answered(spec.sent_bytes, cache_hit)

    def InitUnary(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        """The stream's messages in one serialized InitUnaryResponse (see initserve_protocol.wire.encode_unary).

        ``data`` is the request's bytes: a repeat of a request the cache served is answered from the memo."""
        kept = self.engine.answers.get(data)
        if kept is not None:
            answer, (scheme, shape, nbytes) = kept
            call = _Call("InitUnary", time.perf_counter(), scheme=scheme, shape=shape, tensors=1, bytes_sent=nbytes,
                         cache_hit=True)  # fmt: skip
            self._record(context, call)
            return answer
        request = _parse_init_request(data)
        with self._call(context, "InitUnary") as call:
            spec = self._spec(request, call)
            if request.shared_memory or request.shared_memory_region:
                with open_lease(
                    self.shared_memory, request.shared_memory, request.shared_memory_region, spec.total_bytes
                ) as region:
                    messages = self.engine.write_region(spec, region, call.is_active)
                call.answered(spec.sent_bytes, messages[0].header.cache_hit)
                return encode_unary(messages)
            spec = unary_spec(spec, self._config)
            messages = list(self.engine.answer(spec, call.is_active))
            answer = encode_unary(messages)
            call.answered(spec.sent_bytes, messages[0].header.cache_hit)
            if _reusable(messages):
                self.engine.answers.put(data, answer, (spec.scheme.name, spec.shape, spec.sent_bytes))
            return answer

    def InitMany(
        self, request: pb.InitManyRequest | MalformedRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Every tensor of the request in order on one stream, each message tagged with its tensor's index.
        All are validated before the first byte is sent; an error names the tensor (index and name)."""
        with self._call(context, "InitMany") as call:
            call.scheme = "many"
            if isinstance(request, MalformedRequest):
                raise InvalidRequest(request.message)
            count = len(request.tensors)
            if count > MAX_TENSORS_PER_CALL:
                raise InvalidRequest(
                    f"{count} tensors in one InitMany call; the limit is {MAX_TENSORS_PER_CALL} (max_tensors_per_call)"
                )
            specs = []
            for position, tensor in enumerate(request.tensors):
                try:
                    if tensor.shared_memory or tensor.shared_memory_region:
                        raise InvalidRequest("shared_memory is answered by InitUnary, not by InitMany")
                    specs.append(self.engine.validate(tensor))
                except Exception as error:  # noqa: BLE001 - re-raised with the tensor's label
                    raise _Labelled(error, tensor_label(position, tensor.name)) from None

            def messages() -> Iterator[bytes]:
                for position, spec in enumerate(specs):
                    tag = tensor_tag(position)
                    cache_hit = False
                    try:
                        for message in self.engine.answer(spec, call.is_active):
                            if isinstance(message, pb.InitResponse) and message.HasField("header"):
                                cache_hit = message.header.cache_hit
                            yield tag + serialize_response(message)
                    except Exception as error:  # noqa: BLE001 - re-raised with the tensor's label
                        raise _Labelled(error, tensor_label(position, spec.name)) from None
                    call.answered(spec.sent_bytes, cache_hit)

            chunk_bytes = max((spec.chunk_bytes for spec in specs), default=0)
            yield from self._stream(context, call, chunk_bytes, messages())

    def Describe(self, request: pb.DescribeRequest | MalformedRequest, context: grpc.ServicerContext) -> pb.ServerInfo:
        with self._call(context, "Describe", limited=False):
            if isinstance(request, MalformedRequest):
                raise InvalidRequest(request.message)
            info = describe(self._config)
            info.stats.CopyFrom(self.stats())
            return info

    # --- records and stats ---

    def refused(self, method: str, context: grpc.ServicerContext) -> None:
        """A call the token check refused (security's interceptor): counted, and logged like any call."""
        with self._lock:
            self.refused_unauthenticated += 1
        self._record(context, _Call(method.rsplit("/", 1)[-1], time.perf_counter(), code="UNAUTHENTICATED"))

    def _record(self, context: grpc.ServicerContext, call: _Call) -> None:
        """Count the call and write its access line once the RPC has ended, after its answer went out (gRPC
        runs termination callbacks on its polling thread), so a small call's answer does not wait for them."""
        seconds = time.perf_counter() - call.started

        def record() -> None:
            entry = CallRecord(
                method=call.method, request_id=_request_id(context), peer=context.peer(), seconds=seconds,
                code=call.code, scheme=call.scheme, shape=call.shape, tensors=call.tensors,
                bytes_sent=call.bytes_sent, cache_hit=call.cache_hit,
            )  # fmt: skip
            self.metrics.record(entry)
            self.access_log.write(entry)

        if not context.add_callback(record):
            record()  # the RPC has already ended

    def stats(self) -> pb.ServerStats:
        stats = self.engine.stats()
        stats.inflight_requests = self.inflight_requests
        stats.cancelled = self.cancelled
        stats.stalled_streams = self.stalled
        stats.refused_unauthenticated = self.refused_unauthenticated
        return stats


def add_to_server(servicer: InitServicer, server: grpc.Server) -> None:
    """Register the service as the generated code would, but parse requests here: malformed bytes are the
    client's error (INVALID_ARGUMENT), where grpc's own deserializer failure would be INTERNAL."""
    handlers = {
        "Init": grpc.unary_stream_rpc_method_handler(
            servicer.Init,
            request_deserializer=_parser(pb.InitRequest),
            response_serializer=None,  # Init yields serialized messages (chunks encoded by initserve_protocol.wire)
        ),
        "InitUnary": grpc.unary_unary_rpc_method_handler(
            servicer.InitUnary,
            request_deserializer=None,  # InitUnary parses the request itself, after looking it up in its memo
            response_serializer=None,  # InitUnary returns the serialized response
        ),
        "InitMany": grpc.unary_stream_rpc_method_handler(
            servicer.InitMany,
            request_deserializer=_parser(pb.InitManyRequest),
            response_serializer=None,  # InitMany yields serialized messages (initserve_protocol.wire.tensor_tag)
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
        dtypes=[entry.wire for entry in dtypes.DTYPES],
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
            max_work_seconds=config.max_work_seconds,
            stall_seconds=config.stall_seconds,
            workers=config.workers,
            max_concurrent_calls=config.max_concurrent_calls,
        ),
        shared_memory_socket=socket_path(config.shared_memory_socket),
        checksum_algorithm=CHECKSUM_ALGORITHM,
        api_version=API_VERSION,
        server_id=SERVER_ID,
    )

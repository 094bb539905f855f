"""The sync client's transport: one blocking gRPC channel and the calls over it, every RpcError mapped once."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from initserve._channel import SERVICE, ChannelConfig, ErrorMapper, Message, unary_too_large
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_protocol.v1 import initserve_pb2_grpc as pb_grpc
from initserve_protocol.wire import UnaryPart, decode_many_response, decode_response, decode_unary


class Transport:
    """One gRPC channel to an initserve target and the stub calls over it."""

    def __init__(self, config: ChannelConfig) -> None:
        self.target = config.target
        self._metadata = config.metadata
        options = list(config.options)
        if config.credentials is None:
            self._channel = grpc.insecure_channel(config.target, options=options)
        else:
            self._channel = grpc.secure_channel(config.target, config.credentials, options=options)
        self._errors = ErrorMapper(config)
        self._stub = pb_grpc.InitServiceStub(self._channel)
        # Init's chunks are decoded by hand, without copying their payloads (initserve_protocol.wire).
        self._init = self._channel.unary_stream(
            f"/{SERVICE}/Init",
            request_serializer=pb.InitRequest.SerializeToString,
            response_deserializer=decode_response,
            _registered_method=True,
        )
        self._init_unary = self._channel.unary_unary(
            f"/{SERVICE}/InitUnary",
            request_serializer=pb.InitRequest.SerializeToString,
            response_deserializer=decode_unary,  # the stream's messages, the chunk's payload not copied
            _registered_method=True,
        )
        self._init_many = self._channel.unary_stream(
            f"/{SERVICE}/InitMany",
            request_serializer=pb.InitManyRequest.SerializeToString,
            response_deserializer=decode_many_response,  # (tensor index, message), chunks not copied
            _registered_method=True,
        )
        self.unary_refused = False

    def init_stream(self, request: pb.InitRequest, timeout: float | None) -> Iterator[Message]:
        """The Init stream's messages; on early exit (an integrity error, say) the call is cancelled."""
        call = self._init(request, timeout=timeout, metadata=self._metadata)
        try:
            with self._errors.mapped():
                yield from call
        finally:
            call.cancel()  # a no-op once the stream has finished; otherwise it stops the server's work

    def init_many(self, request: pb.InitManyRequest, timeout: float | None) -> Iterator[tuple[int, Message]]:
        """The InitMany stream's (tensor index, message) pairs; on early exit the call is cancelled."""
        call = self._init_many(request, timeout=timeout, metadata=self._metadata)
        try:
            with self._errors.mapped():
                yield from call
        finally:
            call.cancel()

    def init(self, request: pb.InitRequest, timeout: float | None, *, unary: bool) -> Iterator[Message]:
        """The Init call's messages: from one InitUnary call when ``unary`` (and the server takes it), else a stream."""
        if unary and not self.unary_refused:
            return self.init_unary(request, timeout)
        return self.init_stream(request, timeout)

    def init_unary(self, request: pb.InitRequest, timeout: float | None) -> Iterator[Message]:
        """InitUnary's answer as the stream's messages; the Init stream where the server refuses the size."""
        try:
            return iter(self._init_unary(request, timeout=timeout, metadata=self._metadata))
        except grpc.RpcError as error:
            if unary_too_large(error):
                self.unary_refused = True  # this server's messages are smaller: stream from now on
                return self.init_stream(request, timeout)
            raise self._errors.error(error) from error

    def init_shared(self, request: pb.InitRequest, region_token: str, timeout: float | None) -> list[UnaryPart]:
        """InitUnary asked to fill the registered shared-memory region ``region_token``: its header and trailer (a
        chunk, too, if the server sent one: the caller refuses it)."""
        shared = pb.InitRequest()
        shared.CopyFrom(request)
        shared.shared_memory_region = region_token
        with self._errors.mapped():
            return self._init_unary(shared, timeout=timeout, metadata=self._metadata)

    def describe(self, timeout: float | None) -> pb.ServerInfo:
        with self._errors.mapped():
            return self._stub.Describe(pb.DescribeRequest(), timeout=timeout, metadata=self._metadata)

    def close(self) -> None:
        self._channel.close()

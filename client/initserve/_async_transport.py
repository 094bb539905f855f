"""The asyncio client's transport: one grpc.aio channel and the calls over it, every RpcError mapped as the sync
transport maps it (``initserve._channel``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import grpc.aio

from initserve._channel import SERVICE, ChannelConfig, ErrorMapper, Message, unary_too_large
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_protocol.wire import decode_many_response, decode_response, decode_unary


class AsyncTransport:
    """One grpc.aio channel to an initserve target; made in the event loop that uses it."""

    def __init__(self, config: ChannelConfig) -> None:
        self.target = config.target
        self._metadata = config.metadata
        options = list(config.options)
        if config.credentials is None:
            self._channel = grpc.aio.insecure_channel(config.target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(config.target, config.credentials, options=options)
        self._errors = ErrorMapper(config)
        # The same hand-written decoders as the sync transport: chunks' payloads are not copied.
        self._init = self._channel.unary_stream(
            f"/{SERVICE}/Init",
            request_serializer=pb.InitRequest.SerializeToString,
            response_deserializer=decode_response,
        )
        self._init_unary = self._channel.unary_unary(
            f"/{SERVICE}/InitUnary",
            request_serializer=pb.InitRequest.SerializeToString,
            response_deserializer=decode_unary,
        )
        self._init_many = self._channel.unary_stream(
            f"/{SERVICE}/InitMany",
            request_serializer=pb.InitManyRequest.SerializeToString,
            response_deserializer=decode_many_response,
        )
        self._describe = self._channel.unary_unary(
            f"/{SERVICE}/Describe",
            request_serializer=pb.DescribeRequest.SerializeToString,
            response_deserializer=pb.ServerInfo.FromString,
        )
        self.unary_refused = False

    async def _error(self, error: grpc.RpcError) -> Exception:
        """The SDK's exception for ``error``; a probe of the server's protocol, if one is due, runs in a thread."""
        if self._errors.needs_probe(error):
            return await asyncio.to_thread(self._errors.error, error)
        return self._errors.error(error)

    async def init_stream(self, request: pb.InitRequest, timeout: float | None) -> AsyncIterator[Message]:
        """The Init stream's messages; on early exit the call is cancelled."""
        call = self._init(request, timeout=timeout, metadata=self._metadata)
        try:
            async for message in call:
                yield message
        except grpc.RpcError as error:
            raise await self._error(error) from error
        finally:
            call.cancel()  # a no-op once the stream has finished; otherwise it stops the server's work

    async def init_many(self, request: pb.InitManyRequest, timeout: float | None) -> AsyncIterator[tuple[int, Message]]:
        """The InitMany stream's (tensor index, message) pairs; on early exit the call is cancelled."""
        call = self._init_many(request, timeout=timeout, metadata=self._metadata)
        try:
            async for pair in call:
                yield pair
        except grpc.RpcError as error:
            raise await self._error(error) from error
        finally:
            call.cancel()

    async def init(self, request: pb.InitRequest, timeout: float | None, *, unary: bool) -> AsyncIterator[Message]:
        """The Init call's messages: from one InitUnary call when ``unary`` (and the server takes it), else a stream."""
        if unary and not self.unary_refused:
            try:
                parts = await self._init_unary(request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as error:
                if not unary_too_large(error):
                    raise await self._error(error) from error
                self.unary_refused = True  # this server's messages are smaller: stream from now on
            else:
                for part in parts:
                    yield part
                return
        async for message in self.init_stream(request, timeout):
            yield message

    async def describe(self, timeout: float | None) -> pb.ServerInfo:
        try:
            return await self._describe(pb.DescribeRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise await self._error(error) from error

    async def close(self) -> None:
        await self._channel.close()

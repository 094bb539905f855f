"""The client transport: the channel, its options and credentials, and every RpcError turned into an SDK error."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from initserve._errors import from_grpc_error
from initserve.v1 import initserve_pb2 as pb
from initserve.v1 import initserve_pb2_grpc as pb_grpc

# Large enough for any chunk a server sends (its limit defaults to 4 MiB); requests themselves are tiny.
DEFAULT_MAX_RECEIVE_MESSAGE_BYTES = 64 << 20


class Transport:
    """One gRPC channel to an initserve target and the stub calls over it."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        max_receive_message_bytes: int = DEFAULT_MAX_RECEIVE_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        channel_options = [("grpc.max_receive_message_length", max_receive_message_bytes), *options]
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        self._stub = pb_grpc.InitServiceStub(self._channel)

    def init_stream(self, request: pb.InitRequest, timeout: float | None) -> Iterator[pb.InitResponse]:
        """The Init stream's messages; on early exit (an integrity error, say) the call is cancelled."""
        call = self._stub.Init(request, timeout=timeout)
        try:
            yield from call
        except grpc.RpcError as error:
            raise from_grpc_error(error) from error
        finally:
            call.cancel()  # a no-op once the stream has finished; otherwise it stops the server's work

    def describe(self, timeout: float | None) -> pb.ServerInfo:
        try:
            return self._stub.Describe(pb.DescribeRequest(), timeout=timeout)
        except grpc.RpcError as error:
            raise from_grpc_error(error) from error

    def close(self) -> None:
        self._channel.close()

"""Reference ceilings for the benchmark: minimal grpcio servers and raw TCP over loopback, with no tensor work.

Each runs as its own process (``python bench/ceilings.py grpc|tcp --port 0`` prints ``ceiling listening on
HOST:PORT``) so it competes for the same cores as initserve does. The client halves measure one transfer each:

- ``Stream``: the naive server-stream of 1 MiB protobuf ``BytesValue`` chunks, default (de)serializers: a
  new message per chunk from one preallocated ``bytes`` (no tensor work, no slicing); the client iterates and
  sums ``len(message.value)``. ``RawStream``: the same bytes with identity serializers (no protobuf at all).
- ``Unary``: one ``BytesValue`` of the requested size, the floor of any small request.
- TCP: ``sendall`` of the requested bytes from a preallocated buffer, ``recv_into`` a preallocated one.

Payloads are a repeating 0..255 pattern in touched memory: never untouched zero pages, which the kernel would
serve from one cached page.
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
from google.protobuf import wrappers_pb2

SERVICE = "bench.Ceiling"
STREAM_CHUNK_BYTES = 1 << 20  # the naive stream's message size
MAX_MESSAGE_BYTES = 64 << 20
READY_PREFIX = "ceiling listening on "
LENGTH = struct.Struct("<Q")  # TCP request: the number of bytes wanted
PATTERN = bytes(range(256))
PAGE_BYTES = 4096


def pattern(nbytes: int) -> bytes:
    """``nbytes`` of the repeating 0..255 pattern."""
    whole, rest = divmod(nbytes, len(PATTERN))
    return PATTERN * whole + PATTERN[:rest]


# -- servers -----------------------------------------------------------------------------------------------------


class _Handlers:
    """The three gRPC methods over payloads built once: no tensor, no slicing, no checksum."""

    def __init__(self) -> None:
        self._chunk = pattern(STREAM_CHUNK_BYTES)
        self._unary_messages: dict[int, wrappers_pb2.BytesValue] = {}
        self._lock = threading.Lock()

    def _chunk_sizes(self, total_bytes: int) -> Iterator[int]:
        for start in range(0, total_bytes, STREAM_CHUNK_BYTES):
            yield min(STREAM_CHUNK_BYTES, total_bytes - start)

    def stream(self, request: wrappers_pb2.UInt64Value, context: grpc.ServicerContext) -> Iterator:
        for size in self._chunk_sizes(request.value):
            yield wrappers_pb2.BytesValue(value=self._chunk if size == STREAM_CHUNK_BYTES else self._chunk[:size])

    def raw_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        total_bytes = wrappers_pb2.UInt64Value.FromString(request).value
        for size in self._chunk_sizes(total_bytes):
            yield self._chunk if size == STREAM_CHUNK_BYTES else self._chunk[:size]

    def unary(self, request: wrappers_pb2.UInt64Value, context: grpc.ServicerContext) -> wrappers_pb2.BytesValue:
        with self._lock:
            message = self._unary_messages.get(request.value)
            if message is None:
                message = self._unary_messages[request.value] = wrappers_pb2.BytesValue(value=pattern(request.value))
        return message


def serve_grpc(port: int, workers: int) -> grpc.Server:
    handlers = _Handlers()
    methods = {
        "Stream": grpc.unary_stream_rpc_method_handler(
            handlers.stream,
            request_deserializer=wrappers_pb2.UInt64Value.FromString,
            response_serializer=wrappers_pb2.BytesValue.SerializeToString,
        ),
        "RawStream": grpc.unary_stream_rpc_method_handler(handlers.raw_stream),  # identity both ways
        "Unary": grpc.unary_unary_rpc_method_handler(
            handlers.unary,
            request_deserializer=wrappers_pb2.UInt64Value.FromString,
            response_serializer=wrappers_pb2.BytesValue.SerializeToString,
        ),
    }
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"{READY_PREFIX}127.0.0.1:{bound}", flush=True)
    return server


def _serve_tcp_connection(connection: socket.socket, payload: memoryview) -> None:
    with connection:
        header = bytearray(LENGTH.size)
        while True:
            view, got = memoryview(header), 0
            while got < LENGTH.size:
                received = connection.recv_into(view[got:])
                if not received:
                    return
                got += received
            (nbytes,) = LENGTH.unpack(header)
            if nbytes > len(payload):
                return
            connection.sendall(payload[:nbytes])


def serve_tcp(port: int, max_bytes: int) -> None:
    payload = memoryview(pattern(max_bytes))
    listener = socket.create_server(("127.0.0.1", port))
    print(f"{READY_PREFIX}127.0.0.1:{listener.getsockname()[1]}", flush=True)
    while True:
        connection, _ = listener.accept()
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_serve_tcp_connection, args=(connection, payload), daemon=True).start()


def main() -> int:
    parser = argparse.ArgumentParser(description="A reference-ceiling server for bench/run.py.")
    parser.add_argument("kind", choices=["grpc", "tcp"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--workers", type=int, default=16, help="gRPC threads (initserve's default)")
    parser.add_argument("--max-bytes", type=int, default=1 << 30, help="largest TCP transfer (preallocated)")
    args = parser.parse_args()
    if args.kind == "tcp":
        serve_tcp(args.port, args.max_bytes)
    else:
        server = serve_grpc(args.port, args.workers)
        server.wait_for_termination()
    return 0


# -- clients -----------------------------------------------------------------------------------------------------


class GrpcCeilingClient:
    """Calls the gRPC ceiling server; each method returns the payload bytes received (the caller checks it)."""

    def __init__(self, target: str) -> None:
        self._channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        self._stream = self._channel.unary_stream(
            f"/{SERVICE}/Stream",
            request_serializer=wrappers_pb2.UInt64Value.SerializeToString,
            response_deserializer=wrappers_pb2.BytesValue.FromString,
        )
        self._raw_stream = self._channel.unary_stream(
            f"/{SERVICE}/RawStream", request_serializer=wrappers_pb2.UInt64Value.SerializeToString
        )
        self._unary = self._channel.unary_unary(
            f"/{SERVICE}/Unary",
            request_serializer=wrappers_pb2.UInt64Value.SerializeToString,
            response_deserializer=wrappers_pb2.BytesValue.FromString,
        )

    def stream(self, nbytes: int) -> int:
        return sum(len(message.value) for message in self._stream(wrappers_pb2.UInt64Value(value=nbytes)))

    def raw_stream(self, nbytes: int) -> int:
        return sum(len(data) for data in self._raw_stream(wrappers_pb2.UInt64Value(value=nbytes)))

    def unary(self, nbytes: int) -> int:
        return len(self._unary(wrappers_pb2.UInt64Value(value=nbytes)).value)

    def close(self) -> None:
        self._channel.close()


class TcpCeilingClient:
    """One loopback connection to the TCP ceiling server, receiving into a preallocated buffer."""

    def __init__(self, port: int) -> None:
        self._socket = socket.create_connection(("127.0.0.1", port))
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = memoryview(bytearray())

    def prepare(self, nbytes: int) -> None:
        """Allocate and touch the receive buffer outside the timed region."""
        buffer = bytearray(nbytes)
        buffer[::PAGE_BYTES] = b"\xff" * len(range(0, nbytes, PAGE_BYTES))  # fault every page in now
        self.buffer = memoryview(buffer)

    def fetch(self, nbytes: int) -> int:
        self._socket.sendall(LENGTH.pack(nbytes))
        view, got = self.buffer[:nbytes], 0
        while got < nbytes:
            received = self._socket.recv_into(view[got:])
            if not received:
                break
            got += received
        return got

    def payload_matches(self, nbytes: int) -> bool:
        """Whether the last transfer delivered the pattern (checked outside the timed region)."""
        block = pattern(STREAM_CHUNK_BYTES)  # the pattern repeats every 256 bytes, so every block starts alike
        # bytes == bytes is one memcmp; memoryview == bytes compares item by item, ~7x slower
        return all(
            bytes(self.buffer[start : start + STREAM_CHUNK_BYTES]) == block[: min(STREAM_CHUNK_BYTES, nbytes - start)]
            for start in range(0, nbytes, STREAM_CHUNK_BYTES)
        )

    def close(self) -> None:
        self.buffer = memoryview(bytearray())
        self._socket.close()


if __name__ == "__main__":
    sys.exit(main())

"""The engine: a validated, costed request → a lease on its tensor → the messages of its answer. No gRPC here.

What it owns, and what bounds each:
- **validation and the cost model**: a request becomes an :class:`InitSpec`, or is refused (``validation``,
  ``costs``: its estimated work against ``max_work_seconds``), before anything is admitted;
- **the tensor cache and the in-flight budget** (``cache``): a tensor and its scheme's working memory are
  admitted together, and counted until released;
- **the generation pool** (``generation_pool``): ``workers`` threads, and a lane for light generations so a
  small request never waits behind heavy ones; a generation nobody wants is cancelled, queued or running.

The servicer (``servicer``) turns gRPC requests into calls on it and its messages into gRPC messages. The answer
of one tensor is an iterator run by the call's own thread: a header, chunks as their bytes become final (the
call's thread computes the CRCs of bytes it is the first to wait for), a trailer; ``is_active`` turning false
(the call ended) stops it within production.WAIT_POLL_SECONDS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator

import torch

from initserve_protocol.checksum import CHECKSUM_ALGORITHM
from initserve_protocol.codec import encode_chunk_at, seal_header, tensor_bytes
from initserve_protocol.portable import TORCH
from initserve_protocol.slices import index
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_server import __version__, costs, devices, torch_warnings
from initserve_server.answers import AnswerMemo
from initserve_server.budget import ByteBudget
from initserve_server.buffers import BufferPool
from initserve_server.cache import Lease, TensorCache
from initserve_server.config import MESSAGE_COPIES, STREAM_BUFFER_BYTES, ServerConfig
from initserve_server.generation_pool import GenerationPool
from initserve_server.initializers import Allocate, generate
from initserve_server.production import Abandoned, Production
from initserve_server.shared_memory import RegionLease
from initserve_server.spec import InitSpec
from initserve_server.validation import InvalidRequest, check_finite, validate_request

# Which replica served a stream: in every header and in Describe.
SERVER_ID = f"{socket.gethostname()}:{os.getpid()}"
DEVICE_COPY_PIECE_BYTES = 16 << 20  # one device-to-host copy: long enough that its call and sync cost vanish
IsActive = Callable[[], bool]  # whether the call that waits is still wanted (cancelled, expired, disconnected)


def draw_seed() -> int:
    """A fresh seed for a request that gave none; reported in the header so the result can be reproduced."""
    return secrets.randbits(64)


class TooLargeForUnary(InvalidRequest):
    """INVALID_ARGUMENT: the client streams the tensor instead (the refusal carries a marker it recognizes)."""


def unary_spec(spec: InitSpec, config: ServerConfig) -> InitSpec:
    """The spec of an InitUnary call: its bytes in one chunk, if they fit the unary limit."""
    size = spec.sent_bytes
    if size > config.max_unary_bytes:
        raise TooLargeForUnary(
            f"InitUnary answers at most {config.max_unary_bytes} bytes (max_unary_bytes); this request is "
            f"{size} bytes from its offset: use Init, which streams"
        )
    return dataclasses.replace(spec, chunk_bytes=max(size, 1))


def header(spec: InitSpec, cache_hit: bool) -> pb.Header:
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
            generator="" if spec.generator == TORCH else spec.generator,
        )
    )


def trailer(production: Production) -> pb.Trailer:
    """A finished production's trailer: its checksum, and the warnings torch gave while generating it."""
    return pb.Trailer(checksum=production.final_checksum(), warnings=production.warnings)


def produce(spec: InitSpec, production: Production, allocate: Allocate | None = None) -> None:
    """Generate the contract tensor for ``spec`` into ``production``, piece by piece where the scheme allows;
    ``allocate`` makes a CPU tensor's memory (see ``buffers``). Non-finite parameters torch accepted are refused
    as soon as torch has accepted them (``check_finite``), so wherever torch rejects them its error is the one."""

    def on_piece(tensor: torch.Tensor, final_bytes: int) -> None:
        if production.tensor is None:
            check_finite(spec)
            production.attach(tensor)
        production.advance(final_bytes)

    try:
        with torch_warnings.collecting(production.warnings):  # torch warns before it writes a byte
            tensor = generate(spec, on_piece, allocate=allocate, stop=production.check_cancelled)
        check_finite(spec)
        if production.tensor is None and tensor.device.type == "cpu":
            production.attach(tensor.contiguous())
        elif production.tensor is None:  # generated on a GPU: into pooled host memory, streamed as it lands
            host = allocate(tensor.shape, tensor.dtype) if allocate else torch.empty(tensor.shape, dtype=tensor.dtype)
            production.copy_from(tensor, host, DEVICE_COPY_PIECE_BYTES)
        del tensor
        production.finish()
    except BaseException as error:  # noqa: BLE001 - the streams waiting on it re-raise it
        production.fail(error)


class Engine:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.cache = TensorCache(config.cache_bytes, config.max_inflight_bytes)
        self.buffers = BufferPool(self.cache.spare_bytes)
        self.buffers.start_preallocating(config.preallocate_bytes)
        self.answers = AnswerMemo(config.answer_memo_bytes)
        self.stream_buffers = ByteBudget(STREAM_BUFFER_BYTES, "stream_buffer_bytes")
        self.pool = GenerationPool(config.workers)
        self.refused_work = 0
        self.on_generated: Callable[[str, str, float], None] = lambda scheme, device, seconds: None

    # --- requests ---

    def validate(self, request: pb.InitRequest) -> InitSpec:
        """The request as a spec, refused (InvalidRequest, devices.DeviceUnavailable, costs.WorkRefused) when
        it cannot be served or its generation would run past the cost model's limit."""
        spec = validate_request(request, self.config, draw_seed)
        try:
            costs.check(spec if spec.direct else spec.whole(), self.config.max_work_seconds)
        except costs.WorkRefused:
            self.refused_work += 1
            raise
        return spec

    def stream_buffer(self, chunk_bytes: int) -> Callable[[], None]:
        """Admit a stream's outgoing messages (budget.OverBudget past the limit); returns their release."""
        return self.stream_buffers.take(MESSAGE_COPIES * chunk_bytes, "this stream's messages need")

    def lease(self, spec: InitSpec) -> Lease:
        """A lease on the production of ``spec``'s bytes: cached, joined, or started now (cache.Overloaded when
        it does not fit the in-flight budget, generation_pool.PoolClosed when the server is stopping). A slice's
        new production is empty: the lease's holder cuts it (:meth:`answer`)."""
        if spec.slices and not spec.direct:
            return self.cache.acquire(
                spec.key, spec.total_bytes, lambda: Production(spec.total_bytes), cacheable=not spec.seed_drawn,
                generates=False,
            )  # fmt: skip
        cost = costs.estimate(spec)
        return self.cache.acquire(
            spec.key, spec.total_bytes, lambda: self._start(spec, cost), working_bytes=cost.working_bytes,
            cacheable=not spec.seed_drawn,
        )  # fmt: skip

    def answer(self, spec: InitSpec, is_active: IsActive) -> Iterator[pb.InitResponse | bytes]:
        """One tensor's messages: header, chunks of ``spec.chunk_bytes`` from ``spec.offset`` (serialized, see
        initserve_protocol.wire), trailer. Raises what validation could not know: torch's error, a failed generation,
        production.Abandoned once ``is_active`` turns false."""
        with self._accepted(spec, is_active) as (production, shared):
            yield pb.InitResponse(header=header(spec, shared))
            payload = tensor_bytes(production.tensor)
            total = spec.total_bytes
            for start in range(spec.offset, 0 if spec.checksum_only else total, spec.chunk_bytes):
                end = min(start + spec.chunk_bytes, total)
                production.wait_for(end, is_active)
                yield encode_chunk_at(payload, start, end, production.block_crcs)
            production.wait_for(total, is_active)
            yield pb.InitResponse(trailer=trailer(production))

    def write_region(self, spec: InitSpec, region: RegionLease, is_active: IsActive) -> list[pb.InitResponse]:
        """The shared-memory answer: ``spec``'s bytes written into the client's region as they become final, then
        its header and trailer (the messages InitUnary answers with)."""
        with self._accepted(spec, is_active) as (production, shared):
            region.write(
                production.tensor, spec.offset, spec.total_bytes, lambda end: production.wait_for(end, is_active)
            )
            return [
                pb.InitResponse(header=header(spec, shared)),
                pb.InitResponse(trailer=trailer(production)),
            ]

    @contextlib.contextmanager
    def _accepted(self, spec: InitSpec, is_active: IsActive) -> Iterator[tuple[Production, bool]]:
        """Hold ``spec``'s production once torch has accepted the request (its first bytes are final, its tensor
        attached), and say whether it was shared (cached or joined); a slice's first holder cuts it first."""
        with self.lease(spec) as lease:
            production = lease.production
            if spec.slices and not spec.direct and not lease.shared:
                self._cut(spec, production, is_active)
            production.wait_started(is_active)
            assert production.tensor is not None
            yield production, lease.shared

    # --- generation ---

    def _start(self, spec: InitSpec, cost: costs.Cost) -> Production:
        """A production of ``spec``'s tensor, queued on the generation pool (the light lane too, if light)."""
        production = Production(spec.total_bytes)
        future = self.pool.submit(self._produce, spec, production, light=cost.light)
        production.on_cancel(future.cancel)  # a generation still queued when nobody wants it never starts
        future.add_done_callback(
            lambda done: done.cancelled() and production.fail(Abandoned("cancelled before its generation started"))
        )
        return production

    def _produce(self, spec: InitSpec, production: Production) -> None:
        started = time.perf_counter()
        produce(spec, production, self.buffers.empty)
        if production.error is None:
            self.on_generated(spec.scheme.name, str(spec.device), time.perf_counter() - started)

    def _cut(self, spec: InitSpec, production: Production, is_active: IsActive) -> None:
        """Fill a slice's new production: the whole tensor from the cache (generated there if need be), then the
        slice copied out, so every slice of one tensor shares one generation. Run by the slice's first requester;
        those that joined it wait on the production, and get its error if it fails."""
        try:
            whole = spec.whole()
            with self.lease(whole) as lease:
                lease.production.wait_for(whole.total_bytes, is_active)
                assert lease.production.tensor is not None
                piece = self.buffers.empty(spec.out_shape, spec.dtype.torch_dtype)
                piece.copy_(lease.production.tensor[index(spec.slices)])
                production.warnings.extend(lease.production.warnings)  # the whole tensor's call warned
            production.attach(piece)
            production.finish()
        except BaseException as error:
            production.fail(error)
            raise

    # --- the server's state ---

    def stats(self) -> pb.ServerStats:
        entries, cached_bytes, inflight_bytes = self.cache.gauges()
        counters = self.cache.stats
        reused = self.answers.hits  # each one a cache hit that skipped the tensor cache
        queued, running = self.pool.gauges()
        return pb.ServerStats(
            requests=counters.requests + reused,
            generations=counters.generations,
            cache_hits=counters.hits + reused,
            single_flight_joins=counters.joins,
            cache_misses=counters.misses,
            cache_evictions=counters.evictions,
            cache_entries=entries,
            cache_bytes_used=cached_bytes,
            inflight_bytes=inflight_bytes,
            refused_inflight_bytes=counters.refused,
            abandoned_generations=counters.abandoned,
            unary_answers_reused=reused,
            slices_cut=counters.slices_cut,
            buffer_pool_bytes=self.buffers.free_bytes(),
            refused_work=self.refused_work,
            queued_generations=queued,
            running_generations=running,
        )

    def close(self) -> int:
        """Start no more generations; the number still running (they end with their daemon threads)."""
        return self.pool.close()

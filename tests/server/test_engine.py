"""The engine without gRPC: exact answers, working memory admitted, generations that stop when nobody wants them.

Every generation here runs on the engine's real generation pool; the answers are decoded and compared byte for
byte with the contract's local reference.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest
import torch

from initserve._codec import StreamAssembler
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_protocol.wire import decode_response
from initserve_server import costs
from initserve_server.cache import Overloaded
from initserve_server.config import ServerConfig
from initserve_server.engine import Engine, produce
from initserve_server.production import Abandoned, Production
from initserve_server.validation import validate_request
from tests.conftest import reference, same_bytes

WAIT_SECONDS = 10.0


def request(scheme: str, shape: tuple[int, ...], seed: int = 3, **params: object) -> pb.InitRequest:
    message = pb.InitRequest(scheme=scheme, shape=shape, seed=seed)
    for name, value in params.items():
        setattr(message.params, name, value)
    return message


@pytest.fixture()
def engine() -> Engine:
    running = Engine(ServerConfig(cache_bytes=64 << 20, max_inflight_bytes=256 << 20, workers=2))
    yield running
    running.close()


def fetch(engine: Engine, message: pb.InitRequest) -> torch.Tensor:
    spec = engine.validate(message)
    messages = [decode_response(m) if isinstance(m, bytes) else m for m in engine.answer(spec, lambda: True)]
    assembler = StreamAssembler(expected_shape=spec.out_shape, expected_dtype=spec.dtype.torch_dtype)
    tensor, _ = assembler.consume(iter(messages))
    return tensor


@pytest.mark.parametrize(
    "scheme, shape, params",
    [
        ("normal", (1024, 1024), {}),
        ("trunc_normal", (300, 301), {"a": 0.5, "b": 0.6}),
        ("orthogonal", (96, 64), {}),
        ("sparse", (64, 32), {"sparsity": 0.25}),
        ("dirac", (8, 4, 3, 3), {"groups": 2}),
        ("sparse", (8, 2500), {"sparsity": 0.5}),  # more columns than one call of the compiled loop zeroes
    ],
)
def test_answers_are_the_contract_bytes(engine: Engine, scheme: str, shape: tuple[int, ...], params: dict) -> None:
    assert same_bytes(fetch(engine, request(scheme, shape, **params)), reference(scheme, shape, seed=3, **params))


def test_a_slice_is_cut_from_the_whole_tensor(engine: Engine) -> None:
    message = request("kaiming_uniform", (64, 48))
    message.slices.append(pb.Slice(dim=0, shard_index=1, shard_count=4))
    assert same_bytes(fetch(engine, message), reference("kaiming_uniform", (64, 48), seed=3)[16:32])
    assert engine.cache.stats.slices_cut == 1 and engine.cache.stats.generations == 1


def test_a_generation_is_admitted_with_its_working_memory(engine: Engine) -> None:
    """orthogonal 4096x2048 float32: a 32 MiB tensor whose QR needs more than 64 MiB beside it; a budget that
    holds the tensor but not both refuses it, naming both together."""
    spec = validate_request(request("orthogonal", (4096, 2048)), ServerConfig(), lambda: 0)
    needs = spec.total_bytes + costs.estimate(spec).working_bytes
    assert needs > 3 * spec.total_bytes
    small = Engine(ServerConfig(cache_bytes=0, max_inflight_bytes=needs - 1, workers=1))
    try:
        with pytest.raises(Overloaded, match=rf"this request needs {needs} bytes, more than the limit"):
            small.lease(small.validate(request("orthogonal", (4096, 2048))))
    finally:
        small.close()


def test_a_finished_production_is_freed_without_the_garbage_collector(engine: Engine) -> None:
    """No reference cycle keeps a tensor alive once its lease is released and it left the cache (a pool future's
    callback and the production's cancel hooks once made one: evicted tensors waited for gc)."""
    gc.disable()
    try:
        spec = engine.validate(request("normal", (256, 256), seed=11))
        spec = type(spec)(**{**spec.__dict__, "seed_drawn": True})  # not cacheable: let go at release
        with engine.lease(spec) as lease:
            production = lease.production
            production.wait_for(spec.total_bytes)
        freed = weakref.ref(production)
        del production, lease
        assert freed() is None
    finally:
        gc.enable()


def run_until_cancelled(scheme: str, shape: tuple[int, ...], **params: object) -> tuple[float, BaseException | None]:
    """Generate in a thread, cancel after 0.3 s; (seconds from the cancel to the generation's end, its error)."""
    spec = validate_request(request(scheme, shape, **params), ServerConfig(), lambda: 0)
    production = Production(spec.total_bytes)
    thread = threading.Thread(target=produce, args=(spec, production), daemon=True)
    thread.start()
    time.sleep(0.3)
    cancelled = time.monotonic()
    production.cancel()
    thread.join(WAIT_SECONDS)
    assert not thread.is_alive()
    return time.monotonic() - cancelled, production.error


@pytest.mark.parametrize(
    "scheme, shape, params",
    [
        ("sparse", (16, 1_000_000), {"sparsity": 0.1}),  # ~5 s of columns: stops between two batches of them
        ("trunc_normal", (1024,), {"a": 4.0, "b": 4000.0}),  # ~3 s of rejection rounds: stops between torch calls
        ("normal", (64 << 20,), {}),  # 256 MiB in 4 MiB pieces: stops at the next piece
    ],
)
def test_a_generation_nobody_wants_stops_at_its_next_stopping_point(scheme, shape, params) -> None:
    seconds, error = run_until_cancelled(scheme, shape, **params)
    assert isinstance(error, Abandoned), error
    assert seconds < 0.5

"""Generation in pieces and the production that streams read while it fills: same bytes as one torch call.

The server streams an uncached tensor while generating it (initserve_server.initializers.PIECEWISE_SCHEMES):
this file holds the evidence that a fill in pieces writes exactly what one call writes, for every such scheme
and dtype, with tails, small tensors and odd piece sizes, and that each reported prefix really is final.
"""

from __future__ import annotations

import threading

import pytest
import torch

from initserve_protocol.checksum import BLOCK_BYTES, BlockCrcs, tensor_checksum
from initserve_protocol.codec import tensor_bytes
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_server.config import ServerConfig
from initserve_server.engine import produce
from initserve_server.initializers import PIECEWISE_SCHEMES, generate, piece_bounds
from initserve_server.production import Abandoned, Production
from initserve_server.spec import InitSpec
from initserve_server.validation import validate_request
from tests.conftest import reference, same_bytes

DTYPES = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float64: pb.DTYPE_FLOAT64,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
}
PARAMS = {
    "normal": {"mean": 0.5, "std": 2.0},
    "uniform": {"a": -2.0, "b": 3.0},
    "xavier_uniform": {},
    "xavier_normal": {"gain": 1.5},
    "kaiming_uniform": {"a": 0.3},
    "kaiming_normal": {"mode": "fan_out", "nonlinearity": "relu"},
}
# 15 elements (under 16: one piece), exact multiples of 16, and tails of 1 to 15 elements
SHAPES = [(3, 5), (4, 4), (5, 7), (16, 3), (33, 17), (100, 101), (64, 64), (7, 1001)]


def spec_for(scheme: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 5) -> InitSpec:
    request = pb.InitRequest(scheme=scheme, shape=shape, dtype=DTYPES[dtype], seed=seed)
    for name, value in PARAMS.get(scheme, {}).items():
        setattr(request.params, name, value)
    return validate_request(request, ServerConfig(), lambda: 0)


def test_the_piecewise_table_is_the_schemes_that_end_in_one_fill() -> None:
    assert set(PARAMS) == PIECEWISE_SCHEMES


@pytest.mark.parametrize("numel, piece, expected", [
    (0, 16, []),
    (15, 16, [(0, 15)]),
    (16, 16, [(0, 16)]),
    (47, 16, [(0, 16), (16, 47)]),  # a 15-element remainder joins the piece before it
    (48, 16, [(0, 16), (16, 32), (32, 48)]),
    (40, 32, [(0, 40)]),
    (50, 32, [(0, 32), (32, 50)]),
    (100, 32, [(0, 32), (32, 64), (64, 100)]),
])  # fmt: skip
def test_piece_bounds(numel: int, piece: int, expected: list[tuple[int, int]]) -> None:
    assert piece_bounds(numel, piece) == expected


def test_piece_bounds_refuse_a_piece_that_is_not_a_multiple_of_16() -> None:
    with pytest.raises(ValueError, match="multiple of 16, got 24"):
        piece_bounds(100, 24)


def generate_in_pieces(spec: InitSpec, expected: torch.Tensor, piece_bytes: int) -> tuple[torch.Tensor, list[int]]:
    """Generate ``spec`` piece by piece; returns the tensor and the reported prefixes, each checked as final."""
    reports: list[int] = []

    def on_piece(tensor: torch.Tensor, final_bytes: int) -> None:
        done = final_bytes // tensor.element_size()
        assert same_bytes(tensor.reshape(-1)[:done], expected.reshape(-1)[:done]), f"prefix of {final_bytes} bytes"
        reports.append(final_bytes)

    return generate(spec, on_piece, piece_bytes=piece_bytes), reports


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("scheme", sorted(PIECEWISE_SCHEMES))
def test_a_fill_in_pieces_writes_the_bytes_of_one_call(scheme: str, dtype: torch.dtype) -> None:
    for shape in SHAPES:
        expected = reference(scheme, shape, dtype=dtype, seed=5, **PARAMS[scheme])
        itemsize = expected.element_size()
        for piece_elements in (16, 48, 160):
            actual, reports = generate_in_pieces(spec_for(scheme, shape, dtype), expected, piece_elements * itemsize)
            assert same_bytes(actual, expected), (shape, piece_elements)
            bounds = piece_bounds(expected.numel(), piece_elements)
            assert reports == [end * itemsize for _, end in bounds], (shape, piece_elements)


def test_other_schemes_are_generated_in_one_piece() -> None:
    reports: list[int] = []
    actual = generate(spec_for("orthogonal", (64, 64)), lambda tensor, final: reports.append(final))
    assert same_bytes(actual, reference("orthogonal", (64, 64), seed=5))
    assert reports == []  # the caller takes the finished tensor


def test_production_streams_a_prefix_before_the_tensor_is_finished() -> None:
    """A reader gets the first block while the producer is held after its first piece."""
    spec = spec_for("normal", (1024, 1024))  # 4 MiB: 4 pieces of 1 MiB
    production = Production(spec.total_bytes)
    first_piece_done = threading.Event()
    go_on = threading.Event()

    def on_piece(tensor: torch.Tensor, final_bytes: int) -> None:
        if production.tensor is None:
            production.attach(tensor)
        production.advance(final_bytes)
        if final_bytes == BLOCK_BYTES:
            first_piece_done.set()
            assert go_on.wait(10)

    def run() -> None:
        generate(spec, on_piece, piece_bytes=BLOCK_BYTES)
        production.finish()

    producer = threading.Thread(target=run)
    producer.start()
    try:
        production.wait_started()
        assert first_piece_done.wait(10)
        production.wait_for(BLOCK_BYTES)  # returns: the first block is final
        assert not production.done and len(production.block_crcs) == 1
        expected = reference("normal", (1024, 1024), seed=5, mean=0.5, std=2.0)
        assert same_bytes(production.tensor.reshape(-1)[: BLOCK_BYTES // 4], expected.reshape(-1)[: BLOCK_BYTES // 4])
        with pytest.raises(Abandoned):
            production.wait_for(2 * BLOCK_BYTES, is_active=lambda: False)  # not final yet, and the caller left
    finally:
        go_on.set()
        producer.join(10)
    production.wait_for(spec.total_bytes)
    assert same_bytes(production.tensor, expected)
    assert production.final_checksum() == tensor_checksum(tensor_bytes(expected))
    crcs = BlockCrcs()
    crcs.update(tensor_bytes(expected))
    assert production.block_crcs == crcs.finished()


class SummingRecorded(Production):
    """Records the thread that computes each span of CRCs."""

    def __init__(self, nbytes: int) -> None:
        super().__init__(nbytes)
        self.summed_in: list[str] = []

    def _sum(self, start: int, stop: int) -> None:
        self.summed_in.append(threading.current_thread().name)
        super()._sum(start, stop)


def test_a_reader_sums_the_written_bytes_it_waits_for_and_the_producer_sums_the_rest() -> None:
    """A CPU generation leaves its CRCs to the readers (its thread is the slow step): bytes the producer wrote are
    summed by the first reader that needs them, in the reader's thread; finish() sums what no reader did."""
    tensor = reference("normal", (3 * BLOCK_BYTES // 4 + 5,), seed=9)  # 3 blocks and 20 bytes
    nbytes = tensor.numel() * 4
    expected = BlockCrcs()
    expected.update(tensor_bytes(tensor))
    production = SummingRecorded(nbytes)
    production.attach(tensor)
    production.advance(2 * BLOCK_BYTES)
    assert production.block_crcs == []  # written, not summed: the producer left it to the readers
    reader = threading.Thread(target=production.wait_for, args=(2 * BLOCK_BYTES,), name="reader")
    reader.start()
    reader.join(10)
    assert production.summed_in == ["reader"] and production.block_crcs == expected.crcs[:2]
    production.advance(nbytes)
    assert production.block_crcs == expected.crcs[:2] and not production.done
    production.finish()  # no reader came for the rest
    assert production.summed_in == ["reader", threading.current_thread().name]
    assert production.block_crcs == expected.finished()
    assert production.final_checksum() == tensor_checksum(tensor_bytes(tensor))
    production.wait_for(nbytes)


def test_a_cancelled_production_stops_at_its_next_piece() -> None:
    spec = spec_for("uniform", (4096, 1024))  # 16 MiB: 16 pieces of 1 MiB
    production = Production(spec.total_bytes)
    pieces: list[int] = []

    def on_piece(tensor: torch.Tensor, final_bytes: int) -> None:
        pieces.append(final_bytes)
        if production.tensor is None:
            production.attach(tensor)
        production.advance(final_bytes)
        production.cancel()  # every stream went away after the first piece

    with pytest.raises(Abandoned):
        generate(spec, on_piece, piece_bytes=BLOCK_BYTES)
    assert pieces == [BLOCK_BYTES, 2 * BLOCK_BYTES]  # the piece in progress completes; no further one starts


class RecordingProduction(Production):
    def __init__(self, nbytes: int) -> None:
        super().__init__(nbytes)
        self.advanced: list[int] = []
        self.summed_now: list[bool] = []

    def advance(self, final_bytes: int, *, checksum_now: bool = False) -> None:
        self.advanced.append(final_bytes)
        self.summed_now.append(checksum_now)
        super().advance(final_bytes, checksum_now=checksum_now)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_copy_from_advances_piece_by_piece_and_ends_with_the_sources_bytes(dtype: torch.dtype) -> None:
    """The GPU path's copy to host (here from a CPU source, the same code): every piece final as it lands."""
    source = reference("normal", (1000, 333), dtype=dtype, seed=3)
    nbytes = source.numel() * source.element_size()
    production = RecordingProduction(nbytes)
    host = torch.empty(source.shape, dtype=dtype)
    piece = (1 << 18) + 6  # not a multiple of any element size: pieces round down to whole elements
    production.copy_from(source.t().contiguous().t(), host, piece)  # a non-contiguous source is read in order
    step = piece // source.element_size() * source.element_size()
    assert production.advanced == [*range(step, nbytes, step), nbytes]
    # the copy sums each piece as it lands, with no reader: its streams, not the copy, are the slow side
    assert all(production.summed_now) and len(production.block_crcs) == nbytes // BLOCK_BYTES
    production.finish()
    assert production.tensor is host and same_bytes(host, source)
    assert production.final_checksum() == tensor_checksum(tensor_bytes(source))


def test_copy_from_stops_after_the_piece_in_progress_once_abandoned() -> None:
    source = reference("uniform", (4096, 1024), seed=3)  # 16 MiB: 16 pieces of 1 MiB
    production = Production(source.numel() * 4)
    production.cancel()
    with pytest.raises(Abandoned):
        production.copy_from(source, torch.zeros(source.shape), BLOCK_BYTES)
    assert production.tensor.reshape(-1)[: BLOCK_BYTES // 4].equal(source.reshape(-1)[: BLOCK_BYTES // 4])
    assert not production.tensor.reshape(-1)[BLOCK_BYTES // 4 :].any()


def test_produce_reports_torchs_error_to_every_reader() -> None:
    spec = spec_for("kaiming_normal", (7,))  # torch: fewer than 2 dimensions
    production = Production(spec.total_bytes)
    produce(spec, production)
    with pytest.raises(ValueError, match="Fan in and fan out can not be computed for tensor with fewer than 2"):
        production.wait_started()
    with pytest.raises(ValueError):
        production.wait_for(spec.total_bytes)
    assert production.done and production.checksum is None


def test_a_finished_production_of_zero_bytes() -> None:
    production = Production.finished(torch.empty(0, 3))
    production.wait_started()
    production.wait_for(0)
    assert production.final_checksum() == tensor_checksum(b"")


def test_a_tensor_of_many_pieces_is_exact_over_the_wire_for_its_generator_and_a_joiner(server) -> None:
    """Uncached, 9 MiB of float32 (three 4 MiB pieces, a tail of 15 elements) in ragged chunks, fetched by two
    clients at once: one generates, the other joins and streams along; both get the contract bytes."""
    shape = (2305, 1025)  # 2,362,625 elements: 15 past a multiple of 16
    expected = reference("kaiming_normal", shape, seed=77, mode="fan_out")
    results: dict[str, torch.Tensor] = {}

    def fetch(name: str) -> None:
        with server.client() as client:
            results[name] = client.fetch(
                shape, "kaiming_normal", seed=77, mode="fan_out", chunk_bytes=(1 << 20) + 3
            ).tensor

    threads = [threading.Thread(target=fetch, args=(name,)) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert set(results) == {"first", "second"}
    assert same_bytes(results["first"], expected) and same_bytes(results["second"], expected)

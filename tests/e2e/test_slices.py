"""Slices: the bytes of full[slices] of the whole contract tensor, shards split as torch.chunk splits."""

from __future__ import annotations

import grpc
import pytest
import torch

import initserve
from initserve import Range, Shard
from initserve_protocol.slices import index, resolve
from initserve_protocol.v1 import initserve_pb2 as pb
from tests.conftest import reference, same_bytes

SEED = 5840


@pytest.mark.parametrize("size", [0, 1, 5, 7, 8, 16, 17, 100])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 8])
def test_shards_split_as_torch_chunk_does(size: int, count: int) -> None:
    full = torch.arange(size)
    chunks = [piece.tolist() for piece in torch.chunk(full, count)] if size else []
    shards = []
    for shard in range(count):
        start, length = initserve.shard_bounds(size, shard, count)
        shards.append(full[start : start + length].tolist())
    # torch.chunk may return fewer pieces than asked; the missing shards are empty
    assert shards == chunks + [[]] * (count - len(chunks))


def test_slices_are_checked_against_the_shape() -> None:
    shape = (8, 6)
    assert resolve(shape, [Shard(dim=-1, index=1, count=4), Range(0, 2, 3)]) == ((0, 2, 3), (1, 2, 2))
    cases = [
        ([Range(2, 0, 1)], ValueError, "slices[0]: dim 2 is out of range for a tensor of 2 dims"),
        ([Range(0, 0, 1), Shard(-2, 0, 2)], ValueError, "slices[1]: dim 0 is sliced twice"),
        ([Range(1, 4, 3)], ValueError, "slices[0]: range [4, 7) does not fit dim 1 of size 6"),
        ([Range(1, -1, 2)], ValueError, "slices[0]: range [-1, 1) does not fit dim 1 of size 6"),
        ([Shard(0, 4, 4)], ValueError, "slices[0]: shard 4 of 4 does not exist (0 <= index < count)"),
        ([Shard(0, 0, 0)], ValueError, "slices[0]: shard 0 of 0 does not exist (0 <= index < count)"),
        ([(0, 1, 2)], TypeError, "slices[0] must be an initserve.Range or initserve.Shard, not tuple"),
        ([Range(0, 1.0, 2)], TypeError, "slices[0].start must be an int, not float"),
    ]
    for slices, error, message in cases:
        with pytest.raises(error) as raised:
            resolve(shape, slices)
        assert str(raised.value) == message


@pytest.mark.parametrize(
    ("scheme", "shape", "dim", "count", "params"),
    [
        ("kaiming_uniform", (96, 40), 0, 4, {"a": 5**0.5}),  # a Linear's weight, row-parallel
        ("kaiming_uniform", (96, 40), 1, 4, {"a": 5**0.5}),  # column-parallel
        ("xavier_normal", (10, 7, 3, 3), 1, 3, {}),  # a conv weight over an uneven dim: shards of 3, 3, 1
        ("normal", (5,), 0, 8, {"std": 0.02}),  # more shards than elements: the last ones are empty
        ("orthogonal", (33, 20), 0, 2, {}),
        ("trunc_normal", (4, 6, 9), 2, 3, {"std": 0.02}),
    ],
)
def test_concatenated_shards_are_the_whole_tensor(client: initserve.Client, scheme, shape, dim, count, params) -> None:
    whole = client.fetch(shape, scheme, seed=SEED, **params).tensor
    assert same_bytes(whole, reference(scheme, shape, seed=SEED, **params))
    shards = []
    for shard in range(count):
        result = client.fetch(shape, scheme, seed=SEED, slices=[Shard(dim, shard, count)], **params)
        start, length = initserve.shard_bounds(shape[dim], shard, count)
        assert tuple(result.tensor.shape) == shape[:dim] + (length,) + shape[dim + 1 :]
        assert list(result.header.full_shape) == list(shape)
        assert [(s.dim, s.start, s.length) for s in result.header.slices] == [(dim, start, length)]
        shards.append(result.tensor)
    assert same_bytes(torch.cat(shards, dim=dim), whole)


def test_a_slice_over_several_dims_is_full_of_that_index(client: initserve.Client) -> None:
    shape = (12, 10, 6)
    slices = [Range(0, 3, 5), Shard(2, 1, 2), Range(1, 9, 1)]
    result = client.fetch(shape, "kaiming_normal", seed=SEED, slices=slices, mode="fan_out")
    expected = reference("kaiming_normal", shape, seed=SEED, mode="fan_out")[3:8, 9:10, 3:6]
    assert tuple(result.tensor.shape) == (5, 1, 3) and same_bytes(result.tensor, expected)


def test_fans_come_from_the_whole_shape(client: initserve.Client) -> None:
    """A tensor-parallel shard is the whole tensor's slice, not kaiming on the shard's own (smaller) fans."""
    shape = (64, 256)
    shard = client.fetch(shape, "kaiming_uniform", seed=SEED, slices=[Shard(1, 0, 4)]).tensor
    own_fans = torch.nn.init.kaiming_uniform_(torch.empty(64, 64), generator=torch.Generator().manual_seed(SEED))
    assert same_bytes(shard, reference("kaiming_uniform", shape, seed=SEED)[:, :64])
    bound = 2**0.5 * (3 / 256) ** 0.5  # gain(relu-like a=0) * sqrt(3 / fan_in), fan_in of the whole: 256
    assert shard.abs().max() <= bound < own_fans.abs().max()  # a shard's own fan_in (64) doubles the bound


def test_every_shard_of_a_tensor_shares_one_generation(server, client: initserve.Client) -> None:
    shape, seed = (40, 30), SEED + 1
    before = client.describe().stats
    for shard in range(3):
        client.fetch(shape, "normal", seed=seed, slices=[Shard(0, shard, 3)], chunk_bytes=1000)  # streamed
    client.fetch(shape, "normal", seed=seed)
    after = client.describe().stats
    # one generation of the whole tensor; each slice is a copy cut from it
    assert (after.generations, after.slices_cut) == (before.generations + 1, before.slices_cut + 3)


def raw_stream(server, request: pb.InitRequest) -> list[pb.InitResponse]:
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_stream(
            "/initserve.v1.InitService/Init",
            request_serializer=pb.InitRequest.SerializeToString,
            response_deserializer=pb.InitResponse.FromString,
        )
        return list(call(request, timeout=30))


def test_the_wire_takes_shards_and_reports_ranges(server) -> None:
    shape = (10, 9)
    request = pb.InitRequest(scheme="normal", shape=shape, seed=SEED, chunk_bytes=16, offset=8)
    request.slices.add(dim=1, shard_index=2, shard_count=4)  # 9 columns in shards of 3: columns 6..8
    messages = raw_stream(server, request)
    header = messages[0].header
    assert list(header.shape) == [10, 3] and header.total_bytes == 120 and header.offset == 8
    assert [(s.dim, s.start, s.length, s.shard_count) for s in header.slices] == [(1, 6, 3, 0)]
    data = b"".join(m.chunk.data for m in messages[1:-1])
    expected = reference("normal", shape, seed=SEED)[index(((1, 6, 3),))].contiguous().numpy().tobytes()
    assert data == expected[8:]  # from the offset, within the slice's bytes
    assert messages[-1].trailer.checksum == initserve.tensor_checksum(expected)


@pytest.mark.parametrize(
    ("part", "message"),
    [
        (
            {"dim": 0, "start": 1, "shard_count": 2},
            "slices[0] sets both a range (start, length) and a shard (shard_count)",
        ),
        ({"dim": 3, "length": 1}, "slices[0]: dim 3 is out of range for a tensor of 2 dims"),
        ({"dim": 0, "start": 9, "length": 2}, "slices[0]: range [9, 11) does not fit dim 0 of size 10"),
        ({"dim": 1, "shard_index": 5, "shard_count": 5}, "slices[0]: shard 5 of 5 does not exist (0 <= index < count)"),
    ],
)
def test_slices_that_do_not_fit_are_invalid_arguments(server, part: dict, message: str) -> None:
    request = pb.InitRequest(scheme="normal", shape=(10, 9), seed=SEED)
    request.slices.add(**part)
    with pytest.raises(grpc.RpcError) as raised:
        raw_stream(server, request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == message


def test_a_slice_through_shared_memory(server) -> None:
    with server.client(shared_memory=True) as client:
        result = client.fetch((20, 8), "uniform", seed=SEED, slices=[Shard(0, 1, 2)], a=-2.0, b=2.0)
    assert same_bytes(result.tensor, reference("uniform", (20, 8), seed=SEED, a=-2.0, b=2.0)[10:])

"""InitMany: many named tensors on one stream, in order, each verified as its own Init stream would be."""

from __future__ import annotations

import grpc
import pytest
import torch

import initserve
from initserve import Shard, TensorSpec
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_protocol.wire import decode_many_response, encode_chunk, tensor_tag
from tests.conftest import reference, same_bytes

BASE_SEED = 168058
SPECS = [
    TensorSpec("embed.weight", (50, 16), "normal"),
    TensorSpec("block.0.linear.weight", (24, 16), "kaiming_uniform", {"a": 5**0.5}),
    TensorSpec("block.0.linear.bias", (24,), "uniform", {"a": -0.25, "b": 0.25}),
    TensorSpec("block.0.norm.weight", (24,), "ones"),
    TensorSpec("block.0.conv.weight", (8, 4, 3, 3), "xavier_normal", dtype=torch.float64),
    TensorSpec("head.weight", (10, 24), "orthogonal", {"gain": 2.0}, dtype=torch.float64),
    TensorSpec("lm_head.weight", (30, 8), "normal", {"std": 0.5}, dtype=torch.bfloat16),
    TensorSpec("head.shard", (40, 6), "trunc_normal", {"std": 0.02}, slices=[Shard(0, 1, 4)]),
    TensorSpec("empty", (0, 3), "normal"),
]


def expected(spec: TensorSpec, base_seed: int) -> torch.Tensor:
    seed = initserve.derive_seed(base_seed, spec.name)
    whole = reference(spec.scheme, spec.shape, dtype=spec.dtype, seed=seed, **spec.params)
    return whole[10:20] if spec.slices else whole


def test_a_model_of_tensors_comes_in_one_call(client: initserve.Client) -> None:
    results = client.fetch_many(SPECS, seed=BASE_SEED, chunk_bytes=512)
    assert list(results) == [spec.name for spec in SPECS]
    for spec in SPECS:
        result = results[spec.name]
        assert same_bytes(result.tensor, expected(spec, BASE_SEED)), spec.name
        assert result.header.name == spec.name and result.attempts == 1
        if result.seeded:
            assert result.header.base_seed == BASE_SEED
            assert result.seed == initserve.derive_seed(BASE_SEED, spec.name)


def test_one_call_writes_into_given_tensors_and_reports_progress(client: initserve.Client) -> None:
    outs = [torch.empty(24, 16), torch.empty(24)]
    specs = [
        TensorSpec("w", (24, 16), "kaiming_normal", out=outs[0], seed=3, derive=False),
        TensorSpec("b", (24,), "zeros", out=outs[1]),
    ]
    seen: list[tuple[int, int]] = []
    results = client.fetch_many(specs, progress=lambda received, total: seen.append((received, total)))
    assert results["w"].tensor is outs[0] and results["b"].tensor is outs[1]
    assert same_bytes(outs[0], reference("kaiming_normal", (24, 16), seed=3))
    assert seen[-1] == (24 * 16 * 4 + 24 * 4, 24 * 16 * 4 + 24 * 4)
    assert [received for received, _ in seen] == sorted(received for received, _ in seen)


def test_errors_name_the_tensor_and_the_server_keeps_serving(client: initserve.Client) -> None:
    huge = [SPECS[0], TensorSpec("huge.weight", (1 << 20, 1 << 20), "normal")]
    with pytest.raises(initserve.InvalidArgument) as raised:
        client.fetch_many(huge, seed=1)
    assert str(raised.value).startswith("tensors[1] ('huge.weight'): shape [1048576, 1048576] is ")
    assert str(raised.value).endswith("(max_tensor_bytes)")
    # what torch itself refuses is raised as torch raises it, naming the tensor
    refused = [SPECS[0], TensorSpec("bad.weight", (4, 4), "kaiming_normal", {"mode": "fan_x"})]
    with pytest.raises(ValueError) as raised:
        client.fetch_many(refused, seed=1)
    assert str(raised.value) == (
        "tensors[1] ('bad.weight'): Mode fan_x not supported, please use one of ['fan_in', 'fan_out']"
    )
    flat = [SPECS[0], TensorSpec("flat", (5,), "orthogonal")]
    with pytest.raises(ValueError, match=r"^tensors\[1\] \('flat'\): Only tensors with 2 or more dimensions"):
        client.fetch_many(flat, seed=1)
    # refused by the client before any call, named as the server names its refusals
    for spec, error, message in (
        (TensorSpec("n", (2, 2), "nope"), ValueError, "tensors[1] ('n'): unknown scheme 'nope'; use one of: "),
        (TensorSpec("p", (2, 2), "normal", {"gain": 1.0}), TypeError, "tensors[1] ('p'): normal() got an unexpected"),
        (TensorSpec("s", (4, 4), "normal", slices=[initserve.Shard(0, 5, 4)]), ValueError, "tensors[1] ('s'): "),
        (TensorSpec("d", (2, 2), "normal", dtype=torch.int32), ValueError, "tensors[1] ('d'): dtype torch.int32 "),
    ):
        with pytest.raises(error) as raised:
            client.fetch_many([SPECS[0], spec], seed=1)
        assert type(raised.value) is error and str(raised.value).startswith(message), str(raised.value)
    with pytest.raises(ValueError, match="tensor name 'x' appears twice"):
        client.fetch_many([TensorSpec("x", (1,), "ones"), TensorSpec("x", (2,), "ones")])
    assert same_bytes(client.fetch_many(SPECS[:1], seed=2)["embed.weight"].tensor, expected(SPECS[0], 2))


def test_a_call_without_seeds_reports_each_drawn_seed(client: initserve.Client) -> None:
    specs = [TensorSpec(f"t{i}", (6, 5), "normal") for i in range(3)]
    results = client.fetch_many(specs)
    seeds = {result.seed for result in results.values()}
    assert len(seeds) == 3
    for result in results.values():
        assert not result.header.HasField("base_seed")
        assert same_bytes(result.tensor, reference("normal", (6, 5), seed=result.seed))


def many_call(server) -> grpc.UnaryStreamMultiCallable:
    channel = grpc.insecure_channel(server.target)
    return channel.unary_stream(
        "/initserve.v1.InitService/InitMany",
        request_serializer=pb.InitManyRequest.SerializeToString,
        response_deserializer=pb.InitManyResponse.FromString,
    )


def test_the_wire_tags_every_message_with_its_tensor(server) -> None:
    request = pb.InitManyRequest(
        tensors=[
            pb.InitRequest(scheme="normal", shape=(10, 10), seed=1, chunk_bytes=128),
            pb.InitRequest(scheme="zeros", shape=(3,)),
            pb.InitRequest(scheme="uniform", shape=(7, 7), seed=2, offset=100, chunk_bytes=64),
        ]
    )
    messages = list(many_call(server)(request, timeout=30))
    tags = [(m.tensor, m.WhichOneof("part")) for m in messages]
    assert tags[0] == (0, "header") and tags[-1] == (2, "trailer")
    assert [t for t, _ in tags] == sorted(t for t, _ in tags)  # tensor by tensor, in order
    for position, scheme, shape, seed, offset in ((0, "normal", (10, 10), 1, 0), (2, "uniform", (7, 7), 2, 100)):
        parts = [m for m in messages if m.tensor == position]
        assert parts[0].header.offset == offset
        data = b"".join(m.chunk.data for m in parts if m.HasField("chunk"))
        assert data == reference(scheme, shape, seed=seed).numpy().tobytes()[offset:]


def test_too_many_tensors_in_one_call_is_refused(server) -> None:
    limits = initserve.Client(server.target).describe().limits
    assert (limits.max_tensors_per_call, limits.max_request_bytes) == (16384, 4 << 20)
    request = pb.InitManyRequest(tensors=[pb.InitRequest(scheme="ones", shape=(1,))] * 16385)
    with pytest.raises(grpc.RpcError) as raised:
        list(many_call(server)(request, timeout=30))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "16385 tensors in one InitMany call; the limit is 16384 (max_tensors_per_call)"
    shared = pb.InitManyRequest(tensors=[pb.InitRequest(scheme="ones", shape=(1,), shared_memory="initserve-x")])
    with pytest.raises(grpc.RpcError) as raised:
        list(many_call(server)(shared, timeout=30))
    assert raised.value.details() == "tensors[0]: shared_memory is answered by InitUnary, not by InitMany"


def test_the_many_decoder_reads_hand_written_and_protobuf_messages() -> None:
    data = memoryview(b"abcdefgh")
    hand = tensor_tag(300) + encode_chunk(16, data, 0x01020304)
    position, chunk = decode_many_response(hand)
    assert (position, chunk.offset, bytes(chunk.data), chunk.crc32) == (300, 16, b"abcdefgh", 0x01020304)
    reordered = pb.InitManyResponse(tensor=7, trailer=pb.Trailer(checksum=b"x")).SerializeToString()
    position, message = decode_many_response(reordered)
    assert position == 7 and message.trailer.checksum == b"x"
    position, message = decode_many_response(pb.InitManyResponse(header=pb.Header(name="n")).SerializeToString())
    assert position == 0 and message.header.name == "n"

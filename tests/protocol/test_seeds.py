"""Per-parameter seeds: derive_seed is the documented SHA-256 derivation, and the server applies the same one."""

from __future__ import annotations

import hashlib

import grpc
import pytest

import initserve
from initserve_protocol.v1 import initserve_pb2 as pb
from tests.conftest import reference, same_bytes

BASE_SEED = 20261123


def documented(base_seed: int, name: str) -> int:
    """The derivation as initserve.v1 documents it, written out independently of the client's code."""
    data = b"initserve.v1/derive_seed\x00" + (base_seed % 2**64).to_bytes(8, "big") + name.encode("utf-8")
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


@pytest.mark.parametrize("base_seed", [0, 1, BASE_SEED, 2**64 - 1, -1, -(2**63)])
@pytest.mark.parametrize("name", ["", "weight", "layers.0.attn.q_proj.weight", "ünïcode.名前"])
def test_derive_seed_is_the_documented_sha256(base_seed: int, name: str) -> None:
    assert initserve.derive_seed(base_seed, name) == documented(base_seed, name)
    assert 0 <= initserve.derive_seed(base_seed, name) < 2**64


def test_derive_seed_is_stable_across_releases() -> None:
    # Pinned: a change here changes every model's weights.
    assert initserve.derive_seed(0, "weight") == 0xCD00EFECC4611484
    assert initserve.derive_seed(-1, "x") == initserve.derive_seed(2**64 - 1, "x")


def test_derive_seed_refuses_what_it_cannot_derive_from() -> None:
    with pytest.raises(TypeError, match="seed must be an int, not str"):
        initserve.derive_seed("1", "w")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"seed must be in \[-2\*\*63, 2\*\*64\), got 18446744073709551616"):
        initserve.derive_seed(2**64, "w")
    with pytest.raises(TypeError, match="name must be a str, not int"):
        initserve.derive_seed(1, 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name is 1025 characters; the limit is 1024"):
        initserve.derive_seed(1, "x" * 1025)


def test_a_named_fetch_uses_the_derived_seed_and_reports_it(client: initserve.Client) -> None:
    name = "encoder.layers.3.mlp.fc1.weight"
    result = client.fetch((64, 32), "kaiming_uniform", seed=BASE_SEED, name=name, a=5**0.5)
    derived = initserve.derive_seed(BASE_SEED, name)
    assert same_bytes(result.tensor, reference("kaiming_uniform", (64, 32), seed=derived, a=5**0.5))
    assert result.seed == result.header.seed_used == derived
    assert (result.header.name, result.header.base_seed) == (name, BASE_SEED)
    # derive=False: the name is only a label, the seed is used as given
    plain = client.fetch((64, 32), "normal", seed=BASE_SEED, name=name, derive=False)
    assert same_bytes(plain.tensor, reference("normal", (64, 32), seed=BASE_SEED))
    assert plain.header.name == name and not plain.header.HasField("base_seed")


def test_renaming_one_parameter_changes_only_that_parameter(client: initserve.Client) -> None:
    shapes = {"embed.weight": (100, 16), "block.0.weight": (16, 16), "block.1.weight": (16, 16), "head.weight": (4, 16)}

    def init(names: dict[str, tuple[int, int]]) -> dict[str, bytes]:
        return {
            name: client.fetch(shape, "normal", seed=BASE_SEED, name=name).tensor.numpy().tobytes()
            for name, shape in names.items()
        }

    before = init(shapes)
    renamed = dict(shapes)
    renamed["block.1b.weight"] = renamed.pop("block.1.weight")
    after = init(renamed)
    for name in ("embed.weight", "block.0.weight", "head.weight"):
        assert after[name] == before[name]
    assert after["block.1b.weight"] != before["block.1.weight"]
    assert len({before[name] for name in before}) == len(before)  # equal shapes, different names: different values


def test_deriving_needs_a_base_seed(server, client: initserve.Client) -> None:
    with pytest.raises(ValueError, match=r"derive needs both seed \(the job's base seed\) and name"):
        client.fetch((2, 2), "normal", name="w", derive=True)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb.InitRequest(scheme="normal", shape=(2, 2), name="w", derive_seed=True)
        call = channel.unary_unary(
            "/initserve.v1.InitService/InitUnary",
            request_serializer=pb.InitRequest.SerializeToString,
            response_deserializer=pb.InitUnaryResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as raised:
            call(stub, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == (
        "derive_seed needs seed: the job's base seed, from which the name's seed is derived"
    )


def test_unseeded_schemes_ignore_the_derivation(client: initserve.Client) -> None:
    result = client.fetch((3, 3), "eye", seed=BASE_SEED, name="proj.weight")
    assert same_bytes(result.tensor, reference("eye", (3, 3)))
    assert not result.seeded and result.header.seed_used == 0 and not result.header.HasField("base_seed")

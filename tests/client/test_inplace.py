"""The in-place twins as drop-ins for torch.nn.init: same signatures, same bytes, same tensor back, seeds from torch."""

from __future__ import annotations

import inspect
import itertools
import socket
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

import initserve
from tests.conftest import reference, same_bytes

FIRST_SEED = 1000


class SmallNet(nn.Module):
    """One of each layer a DCGAN-style ``weights_init`` meets."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 6)
        self.conv1d = nn.Conv1d(6, 8, kernel_size=3)
        self.conv2d = nn.Conv2d(8, 16, kernel_size=3, bias=True)
        self.norm = nn.BatchNorm2d(16)
        self.linear = nn.Linear(16, 4)


def client_weights_init(client: initserve.Client, seeds: Iterator[int]) -> Callable[[nn.Module], None]:
    """The PyTorch DCGAN tutorial's ``weights_init``, with ``client.`` for ``nn.init.`` and a seed per tensor."""

    def weights_init(m: nn.Module) -> None:
        classname = m.__class__.__name__
        if classname.find("Conv") != -1:
            client.normal_(m.weight.data, 0.0, 0.02, seed=next(seeds))
            client.constant_(m.bias, 0)
        elif classname.find("BatchNorm") != -1:
            client.normal_(m.weight.data, 1.0, 0.02, seed=next(seeds))
            client.constant_(m.bias.data, 0)
        elif classname.find("Linear") != -1:
            client.xavier_uniform_(m.weight, gain=initserve.calculate_gain("relu"), seed=next(seeds))
            client.uniform_(m.bias, -0.1, 0.1, seed=next(seeds))
        elif classname.find("Embedding") != -1:
            client.trunc_normal_(m.weight, std=0.5, a=-1.0, b=1.0, seed=next(seeds))

    return weights_init


def torch_weights_init(seeds: Iterator[int]) -> Callable[[nn.Module], None]:
    """The same function on torch.nn.init, each call given a generator seeded as the client call's seed."""

    def generator() -> torch.Generator:
        return torch.Generator().manual_seed(next(seeds))

    def weights_init(m: nn.Module) -> None:
        classname = m.__class__.__name__
        if classname.find("Conv") != -1:
            nn.init.normal_(m.weight.data, 0.0, 0.02, generator=generator())
            nn.init.constant_(m.bias, 0)
        elif classname.find("BatchNorm") != -1:
            nn.init.normal_(m.weight.data, 1.0, 0.02, generator=generator())
            nn.init.constant_(m.bias.data, 0)
        elif classname.find("Linear") != -1:
            nn.init.xavier_uniform_(m.weight, gain=nn.init.calculate_gain("relu"), generator=generator())
            nn.init.uniform_(m.bias, -0.1, 0.1, generator=generator())
        elif classname.find("Embedding") != -1:
            nn.init.trunc_normal_(m.weight, std=0.5, a=-1.0, b=1.0, generator=generator())

    return weights_init


def test_model_apply_weights_init_matches_torch_nn_init(client: initserve.Client) -> None:
    served = SmallNet()
    params_before = dict(served.named_parameters())
    with torch.no_grad():
        for param in params_before.values():
            param.fill_(float("nan"))  # so a parameter the client never filled cannot match torch's
    served.apply(client_weights_init(client, itertools.count(FIRST_SEED)))
    local = SmallNet()
    local.apply(torch_weights_init(itertools.count(FIRST_SEED)))

    served_params = dict(served.named_parameters())
    assert served_params.keys() == dict(local.named_parameters()).keys()
    assert len(served_params) == 9
    for name, param in local.named_parameters():
        assert served_params[name] is params_before[name], name  # filled in place, not replaced
        assert served_params[name].requires_grad and served_params[name].is_leaf, name
        assert same_bytes(served_params[name].detach(), param.detach()), name


def test_without_a_seed_the_seed_comes_from_torchs_global_rng(client: initserve.Client) -> None:
    first, second, other = torch.empty(12, 5), torch.empty(12, 5), torch.empty(12, 5)
    torch.manual_seed(0)
    client.kaiming_uniform_(first)
    torch.manual_seed(0)
    client.kaiming_uniform_(second)
    torch.manual_seed(1)
    client.kaiming_uniform_(other)
    assert same_bytes(first, second)
    assert not same_bytes(first, other)
    torch.manual_seed(0)
    assert same_bytes(first, reference("kaiming_uniform", (12, 5), seed=initserve.draw_seed()))


def test_without_a_seed_the_seed_comes_from_the_given_generator(client: initserve.Client) -> None:
    first, second, other = torch.empty(7, 9), torch.empty(7, 9), torch.empty(7, 9)
    torch.manual_seed(0)
    client.xavier_normal_(first, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(1)  # the global RNG plays no part when a generator is given
    client.xavier_normal_(second, generator=torch.Generator().manual_seed(5))
    client.xavier_normal_(other, generator=torch.Generator().manual_seed(6))
    assert same_bytes(first, second)
    assert not same_bytes(first, other)
    seed = initserve.draw_seed(torch.Generator().manual_seed(5))
    assert same_bytes(first, reference("xavier_normal", (7, 9), seed=seed))


def test_the_drawn_seed_is_draw_seed_and_consumes_one_draw(client: initserve.Client) -> None:
    torch.manual_seed(3)
    seed = initserve.draw_seed()
    after_draw = torch.rand(4)
    explicit = client.kaiming_uniform_(torch.empty(6, 4, 3), seed=seed)
    torch.manual_seed(3)
    drawn = client.kaiming_uniform_(torch.empty(6, 4, 3))
    assert same_bytes(torch.rand(4), after_draw)  # the call advanced torch's RNG by exactly that one draw
    assert same_bytes(drawn, explicit)
    generator = torch.Generator().manual_seed(8)
    client.kaiming_uniform_(torch.empty(6, 4, 3), generator=generator)
    expected_state = torch.Generator().manual_seed(8)
    initserve.draw_seed(expected_state)
    assert torch.equal(generator.get_state(), expected_state.get_state())


def test_unseeded_schemes_leave_torchs_rng_alone(client: initserve.Client) -> None:
    torch.manual_seed(4)
    state = torch.get_rng_state()
    filled = client.constant_(torch.empty(3, 3), 0.5)
    client.dirac_(torch.empty(4, 2, 3), 2)
    client.eye_(torch.empty(3, 5))
    assert torch.equal(torch.get_rng_state(), state)
    assert same_bytes(filled, torch.full((3, 3), 0.5))


def expected_in_place_signature(name: str) -> list[tuple[str, object, object]]:
    """torch's ``torch.nn.init.<name>_`` parameters, then the client's keyword-only extras."""
    torch_parameters = inspect.signature(getattr(torch.nn.init, f"{name}_")).parameters.values()
    expected = [(p.name, p.kind, p.default) for p in torch_parameters]
    keyword = inspect.Parameter.KEYWORD_ONLY
    if initserve.SCHEMES[name].seeded:
        expected.append(("seed", keyword, None))
    expected += [("device", keyword, "cpu"), ("timeout", keyword, None)]
    if initserve.SCHEMES[name].seeded:  # the generator of this call: the client's when None
        expected += [("rng", keyword, None), ("local", keyword, None)]
    return expected


@pytest.mark.parametrize("name", list(initserve.SCHEMES))
def test_in_place_signatures_are_torchs_plus_keyword_extras(client: initserve.Client, name: str) -> None:
    parameters = inspect.signature(getattr(client, f"{name}_")).parameters.values()
    actual = [(p.name, p.kind, p.default) for p in parameters]
    expected = expected_in_place_signature(name)
    assert actual == expected
    # Equal is not enough for defaults: 0 == 0.0, but torch's kaiming a=0 and orthogonal gain=1 are ints.
    assert [type(default) for *_, default in actual] == [type(default) for *_, default in expected]
    assert ("generator" in [p[0] for p in actual]) == initserve.SCHEMES[name].seeded


def test_positional_arguments_follow_torchs_order(client: initserve.Client) -> None:
    by_position = client.kaiming_normal_(torch.empty(8, 3, 3), 0.1, "fan_out", "relu", torch.Generator().manual_seed(2))
    by_keyword = client.kaiming_normal_(
        torch.empty(8, 3, 3), a=0.1, mode="fan_out", nonlinearity="relu", generator=torch.Generator().manual_seed(2)
    )
    assert same_bytes(by_position, by_keyword)
    seed = initserve.draw_seed(torch.Generator().manual_seed(2))
    expected = reference("kaiming_normal", (8, 3, 3), seed=seed, a=0.1, mode="fan_out", nonlinearity="relu")
    assert same_bytes(by_position, expected)
    assert same_bytes(
        client.uniform_(torch.empty(5), -2.0, -1.0, seed=9), reference("uniform", (5,), seed=9, a=-2, b=-1)
    )


def test_returns_the_same_tensor_filled(client: initserve.Client) -> None:
    tensor = torch.empty(6, 5)
    assert client.normal_(tensor, 0.0, 2.0, seed=11) is tensor
    assert same_bytes(tensor, reference("normal", (6, 5), seed=11, std=2.0))


def test_fills_a_non_contiguous_tensor_as_a_tensor_of_its_shape(client: initserve.Client) -> None:
    transposed = torch.empty(8, 6).t()
    assert not transposed.is_contiguous()
    assert client.xavier_uniform_(transposed, seed=12) is transposed
    assert same_bytes(transposed, reference("xavier_uniform", (6, 8), seed=12))

    base = torch.zeros(8, 12, dtype=torch.bfloat16)
    strided = base[:, ::2]
    assert client.kaiming_normal_(strided, seed=13) is strided
    assert same_bytes(strided, reference("kaiming_normal", (8, 6), dtype=torch.bfloat16, seed=13))
    assert not base[:, 1::2].any()  # the elements between the view's are untouched


def test_fills_a_contiguous_view_at_its_offset_only(client: initserve.Client) -> None:
    base = torch.zeros(40)
    view = base[5:35].view(5, 6)
    assert view.is_contiguous() and view.storage_offset() == 5
    client.uniform_(view, 1.0, 2.0, seed=14)
    # Cloned: same_bytes reads a view's whole storage, not just the view.
    assert same_bytes(view.clone(), reference("uniform", (5, 6), seed=14, a=1.0, b=2.0))
    assert not base[:5].any() and not base[35:].any()


def test_fills_a_parameter_that_requires_grad(client: initserve.Client) -> None:
    weight = nn.Parameter(torch.empty(10, 4))
    assert client.orthogonal_(weight, 0.5, seed=15) is weight
    assert weight.requires_grad and weight.is_leaf and weight.grad_fn is None
    assert same_bytes(weight.detach(), reference("orthogonal", (10, 4), seed=15, gain=0.5))
    transposed = nn.Parameter(torch.empty(4, 10)).t()  # a non-leaf, non-contiguous view of a parameter
    client.orthogonal_(transposed, 0.5, seed=15)
    assert same_bytes(transposed.detach(), reference("orthogonal", (10, 4), seed=15, gain=0.5))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_fills_float64_and_bfloat16(client: initserve.Client, dtype: torch.dtype) -> None:
    tensor = torch.empty(9, 7, dtype=dtype)
    assert client.trunc_normal_(tensor, 0.0, 1.0, -0.5, 0.5, seed=16) is tensor
    assert tensor.dtype == dtype
    assert same_bytes(tensor, reference("trunc_normal", (9, 7), dtype=dtype, seed=16, a=-0.5, b=0.5))
    column = torch.empty(7, 9, dtype=dtype).t()
    client.trunc_normal_(column, 0.0, 1.0, -0.5, 0.5, seed=16)
    assert same_bytes(column, tensor)


@pytest.fixture()
def unreachable_client() -> Iterator[initserve.Client]:
    """A client whose every request fails with Unavailable: what it does without one never reached the network."""
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    with initserve.Client(f"127.0.0.1:{port}", timeout=10.0) as client:
        yield client


def test_an_unsupported_dtype_raises_value_error_before_any_request(unreachable_client: initserve.Client) -> None:
    with pytest.raises(initserve.Unavailable):  # control: a request to this client cannot succeed
        unreachable_client.uniform_(torch.empty(2, 2), seed=1)
    message = r"dtype torch.int64 is not served by initserve; use one of float32, float64, float16, bfloat16"
    integers = torch.zeros(4, 4, dtype=torch.int64)
    for fill in (
        lambda: unreachable_client.kaiming_uniform_(integers),
        lambda: unreachable_client.kaiming_uniform_(integers, seed=1),
        lambda: unreachable_client.constant_(integers, 3),
    ):
        with pytest.raises(ValueError, match=f"^{message}$") as raised:
            fill()
        assert not isinstance(raised.value, initserve.InitServeError)  # refused locally, not by a server
    assert not integers.any()


def test_a_refused_dtype_leaves_torchs_rng_alone(unreachable_client: initserve.Client) -> None:
    torch.manual_seed(6)
    state = torch.get_rng_state()
    with pytest.raises(ValueError):
        unreachable_client.kaiming_uniform_(torch.zeros(4, 4, dtype=torch.int64))
    assert torch.equal(torch.get_rng_state(), state)


def test_meta_tensors_are_returned_untouched(unreachable_client: initserve.Client) -> None:
    torch.manual_seed(7)
    state = torch.get_rng_state()
    for name, tensor in [
        ("kaiming_uniform_", torch.empty(8, 4, 3, 3, device="meta")),
        ("normal_", torch.empty(5, device="meta")),
        ("orthogonal_", nn.Parameter(torch.empty(6, 3, device="meta"))),
        ("constant_", torch.empty(2, 2, device="meta", dtype=torch.bfloat16)),
    ]:
        args = (0.5,) if name == "constant_" else ()
        returned = getattr(unreachable_client, name)(tensor, *args)  # no Unavailable: no request was made
        assert returned is tensor
        assert returned.is_meta
    assert torch.equal(torch.get_rng_state(), state)  # nor was a seed drawn

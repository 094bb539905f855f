"""Warnings torch gives on the server reach the caller as the same UserWarning, on every call, cached or not."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

import initserve
from tests.conftest import ServerProcess, same_bytes

FAR_MEAN = {"mean": 5.0, "std": 1.0, "a": -1.0, "b": 1.0}  # more than 2 std from [a, b]


def user_warnings(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    """The UserWarnings among ``caught``: not a ResourceWarning the garbage collector gave meanwhile."""
    return [warning for warning in caught if issubclass(warning.category, UserWarning)]


def torch_warns(call: Callable[[], Any]) -> list[str]:
    """The UserWarning messages ``call`` gives, every one of them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(warning.message) for warning in user_warnings(caught)]


def local_trunc_normal() -> torch.Tensor:
    return torch.nn.init.trunc_normal_(torch.empty(4, 4), **FAR_MEAN, generator=torch.Generator().manual_seed(1))


def test_trunc_normal_far_from_its_bounds_warns_as_torch_does_on_every_call(client: initserve.Client) -> None:
    expected = torch_warns(local_trunc_normal)
    assert len(expected) == 1 and expected[0].startswith("mean is more than 2 std from [a, b]")
    for attempt in range(2):  # generated, then cached
        results: list[initserve.InitResult] = []
        with pytest.warns(UserWarning) as caught:
            results.append(client.fetch((4, 4), "trunc_normal", seed=1, **FAR_MEAN))
        told = user_warnings(caught.list)
        assert [str(w.message) for w in told] == expected, attempt
        assert told[0].filename == __file__  # attributed to the caller's line, as torch's own is
        assert results[0].warnings == tuple(expected)
        assert results[0].header.cache_hit == (attempt == 1)
        assert same_bytes(results[0].tensor, local_trunc_normal())


def test_zero_element_tensors_warn_as_torch_does(client: initserve.Client) -> None:
    expected = torch_warns(lambda: torch.nn.init.kaiming_normal_(torch.empty(0, 3)))
    assert expected == ["Initializing zero-element tensors is a no-op"]
    for seed in (5, 6):
        assert torch_warns(lambda s=seed: client.kaiming_normal((0, 3), seed=s)) == expected
        # kaiming_uniform is generated in pieces, through a tensor subclass: torch then warns from torch.overrides,
        # a place whose first warning silenced every later one until the server's filter covered it
        assert torch_warns(lambda s=seed: client.kaiming_uniform((0, 3), seed=s)) == expected
    assert torch_warns(lambda: client.kaiming_normal_(torch.empty(0, 3))) == expected


def test_a_slice_of_a_call_that_warned_warns_and_quiet_calls_stay_quiet(client: initserve.Client) -> None:
    told = torch_warns(
        lambda: client.fetch((8, 8), "trunc_normal", seed=2, slices=[initserve.Range(0, 0, 2)], **FAR_MEAN)
    )
    assert len(told) == 1 and told[0].startswith("mean is more than 2 std")
    assert torch_warns(lambda: client.fetch((8, 8), "trunc_normal", seed=2, std=0.5)) == []
    assert torch_warns(lambda: client.normal((0, 3), seed=1)) == []  # torch's normal_ does not warn on no elements


def test_each_tensor_of_init_many_warns_for_itself(client: initserve.Client) -> None:
    specs = [
        initserve.TensorSpec("quiet", (4, 4), "normal"),
        initserve.TensorSpec("far", (4, 4), "trunc_normal", FAR_MEAN),
        initserve.TensorSpec("empty", (0, 3), "kaiming_uniform"),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = client.fetch_many(specs, seed=3)
    assert [r.warnings for r in results.values()] == [
        (),
        (torch_warns(local_trunc_normal)[0],),
        ("Initializing zero-element tensors is a no-op",),
    ]
    assert len(user_warnings(caught)) == 2


def test_the_asyncio_client_warns_too(server: ServerProcess) -> None:
    import asyncio

    import initserve.aio

    async def fetch() -> initserve.InitResult:
        async with initserve.aio.Client(server.target) as client:
            return await client.fetch((4, 4), "trunc_normal", seed=9, **FAR_MEAN)

    told = torch_warns(lambda: asyncio.run(asyncio.wait_for(fetch(), 60)))
    assert len(told) == 1 and told[0].startswith("mean is more than 2 std")

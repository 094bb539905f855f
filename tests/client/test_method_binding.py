"""The scheme methods' argument binding (``client.normal(shape, ...)``, ``client.normal_(tensor, ...)``): the fast
path for the usual call splits arguments exactly as ``inspect.Signature.bind`` does, and every other call goes
through ``bind`` itself, raising Python's own TypeError."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import initserve

METHODS = [name for scheme in initserve.SCHEMES for name in (scheme, f"{scheme}_")]


class Recorder:
    """Stands in for the client behind a scheme method: records what the method forwards."""

    def init(self, shape: Any, scheme: str, **kwargs: Any) -> tuple:
        return ("init", shape, scheme, kwargs)

    def fill_(self, tensor: Any, scheme: str, **kwargs: Any) -> tuple:
        return ("fill_", tensor, scheme, kwargs)


def expected_call(method_name: str, args: tuple, kwargs: dict) -> tuple:
    """What the method must forward: the explicitly given arguments, bound by ``inspect``."""
    method = getattr(initserve.Client, method_name)
    bound = dict(method.__signature__.bind(*args, **kwargs).arguments)
    bound.pop("self")
    first = bound.pop("tensor" if method_name.endswith("_") else "shape")
    scheme = method_name.removesuffix("_")
    return ("fill_" if method_name.endswith("_") else "init", first, scheme, bound)


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, tuple, dict]:
    method_name = draw(st.sampled_from(METHODS))
    names = list(getattr(initserve.Client, method_name).__signature__.parameters)
    extra_positional = draw(st.integers(0, 3))
    args = (Recorder(), "first", *range(extra_positional))
    keywords = draw(st.lists(st.sampled_from([*names[1:], "gain", "bogus", "self"]), unique=True, max_size=6))
    return method_name, args, {name: f"value of {name}" for name in keywords}


@settings(max_examples=600, deadline=None)
@given(calls())
def test_a_scheme_method_forwards_what_signature_bind_binds(call: tuple[str, tuple, dict]) -> None:
    method_name, args, kwargs = call
    method = getattr(initserve.Client, method_name)
    try:
        expected = expected_call(method_name, args, kwargs)
    except TypeError as error:
        with pytest.raises(TypeError) as raised:
            method(*args, **kwargs)
        assert str(raised.value) == str(error)
        return
    assert method(*args, **kwargs) == expected


@pytest.mark.parametrize(
    ("method_name", "kwargs"),
    [
        ("normal", {"seed": 1}),
        ("constant", {"val": 0.5, "timeout": 3.0}),
        ("kaiming_normal", {"a": 0.1, "mode": "fan_out", "seed": 2, "dtype": "d", "device": "cuda"}),
        ("kaiming_normal_", {"mode": "fan_out", "generator": "g", "seed": 2}),
    ],
)
def test_the_usual_calls_take_the_fast_path(monkeypatch: pytest.MonkeyPatch, method_name: str, kwargs: dict) -> None:
    """A shape or tensor and keywords: split without ``inspect`` (binding never called), same result."""
    method = getattr(initserve.Client, method_name)
    expected = expected_call(method_name, (Recorder(), "first"), kwargs)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("signature.bind was called")

    monkeypatch.setattr(inspect.Signature, "bind", refuse)
    assert method(Recorder(), "first", **kwargs) == expected

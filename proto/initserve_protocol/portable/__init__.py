"""The portable generator (issue 20): a versioned, device- and release-independent generator, specified in
docs/portable.md. ``reference`` is its executable specification (pure Python), ``cpu`` its fast kernel,
``tensors`` what the server and the SDK call to fill torch tensors with it."""

TORCH = "torch"  # the default: the contract's torch.Generator(device).manual_seed(seed)
PHILOX = "philox4x32-10/v1"  # the portable generator, version 1
GENERATORS = (TORCH, PHILOX)


def generator_name(value: str) -> str:
    """A request's generator, "" meaning torch's; ValueError naming the served ones otherwise."""
    name = value or TORCH
    if name not in GENERATORS:
        raise ValueError(f"generator {value!r} is not served; use one of: {', '.join(GENERATORS)}")
    return name

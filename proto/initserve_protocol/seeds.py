"""Per-parameter seeds: ``derive_seed(base_seed, name)``, a stable cryptographic derivation.

Each parameter of a model gets its own seed from the job's one base seed and the parameter's name, so adding,
removing or renaming one layer leaves every other parameter's values unchanged (a single generator shared
across parameters in order would shift them all). The derivation is SHA-256, never Python's ``hash`` (salted
per process), and is fixed by ``initserve.v1``:

    digest = SHA-256(b"initserve.v1/derive_seed" + b"\\x00" + base_seed as 8 bytes big-endian + UTF-8 name)
    seed = the first 8 bytes of digest, big-endian (0 <= seed < 2**64)

The server computes the same function when a request sets ``derive_seed`` (its header then reports
``base_seed``, ``name`` and the derived ``seed_used``).
"""

from __future__ import annotations

import hashlib
import numbers

SEED_MIN = -(1 << 63)  # torch.Generator.manual_seed takes [-2**63, 2**64); negatives wrap to two's complement
SEED_LIMIT = 1 << 64
MAX_NAME_CHARS = 1024  # a parameter's name, as sent to the server
_DOMAIN = b"initserve.v1/derive_seed\x00"


def check_seed(seed: int) -> int:
    """``seed`` as the wire's uint64 (negatives wrap, as manual_seed's do); TypeError/ValueError otherwise."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, not {type(seed).__name__}")
    if not SEED_MIN <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [-2**63, 2**64), got {seed}")
    return int(seed) % SEED_LIMIT


def check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, not {type(name).__name__}")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"name is {len(name)} characters; the limit is {MAX_NAME_CHARS}")
    return name


def derive_seed(base_seed: int, name: str) -> int:
    """The seed of the parameter ``name`` in a job whose base seed is ``base_seed`` (see the module's docs).

    >>> derive_seed(0, "layer1.weight") == derive_seed(0, "layer1.weight") != derive_seed(0, "layer1.bias")
    True
    """
    base = check_seed(base_seed)
    data = _DOMAIN + base.to_bytes(8, "big") + check_name(name).encode("utf-8")
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")

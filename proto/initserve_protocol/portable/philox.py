"""Philox4x32-10, the bits of the portable generator: the reference, in plain Python integers.

Philox4x32 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3", SC 2011; the Random123
library) maps a 128-bit counter and a 64-bit key to 128 random bits. Each of its 10 rounds multiplies two of the
counter's words by fixed 32-bit constants, keeps both halves of each 64-bit product, and mixes them with the
other two words and the key; the key is bumped by two Weyl constants before every round but the first. Nothing
in it depends on a device, a thread count or a library: it is integer arithmetic modulo 2**32, which is why the
portable generator's bits are the same everywhere. Its known-answer vectors are Random123's
(``kat_vectors``), checked by tests/protocol/test_portable.py.
"""

from __future__ import annotations

from collections.abc import Sequence

ROUNDS = 10
MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)  # PHILOX_M4x32_0, PHILOX_M4x32_1
WEYL = (0x9E3779B9, 0xBB67AE85)  # PHILOX_W32_0 (the golden ratio), PHILOX_W32_1 (sqrt(3) - 1)
MASK32 = 0xFFFFFFFF


def _round(counter: Sequence[int], key: Sequence[int]) -> tuple[int, int, int, int]:
    product0 = MULTIPLIERS[0] * counter[0]
    product1 = MULTIPLIERS[1] * counter[2]
    hi0, lo0 = product0 >> 32, product0 & MASK32
    hi1, lo1 = product1 >> 32, product1 & MASK32
    return (hi1 ^ counter[1] ^ key[0], lo1, hi0 ^ counter[3] ^ key[1], lo0)


def philox4x32(counter: Sequence[int], key: Sequence[int], rounds: int = ROUNDS) -> tuple[int, int, int, int]:
    """Four 32-bit words from a counter of four 32-bit words and a key of two (each an int in [0, 2**32))."""
    if len(counter) != 4 or len(key) != 2:
        raise ValueError("philox4x32 takes a counter of 4 words and a key of 2")
    if any(not 0 <= word <= MASK32 for word in (*counter, *key)):
        raise ValueError("every counter and key word must be in [0, 2**32)")
    words = tuple(counter)
    k0, k1 = key
    for round_number in range(rounds):
        if round_number:
            k0, k1 = (k0 + WEYL[0]) & MASK32, (k1 + WEYL[1]) & MASK32
        words = _round(words, (k0, k1))
    return words  # type: ignore[return-value]


def key_of(seed: int) -> tuple[int, int]:
    """The key of a 64-bit seed (negative seeds wrap to their uint64, as ``torch.Generator.manual_seed`` wraps
    them): its low word first, then its high word."""
    seed %= 1 << 64
    return seed & MASK32, seed >> 32

"""The portable generator's reference (issue 20): Philox4x32-10 against Random123's known answers."""

from __future__ import annotations

import pytest

from initserve_protocol.portable.philox import key_of, philox4x32

# Random123's kat_vectors, the three "philox4x32 10" lines: counter (4 words), key (2 words) -> output (4 words).
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KNOWN_ANSWERS, ids=["zeros", "ones", "pi"])
def test_philox4x32_10_gives_random123s_known_answers(counter, key, expected) -> None:
    assert philox4x32(counter, key) == expected


def test_the_key_is_the_seed_as_uint64_low_word_first() -> None:
    assert key_of(0x0123456789ABCDEF) == (0x89ABCDEF, 0x01234567)
    assert key_of(-1) == (0xFFFFFFFF, 0xFFFFFFFF)
    assert key_of(1 << 64) == (0, 0)


def test_words_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="counter of 4 words and a key of 2"):
        philox4x32((0, 0, 0), (0, 0))
    with pytest.raises(ValueError, match=r"in \[0, 2\*\*32\)"):
        philox4x32((0, 0, 0, 1 << 32), (0, 0))

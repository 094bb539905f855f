"""The portable generator's known answers (tests/protocol/portable_known_answers.json): the reference and the
fast path (scales.draw, cpu.fill, torch's 16-bit rounding) both give them, and the file is what
``python -m tests.protocol.portable_known_answers --write`` writes now, so the specification cannot drift silently."""

from __future__ import annotations

import hashlib

import pytest

from tests.protocol.portable_known_answers import (
    CASES,
    GENERATOR,
    TABLE,
    entry,
    kernel_bytes,
    load,
    reference_bytes,
    render,
)

IDS = [f"{number}-{case.scheme}-{case.dtype}" for number, case in enumerate(CASES)]


@pytest.fixture(scope="module")
def references() -> list[bytes]:
    """reference.generate's bytes of every case, in CASES' order, computed once (the reference is slow)."""
    return [reference_bytes(case) for case in CASES]


@pytest.fixture(scope="module")
def table() -> dict:
    return load()


def test_the_table_has_every_case_of_this_generator(table) -> None:
    assert table["generator"] == GENERATOR
    assert len(table["cases"]) == len(CASES) >= 40
    for item, case in zip(table["cases"], CASES, strict=True):
        assert (item["scheme"], tuple(item["shape"]), item["dtype"], item["seed"]) == (
            case.scheme,
            case.shape,
            case.dtype,
            case.seed,
        )


@pytest.mark.parametrize("number", range(len(CASES)), ids=IDS)
def test_the_reference_gives_the_known_answer(number, references, table) -> None:
    data, known = references[number], table["cases"][number]
    assert hashlib.sha256(data).hexdigest() == known["sha256"]
    assert data[:16].hex() == known["head"]


@pytest.mark.parametrize("number", range(len(CASES)), ids=IDS)
def test_the_kernel_gives_the_known_answer(number, table) -> None:
    known = table["cases"][number]
    resolved = tuple(tuple(item) for item in known["slices"])
    shape, dtype, seed = tuple(known["shape"]), known["dtype"], known["seed"]
    data = kernel_bytes(known["scheme"], known["params"], shape, dtype, seed, resolved)
    assert data[:16].hex() == known["head"]
    assert hashlib.sha256(data).hexdigest() == known["sha256"]


def test_the_file_is_what_the_script_writes(references) -> None:
    expected = render([entry(case, data) for case, data in zip(CASES, references, strict=True)])
    assert TABLE.read_text() == expected, (
        f"{TABLE.name} is not what `python -m tests.protocol.portable_known_answers --write` writes now: "
        "either the reference changed (a new generator version) or the file was edited by hand"
    )
    assert len(expected) < 50_000

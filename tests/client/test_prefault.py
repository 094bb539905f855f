"""Prefaulting a destination: its pages become resident, its contents never change, small tensors are skipped."""

from __future__ import annotations

import mmap
import sys

import pytest
import torch

from initserve_memory.prefault import PREFAULT_MIN_BYTES, prefault_async

JOIN_SECONDS = 30.0


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * mmap.PAGESIZE


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux's")
def test_a_fresh_tensors_pages_become_resident_without_being_written() -> None:
    nbytes = 256 << 20
    tensor = torch.empty(nbytes, dtype=torch.uint8)  # fresh pages from mmap: not resident until touched
    before = resident_bytes()
    worker = prefault_async(tensor)
    assert worker is not None
    worker.join(JOIN_SECONDS)
    assert resident_bytes() - before >= nbytes * 0.95
    assert int(tensor.count_nonzero()) == 0  # faulted in as the kernel's zero-filled pages, nothing written


def test_contents_are_never_changed() -> None:
    tensor = torch.arange((64 << 20) // 8, dtype=torch.int64)
    expected = tensor.clone()
    worker = prefault_async(tensor)
    assert worker is not None
    worker.join(JOIN_SECONDS)
    assert torch.equal(tensor, expected)


def test_small_tensors_are_left_to_their_writes() -> None:
    assert prefault_async(torch.empty(PREFAULT_MIN_BYTES - 1, dtype=torch.uint8)) is None

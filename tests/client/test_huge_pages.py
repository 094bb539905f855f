"""Huge pages for a large fresh destination: advised before its first write, it is backed by transparent huge
pages (read back from /proc/self/smaps); contents never change; small tensors and refusals change nothing; and a
client with ``MemoryPolicy(huge_pages=True)`` fetches into such memory, byte for byte."""

from __future__ import annotations

import pytest
import torch

import initserve
from initserve_memory import huge_pages
from tests.conftest import ServerProcess, reference, same_bytes

THP = pytest.mark.skipif(not huge_pages.available(), reason="transparent huge pages are off on this kernel")
MADVISE_ONLY = pytest.mark.skipif(
    "[madvise]" not in (huge_pages.THP_SETTING.read_text() if huge_pages.available() else ""),
    reason="the control needs the kernel to give huge pages only where advised",
)


def anon_huge_bytes(tensor: torch.Tensor) -> int:
    """AnonHugePages of the mappings that overlap ``tensor``'s bytes, from /proc/self/smaps (advice splits a
    mapping at the huge-page boundaries, so a tensor can span several)."""
    first = tensor.data_ptr()
    last = first + tensor.numel() * tensor.element_size()
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            words = line.split()
            if "-" in words[0] and len(words) >= 5:
                start, end = (int(part, 16) for part in words[0].split("-"))
                inside = start < last and first < end
            elif inside and words[0] == "AnonHugePages:":
                total += int(words[1]) * 1024
    return total


@THP
def test_an_advised_fresh_tensor_is_faulted_in_huge_pages() -> None:
    tensor = torch.empty(64 << 20, dtype=torch.uint8)
    assert huge_pages.advise(tensor)
    tensor.fill_(1)
    # Its whole huge pages; the kernel may lack a free huge page now and then, so at least most of them.
    assert anon_huge_bytes(tensor) >= (64 << 20) // 2


@THP
@MADVISE_ONLY
def test_without_the_advice_the_same_tensor_gets_none() -> None:
    """The control: the count above is the advice's doing."""
    tensor = torch.empty(64 << 20, dtype=torch.uint8)
    tensor.fill_(1)
    assert anon_huge_bytes(tensor) == 0


def test_contents_are_never_changed() -> None:
    tensor = torch.arange((32 << 20) // 8, dtype=torch.int64)
    expected = tensor.clone()
    huge_pages.advise(tensor)
    assert torch.equal(tensor, expected)


def test_small_and_empty_tensors_are_left_alone() -> None:
    assert not huge_pages.advise(torch.empty(huge_pages.HUGE_PAGES_MIN_BYTES - 1, dtype=torch.uint8))
    assert not huge_pages.advise(torch.empty(0))


@THP
def test_a_client_asking_for_huge_pages_fetches_into_them(server: ServerProcess) -> None:
    shape = (8192, 2048)  # 64 MiB of float32
    with server.client(memory=initserve.MemoryPolicy(huge_pages=True)) as client:
        tensor = client.normal(shape, seed=3)
        assert same_bytes(tensor, reference("normal", shape, seed=3))
        assert anon_huge_bytes(tensor) >= (64 << 20) // 2


@THP
def test_a_pooling_client_asking_for_huge_pages_gets_them_in_its_pool(server: ServerProcess) -> None:
    shape = (8192, 2048)
    policy = initserve.MemoryPolicy(reuse_bytes=256 << 20, huge_pages=True)
    with server.client(memory=policy) as client:
        tensor = client.normal(shape, seed=4)
        assert same_bytes(tensor, reference("normal", shape, seed=4))
        assert anon_huge_bytes(tensor) >= (64 << 20) // 2

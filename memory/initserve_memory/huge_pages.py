"""A large fresh destination backed by transparent huge pages, asked for before its first write.

The first write to each 4 KiB page of a new tensor is a page fault. ``madvise(MADV_HUGEPAGE)`` on the untouched
range lets the kernel fault it in one huge page (2 MiB on x86-64) at a time, 1/512 as many faults, where
transparent huge pages are enabled for advised ranges (``/sys/kernel/mm/transparent_hugepage/enabled`` reads
``[always]`` or ``[madvise]``). Only the range's whole huge pages are advised, so no byte outside the tensor is
affected; contents never change; where the kernel refuses, nothing changes and the writes fault 4 KiB pages as
before. The costs: resident memory grows in huge-page steps, and with the kernel's default ``defrag`` setting
(``madvise``) a fault may first compact memory to find a free huge page.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from initserve_memory import c_library

MADV_HUGEPAGE = 14  # linux/mman.h
HUGE_PAGES_MIN_BYTES = 8 << 20  # below this a tensor holds at most a few huge pages: not worth the call
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HUGE_PAGE_SIZE = Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
DEFAULT_HUGE_PAGE_BYTES = 2 << 20

_madvise = c_library.function("madvise", ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def huge_page_bytes() -> int:
    """The transparent huge page's size on this kernel (2 MiB on x86-64 where it does not say)."""
    try:
        return int(HUGE_PAGE_SIZE.read_text())
    except (OSError, ValueError):
        return DEFAULT_HUGE_PAGE_BYTES


def available() -> bool:
    """Whether this kernel gives huge pages to advised ranges (its setting is ``always`` or ``madvise``)."""
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False
    return _madvise is not None and ("[always]" in setting or "[madvise]" in setting)


def advise(tensor: torch.Tensor) -> bool:
    """Ask for huge pages behind a large contiguous CPU ``tensor``'s whole huge-page-aligned interior; True if
    the kernel took the advice (a small tensor, another OS or a refusal: False, nothing changed)."""
    nbytes = tensor.numel() * tensor.element_size()
    if _madvise is None or nbytes < HUGE_PAGES_MIN_BYTES or tensor.device.type != "cpu":
        return False
    huge = huge_page_bytes()
    start = -(-tensor.data_ptr() // huge) * huge
    end = (tensor.data_ptr() + nbytes) // huge * huge
    return end > start and _madvise(start, end - start, MADV_HUGEPAGE) == 0

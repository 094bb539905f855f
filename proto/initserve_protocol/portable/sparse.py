"""sparse's zero positions under the portable generator (docs/portable.md section 5.1): which rows of each column
are set to zero, from keyed bits of stream 1 instead of torch's stateful ``randperm``.

The key of element (row r, column c) of a (rows, cols) tensor is the uniform U (section 3) of element
``r * cols + c`` in stream 1 (``draws.SPARSE``). Column c's zeros are the ``zeros`` rows with the smallest keys, a
tie going to the smaller row: a uniformly random subset of each column, a function of the seed alone.

``zero_rows`` is the reference (plain Python, a sort per column). The fast path describes each column's subset by
a threshold, ``(key, row)``: an element is zero when its ``(key, row)`` is at most that pair, compared key first.
``thresholds`` finds them for a range of columns with the CPU kernel and numpy, a block of columns at a time (its
memory O(rows x block)); ``zero_mask`` then marks any element from its own key, so a range of a slice costs its own
elements plus the keys of every row of the columns it touches.
"""

from __future__ import annotations

import functools

import numpy as np

from initserve_protocol.portable import cpu
from initserve_protocol.portable.draws import SPARSE, element_word, uniform

KEY_BLOCK_ELEMENTS = 1 << 20  # keys per block of columns in ``thresholds``: 8 MiB of float64, and as much again
NO_ZEROS = -1.0  # a threshold key below every key (keys are in [0, 1))
ALL_ZEROS = 2.0  # a threshold key above every key
CACHED_COLUMNS = 1 << 17  # thresholds of up to this many columns are kept for the next piece (2 MiB)


def zero_rows(seed: int, rows: int, cols: int, column: int, zeros: int) -> set[int]:
    """The reference: the rows of ``column`` that are zero, by sorting the column's (key, row) pairs."""
    keys = sorted((uniform(element_word(seed, r * cols + column, SPARSE)), r) for r in range(rows))
    return {r for _, r in keys[:zeros]}


def thresholds(seed: int, rows: int, cols: int, start: int, count: int, zeros: int) -> tuple[np.ndarray, np.ndarray]:
    """(key, row) thresholds of columns ``[start, start + count)``, as two read-only arrays: element (r, c) is zero
    when its key < key[c] or (its key == key[c] and r <= row[c]). The last few requests' are kept (up to
    CACHED_COLUMNS columns each): a producer fills a tensor piece by piece, and each piece that spans two rows
    needs every column's threshold, which costs every key of the tensor."""
    if count > CACHED_COLUMNS:
        return _thresholds(seed, rows, cols, start, count, zeros)
    return _cached_thresholds(seed % (1 << 64), rows, cols, start, count, zeros)


def _thresholds(seed: int, rows: int, cols: int, start: int, count: int, zeros: int) -> tuple[np.ndarray, np.ndarray]:
    keys_at = np.full(count, NO_ZEROS if zeros == 0 else ALL_ZEROS, dtype=np.float64)
    rows_at = np.full(count, -1, dtype=np.int64)
    if zeros in (0, rows) or count == 0:
        keys_at.flags.writeable = rows_at.flags.writeable = False
        return keys_at, rows_at
    block = max(1, KEY_BLOCK_ELEMENTS // rows)
    for first in range(start, start + count, block):
        width = min(block, start + count - first)
        keys = np.empty(rows * width, dtype=np.float64)
        cpu.fill(keys, (rows, cols), ((1, first, width),), cpu.UNIFORM, 0.0, 1.0, seed, stream=SPARSE)
        keys = keys.reshape(rows, width).T.copy()  # one column a row: contiguous for the partition
        kth = np.partition(keys, zeros - 1, axis=1)[:, zeros - 1]  # the zeros-th smallest key of each column
        need = zeros - np.count_nonzero(keys < kth[:, None], axis=1)  # rows with the kth key that are zero, >= 1
        # The need-th row holding the kth key is the last zero (ties go to the smaller rows): the first such row,
        # but for a column whose keys tie at the threshold (probability about rows**2 * 2**-53).
        equal = keys == kth[:, None]
        last = np.argmax(equal, axis=1)
        for column in np.flatnonzero(need > 1):
            last[column] = np.flatnonzero(equal[column])[need[column] - 1]
        keys_at[first - start : first - start + width] = kth
        rows_at[first - start : first - start + width] = last
    keys_at.flags.writeable = rows_at.flags.writeable = False
    return keys_at, rows_at


# A pure function's memo (its values depend on the arguments alone), bounded in entries and in columns per entry:
# 16 MiB at most. lru_cache is thread-safe.
_cached_thresholds = functools.lru_cache(maxsize=8)(_thresholds)


def zero_mask(keys: np.ndarray, rows: np.ndarray, columns: np.ndarray, limits: tuple[np.ndarray, np.ndarray]):
    """Which elements are zero, from their keys, full-tensor rows and columns (indices into ``limits``)."""
    key_at, row_at = limits[0][columns], limits[1][columns]
    return (keys < key_at) | ((keys == key_at) & (rows <= row_at))

"""The whole-tensor checksum: SHA-256 over the CRC-32 of each 1 MiB block, independent of chunking.

Why this shape: CRC-32 (zlib) runs at ~2.3 GB/s and releases the GIL, SHA-256 at ~1.3 GB/s; hashing one
4-byte CRC per MiB makes the digest cost that of the CRCs while the final SHA-256 binds block order and the
total length. The digest depends only on the bytes, never on how they were chunked, so a stream resumed at
any offset, or split across connections, verifies against the same trailer.
"""

from __future__ import annotations

import hashlib
import zlib

CHECKSUM_ALGORITHM = "sha256-of-crc32-per-1MiB-block"
BLOCK_BYTES = 1 << 20


class TensorChecksum:
    """Incremental form of :func:`tensor_checksum`; feed the tensor's bytes in order, any piece sizes."""

    def __init__(self) -> None:
        self._blocks = hashlib.sha256()
        self._block_crc = 0
        self._block_filled = 0
        self.total_bytes = 0

    def update(self, data: bytes | memoryview, *, crc: int | None = None) -> None:
        """Feed the next bytes; ``crc``, the CRC-32 of exactly ``data``, saves recomputing a whole block's."""
        view = memoryview(data).cast("B")
        if crc is not None and self._block_filled == 0 and len(view) == BLOCK_BYTES:
            self._block_crc = crc
            self._close_block()
            self.total_bytes += BLOCK_BYTES
            return
        position = 0
        while position < len(view):
            take = min(BLOCK_BYTES - self._block_filled, len(view) - position)
            self._block_crc = zlib.crc32(view[position : position + take], self._block_crc)
            self._block_filled += take
            position += take
            if self._block_filled == BLOCK_BYTES:
                self._close_block()
        self.total_bytes += len(view)

    def _close_block(self) -> None:
        self._blocks.update(self._block_crc.to_bytes(4, "big"))
        self._block_crc = 0
        self._block_filled = 0

    def digest(self) -> bytes:
        """The 32-byte digest of everything fed so far (the object stays usable)."""
        final = self._blocks.copy()
        if self._block_filled:
            final.update(self._block_crc.to_bytes(4, "big"))
        final.update(self.total_bytes.to_bytes(8, "big"))
        return final.digest()


def tensor_checksum(data: bytes | memoryview) -> bytes:
    """The checksum of a whole tensor's bytes under :data:`CHECKSUM_ALGORITHM`."""
    checksum = TensorChecksum()
    checksum.update(data)
    return checksum.digest()

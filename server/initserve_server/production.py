"""A tensor being produced: readable up to a watermark while the rest is still being generated.

One producer thread fills the tensor front to back and calls :meth:`Production.advance` as each prefix becomes
final; it computes the CRC-32 of every finished 1 MiB block as it goes, so streams reuse them as chunk CRCs and
the whole-tensor checksum is ready the moment the last byte is. Any number of streams read it meanwhile, each
waiting (:meth:`Production.wait_for`) only for the bytes it is about to send. This is how a stream of an
uncached tensor overlaps its generation, and how a request that joins a generation in flight streams along.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from initserve._checksum import BLOCK_BYTES, TensorChecksum
from initserve._codec import tensor_bytes

WAIT_POLL_SECONDS = 0.1  # how often a waiting stream checks whether its call is still active


class Abandoned(Exception):
    """Every stream that wanted the tensor went away (cancelled, expired or disconnected)."""


class Production:
    """The producer calls :meth:`attach`, :meth:`advance` (any number of times), then :meth:`finish` or
    :meth:`fail`; readers call :meth:`wait_started`, :meth:`wait_for` and :meth:`final_checksum`."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.tensor: torch.Tensor | None = None  # contiguous, on the CPU, from attach() on
        self.block_crcs: list[int] = []  # grows as blocks become final; chunks that are one block reuse them
        self.checksum: bytes | None = None  # the whole tensor's, once finished
        self.error: BaseException | None = None
        self._final = 0  # bytes final
        self._crcs = TensorChecksum()
        self._cancelled = False
        self._changed = threading.Condition()
        self._on_done: list[Callable[[Production], None]] = []

    @classmethod
    def finished(cls, tensor: torch.Tensor) -> Production:
        """A production of an already generated contiguous CPU tensor."""
        production = cls(tensor.numel() * tensor.element_size())
        production.attach(tensor)
        production.finish()
        return production

    # --- producer ---

    def copy_from(self, source: torch.Tensor, host: torch.Tensor, piece_bytes: int) -> None:
        """Attach ``host`` (a contiguous CPU tensor of ``source``'s shape and dtype) and copy ``source`` (any
        device) into it ``piece_bytes`` at a time, advancing after each piece, so streams send the first bytes
        while the rest are still on their way from the GPU. The copies are synchronous: a piece is in ``host``
        when ``copy_`` returns."""
        assert host.is_contiguous() and host.device.type == "cpu"
        assert host.shape == source.shape and host.dtype == source.dtype
        self.attach(host)
        source_flat, host_flat = source.contiguous().view(-1), host.view(-1)
        step = max(1, piece_bytes // host.element_size())
        for start in range(0, host_flat.numel(), step):
            end = min(start + step, host_flat.numel())
            host_flat[start:end].copy_(source_flat[start:end])
            self.advance(end * host.element_size())

    def attach(self, tensor: torch.Tensor) -> None:
        """The tensor being filled; its bytes are read only below the watermark."""
        self.tensor = tensor

    def advance(self, final_bytes: int) -> None:
        """Bytes ``[0, final_bytes)`` are final. Raises :class:`Abandoned` once nobody wants the tensor."""
        if self._cancelled:
            raise Abandoned("every stream for this tensor ended before it was generated")
        assert self.tensor is not None
        if final_bytes <= self._final:
            return
        self._crcs.update(tensor_bytes(self.tensor)[self._final : final_bytes])
        self._final = final_bytes
        with self._changed:
            self.block_crcs.extend(self._crcs.crcs[len(self.block_crcs) :])  # one list that only grows
            self._changed.notify_all()

    def finish(self) -> None:
        assert self.tensor is not None
        self.advance(self.nbytes)
        with self._changed:
            self.block_crcs.extend(self._crcs.finished()[len(self.block_crcs) :])
            self.checksum = self._crcs.digest()
            self._changed.notify_all()
        self._done()

    def fail(self, error: BaseException) -> None:
        with self._changed:
            self.error = error
            self._changed.notify_all()
        self._done()

    def cancel(self) -> None:
        """Ask the producer to stop at its next :meth:`advance` (one that generates in one piece cannot)."""
        self._cancelled = True

    def _done(self) -> None:
        with self._changed:
            callbacks, self._on_done = self._on_done, []
        for callback in callbacks:
            callback(self)

    def on_done(self, callback: Callable[[Production], None]) -> None:
        """Call ``callback(self)`` once finished or failed (at once, if it already is)."""
        with self._changed:
            if not self.done:
                self._on_done.append(callback)
                return
        callback(self)

    # --- readers ---

    @property
    def done(self) -> bool:
        return self.checksum is not None or self.error is not None

    def wait_started(self, is_active: Callable[[], bool] = lambda: True) -> None:
        """Until the first bytes are final (torch accepted the request) or it is done; re-raises its error,
        raises :class:`Abandoned` when ``is_active`` turns false."""
        with self._changed:
            while not (self._final > 0 or self.done):
                if not is_active():
                    raise Abandoned("the call ended while its tensor was being generated")
                self._changed.wait(WAIT_POLL_SECONDS)
        if self.error is not None:
            raise self.error

    def wait_for(self, end: int, is_active: Callable[[], bool] = lambda: True) -> None:
        """Until bytes ``[0, end)`` are final and their block CRCs known; re-raises a production error, raises
        :class:`Abandoned` when ``is_active`` turns false."""
        with self._changed:
            while not self._has(end) and self.error is None:
                if not is_active():
                    raise Abandoned("the call ended while waiting for the tensor's bytes")
                self._changed.wait(WAIT_POLL_SECONDS)
            if not self._has(end):
                raise self.error  # type: ignore[misc]

    def _has(self, end: int) -> bool:
        """Whether bytes ``[0, end)`` may be read: whole blocks whose CRCs are known, and the last byte only
        with the checksum, which the trailer after it carries."""
        if self.checksum is not None:
            return end <= self.nbytes
        return end <= min(len(self.block_crcs) * BLOCK_BYTES, self.nbytes - 1)

    def final_checksum(self) -> bytes:
        """The whole tensor's checksum; call after every byte was waited for."""
        assert self.checksum is not None, "the checksum is known only once the production finished"
        return self.checksum

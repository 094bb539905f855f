"""A tensor being produced: readable up to a watermark while the rest is still being generated.

One producer thread fills the tensor front to back and calls :meth:`Production.advance` as each prefix is
written. Any number of streams read it meanwhile, each waiting (:meth:`Production.wait_for`) only for the bytes
it is about to send. This is how a stream of an uncached tensor overlaps its generation, and how a request that
joins a generation in flight streams along.

A byte may be sent once its 1 MiB block's CRC-32 is known (streams reuse them as chunk CRCs, and the
whole-tensor checksum is made of them). Who computes them: for a CPU generation, the readers. The generating
thread is the slowest step of an uncached fetch (torch's fill runs on one core), so a reader waiting for bytes
that are written but not yet summed sums them itself, in its own thread, one reader at a time; the producer sums
only what no reader did, when it finishes. A producer that is not the slowest step (a copy from the GPU, whose
streams are) sums each piece as it advances (``checksum_now``).

A reader whose call ends stops waiting within WAIT_POLL_SECONDS (``is_active``); the producer is told to stop by
:meth:`Production.cancel`, which it notices at its next stopping point (:meth:`Production.check_cancelled`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from initserve_protocol.checksum import BLOCK_BYTES, TensorChecksum
from initserve_protocol.codec import tensor_bytes

WAIT_POLL_SECONDS = 0.1  # how often a waiting stream checks whether its call is still active


class Abandoned(Exception):
    """Every stream that wanted the tensor went away (cancelled, expired or disconnected)."""


class Production:
    """The producer calls :meth:`attach`, :meth:`advance` (any number of times), then :meth:`finish` or
    :meth:`fail`, and :meth:`check_cancelled` wherever it can stop; readers call :meth:`wait_started`,
    :meth:`wait_for` and :meth:`final_checksum`."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.tensor: torch.Tensor | None = None  # contiguous, on the CPU, from attach() on
        self.block_crcs: list[int] = []  # grows as blocks become final; chunks that are one block reuse them
        self.checksum: bytes | None = None  # the whole tensor's, once finished
        self.error: BaseException | None = None
        self.warnings: list[str] = []  # what torch warned while generating it (torch_warnings), before any byte
        self._written = 0  # bytes the producer has written: final, but maybe not yet summed
        self._final = 0  # bytes written and summed: their blocks' CRCs are in _crcs
        self._summing = False  # a thread is computing CRCs of [_final, _written) outside the lock
        self._crcs = TensorChecksum()
        self._cancelled = False
        self._changed = threading.Condition()
        self._on_done: list[Callable[[Production], None]] = []
        self._on_cancel: list[Callable[[], object]] = []

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
            self.advance(end * host.element_size(), checksum_now=True)

    def attach(self, tensor: torch.Tensor) -> None:
        """The tensor being filled; its bytes are read only below the watermark."""
        self.tensor = tensor

    def advance(self, final_bytes: int, *, checksum_now: bool = False) -> None:
        """Bytes ``[0, final_bytes)`` are written and final; ``checksum_now``: sum them in this thread rather than
        leave it to the readers. Raises :class:`Abandoned` once nobody wants the tensor."""
        self.check_cancelled()
        assert self.tensor is not None
        with self._changed:
            if final_bytes <= self._written:
                return
            self._written = final_bytes
            self._changed.notify_all()
        if checksum_now:
            self._sum_written()

    def finish(self) -> None:
        """Every byte is written: a finished tensor is kept (and cached) even if its streams have gone."""
        assert self.tensor is not None
        with self._changed:
            self._written = self.nbytes
            self._changed.notify_all()
        self._sum_written()  # what no reader summed (all of it, when nobody reads)
        with self._changed:
            self.block_crcs.extend(self._crcs.finished()[len(self.block_crcs) :])
            self.checksum = self._crcs.digest()
            self._changed.notify_all()
        self._done()

    def _sum_written(self) -> None:
        """The producer's share: wait for a reader that is summing, then sum whatever is still unsummed."""
        with self._changed:
            while self._summing:
                self._changed.wait()
            span = self._claim()
        if span is not None:
            self._sum(*span)

    def _claim(self) -> tuple[int, int] | None:
        """Under the lock: the written bytes nobody has summed, now this thread's to sum; None if another thread
        is summing or there is nothing to sum."""
        if self._summing or self._written <= self._final:
            return None
        self._summing = True
        return self._final, self._written

    def _sum(self, start: int, stop: int) -> None:
        """Compute the CRCs of claimed bytes ``[start, stop)`` outside the lock, then publish them."""
        assert self.tensor is not None
        summed = False
        try:
            self._crcs.update(tensor_bytes(self.tensor)[start:stop])
            summed = True
        finally:
            with self._changed:
                if summed:
                    self._final = stop
                    self.block_crcs.extend(self._crcs.crcs[len(self.block_crcs) :])  # one list that only grows
                self._summing = False
                self._changed.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._changed:
            self.error = error
            self._changed.notify_all()
        self._done()

    def cancel(self) -> None:
        """Nobody wants the tensor any more: the producer stops at its next :meth:`advance` or
        :meth:`check_cancelled` (a generation still queued never starts: see :meth:`on_cancel`)."""
        with self._changed:
            if self._cancelled:
                return
            self._cancelled = True
            callbacks, self._on_cancel = self._on_cancel, []
        for callback in callbacks:
            callback()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def check_cancelled(self) -> None:
        """Raise :class:`Abandoned` once :meth:`cancel` was called (the producer's stopping points)."""
        if self._cancelled:
            raise Abandoned("every stream for this tensor ended before it was generated")

    def on_cancel(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` when the production is cancelled (at once, if it already is; never once done)."""
        with self._changed:
            if self.done:
                return
            if not self._cancelled:
                self._on_cancel.append(callback)
                return
        callback()

    def _done(self) -> None:
        with self._changed:
            callbacks, self._on_done = self._on_done, []
            self._on_cancel = []  # nothing left to stop; and its hooks (a pool future) must not keep it alive
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
            while not (self._written > 0 or self.done):
                if not is_active():
                    raise Abandoned("the call ended while its tensor was being generated")
                self._changed.wait(WAIT_POLL_SECONDS)
        if self.error is not None:
            raise self.error

    def wait_for(self, end: int, is_active: Callable[[], bool] = lambda: True) -> None:
        """Until bytes ``[0, end)`` are final and their block CRCs known, summing written bytes in this thread
        while no other thread does; re-raises a production error, raises :class:`Abandoned` when ``is_active``
        turns false."""
        while True:
            with self._changed:
                if self._has(end):
                    return
                if self.error is not None:
                    raise self.error
                if not is_active():
                    raise Abandoned("the call ended while waiting for the tensor's bytes")
                span = self._claim()
                if span is None:
                    self._changed.wait(WAIT_POLL_SECONDS)
                    continue
            self._sum(*span)

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

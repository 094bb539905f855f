"""Serialized InitUnary answers kept by their request's bytes: a repeated small request skips parsing, validation,
the tensor cache and encoding.

Only answers the tensor cache already served (``cache_hit``) with an explicit seed are kept, so each is a pure
function of the request's bytes and this server's fixed configuration: the same bytes are the same answer. The
answers live in an LRU bounded by ``budget_bytes`` (request and answer bytes both counted), apart from the
tensor cache's own budget.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class AnswerMemo:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._answers: OrderedDict[bytes, tuple[bytes, Any]] = OrderedDict()  # LRU order: oldest first
        self._bytes = 0
        self.hits = 0

    def get(self, request: bytes) -> tuple[bytes, Any] | None:
        """(answer, what was kept with it), or None."""
        with self._lock:
            kept = self._answers.get(request)
            if kept is not None:
                self._answers.move_to_end(request)
                self.hits += 1
            return kept

    def put(self, request: bytes, answer: bytes, about: Any = None) -> None:
        """Keep ``answer`` (and ``about``, a small description of it) for ``request``'s bytes."""
        size = len(request) + len(answer)
        if size > self.budget_bytes:
            return
        with self._lock:
            if request in self._answers:
                return
            while self._bytes + size > self.budget_bytes:
                old_request, (old_answer, _) = self._answers.popitem(last=False)
                self._bytes -= len(old_request) + len(old_answer)
            self._answers[request] = (answer, about)
            self._bytes += size

    def gauges(self) -> tuple[int, int]:
        """(answers kept, bytes kept)."""
        with self._lock:
            return len(self._answers), self._bytes

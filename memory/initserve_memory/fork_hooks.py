"""Objects told about a fork, through os.register_at_fork called once, with the first object (never on import).

os.register_at_fork cannot unregister, so each kind of object keeps one :class:`ForkHooks` at module level: the
hooks are registered when the first object is tracked (a process that makes none gets none) and reach every live
one (held weakly) by calling its ``_before_fork`` and ``_after_fork_in_child`` methods.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any


class ForkHooks:
    """The live objects of one kind, told before a fork (``before=True``) and in the child after it."""

    def __init__(self, *, before: bool) -> None:
        self._before = before
        self._objects: weakref.WeakSet[Any] = weakref.WeakSet()
        self._registered = False
        self._lock = threading.Lock()

    def track(self, obj: Any) -> None:
        with self._lock:
            if not self._registered:
                if self._before:
                    os.register_at_fork(before=self._before_fork, after_in_child=self._after_fork_in_child)
                else:
                    os.register_at_fork(after_in_child=self._after_fork_in_child)
                self._registered = True
            self._objects.add(obj)

    def _before_fork(self) -> None:
        for obj in list(self._objects):
            obj._before_fork()

    def _after_fork_in_child(self) -> None:
        for obj in list(self._objects):
            obj._after_fork_in_child()

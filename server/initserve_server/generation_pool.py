"""The generation threads: ``workers`` threads for any generation, and a lane of their own for small ones.

Why lanes: a generation cannot be preempted (torch's fill, a QR, a rejection loop run to their end or to their
next stopping point), so a pool whose threads are all busy with heavy generations makes a ``[4, 4]`` wait
behind them for as long as they take. The cost model (``costs``) calls a generation *light* when it is
estimated to take a few milliseconds; light generations may run on any idle thread, and ``light_workers``
threads run nothing else, so one always starts within about one light generation's time, however many heavy
ones are running or queued.

Heavy generations are background work: their threads run HEAVY_NICENESS steps below the process's priority
(Linux keeps a nice value per thread), so on a busy machine the threads that send cached bytes, answer health
checks and run light generations get the cores first; an idle core still runs a heavy generation at full speed.

The threads are daemons and carry no state a process exit must wait for: ``close()`` drops what is queued
(each task's future is cancelled) and a server stopping under SIGTERM exits without joining generations still
running (see ``cli.main``). Each thread puts torch in the contract's state (``initializers.configure_torch``)
once, before its first generation.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from initserve_server.initializers import configure_torch

DEFAULT_LIGHT_WORKERS = 1
HEAVY_NICENESS = 10  # CFS weight 110 against 1024: a tenth of a core where a normal thread wants it
log = logging.getLogger("initserve.server")


def lower_this_threads_priority(steps: int) -> bool:
    """Raise the calling thread's nice value by ``steps`` (never lowering it: that needs privileges); False where
    the platform has no per-thread nice value."""
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + steps))
    except (AttributeError, OSError) as error:
        log.debug("generation threads keep their priority: %s", error)
        return False
    return True


class PoolClosed(RuntimeError):
    """The server is stopping: no new generation starts."""


class GenerationPool:
    def __init__(self, workers: int, light_workers: int = DEFAULT_LIGHT_WORKERS, name: str = "initserve-generate"):
        if workers < 1 or light_workers < 0:
            raise ValueError(f"workers must be >= 1 and light_workers >= 0, got {workers}, {light_workers}")
        self.workers = workers
        self.light_workers = light_workers
        self._lock = threading.Condition()
        self._heavy: deque[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = deque()
        self._light: deque[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = deque()
        self._running = 0
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, args=(False,), name=f"{name}-{number}", daemon=True)
            for number in range(workers)
        ] + [
            threading.Thread(target=self._work, args=(True,), name=f"{name}-light-{number}", daemon=True)
            for number in range(light_workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, function: Callable[..., Any], *args: Any, light: bool = False) -> Future[Any]:
        """Run ``function(*args)`` on a generation thread; ``light`` generations may also use the light lane.
        Cancelling the returned future before it starts keeps it from ever running."""
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise PoolClosed("the server is stopping; no new generation starts")
            (self._light if light else self._heavy).append((future, function, args))
            self._lock.notify_all()
        return future

    def _next(self, light_only: bool) -> tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None:
        """Under the lock: the oldest task this thread may run (heavy threads prefer heavy tasks, so the light
        lane is not left to carry every light task alone while heavy threads idle)."""
        queues = (self._light,) if light_only else (self._heavy, self._light)
        for queue in queues:
            while queue:
                task = queue.popleft()
                if task[0].set_running_or_notify_cancel():
                    return task
        return None

    def _work(self, light_only: bool) -> None:
        configure_torch()
        if not light_only:
            lower_this_threads_priority(HEAVY_NICENESS)
        while True:
            with self._lock:
                while (task := self._next(light_only)) is None:
                    if self._closed:
                        return
                    self._lock.wait()
                self._running += 1
            future, function, args = task
            try:
                result = function(*args)
            except BaseException as error:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(error)
            else:
                future.set_result(result)
            finally:
                with self._lock:
                    self._running -= 1
                del task, future, function, args  # drop the generation's references before idling

    def gauges(self) -> tuple[int, int]:
        """(generations queued, generations running)."""
        with self._lock:
            return len(self._heavy) + len(self._light), self._running

    def close(self) -> int:
        """Start nothing more: cancel what is queued; returns how many generations are still running (their
        daemon threads end with them, or with the process)."""
        with self._lock:
            self._closed = True
            queued = [*self._heavy, *self._light]
            self._heavy.clear()
            self._light.clear()
            running = self._running
            self._lock.notify_all()
        for future, _, _ in queued:
            future.cancel()
        return running

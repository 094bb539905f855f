"""The generation pool on its own: the light lane, cancelling what is queued, closing, torch's thread count."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from initserve_server.generation_pool import HEAVY_NICENESS, GenerationPool, PoolClosed
from initserve_server.initializers import TORCH_THREADS

WAIT_SECONDS = 10.0


def blocker(started: threading.Event, release: threading.Event) -> str:
    started.set()
    assert release.wait(WAIT_SECONDS)
    return threading.current_thread().name


def test_a_light_generation_runs_while_every_heavy_thread_is_busy_and_more_are_queued() -> None:
    pool = GenerationPool(workers=2)
    release = threading.Event()
    try:
        started = [threading.Event() for _ in range(2)]
        heavy = [pool.submit(blocker, event, release) for event in started]
        queued = pool.submit(lambda: "queued heavy")
        assert all(event.wait(WAIT_SECONDS) for event in started)
        assert pool.gauges() == (1, 2)
        light = pool.submit(lambda: threading.current_thread().name, light=True)
        assert light.result(WAIT_SECONDS).startswith("initserve-generate-light-")
        assert not queued.done()  # heavy work waits for a heavy thread
        release.set()
        assert queued.result(WAIT_SECONDS) == "queued heavy"
        assert sorted(future.result(WAIT_SECONDS) for future in heavy) == [
            "initserve-generate-0",
            "initserve-generate-1",
        ]
    finally:
        release.set()
        pool.close()


def test_idle_heavy_threads_take_light_work_too() -> None:
    pool = GenerationPool(workers=2, light_workers=1)
    release = threading.Event()
    try:
        started = threading.Event()
        pool.submit(blocker, started, release, light=True)  # the light lane is busy
        assert started.wait(WAIT_SECONDS)
        other = pool.submit(lambda: threading.current_thread().name, light=True)
        assert other.result(WAIT_SECONDS).startswith("initserve-generate-")  # a heavy thread took it
    finally:
        release.set()
        pool.close()


def test_a_cancelled_queued_generation_never_runs() -> None:
    pool = GenerationPool(workers=1, light_workers=0)
    release = threading.Event()
    ran: list[str] = []
    try:
        started = threading.Event()
        pool.submit(blocker, started, release)
        assert started.wait(WAIT_SECONDS)
        queued = pool.submit(ran.append, "queued")
        assert queued.cancel()
        release.set()
        assert pool.submit(ran.append, "after").result(WAIT_SECONDS) is None
        assert ran == ["after"]
    finally:
        release.set()
        pool.close()


def test_close_cancels_what_is_queued_refuses_new_work_and_counts_what_runs() -> None:
    pool = GenerationPool(workers=1, light_workers=0)
    release = threading.Event()
    started = threading.Event()
    running = pool.submit(blocker, started, release)
    assert started.wait(WAIT_SECONDS)
    queued = pool.submit(lambda: "never")
    assert pool.close() == 1
    assert queued.cancelled()
    with pytest.raises(PoolClosed, match="the server is stopping"):
        pool.submit(lambda: None)
    release.set()
    assert running.result(WAIT_SECONDS) == "initserve-generate-0"


def test_threads_are_daemons_in_the_contracts_torch_state() -> None:
    pool = GenerationPool(workers=1)
    try:
        state = pool.submit(lambda: (threading.current_thread().daemon, torch.get_num_threads())).result(WAIT_SECONDS)
        assert state == (True, TORCH_THREADS)
    finally:
        pool.close()


def test_an_error_reaches_the_future_and_the_thread_goes_on() -> None:
    pool = GenerationPool(workers=1, light_workers=0)
    try:
        with pytest.raises(ValueError, match="bad"):
            pool.submit(lambda: (_ for _ in ()).throw(ValueError("bad"))).result(WAIT_SECONDS)
        deadline = time.monotonic() + WAIT_SECONDS
        assert pool.submit(lambda: 42).result(max(0.0, deadline - time.monotonic())) == 42
    finally:
        pool.close()


def test_heavy_threads_run_at_a_lower_priority_and_the_light_lane_at_the_processs() -> None:
    pool = GenerationPool(workers=1, light_workers=1)
    release = threading.Event()
    try:
        started = threading.Event()
        pool.submit(blocker, started, release)  # occupies the heavy thread, so the next runs in the light lane
        assert started.wait(WAIT_SECONDS)

        def niceness() -> int:
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        own = os.getpriority(os.PRIO_PROCESS, 0)
        assert pool.submit(niceness, light=True).result(WAIT_SECONDS) == own
        release.set()
        assert pool.submit(niceness).result(WAIT_SECONDS) == min(19, own + HEAVY_NICENESS)
    finally:
        release.set()
        pool.close()

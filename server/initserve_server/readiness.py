"""Readiness: the devices a replica must serve generate a probe tensor, at start and every PROBE_INTERVAL_SECONDS.

A GPU pod on a node whose CUDA is broken would otherwise report SERVING and answer FAILED_PRECONDITION to every
CUDA request. With ``--require-devices cuda``, the health service ``initserve.v1.InitService`` (readiness) says
NOT_SERVING until each listed device has generated a small tensor, and again whenever a probe fails or takes
longer than PROBE_TIMEOUT_SECONDS; the service ``""`` (liveness) says SERVING while the process answers, so a
broken GPU takes the pod out of the Service without restarting it in a loop. Probes run in the generation
pool's light lane, like any small request, from a daemon thread of their own.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
from collections.abc import Callable

import torch

from initserve_server import devices
from initserve_server.generation_pool import GenerationPool

PROBE_INTERVAL_SECONDS = 30.0
PROBE_TIMEOUT_SECONDS = 10.0
PROBE_ELEMENTS = 4096
log = logging.getLogger("initserve.server")


def probe_device(name: str) -> None:
    """Generate a small normal tensor on device ``name`` and bring it back; raise if anything fails."""
    device = devices.parse_device(name)
    devices.require_available(device)
    tensor = torch.empty(PROBE_ELEMENTS, device=device)
    torch.nn.init.normal_(tensor, generator=torch.Generator(device).manual_seed(0))
    host = tensor.cpu()
    if not math.isfinite(float(host.abs().sum())):
        raise RuntimeError(f"device {name} generated non-finite values")


def probe_all(names: tuple[str, ...], pool: GenerationPool) -> str | None:
    """None when every device generates; otherwise why not."""
    for name in names:
        try:
            pool.submit(probe_device, name, light=True).result(PROBE_TIMEOUT_SECONDS)
        except concurrent.futures.TimeoutError:
            return f"device {name}: the probe generation took over {PROBE_TIMEOUT_SECONDS:g} s"
        except Exception as error:  # noqa: BLE001 - any failure means not ready, and says why
            return f"device {name}: {type(error).__name__}: {error}"
    return None


class Readiness:
    """Probes ``names`` now and every PROBE_INTERVAL_SECONDS, calling ``set_ready`` on each change."""

    def __init__(self, names: tuple[str, ...], pool: GenerationPool, set_ready: Callable[[bool], None]) -> None:
        self._names = names
        self._pool = pool
        self._set_ready = set_ready
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="initserve-readiness", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        ready: bool | None = None
        while not self._stop.is_set():
            problem = probe_all(self._names, self._pool)
            if self._stop.is_set():
                return
            if (problem is None) != ready:
                ready = problem is None
                if ready:
                    log.info("required devices generate: %s; ready", ", ".join(self._names))
                else:
                    log.error("not ready: %s", problem)
                self._set_ready(ready)
            self._stop.wait(PROBE_INTERVAL_SECONDS)

    def close(self) -> None:
        self._stop.set()

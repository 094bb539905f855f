"""MemoryPolicy(malloc_thresholds=True) raises glibc's dynamic malloc thresholds once per process: received memory
is reused, not faulted in. Off by default: a Client changes nothing process-wide unless asked.

Each check runs in a fresh interpreter, so that nothing this test process did to glibc's thresholds counts.
"""

from __future__ import annotations

import os
import textwrap

import pytest

from initserve_memory import malloc_thresholds
from tests.conftest import ServerProcess, run_python

glibc_only = pytest.mark.skipif(not malloc_thresholds._is_glibc(), reason="glibc's malloc only")

# In a thread of its own (an arena of its own, as gRPC's channel thread has), 8 blocks of 1 MiB are written and
# freed, 5 times. A mapped 1 MiB block freed first sets glibc's dynamic thresholds to about 1 MiB (mmap) and
# 2 MiB (trim), so every round's 8 MiB at the arena's top is given back and faulted in again (~2,000 faults per
# round); with the thresholds raised it stays, and later rounds fault nothing.
ARENA_CHURN = textwrap.dedent(
    """
    import ctypes, resource, sys, threading
    from initserve_memory import malloc_thresholds
    if sys.argv[1] == "raise":
        assert malloc_thresholds.raise_thresholds()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    MIB = 1 << 20
    libc.free(libc.malloc(MIB))  # what the first received 1 MiB message does
    faults = []

    def churn():
        for _ in range(5):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            blocks = [libc.malloc(MIB) for _ in range(8)]
            for block in blocks:
                ctypes.memset(block, 1, MIB)
            for block in blocks:
                libc.free(block)
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

    thread = threading.Thread(target=churn)
    thread.start()
    thread.join()
    print(sum(faults[1:]))
    """
)


def output_of(source: str, *args: str, env: dict[str, str] | None = None) -> str:
    done = run_python(source, *args, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@glibc_only
def test_raised_thresholds_keep_a_thread_s_freed_memory_for_its_next_allocations() -> None:
    raised = int(output_of(ARENA_CHURN, "raise"))
    dynamic = int(output_of(ARENA_CHURN, "leave"))
    pages_per_round = 8 * (1 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert raised < pages_per_round // 8  # 4 later rounds: almost nothing faulted again
    assert dynamic >= 4 * pages_per_round // 2  # given back every round: most pages faulted in each time


def test_the_switch_turns_it_off_and_it_runs_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(malloc_thresholds.ENV_SWITCH, "0")
    assert malloc_thresholds.raise_thresholds() is False
    monkeypatch.delenv(malloc_thresholds.ENV_SWITCH)
    assert malloc_thresholds.raise_thresholds() is malloc_thresholds._is_glibc()
    # done once; later calls only report it
    assert malloc_thresholds.raise_thresholds() is malloc_thresholds._is_glibc()


FETCH_FAULTS = textwrap.dedent(
    """
    import resource, statistics, sys, torch, initserve
    shape = (64 * 256, 1024)  # 64 MiB of float32
    out = torch.zeros(shape)  # resident: the fetches write into pages written before
    # BDP probing off: a window that grows also faults in new receive memory (up to ~500 a fetch, measured),
    # which is not what this measures.
    options = [("grpc.http2.bdp_probe", 0), ("grpc.use_local_subchannel_pool", 1)]
    memory = initserve.MemoryPolicy(malloc_thresholds=sys.argv[2] == "raise")
    with initserve.Client(sys.argv[1], timeout=60, options=options, memory=memory) as client:
        faults = []
        for _ in range(10):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            client.fill_(out, "normal", seed=41)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(statistics.median(faults[2:]))  # after two fetches of warm-up
    """
)


@glibc_only
def test_a_cached_fetch_into_resident_memory_takes_almost_no_page_faults(server: ServerProcess) -> None:
    """Medians measured per 64 MiB fetch: 2-3 with the thresholds raised; 1,970-3,180 with them left where glibc
    put them (a full run once saw a median of 295 with BDP probing on: faults of a growing window)."""
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    raised = float(output_of(FETCH_FAULTS, server.target, "raise"))
    dynamic = float(output_of(FETCH_FAULTS, server.target, "leave"))
    assert raised < pages // 100
    assert dynamic > pages // 16

"""A Client changes nothing process-wide unless its MemoryPolicy asks: no allocator setting, no fork hook.

Each check runs in a fresh interpreter that spies on os.register_at_fork before initserve is imported, and asks
glibc whether a 24 MiB malloc is still served by a mapping of its own (glibc's mmap threshold as the process had
it) or from the heap (the threshold raised: MemoryPolicy(malloc_thresholds=True)).
"""

from __future__ import annotations

import json
import textwrap

import pytest

import initserve
from initserve_memory import malloc_thresholds
from tests.conftest import ServerProcess, reference, run_python, same_bytes

FRESH_CLIENT = textwrap.dedent(
    """
    import ctypes, json, os, sys, traceback
    hooks = []
    real_register = os.register_at_fork

    def spy(**callbacks):
        caller = traceback.extract_stack(limit=2)[0].filename
        hooks.append(caller)
        real_register(**callbacks)

    os.register_at_fork = spy
    import initserve

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)

    def mapped_blocks_for_24_mib():  # asked once: freeing a mapped block moves glibc's dynamic thresholds
        before = libc.mallinfo2().hblks
        block = libc.malloc(24 << 20)
        mapped = libc.mallinfo2().hblks - before
        libc.free(block)
        return mapped

    imported_hooks = list(hooks)
    policy = initserve.MemoryPolicy.fast() if sys.argv[1] == "fast" else initserve.MemoryPolicy()
    client = initserve.Client("localhost:1", memory=policy)
    client.close()
    print(json.dumps({
        "mapped": mapped_blocks_for_24_mib(),
        "hooks_on_import": [path for path in imported_hooks if "initserve" in path],
        "hooks_after_client": [path for path in hooks if "initserve" in path],
    }))
    """
)
glibc_only = pytest.mark.skipif(not malloc_thresholds._is_glibc(), reason="glibc's malloc only")


def fresh_client(policy: str) -> dict:
    done = run_python(FRESH_CLIENT, policy)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@glibc_only
def test_a_default_client_changes_no_allocator_setting_and_registers_no_fork_hook() -> None:
    seen = fresh_client("default")
    assert seen == {"mapped": 1, "hooks_on_import": [], "hooks_after_client": []}


@glibc_only
def test_the_fast_policy_raises_the_thresholds_and_its_pool_registers_its_fork_hooks() -> None:
    """The control: the same checks see what the fast policy does (so the default's result means something)."""
    seen = fresh_client("fast")
    assert (seen["mapped"], seen["hooks_on_import"]) == (0, [])
    assert [path.rsplit("/", 1)[-1] for path in seen["hooks_after_client"]] == ["fork_hooks.py"]  # the pool's


def test_a_default_clients_tensors_are_torch_empty_s_and_nothing_is_kept(server: ServerProcess) -> None:
    shape = (4096, 1024)  # 16 MiB: the size the fast policy pools and prefaults
    with server.client() as client:
        tensor = client.normal(shape, seed=3)
        assert same_bytes(tensor, reference("normal", shape, seed=3))
        assert tensor.untyped_storage().resizable()
        del tensor
        assert client._memory.free_bytes() == 0 and client.release_memory() == 0


def test_the_fast_policy_keeps_freed_memory_for_the_next_fetch(server: ServerProcess) -> None:
    shape = (4096, 1024)
    with server.client(memory=initserve.MemoryPolicy.fast()) as client:
        tensor = client.normal(shape, seed=3)
        assert same_bytes(tensor, reference("normal", shape, seed=3))
        assert not tensor.untyped_storage().resizable()  # made over a mapping of the pool
        del tensor
        assert client._memory.free_bytes() == 16 << 20
        assert client.release_memory() == 16 << 20

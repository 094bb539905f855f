"""Linux host-memory tricks, walled off: nothing here runs on import, and each is used only when asked for.

The SDK uses them behind ``initserve.MemoryPolicy`` (all off by default); the server for the tensors it generates
within its byte budgets. docs/performance.md measures what each buys.

- :mod:`~initserve_memory.buffer_pool`: new CPU tensors over memory freed tensors left.
- :mod:`~initserve_memory.reuse_pool`: the pool of free buffers behind it (and the SDK's shared-memory regions).
- :mod:`~initserve_memory.page_moves`: written pages moved between mappings (``mremap``), so one size serves another.
- :mod:`~initserve_memory.prefault`: a large destination's pages made resident by another thread.
- :mod:`~initserve_memory.huge_pages`: a large fresh destination backed by transparent huge pages.
- :mod:`~initserve_memory.malloc_thresholds`: glibc's dynamic malloc thresholds raised, process-wide, when called.
- :mod:`~initserve_memory.c_library`: the C library calls behind them (ctypes).
"""

"""Keep XLA:CPU's per-step scratch memory mapped between steps (glibc only).

XLA:CPU allocates a jitted call's temporaries as one block (1.7 GB for the
MiniLM train step at 16 x 64 + 32 x 128 tokens) and frees it when the call
returns. glibc's malloc serves a block that size with a fresh ``mmap`` (the
executing thread's arena cannot hold it) and unmaps it on free, so every step
page-faults the whole block back in: 400k minor faults and 1-1.8 s of kernel
time per step on one core, about a fifth of the step (``benchmarks/step_throughput.py``).

:func:`keep_scratch_mapped` asks glibc to serve large blocks from the main
heap (one arena, no ``mmap`` for large blocks) and not to give freed memory
back, so the next step reuses the same pages: no faults, no kernel time. Peak
RSS does not stay at the old peak, though: small allocations made during a
step carve the start of the freed block, the next step's block no longer fits
in it, and the heap settles at two blocks. Measured at shape A, 1 thread: step
5.8 s instead of 6.9 s, peak RSS 4.4 GB instead of 2.8 GB.

That trade is not a default: set ``OPERA_JAX_KEEP_SCRATCH=1`` in the
environment to take it (speed over memory, on a machine with memory to spare).
It must apply before any thread other than the main one allocates (glibc sizes
its arena limit once), so ``opera_jax/__init__.py`` calls
:func:`keep_scratch_mapped` on import, and it acts only when the variable is
set. Not glibc (macOS, musl): nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

applied = False


def keep_scratch_mapped() -> bool:
    """Apply the settings above; returns whether they were applied."""
    global applied
    if applied:
        return True
    if os.environ.get("OPERA_JAX_KEEP_SCRATCH", "0") != "1":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, -1)  # -1: never trim
    applied = bool(ok)
    return applied

"""Back XLA:CPU's per-step scratch memory with transparent huge pages (glibc on Linux).

XLA:CPU allocates a jitted call's temporaries as one block (1.3-1.7 GB for the
MiniLM train step at 16 x 64 + 32 x 128 tokens) and frees it when the call
returns. glibc serves a block that size with a fresh ``mmap`` and unmaps it on
free, so every step faults the whole block back in, 4 KiB at a time: ~418k
minor faults and 1-1.4 s of kernel time per step on one core, 15-20% of the
step (``benchmarks/step_throughput.py``).

glibc's tunable ``glibc.malloc.hugetlb=1`` (glibc >= 2.35) makes malloc
``madvise(MADV_HUGEPAGE)`` the memory it maps; with the kernel's transparent
huge pages in ``madvise`` or ``always`` mode the block then faults in 2 MiB at
a time. Measured at that shape, one thread: 755 faults and 0.17 s of kernel
time per step, step 5.4 s instead of 6.5-6.9 s, the same peak memory.

Tunables are read when a process starts, so :func:`use_huge_pages` re-executes
the running command once with the tunable added to ``GLIBC_TUNABLES`` (the
variable then carries it, so there is no second re-execution). The command-line
entry point (``opera-jax``, ``python -m opera_jax.cli``) calls it first thing; in
your own program set ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` before starting
Python. ``OPERA_JAX_HUGEPAGES=0`` turns it off. Where it cannot apply (not
Linux, not glibc >= 2.35, huge pages ``never``) nothing happens.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def with_hugetlb(tunables: str | None) -> str:
    """``GLIBC_TUNABLES`` with ``glibc.malloc.hugetlb=1`` added (an existing hugetlb setting is kept)."""
    items = [t for t in (tunables or "").split(":") if t]
    if any(t.startswith("glibc.malloc.hugetlb=") for t in items):
        return ":".join(items)
    return ":".join([*items, TUNABLE])


def _glibc_version() -> tuple[int, ...] | None:
    """``(major, minor)`` of the C library on Linux when it is glibc, else None."""
    name, version = platform.libc_ver()
    if sys.platform != "linux" or name != "glibc":
        return None
    try:
        return tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return None


def huge_pages_possible() -> bool:
    """Linux with glibc >= 2.35 and transparent huge pages not ``never``."""
    version = _glibc_version()
    if version is None or version < (2, 35):
        return False
    try:
        return "[never]" not in _THP.read_text()
    except OSError:
        return False


def use_huge_pages() -> None:
    """Re-execute this command with huge pages for malloc, unless already so, turned off, or impossible."""
    if os.environ.get("OPERA_JAX_HUGEPAGES", "1") == "0":
        return
    current = os.environ.get("GLIBC_TUNABLES", "")
    wanted = with_hugetlb(current)
    if wanted == current or not huge_pages_possible():  # already set (by us or the user), or impossible
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": wanted})


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``).

    XLA's compiler frees hundreds of MB when a compilation ends, but glibc keeps
    freed heap memory mapped, so it would stay in the process's resident set and
    under its peak for the rest of the run. The train step calls this after
    compiling. Not glibc: nothing happens.
    """
    if _glibc_version() is None:
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

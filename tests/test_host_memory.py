"""Huge pages for XLA:CPU's scratch memory: the glibc tunable, and the one re-execution that applies it."""

import os
import subprocess
import sys

import pytest

from opera_jax.cpu.host_memory import huge_pages_possible, release_free_memory, with_hugetlb

PRINT_AFTER = (
    "from opera_jax.cpu.host_memory import use_huge_pages; import os; print('started', flush=True); "
    "use_huge_pages(); print(os.environ.get('GLIBC_TUNABLES'))"
)


def test_tunable_is_added_once_and_others_kept():
    assert with_hugetlb(None) == "glibc.malloc.hugetlb=1"
    assert with_hugetlb("") == "glibc.malloc.hugetlb=1"
    assert with_hugetlb("glibc.malloc.arena_max=2") == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert with_hugetlb("glibc.malloc.hugetlb=0:x=1") == "glibc.malloc.hugetlb=0:x=1"  # the user's choice stands


def _run(**env):
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "OPERA_JAX_HUGEPAGES")}
    out = subprocess.run(
        [sys.executable, "-c", PRINT_AFTER], env={**base, **env}, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def test_the_command_reexecutes_once_with_huge_pages():
    if not huge_pages_possible():
        pytest.skip("not Linux with glibc >= 2.35 and transparent huge pages")
    # "started" twice: the first process re-executed itself, the second found the tunable and went on
    assert _run() == ["started", "started", "glibc.malloc.hugetlb=1"]


def test_turned_off_or_already_set_means_no_reexecution():
    assert _run(OPERA_JAX_HUGEPAGES="0") == ["started", "None"]
    assert _run(GLIBC_TUNABLES="glibc.malloc.hugetlb=0") == ["started", "glibc.malloc.hugetlb=0"]


def test_release_free_memory_is_harmless():
    release_free_memory()
    release_free_memory()

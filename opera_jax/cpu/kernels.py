"""What the C++ kernels for XLA:CPU share: compiling them, where they are kept, turning them off,
and running them per device.

The kernels (``csrc/*.cc``: attention in ``attention.py``, matrix products through MKL in
``blas.py``) are XLA FFI handlers compiled from source the first time a process needs them,
with the C++ compiler of ``$CXX`` (default ``g++``, else ``c++``) and ``-O3 -march=native``, into
``$OPERA_KERNEL_CACHE_DIR``, else ``$OPERA_CACHE_DIR/kernels`` (default ``~/.cache/opera-jax/kernels``):
one library per source (with the headers beside it), compiler, flags, linked libraries, jaxlib and
CPU; later processes load it from there.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import jax

from opera_jax.io_utils import atomic_path, cache_dir

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")

_disabled = 0  # > 0 inside disabled()


@contextlib.contextmanager
def disabled():
    """Models traced inside use no C++ kernel: XLA's own ops throughout (the planner: XLA then counts
    every temporary and FLOP, as a GPU's or TPU's compiler would see them)."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


def wanted(env: str) -> bool:
    """Not inside :func:`disabled` and not turned off by the environment variable ``env`` (``"0"``)."""
    return _disabled == 0 and os.environ.get(env, "1") != "0"


def _cpu_signature() -> str:
    """The CPU's model and feature flags (``-march=native`` code is only valid on a CPU like this one)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


KERNEL_CACHE_ENV = "OPERA_KERNEL_CACHE_DIR"


def kernel_dir() -> Path:
    """Where compiled kernels are kept. Content-addressed, so one folder can serve every run and test
    (the tests share one per session: a kernel compiles once, not once per process)."""
    own = os.environ.get(KERNEL_CACHE_ENV)
    return Path(own).expanduser() if own else cache_dir("kernels")


def find_compiler() -> str | None:
    return shutil.which(os.environ.get("CXX") or "g++") or shutil.which("c++")


def build(source: Path, compiler: str, out_dir: Path, link: tuple[str, ...] = (), extra_key: str = "") -> Path:
    """Compile ``source`` (linked with ``link``) into ``out_dir`` unless it is there already; the library's path.

    ``extra_key``: whatever else the library depends on (the linked libraries' version). Written
    to a temporary file and renamed, so processes compiling at the same time never load a
    half-written library. A failed compilation raises ``RuntimeError`` with the compiler's message."""
    import jaxlib

    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]  # what the sources include
    key = hashlib.sha256(
        "\0".join(
            [
                source.read_text(),
                *headers,
                compiler,
                version,
                " ".join(FLAGS),
                " ".join(link),
                extra_key,
                jaxlib.__version__,
                _cpu_signature(),
            ]
        ).encode()
    ).hexdigest()[:20]
    lib = out_dir / f"{source.stem}-{key}.so"
    if lib.exists():
        return lib
    with atomic_path(lib) as tmp:
        cmd = [compiler, *FLAGS, "-isystem", jax.ffi.include_dir(), str(source), "-o", str(tmp), *link]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return lib


def load(
    source: Path, targets: dict[str, str], fallback: str, link: tuple[str, ...] = (), extra_key: str = ""
) -> ctypes.CDLL | None:
    """Compile ``source`` (now, if needed, into :func:`kernel_dir`), load it, register each
    ``{XLA custom-call target: the library's handler symbol}`` with XLA:CPU and return the library.
    ``None``, after a one-line warning that ends with ``fallback`` (what runs instead), where there
    is no C++ compiler or the kernel does not build."""
    compiler = find_compiler()
    if compiler is None:
        log.warning("opera-jax: no C++ compiler ($CXX, g++, c++): %s", fallback)
        return None
    try:
        lib = ctypes.cdll.LoadLibrary(str(build(source, compiler, kernel_dir(), link, extra_key)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("opera-jax: %s did not build (%s): %s", source.name, e, fallback)
        return None
    for target, symbol in targets.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return lib

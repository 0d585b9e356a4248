"""The dense layers' matrix products on XLA:CPU through Intel oneMKL (``csrc/gemm.cc``, through the XLA FFI).

XLA:CPU runs a lone dot through Eigen. For the encoder's f32 shapes on an AVX-512 Xeon,
Eigen's weight-gradient products (both operands contracted over the tokens) ran 15-22% below
MKL's, and on two threads it ran ``[tokens, 384] @ [384, 384]`` on one of them
(``benchmarks/README.md``). With the ``mkl`` extra installed (``pip install "opera-jax[mkl]"``,
x86-64 Linux) every product of :func:`ops.dense` and :func:`ops.gelu_dense`, forward, input
gradient and weight gradient, is one custom call: MKL's single-threaded SGEMM (its sequential
layer: no OpenMP threads of its own) on row blocks of the result spread over XLA:CPU's intra-op
threads. The kernel is compiled and cached like the attention kernel (``kernels.py``), linked
against the wheel's libraries; the key includes MKL's version.

Without MKL, without a C++ compiler, off CPU, in bf16, inside ``cpu_kernels.disabled()`` or with
``OPERA_JAX_CPU_BLAS=0``, the products stay XLA dots. Under ``jax.set_mesh`` of the train step's
mesh each device multiplies its own tokens (``jax.shard_map``); a weight gradient is summed over
the devices with one ``psum``. Results equal XLA's dots to float rounding (``tests/test_cpu_blas.py``).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from opera_jax.cpu import kernels as cpu_kernels
from opera_jax.sharding import per_device

log = logging.getLogger(__name__)

SOURCE = cpu_kernels.CSRC / "gemm.cc"
TARGET, SYMBOL = "opera_gemm", "OperaGemm"
ENV = "OPERA_JAX_CPU_BLAS"  # "0": never use MKL
# MKL's LP64 interface, its sequential threading layer and its core, in link order.
MKL_LIBRARIES = ("libmkl_intel_lp64.so", "libmkl_sequential.so", "libmkl_core.so")


def mkl_libraries() -> tuple[list[Path], str] | None:
    """The installed ``mkl`` wheel's :data:`MKL_LIBRARIES` (paths) and its version; ``None`` without it."""
    try:
        files, version = metadata.files("mkl") or [], metadata.version("mkl")
    except metadata.PackageNotFoundError:
        return None
    found = {}
    for f in files:
        for name in MKL_LIBRARIES:
            if f.name == name or f.name.startswith(name + "."):
                found[name] = Path(f.locate()).resolve()
    if len(found) < len(MKL_LIBRARIES) or not all(p.exists() for p in found.values()):
        return None
    return [found[name] for name in MKL_LIBRARIES], version


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The MKL kernel, compiled (now, if needed), loaded and registered; once per process."""
    mkl = mkl_libraries()
    if mkl is None:
        log.info("opera-jax: no MKL (the `mkl` extra): the dense layers' products run as XLA dots")
        return None
    libraries, version = mkl
    link = (*map(str, libraries), f"-Wl,-rpath,{libraries[0].parent}")
    return cpu_kernels.load(
        SOURCE, {TARGET: SYMBOL}, "the dense layers' products run as XLA dots", link, extra_key=f"mkl {version}"
    )


def available() -> bool:
    """Whether the MKL kernel is compiled, loaded and registered (see :func:`_library`)."""
    return _library() is not None


def sgemm_address() -> int | None:
    """The address of MKL's ``cblas_sgemm`` (LP64, sequential), as loaded with the kernel; ``None``
    without it. The attention kernel runs its products through it (``attention.py``)."""
    lib = _library()
    return None if lib is None else ctypes.cast(lib.cblas_sgemm, ctypes.c_void_p).value


def applies(*arrays: jax.Array) -> bool:
    """Whether the products of these operands go to MKL: f32 on CPU, MKL's kernel available, not turned off."""
    if jax.default_backend() != "cpu" or any(x.dtype != jnp.float32 for x in arrays):
        return False
    return cpu_kernels.wanted(ENV) and available()


def _gemm(a: jax.Array, b: jax.Array, ta: bool, tb: bool) -> jax.Array:
    """``op(a) op(b)`` for matrices, ``op`` the transpose where ``ta`` / ``tb`` say so."""
    m = a.shape[1] if ta else a.shape[0]
    n = b.shape[0] if tb else b.shape[1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential")
    return call(a, b, ta=np.int64(ta), tb=np.int64(tb))


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w``: ``[tokens, din] @ [din, dout]`` (a dense layer's forward product)."""
    return per_device(lambda x, w: _gemm(x, w, False, False), x, w, whole=(1,))


def matmul_t(g: jax.Array, w: jax.Array) -> jax.Array:
    """``g @ w.T``: ``[tokens, dout]`` by ``[din, dout]`` (a dense layer's input gradient)."""
    return per_device(lambda g, w: _gemm(g, w, False, True), g, w, whole=(1,))


def t_matmul(a: jax.Array, g: jax.Array) -> jax.Array:
    """``a.T @ g``: ``[tokens, din]`` and ``[tokens, dout]`` contracted over every device's tokens
    (a dense layer's weight gradient)."""
    return per_device(lambda a, g: _gemm(a, g, True, False), a, g, summed=True)

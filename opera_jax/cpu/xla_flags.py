"""The XLA:CPU flags opera-jax runs with: single matrix multiplications through Eigen, not YNNPACK.

jaxlib 0.10's XLA:CPU hands every dot to YNNPACK (``__ynn_fusion``). For the
encoder's shapes, f32 on one core of an Intel Xeon (Emerald Rapids, AVX-512),
YNNPACK's kernels are the slower ones: the feed-forward up-projection
``[16384, 384] @ [384, 1536]`` ran at 60-70 GFLOP/s against 120-137 under
XLA's Eigen path, and the MiniLM train step's dots as a whole at 80 against 102
GFLOP/s (``benchmarks/README.md``, "lone dots through Eigen instead of YNNPACK"). Removing the
YNN fusion type ``INDIVIDUAL_DOT`` sends lone dots to Eigen and leaves YNNPACK
the reductions (LayerNorm, softmax row sums) with whatever it fuses into them:
switching YNNPACK off altogether makes XLA split those reductions into hundreds
of slow ``reduce-window`` passes (a slower step than jaxlib's default).

The flag is read when jax starts its CPU backend, so :func:`use_xla_cpu_flags`
must run before the first jax computation; the ``opera-jax`` command calls it
first thing, and so does the test suite. An XLA that does not know a flag in
``XLA_FLAGS`` aborts, so the flag is only added for the jaxlib releases it was
measured on (:data:`MEASURED_JAXLIB`); on others nothing changes. Your own
``--xla_cpu_experimental_ynn_fusion_type`` in ``XLA_FLAGS`` wins, and
``OPERA_JAX_XLA_CPU_FLAGS=0`` turns this off. GPU and TPU runs are unaffected (it
is a CPU-backend option).
"""

from __future__ import annotations

import os
from importlib import metadata

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-INDIVIDUAL_DOT"
MEASURED_JAXLIB = ((0, 10),)  # (major, minor) releases whose XLA:CPU has the flag and was measured with it


def with_xla_cpu_flags(flags: str | None) -> str:
    """``XLA_FLAGS`` with :data:`FLAG` added (a YNN fusion setting of the user's own is kept)."""
    flags = (flags or "").strip()
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return flags
    return f"{flags} {FLAG}".strip()


def _jaxlib_release() -> tuple[int, int] | None:
    try:
        major, minor = metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def use_xla_cpu_flags() -> None:
    """Add :data:`FLAG` to ``XLA_FLAGS`` for this process and its children, where it applies."""
    if os.environ.get("OPERA_JAX_XLA_CPU_FLAGS", "1") == "0" or _jaxlib_release() not in MEASURED_JAXLIB:
        return
    os.environ["XLA_FLAGS"] = with_xla_cpu_flags(os.environ.get("XLA_FLAGS"))

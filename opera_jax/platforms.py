"""Which platform JAX will compute on, known before JAX starts a backend.

The command sets the process up for XLA:CPU (huge pages, which re-executes it once; XLA:CPU's
flags) only where the computation will run on the CPU: a host with a GPU or TPU plugin for JAX
installed, or ``JAX_PLATFORMS`` naming an accelerator first, gets none of it, and the CPU package
(``opera_jax/cpu``) is not imported there.
"""

from __future__ import annotations

import importlib.util
import os

# The modules JAX's accelerator plugins install (jax[cuda12], jax[cuda13], jax[tpu], ROCm).
ACCELERATOR_MODULES = ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu", "jax_rocm7_plugin", "jax_rocm60_plugin")


def accelerator_expected(environ=os.environ) -> bool:
    """Whether JAX is expected to pick a GPU or TPU here: ``JAX_PLATFORMS``' first entry when it is
    set, else whether an accelerator plugin is installed (a plugin without a device still falls
    back to the CPU, which then runs without the CPU set-up: correct, slower)."""
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms[0] != "cpu"
    return any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_MODULES)

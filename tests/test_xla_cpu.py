"""The XLA:CPU flag opera-jax runs with: how it enters XLA_FLAGS, and that it moves lone dots off YNNPACK."""

import os
import subprocess
import sys

import pytest

from opera_jax.cpu import xla_flags as xla_cpu
from opera_jax.cpu.xla_flags import FLAG, with_xla_cpu_flags

# Compiles one f32 dot in a fresh process (XLA reads XLA_FLAGS once) and prints what XLA:CPU made of it.
COMPILE_A_DOT = """
from opera_jax.cpu.xla_flags import use_xla_cpu_flags
use_xla_cpu_flags()
import jax, jax.numpy as jnp
text = jax.jit(lambda a, b: a @ b).lower(jnp.ones((256, 64)), jnp.ones((64, 128))).compile().as_text()
print("ynn" if "__ynn_fusion" in text else "other")
"""


def test_flag_is_added_once_and_the_users_flags_kept():
    assert with_xla_cpu_flags(None) == FLAG
    assert with_xla_cpu_flags("--xla_force_host_platform_device_count=8") == (
        "--xla_force_host_platform_device_count=8 " + FLAG
    )
    assert with_xla_cpu_flags(with_xla_cpu_flags("")) == FLAG
    own = "--xla_cpu_experimental_ynn_fusion_type=REDUCE"
    assert with_xla_cpu_flags(own) == own  # the user's choice stands


def test_only_for_the_measured_jaxlib_releases(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--x=1")
    monkeypatch.setattr(xla_cpu, "_jaxlib_release", lambda: (0, 99))
    xla_cpu.use_xla_cpu_flags()
    assert os.environ["XLA_FLAGS"] == "--x=1"  # an XLA that lacks the flag would abort on it
    monkeypatch.setattr(xla_cpu, "_jaxlib_release", lambda: xla_cpu.MEASURED_JAXLIB[0])
    monkeypatch.setenv("OPERA_JAX_XLA_CPU_FLAGS", "0")
    xla_cpu.use_xla_cpu_flags()
    assert os.environ["XLA_FLAGS"] == "--x=1"
    monkeypatch.delenv("OPERA_JAX_XLA_CPU_FLAGS")
    xla_cpu.use_xla_cpu_flags()
    assert os.environ["XLA_FLAGS"] == "--x=1 " + FLAG


def _compiled_dot(**env) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "OPERA_JAX_XLA_CPU_FLAGS")}
    out = subprocess.run(
        [sys.executable, "-c", COMPILE_A_DOT],
        env={**base, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()[-1]


def test_the_flag_takes_lone_dots_off_ynnpack():
    if xla_cpu._jaxlib_release() not in xla_cpu.MEASURED_JAXLIB:
        pytest.skip("the flag is only used with the jaxlib releases it was measured on")
    assert _compiled_dot(OPERA_JAX_XLA_CPU_FLAGS="0") == "ynn"  # jaxlib's default: the dot goes to YNNPACK
    assert _compiled_dot() == "other"  # with the flag: XLA's own dot (Eigen)

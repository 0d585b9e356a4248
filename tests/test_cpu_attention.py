"""The C++ CPU attention kernel (opera_jax.models.cpu_attention) against ops.attention, its XLA formulation."""

import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from opera_jax.cpu import attention as cpu_attention
from opera_jax.cpu import blas as cpu_blas
from opera_jax.cpu import kernels as cpu_kernels
from opera_jax.models import attention, ops
from opera_jax.sharding import BATCH_AXES, make_mesh

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out: README "Tests"


@pytest.fixture(autouse=True)
def _kernel():
    """Built on first use (into the tests' cache directory, see conftest), or these tests are skipped."""
    if not cpu_attention.available():
        pytest.skip("the CPU attention kernel did not build (no C++ compiler?)")


def _operands(b, n, h, d, seed=0, rate=0.0, empty=False):
    """[b, n, h, d] q (scaled), k, v, cotangent g; a [b, 1, 1, n] padding bias of random lengths; a keep-mask."""
    rng = np.random.default_rng(seed)
    q, k, v, g = (jnp.asarray(rng.normal(size=(b, n, h, d)).astype(np.float32)) for _ in range(4))
    q = q / np.sqrt(d)
    lengths = rng.integers(1, n + 1, size=b)
    if empty:
        lengths[0] = 0  # every key of the first sequence masked
    mask = np.arange(n)[None, :] < lengths[:, None]
    bias = jnp.where(jnp.asarray(mask)[:, None, None, :], 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    keep = jnp.asarray(rng.random((b, h, n, n)) >= rate) if rate else None
    return q, k, v, bias, keep, g


def _xla(q, k, v, bias, keep, rate):
    t = lambda x: x.transpose(0, 2, 1, 3)
    return t(ops.attention(t(q), t(k), t(v), bias, keep, rate))


def _value_and_grads(fn, q, k, v, bias, keep, rate, g):
    out, vjp = jax.vjp(jax.jit(lambda q, k, v, bias: fn(q, k, v, bias, keep, rate)), q, k, v, bias)
    return (out, *vjp(g))


@pytest.fixture(params=["tiled", "mkl"])
def products(request, monkeypatch):
    """The kernel's products: its own tiled GEMM, or MKL's SGEMM (``cpu_blas``; skipped without MKL)."""
    if request.param == "tiled":
        monkeypatch.setenv(cpu_blas.ENV, "0")
    elif cpu_blas.sgemm_address() is None:
        pytest.skip("no MKL (the `mkl` extra)")
    return request.param


@pytest.mark.parametrize(
    "b,n,h,d,rate,empty",
    [
        (2, 128, 12, 32, 0.0, False),  # MiniLM's heads at shape A's passage length
        (3, 37, 4, 20, 0.0, True),  # neither n nor d a multiple of 16 (padded buffers); an all-masked sequence
        (2, 64, 3, 64, 0.1, False),  # dropout
        (1, 5, 2, 8, 0.5, True),  # fewer keys than one vector
    ],
)
def test_kernel_matches_xla_attention(b, n, h, d, rate, empty, products):
    ops_ = _operands(b, n, h, d, seed=n, rate=rate, empty=empty)
    want = _value_and_grads(_xla, *ops_[:5], rate, ops_[5])
    got = _value_and_grads(cpu_attention.attention, *ops_[:5], rate, ops_[5])
    text = jax.jit(lambda q: cpu_attention.attention(q, *ops_[1:5], rate)).lower(ops_[0]).as_text()
    assert f"blas = {int(products == 'mkl')} : i64" in text  # the products asked for
    for name, a, w in zip(("out", "dq", "dk", "dv", "dbias"), got, want):
        assert a.shape == w.shape, name
        scale = float(jnp.max(jnp.abs(w))) or 1.0
        np.testing.assert_allclose(a, w, atol=1e-5 * scale, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("b,n,h,d,rate", [(2, 40, 3, 32, 0.0), (3, 37, 4, 20, 0.2)])
def test_kernel_takes_the_projection_biases_and_the_scale(b, n, h, d, rate, products):
    """attention(q, k, v, biases, scale) equals the attention of (q + bq) * scale, k + bk, v + bv, values
    and gradients (the biases' included; bk's is 0, as the softmax ignores a per-query shift)."""
    q, k, v, bias, keep, g = _operands(b, n, h, d, seed=7, rate=rate, empty=True)
    rng = np.random.default_rng(8)
    biases = tuple(jnp.asarray(rng.normal(size=h * d).astype(np.float32)) for _ in range(3))
    scale = 0.37

    def kernel(q, k, v, bq, bk, bv):
        return cpu_attention.attention(q, k, v, bias, keep, rate, (bq, bk, bv), scale)

    def reference(q, k, v, bq, bk, bv):
        add = lambda x, b_: x + b_.reshape(h, d)
        return _xla(add(q, bq) * scale, add(k, bk), add(v, bv), bias, keep, rate)

    def value_and_grads(fn):
        out, vjp = jax.vjp(jax.jit(fn), q, k, v, *biases)
        return (out, *vjp(g))

    got, want = value_and_grads(kernel), value_and_grads(reference)
    for name, a, w in zip(("out", "dq", "dk", "dv", "dbq", "dbk", "dbv"), got, want):
        # (bk's reference gradient is float noise: measured on dbq's scale)
        scale_ = float(jnp.max(jnp.abs(want[4] if name == "dbk" else w)))
        np.testing.assert_allclose(a, w, atol=2e-5 * scale_, rtol=1e-5, err_msg=name)
    assert not np.any(got[5])  # bk's gradient


def test_kernel_is_deterministic_and_model_dispatches_to_it():
    q, k, v, bias, keep, g = _operands(2, 48, 3, 32, seed=1)
    first = _value_and_grads(cpu_attention.attention, q, k, v, bias, keep, 0.0, g)
    again = _value_and_grads(cpu_attention.attention, q, k, v, bias, keep, 0.0, g)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert cpu_attention.applies(q, k, v, bias)
    hlo = jax.jit(_model_attention).lower(q, k, v, bias).as_text()
    assert "opera_attention_forward" in hlo
    # bf16 operands and other bias shapes take the XLA formulation.
    assert not cpu_attention.applies(q.astype(jnp.bfloat16), k, v, bias)
    assert not cpu_attention.applies(q, k, v, jnp.zeros((2, 1, 48, 48), jnp.float32))


def test_switched_off_by_the_environment_and_for_the_planner(monkeypatch):
    q, k, v, bias, _, _ = _operands(1, 16, 2, 16)
    with cpu_kernels.disabled():
        assert not cpu_attention.applies(q, k, v, bias)
    assert cpu_attention.applies(q, k, v, bias)
    monkeypatch.setenv(cpu_attention.ENV, "0")
    assert not cpu_attention.applies(q, k, v, bias)
    assert "opera_attention" not in jax.jit(_model_attention).lower(q, k, v, bias).as_text()


def _model_attention(q, k, v, bias):
    """The model's attention (``model.attention: cpu``) on the padding mask ``bias`` stands for."""
    return attention.attend(q, k, v, (bias[:, 0, 0] == 0).astype(jnp.int32), implementation="cpu")


def test_sharded_kernel_runs_per_device_and_equals_one_device():
    """Under the train step's mesh each device runs the kernel on its own sequences (no gather of the
    batch); values and gradients equal the unsharded call."""
    mesh = make_mesh()
    ndev = mesh.size
    q, k, v, bias, keep, g = _operands(ndev * 2, 24, 2, 16, seed=2, rate=0.2)
    want = _value_and_grads(cpu_attention.attention, q, k, v, bias, keep, 0.2, g)
    rows = NamedSharding(mesh, P(BATCH_AXES))
    args = jax.device_put((q, k, v, bias, keep, g), rows)

    def fn(q, k, v, bias, keep, g):
        out, vjp = jax.vjp(lambda q, k, v, bias: cpu_attention.attention(q, k, v, bias, keep, 0.2), q, k, v, bias)
        return (out, *vjp(g))

    with jax.set_mesh(mesh):
        compiled = jax.jit(fn).lower(*args).compile()
        got = compiled(*args)
    for a, w in zip(got, want):
        np.testing.assert_allclose(a, w, atol=1e-6, rtol=1e-6)
    text = compiled.as_text()
    assert "all-gather" not in text
    # Both kernels' calls in the compiled step return each device's rows: 2 sequences, not 2 * ndev.
    for target in ("forward", "backward"):
        call = re.search(rf"= \((f32\[[0-9,]+\]).*custom-call\(.*opera_attention_{target}", text)
        assert call and call.group(1) == "f32[2,24,2,16]", target


def test_build_caches_the_library_and_reports_compiler_errors(tmp_path):
    compiler = cpu_kernels.find_compiler()
    lib = cpu_attention.build(compiler, tmp_path)
    assert lib.exists() and lib.parent == tmp_path
    mtime = os.stat(lib).st_mtime_ns
    assert cpu_attention.build(compiler, tmp_path) == lib and os.stat(lib).st_mtime_ns == mtime  # not rebuilt
    bad = tmp_path / "cxx"
    bad.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake 1.0 && exit 0\necho 'error: no' >&2\nexit 1\n")
    bad.chmod(0o755)
    with pytest.raises(RuntimeError, match="error: no"):
        cpu_attention.build(str(bad), tmp_path / "other")
    assert not list((tmp_path / "other").glob("*.so"))  # nothing half-written


def test_a_changed_header_rebuilds_the_kernels(tmp_path):
    """A kernel's library is keyed on the headers beside its source too (``parallel_for.h``)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("gemm.cc", "parallel_for.h"):
        shutil.copy(cpu_kernels.CSRC / name, src / name)
    compiler = cpu_kernels.find_compiler()
    first = cpu_kernels.build(src / "gemm.cc", compiler, tmp_path / "out")  # (MKL's symbols left unresolved)
    header = src / "parallel_for.h"
    header.write_text(header.read_text() + "\n// changed\n")
    second = cpu_kernels.build(src / "gemm.cc", compiler, tmp_path / "out")
    assert first != second and first.exists() and second.exists()

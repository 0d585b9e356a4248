"""The dense layers' products through MKL (opera_jax.models.cpu_blas) against NumPy and XLA's dots."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from opera_jax.cpu import blas as cpu_blas
from opera_jax.cpu import kernels as cpu_kernels
from opera_jax.models import ops
from opera_jax.sharding import BATCH_AXES, make_mesh


@pytest.fixture(autouse=True)
def _kernel():
    """Built on first use where the `mkl` extra is installed, or these tests are skipped."""
    if not cpu_blas.available():
        pytest.skip("no MKL kernel (the `mkl` extra is not installed, or no C++ compiler)")


def _array(rng, *shape):
    return jnp.asarray(rng.normal(size=shape).astype(np.float32))


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 7, 3), (63, 10, 17), (300, 48, 130), (129, 384, 64)])
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_gemm_matches_numpy(m, k, n, ta, tb):
    rng = np.random.default_rng(m + k + n)
    a = _array(rng, *((k, m) if ta else (m, k)))
    b = _array(rng, *((n, k) if tb else (k, n)))
    got = jax.jit(lambda a, b: cpu_blas._gemm(a, b, ta, tb))(a, b)
    an, bn = np.asarray(a, np.float64), np.asarray(b, np.float64)
    want = (an.T if ta else an) @ (bn.T if tb else bn)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_gemm_of_an_empty_contraction_is_zero():
    got = jax.jit(lambda a, b: cpu_blas._gemm(a, b, False, False))(jnp.ones((4, 0)), jnp.ones((0, 3)))
    np.testing.assert_array_equal(np.asarray(got), np.zeros((4, 3), np.float32))


def _dense_grads_hlo(x, kernel, bias, g):
    compiled = jax.jit(lambda x, k, b: jax.vjp(ops.dense, x, k, b)[1](g)).lower(x, kernel, bias).compile()
    return compiled(x, kernel, bias), compiled.as_text()


def test_dense_runs_its_three_products_through_mkl():
    """Forward, input gradient and weight gradient are each one MKL call, and no dot is left;
    values and gradients equal the plain formulation's."""
    rng = np.random.default_rng(1)
    x, kernel, bias, g = _array(rng, 4, 24, 48), _array(rng, 48, 96), _array(rng, 96), _array(rng, 4, 24, 96)
    (dx, dk, db), hlo = _dense_grads_hlo(x, kernel, bias, g)
    assert hlo.count('custom_call_target="opera_gemm"') == 2 and " dot(" not in hlo
    forward = jax.jit(ops.dense).lower(x, kernel, bias).compile().as_text()
    assert forward.count('custom_call_target="opera_gemm"') == 1 and " dot(" not in forward
    want = jax.vjp(lambda x, k, b: x @ k + b, x, kernel, bias)[1](g)
    for got, w in zip((dx, dk, db), want):
        np.testing.assert_allclose(np.asarray(got), np.asarray(w), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(
        np.asarray(ops.dense(x, kernel, bias)), np.asarray(x @ kernel + bias), rtol=2e-5, atol=2e-5
    )


def test_xla_dots_where_mkl_is_turned_off_or_does_not_apply(monkeypatch):
    rng = np.random.default_rng(2)
    x, kernel, bias, g = _array(rng, 2, 8, 16), _array(rng, 16, 16), _array(rng, 16), _array(rng, 2, 8, 16)
    with cpu_kernels.disabled():
        assert "opera_gemm" not in _dense_grads_hlo(x, kernel, bias, g)[1]
    bf16 = [a.astype(jnp.bfloat16) for a in (x, kernel, bias, g)]
    assert "opera_gemm" not in _dense_grads_hlo(*bf16)[1]
    monkeypatch.setenv(cpu_blas.ENV, "0")
    assert "opera_gemm" not in _dense_grads_hlo(x, kernel, bias, g)[1]


def test_per_device_products_equal_one_device():
    """Under the train step's mesh each device multiplies its own tokens (no gather of the batch);
    the weight gradient is summed over the devices. Same values as on one device."""
    ndev = len(jax.devices())
    if ndev < 2:
        pytest.skip("needs several (simulated) devices")
    rng = np.random.default_rng(3)
    b = 2 * ndev
    x, kernel, bias, g = _array(rng, b, 12, 32), _array(rng, 32, 40), _array(rng, 40), _array(rng, b, 12, 40)
    fn = lambda x, k, bias, g: jax.vjp(ops.dense, x, k, bias)[1](g)
    want = jax.jit(fn)(x, kernel, bias, g)
    mesh = make_mesh()
    rows = NamedSharding(mesh, P(BATCH_AXES))
    args = (jax.device_put(x, rows), kernel, bias, jax.device_put(g, rows))
    with jax.set_mesh(mesh):
        compiled = jax.jit(fn).lower(*args).compile()
        got = compiled(*args)
    for a, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=2e-5, atol=2e-5)
    text = compiled.as_text()
    assert "all-gather" not in text and "all-reduce" in text
    calls = re.findall(r"= (f32\[[0-9,]+\])\{[0-9,]*\} custom-call\(.*opera_gemm", text)
    assert sorted(calls) == ["f32[24,32]", "f32[32,40]"], calls  # 2 sequences x 12 tokens per device

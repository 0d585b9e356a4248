"""The hand-written backward passes of opera_jax.models.ops against jax.grad of the plain formulations."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opera_jax.cpu import blas as cpu_blas
from opera_jax.cpu import xla_flags as xla_cpu
from opera_jax.models import ops

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out: README "Tests"


def _plain_layer_norm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias


def test_gelu_value_and_gradient_match_plain():
    x = jnp.asarray(np.random.default_rng(0).normal(scale=3.0, size=(4, 257)).astype(np.float32))
    g = jnp.asarray(np.random.default_rng(1).normal(size=x.shape).astype(np.float32))
    np.testing.assert_allclose(ops.gelu(x), jax.nn.gelu(x, approximate=False), atol=1e-6, rtol=1e-6)
    want = jax.vjp(lambda x: jax.nn.gelu(x, approximate=False), x)[1](g)[0]
    got = jax.vjp(ops.gelu, x)[1](g)[0]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)
    # Second-order use is not needed by the step, but the first derivative must be jittable.
    np.testing.assert_allclose(
        jax.jit(jax.grad(lambda x: ops.gelu(x).sum()))(x),
        jax.grad(lambda x: jax.nn.gelu(x, approximate=False).sum())(x),
        atol=1e-6,
    )


@pytest.mark.parametrize("shape", [(3, 5, 384), (7, 16)])
def test_layer_norm_value_and_gradients_match_plain(shape):
    rng = np.random.default_rng(len(shape))
    x = jnp.asarray((rng.normal(size=shape) * 2 + 0.5).astype(np.float32))
    scale = jnp.asarray(rng.normal(size=shape[-1:]).astype(np.float32))
    bias = jnp.asarray(rng.normal(size=shape[-1:]).astype(np.float32))
    g = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    eps = 1e-12
    np.testing.assert_allclose(
        ops.layer_norm(x, scale, bias, eps), _plain_layer_norm(x, scale, bias, eps), atol=1e-5, rtol=1e-5
    )
    want = jax.vjp(lambda *a: _plain_layer_norm(*a, eps), x, scale, bias)[1](g)
    got = jax.vjp(lambda *a: ops.layer_norm(*a, eps), x, scale, bias)[1](g)
    for name, a, b in zip(("x", "scale", "bias"), got, want):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("train", [False, True])
def test_plain_switch_gives_the_same_model_gradients(tiny_bert_dir, train):
    """The model's ops against the plain formulations; in train mode both draw the same dropout masks."""
    from flax import nnx

    from opera_jax.models.encoder import load_encoder

    model = load_encoder(str(tiny_bert_dir)).model
    model.train() if train else model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(5, 60, (4, 12)).astype(np.int32))
    mask = jnp.asarray((np.arange(12)[None] < rng.integers(3, 13, (4, 1))).astype(np.int32))

    def loss(params):
        emb = nnx.merge(graphdef, params, rest, copy=True)(ids, mask)
        return jnp.sum(emb * jnp.arange(emb.shape[-1], dtype=emb.dtype))

    fast = jax.grad(loss)(params)
    try:
        ops.PLAIN = True
        plain = jax.grad(loss)(params)
    finally:
        ops.PLAIN = False
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)


def _plain_attention(q, k, v, bias, keep=None, rate=0.0):
    p = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) + bias, axis=-1)
    if keep is not None:
        p = jnp.where(keep, p / (1.0 - rate), 0.0)
    return p @ v


@pytest.mark.parametrize("rate", [0.0, 0.25])
def test_attention_value_and_gradients_match_plain(rate):
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.normal(scale=2.0, size=(3, 2, 7, 4)).astype(np.float32)) for _ in range(3))
    mask = rng.integers(0, 2, (3, 1, 1, 7)).astype(bool)
    mask[..., 0] = True
    mask[1] = False  # an empty sequence: every key masked
    bias = jnp.where(jnp.asarray(mask), 0.0, jnp.finfo(jnp.float32).min)
    keep = jnp.asarray(rng.random((3, 2, 7, 7)) >= rate) if rate else None
    g = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))
    want_out, want_vjp = jax.vjp(lambda *a: _plain_attention(*a, keep, rate), q, k, v, bias)
    got_out, got_vjp = jax.vjp(lambda *a: ops.attention(*a, keep, rate), q, k, v, bias)
    np.testing.assert_allclose(got_out, want_out, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("q", "k", "v", "bias"), got_vjp(g), want_vjp(g)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=name)


def test_attention_keeps_no_square_array_for_the_backward_pass():
    """The residuals are q, k, v, the bias, the keep-mask and row statistics: nothing [.., n, n] in f32."""
    q = k = v = jnp.ones((2, 3, 16, 4), jnp.float32)
    bias = jnp.zeros((2, 1, 1, 16), jnp.float32)
    _, vjp = jax.vjp(lambda q, k, v: ops.attention(q, k, v, bias), q, k, v)
    shapes = [x.shape for x in jax.tree.leaves(vjp) if hasattr(x, "shape") and x.dtype == jnp.float32]
    assert shapes and all(s[-2:] != (16, 16) for s in shapes), shapes


@pytest.mark.parametrize("shape", [(3, 5, 12), (9, 12)])
def test_dense_value_and_gradients_match_plain(shape):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(12, 7)).astype(np.float32))
    bias = jnp.asarray(rng.normal(size=(7,)).astype(np.float32))
    g = jnp.asarray(rng.normal(size=shape[:-1] + (7,)).astype(np.float32))
    want_out, want_vjp = jax.vjp(lambda x, w, b: x @ w + b, x, kernel, bias)
    got_out, got_vjp = jax.vjp(ops.dense, x, kernel, bias)
    np.testing.assert_allclose(got_out, want_out, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("x", "kernel", "bias"), got_vjp(g), want_vjp(g)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=name)


def _weight_gradient_dot(plain: bool) -> str:
    """The compiled dot that makes a dense layer's kernel gradient (a [8, 32, 32] input, as in the encoder)."""
    x = jnp.ones((8, 32, 32), jnp.float32)
    kernel, bias, after = jnp.ones((32, 64), jnp.float32), jnp.zeros((64,), jnp.float32), jnp.ones((64, 32))
    ops.PLAIN = plain
    try:
        loss = lambda k, x: jnp.sum(jnp.tanh(ops.dense(x, k, bias)) @ after)
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(kernel, x).compile().as_text()
    finally:
        ops.PLAIN = False
    (dot,) = [line for line in hlo.splitlines() if " dot(" in line and "= f32[32,64]" in line]
    return dot


@pytest.fixture
def xla_dots(monkeypatch):
    """The dense layers' products as XLA dots, even where MKL is installed (``cpu/blas.py``)."""
    monkeypatch.setenv(cpu_blas.ENV, "0")


def test_dense_weight_gradient_contracts_over_the_tokens(xla_dots):
    """x^T g as one dot contracting dimension 0 of both operands. Autodiff of the plain dot has
    XLA:CPU copy g into [features, tokens] first and contract dimension 1 of that copy, which
    runs at about half the FLOP rate (benchmarks/README.md)."""
    assert "lhs_contracting_dims={0}, rhs_contracting_dims={0}" in _weight_gradient_dot(plain=False)
    plain = _weight_gradient_dot(plain=True)  # what the op avoids
    assert "lhs_contracting_dims={0}, rhs_contracting_dims={1}" in plain and "copy" in plain


def _dots_fused_into_ynnpack(dense) -> int:
    """How many of XLA:CPU's YNNPACK fusions hold a dot, compiling ``layer_norm(dense(x) + x)``:
    a dense layer feeding a LayerNorm, as the encoder's output projections do (4,096 tokens: XLA:CPU
    leaves smaller dots out of the fusion)."""
    x = jnp.ones((32, 128, 64), jnp.float32)
    kernel, bias, scale = jnp.ones((64, 64), jnp.float32), jnp.zeros((64,), jnp.float32), jnp.ones((64,))
    f = lambda x, k: ops.layer_norm(dense(x, k, bias) + x, scale, bias, 1e-12)
    hlo = jax.jit(f).lower(x, kernel).compile().as_text()
    bodies = dict(re.findall(r"^%?([\w.\-]+) \(.*?\) -> .*? \{\n(.*?)\n\}", hlo, re.S | re.M))
    fusions = [
        re.search(r"calls=%?([\w.\-]+)", line).group(1)
        for line in hlo.splitlines()
        if "__ynn_fusion" in line and "calls=" in line
    ]
    return sum(" dot(" in bodies.get(name, "") for name in fusions)


def test_dense_stays_a_lone_dot_before_a_layer_norm(xla_dots):
    """On XLA:CPU the plain dot is fused into YNNPACK's LayerNorm reduction, where its matmul runs
    at about half the rate of a lone dot through Eigen (benchmarks/README.md); ``ops.dense`` keeps
    it out. Checked where opera-jax's XLA:CPU flag applies (the jaxlib it was measured on)."""
    if jax.default_backend() != "cpu" or xla_cpu._jaxlib_release() not in xla_cpu.MEASURED_JAXLIB:
        pytest.skip("the fusion is XLA:CPU's, as measured with jaxlib " + str(xla_cpu.MEASURED_JAXLIB))
    assert _dots_fused_into_ynnpack(lambda x, k, b: x @ k + b) == 1  # what the op avoids
    assert _dots_fused_into_ynnpack(ops.dense) == 0


def test_narrowing_dense_weight_gradient_is_made_transposed_on_cpu(xla_dots):
    """For a layer that narrows (in > out, the feed-forward output), XLA:CPU runs g^T a, with the wider
    operand on the right, faster than a^T g (benchmarks/README.md): the kernel gradient [64, 32] comes
    from a [32, 64] dot and a transpose, and equals the plain one."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(8, 16, 64)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(64, 32)).astype(np.float32))
    bias = jnp.zeros((32,), jnp.float32)
    grad = lambda dense: jax.grad(lambda k: jnp.sum(jnp.tanh(dense(x, k, bias))))
    np.testing.assert_allclose(grad(ops.dense)(kernel), grad(lambda x, k, b: x @ k + b)(kernel), atol=1e-5, rtol=1e-5)
    hlo = jax.jit(grad(ops.dense)).lower(kernel).compile().as_text()
    dots = [line for line in hlo.splitlines() if " dot(" in line and "lhs_contracting_dims={0}" in line]
    if jax.default_backend() == "cpu":
        assert len(dots) == 1 and "= f32[32,64]" in dots[0], dots


def test_gelu_dense_value_and_gradients_match_plain():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(scale=2.0, size=(3, 5, 12)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(12, 6)).astype(np.float32))
    bias = jnp.asarray(rng.normal(size=(6,)).astype(np.float32))
    g = jnp.asarray(rng.normal(size=(3, 5, 6)).astype(np.float32))
    plain = lambda x, w, b: jax.nn.gelu(x, approximate=False) @ w + b
    want_out, want_vjp = jax.vjp(plain, x, kernel, bias)
    got_out, got_vjp = jax.vjp(ops.gelu_dense, x, kernel, bias)
    np.testing.assert_allclose(got_out, want_out, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("x", "kernel", "bias"), got_vjp(g), want_vjp(g)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=name)


def test_attention_with_a_key_by_key_bias_keeps_its_shape():
    """A bias over [.., n, n] (not per batch row) gets a gradient of its own shape."""
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 3, 6, 4)).astype(np.float32)) for _ in range(3))
    bias = jnp.asarray(rng.normal(size=(1, 1, 6, 6)).astype(np.float32))
    g = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))
    want = jax.vjp(_plain_attention, q, k, v, bias)[1](g)
    got = jax.vjp(ops.attention, q, k, v, bias)[1](g)
    assert got[3].shape == bias.shape
    for name, a, b in zip(("q", "k", "v", "bias"), got, want):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=name)


def _compiled_temp_bytes(f, *args) -> int:
    return jax.jit(jax.grad(f)).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_compiled_backward_holds_one_layer_of_attention_probabilities():
    """Six stacked attentions: XLA's scratch holds about one [b, h, n, n] array at a time, not one per
    layer. (Without the backward pass's dependence on the cotangent, XLA:CPU scheduled or merged the
    recomputation into the forward pass: 7.6 arrays; autodiff of the plain softmax: 13.7.)"""
    b, h, n, d = 4, 2, 256, 8
    bias = jnp.zeros((b, 1, 1, n))

    def f(x):
        for i in range(6):
            q = jnp.tanh(x * (1.0 + 0.1 * i))
            x = x + ops.attention(q, q * 1.1, q * 0.9, bias)
        return (x**2).sum()

    assert _compiled_temp_bytes(f, jnp.ones((b, h, n, d))) < 4 * b * h * n * n * 4


def test_compiled_backward_keeps_one_array_per_gelu_dense():
    """Six stacked GELU + dense layers keep one [tokens, features] array each (the GELU input), plus
    working space: 7.25 arrays measured; 13.25 without the dependence on the cotangent, 19.25 for
    autodiff of ``gelu(x) @ w``."""
    t, d, f = 2048, 16, 512

    def mlp(x, w1, w2, bias):
        for i in range(6):
            x = x + ops.gelu_dense(jnp.tanh(x) @ w1 * (1 + 0.1 * i), w2, bias)
        return (x**2).sum()

    args = (jnp.ones((t, d)), jnp.full((d, f), 0.1), jnp.full((f, d), 0.1), jnp.zeros(d))
    assert _compiled_temp_bytes(mlp, *args) < 9 * t * f * 4

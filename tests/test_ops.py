"""The hand-written backward passes of opera_jax.models.ops against jax.grad of the plain formulations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opera_jax.models import ops


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
    np.testing.assert_allclose(jax.jit(jax.grad(lambda x: ops.gelu(x).sum()))(x),
                               jax.grad(lambda x: jax.nn.gelu(x, approximate=False).sum())(x), atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 5, 384), (7, 16)])
def test_layer_norm_value_and_gradients_match_plain(shape):
    rng = np.random.default_rng(len(shape))
    x = jnp.asarray((rng.normal(size=shape) * 2 + 0.5).astype(np.float32))
    scale = jnp.asarray(rng.normal(size=shape[-1:]).astype(np.float32))
    bias = jnp.asarray(rng.normal(size=shape[-1:]).astype(np.float32))
    g = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    eps = 1e-12
    np.testing.assert_allclose(ops.layer_norm(x, scale, bias, eps), _plain_layer_norm(x, scale, bias, eps),
                               atol=1e-5, rtol=1e-5)
    want = jax.vjp(lambda *a: _plain_layer_norm(*a, eps), x, scale, bias)[1](g)
    got = jax.vjp(lambda *a: ops.layer_norm(*a, eps), x, scale, bias)[1](g)
    for name, a, b in zip(("x", "scale", "bias"), got, want):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=name)


def test_plain_switch_gives_the_same_model_gradients(tiny_bert_dir):
    from flax import nnx

    from opera_jax.models.encoder import load_encoder

    model = load_encoder(str(tiny_bert_dir)).model
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(5, 60, (4, 12)).astype(np.int32))
    mask = jnp.asarray((np.arange(12)[None] < rng.integers(3, 13, (4, 1))).astype(np.int32))

    def loss(params):
        emb = nnx.merge(graphdef, params, rest)(ids, mask)
        return jnp.sum(emb * jnp.arange(emb.shape[-1], dtype=emb.dtype))

    fast = jax.grad(loss)(params)
    try:
        ops.PLAIN = True
        plain = jax.grad(loss)(params)
    finally:
        ops.PLAIN = False
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_masked_softmax_value_and_gradients_match_plain():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(scale=4.0, size=(3, 2, 5, 7)).astype(np.float32))
    mask = rng.integers(0, 2, (3, 1, 1, 7)).astype(bool)
    mask[..., 0] = True
    bias = jnp.where(jnp.asarray(mask), 0.0, jnp.finfo(jnp.float32).min)
    g = jnp.asarray(rng.normal(size=logits.shape).astype(np.float32))
    plain = lambda l, b: jax.nn.softmax(l + b, axis=-1)
    np.testing.assert_allclose(ops.masked_softmax(logits, bias), plain(logits, bias), atol=1e-6)
    want = jax.vjp(plain, logits, bias)[1](g)
    got = jax.vjp(ops.masked_softmax, logits, bias)[1](g)
    np.testing.assert_allclose(got[0], want[0], atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], atol=1e-5, rtol=1e-5)

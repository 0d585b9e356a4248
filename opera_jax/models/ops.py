"""Fused elementwise ops with hand-written backward passes, for the encoder's train step.

Autodiff of the plain formulations keeps more residuals and runs more passes
than needed, and on XLA:CPU these passes are a large share of a train step
(profile in ``benchmarks/step_throughput.py``). Each op here has a
``jax.custom_vjp`` that saves the fewest arrays and computes its gradient in
one fused pass; the tests compare every gradient with ``jax.grad`` of the plain
formulation (``tests/test_ops.py``).

``PLAIN = True`` (read at trace time) switches the model back to the plain
formulations (``jax.nn.gelu``, ``nnx.LayerNorm``, the attention scale on the
logits), to measure what the changes buy.

- :func:`gelu`: exact GELU written with ``erf``, as PyTorch computes it (jax's
  ``gelu(approximate=False)`` uses ``erfc``, which XLA expands into a slower
  two-branch polynomial with an ``exp``). Saves the input only.
- :func:`masked_softmax`: attention softmax that saves the probabilities only.
  Autodiff of ``jax.nn.softmax`` kept three ``[b, heads, n, n]`` arrays per
  layer alive for the backward pass (the exponentials, the reciprocal of their
  sum broadcast to full size, the probabilities): at 64 x 256 tokens that is
  3.6 GB of the step's 7.3 GB scratch.
- :func:`layer_norm`: saves the normalised input and ``1/std`` instead of the
  input, mean, variance and their intermediate products.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

PLAIN = False  # True: the plain formulations everywhere (see above)

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# ---------------------------------------------------------------- GELU

def _gelu_plain(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


@jax.custom_vjp
def _gelu_erf(x: jax.Array) -> jax.Array:
    return x * (0.5 + 0.5 * jax.lax.erf(x * _SQRT_HALF))


def _gelu_fwd(x):
    return _gelu_erf(x), x


def _gelu_bwd(x, g):
    cdf = 0.5 + 0.5 * jax.lax.erf(x * _SQRT_HALF)
    pdf = jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return (g * (cdf + x * pdf).astype(g.dtype),)


_gelu_erf.defvjp(_gelu_fwd, _gelu_bwd)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU: ``x * Phi(x)``."""
    return _gelu_erf(x) if not PLAIN else _gelu_plain(x)


# ---------------------------------------------------------------- LayerNorm

def _ln_stats(x, eps):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    xc = x32 - mean
    rstd = jax.lax.rsqrt(jnp.square(xc).mean(-1, keepdims=True) + eps)
    return xc * rstd, rstd


def _layer_norm_core(x, scale, bias, eps):
    xhat, _ = _ln_stats(x, eps)
    return (xhat * scale + bias).astype(x.dtype)


_layer_norm = jax.custom_vjp(_layer_norm_core, nondiff_argnums=(3,))


def _ln_fwd(x, scale, bias, eps):
    xhat, rstd = _ln_stats(x, eps)
    return (xhat * scale + bias).astype(x.dtype), (xhat, rstd, scale, bias)


def _ln_bwd(eps, res, g):
    xhat, rstd, scale, bias = res
    g32 = g.astype(jnp.float32)
    rows = tuple(range(g.ndim - 1))
    dbias = g32.sum(rows).astype(bias.dtype)
    dscale = (g32 * xhat).sum(rows).astype(scale.dtype)
    gx = g32 * scale
    dx = rstd * (gx - gx.mean(-1, keepdims=True) - xhat * (gx * xhat).mean(-1, keepdims=True))
    return dx.astype(g.dtype), dscale, dbias


_layer_norm.defvjp(_ln_fwd, _ln_bwd)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis (two-pass variance, statistics in f32), as ``torch.nn.LayerNorm``."""
    return _layer_norm(x, scale, bias, eps)


# ---------------------------------------------------------------- softmax

@jax.custom_vjp
def _masked_softmax(logits, bias):
    z = logits.astype(jnp.float32) + bias
    e = jnp.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _softmax_fwd(logits, bias):
    p = _masked_softmax(logits, bias)
    return p, (p, jnp.zeros((), logits.dtype), bias)


def _softmax_bwd(res, g):
    p, zero, bias = res  # bias: [b, 1, 1, n], for its shape and dtype
    bias_shape = bias.shape
    dz = p * (g - (g * p).sum(-1, keepdims=True))
    axes = tuple(i for i, n in enumerate(bias_shape) if n == 1 and dz.shape[i] != 1)
    dbias = dz.sum(axes, keepdims=True).reshape(bias_shape) if axes else dz.reshape(bias_shape)
    return dz.astype(zero.dtype), dbias.astype(bias.dtype)


_masked_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def masked_softmax(logits: jax.Array, bias: jax.Array) -> jax.Array:
    """``softmax(logits + bias)`` over the last axis, in f32; ``bias`` broadcasts against ``logits``."""
    if PLAIN:
        return jax.nn.softmax(logits.astype(jnp.float32) + bias, axis=-1)
    return _masked_softmax(logits, bias)

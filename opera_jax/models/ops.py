"""Fused elementwise ops with hand-written backward passes, for the encoder's train step.

Autodiff of the plain formulations keeps more residuals and runs more passes
than needed, and on XLA:CPU these passes are a large share of a train step
(profile in ``benchmarks/step_throughput.py``). Each op here has a
``jax.custom_vjp`` that saves the fewest arrays and computes its gradient in
one fused pass; the tests compare every gradient with ``jax.grad`` of the plain
formulation (``tests/test_ops.py``).

``PLAIN = True`` (read at trace time) switches the BERT model's GELU, LayerNorm and
dense layers back to the plain formulations (``jax.nn.gelu``, ``nnx.LayerNorm``,
XLA's dot), to measure what the changes buy (``benchmarks/step_throughput.py``).
Attention is chosen by ``model.attention`` instead (``attention.py``).

- :func:`gelu`: exact GELU written with ``erf``, as PyTorch computes it (jax's
  ``gelu(approximate=False)`` uses ``erfc``, which XLA expands into a slower
  two-branch polynomial with an ``exp``). Saves the input only.
- :func:`attention`: softmax attention (with dropout) that keeps no ``[b, heads, n, n]``
  array for the backward pass: it saves the softmax's row maxima and sums and
  recomputes the probabilities there, transposed (``[.., key, query]``), so that two of
  its three gradient matmuls contract the last axis. Autodiff of ``jax.nn.softmax`` kept three
  such arrays per layer (the exponentials, the reciprocal of their sum broadcast
  to full size, the probabilities): at 64 x 256 tokens 3.6 GB of the step's
  7.3 GB scratch; keeping the probabilities alone still cost 1.15 GB there.
- :func:`dense`: a dense layer whose weight gradient contracts ``x`` and ``g`` over the
  tokens directly; autodiff had XLA:CPU copy ``g`` transposed first and run a dot at about
  half the FLOP rate. With the ``mkl`` extra, on CPU, its three products go to MKL instead
  (``cpu/blas.py``). On XLA:CPU its forward dot stays out of YNNPACK's fusion with the
  LayerNorm after it, and a narrowing layer's weight gradient is made transposed (both faster there).
- :func:`gelu_dense`: GELU followed by a dense layer, saving the GELU's input
  only (autodiff also keeps its output, the dense layer's input).
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


# ---------------------------------------------------------------- dense layer


def _lone_dot(y):
    """``y``, the result of a dot, kept a lone dot on XLA:CPU: a no-op ``reduce_precision`` (f32 to f32)
    between it and its consumers. Otherwise the output projections' dots (attention output,
    feed-forward output), whose results feed the next LayerNorm, are fused into YNNPACK's
    LayerNorm reduction, where their matmul ran at 71-75 GFLOP/s in the MiniLM train step, against
    ~150 as lone dots through Eigen (``cpu/xla_flags.py``); steps 2-9% faster in sequential pairs
    (``benchmarks/README.md``). Other platforms: unchanged (a GPU fuses the bias add that follows
    into its matmul)."""
    return jax.lax.platform_dependent(
        y, cpu=lambda y: jax.lax.reduce_precision(y, exponent_bits=8, mantissa_bits=23), default=lambda y: y
    )


def _with_bias(y, bias):
    return y if bias is None else y + bias


def _plain_dense(a, kernel, bias):
    """``a @ kernel + bias`` (``bias`` ``None``: none) over the last axis as XLA's dot (kept a lone dot
    on XLA:CPU)."""
    return _with_bias(_lone_dot(jax.lax.dot_general(a, kernel, (((a.ndim - 1,), (0,)), ((), ())))), bias)


def _cpu_blas(*arrays):
    """``opera_jax.cpu.blas`` when these operands' products go to MKL (f32 on CPU, the ``mkl``
    extra); ``None`` otherwise. The CPU package is imported on the CPU only."""
    if jax.default_backend() != "cpu":
        return None
    from opera_jax.cpu import blas

    return blas if blas.applies(*arrays) else None


def _dense(a, kernel, bias):
    """:func:`_plain_dense`, its product through MKL on CPU where it is installed (``cpu/blas.py``)."""
    if cpu_blas := _cpu_blas(a, kernel):
        return _with_bias(cpu_blas.matmul(_rows(a), kernel).reshape(*a.shape[:-1], kernel.shape[1]), bias)
    return _plain_dense(a, kernel, bias)


def _rows(a):
    return a.reshape(-1, a.shape[-1])


@jax.custom_vjp
def _dense_op(x, kernel, bias):
    return _dense(x, kernel, bias)


def _dense_fwd(x, kernel, bias):
    return _dense(x, kernel, bias), (x, kernel, bias)  # (bias: whether there is one)


def _dense_grads(a, kernel, g):
    """``(g W^T, a^T g, sum of g)`` for ``[tokens, in]`` inputs ``a`` and ``[tokens, out]`` cotangents
    ``g``: the gradients of a dense layer, its weight gradient contracted over the tokens directly
    (on CPU through MKL where it is installed, ``cpu/blas.py``)."""
    if cpu_blas := _cpu_blas(a, kernel, g):
        return cpu_blas.matmul_t(g, kernel), cpu_blas.t_matmul(a, g).astype(kernel.dtype), g.sum(0)
    da = jax.lax.dot_general(g, kernel, (((1,), (1,)), ((), ())))
    if a.shape[1] > g.shape[1]:  # a narrowing layer (the feed-forward output)
        dkernel = jax.lax.platform_dependent(a, g, cpu=_weight_gradient_transposed, default=_weight_gradient)
    else:
        dkernel = _weight_gradient(a, g)
    return da, dkernel.astype(kernel.dtype), g.sum(0)


def _weight_gradient(a, g):
    return jax.lax.dot_general(a, g, (((0,), (0,)), ((), ())))


def _weight_gradient_transposed(a, g):
    """``a^T g`` as ``(g^T a)^T``, for XLA:CPU when ``a`` is the wider one (``[tokens, 1536]`` against
    ``[tokens, 384]``): its dot made ``[1536, 384] = a^T g`` at 102 GFLOP/s (median) and ``[384, 1536]
    = g^T a`` at 115 on one Xeon core at 4,096 tokens, 90 and 100 at 16,384; the transpose of the small
    result takes ~1 ms. The barrier keeps XLA from folding the transpose back into the dot."""
    return jax.lax.optimization_barrier(_weight_gradient(g, a)).T


def _dense_bwd(res, g):
    x, kernel, bias = res
    dx, dkernel, dbias = _dense_grads(_rows(x), kernel, _rows(g))
    return dx.reshape(x.shape).astype(x.dtype), dkernel, None if bias is None else dbias


_dense_op.defvjp(_dense_fwd, _dense_bwd)


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """``x @ kernel + bias`` over the last axis (``bias`` ``None``: the product alone). Its backward
    pass contracts the weight gradient over the tokens directly (``x^T g``); autodiff of the plain
    dot has XLA:CPU materialise ``g^T`` and run ``x^T (g^T)^T``, at about half the FLOP rate."""
    return _plain_dense(x, kernel, bias) if PLAIN else _dense_op(x, kernel, bias)


# ---------------------------------------------------------------- GELU, then a dense layer


def _after(x, g):
    """``x``, made to depend on the incoming cotangent ``g``: ``x + 0 * g[idx]``, where ``g[idx]``
    keeps the leading axes ``x`` shares with ``g`` (so it is split over devices like ``x``: no
    communication) and one entry of the others. A backward pass's recomputation fed this cannot
    run during the forward pass: XLA:CPU drops ``optimization_barrier``s before scheduling, and
    then schedules such recomputations early or merges them with the forward pass's values,
    keeping every layer's copy alive."""
    idx = tuple(slice(None) if i < g.ndim - 1 and x.shape[i] == g.shape[i] else slice(0, 1) for i in range(x.ndim))
    return x + (g[idx] * 0).astype(x.dtype)


@jax.custom_vjp
def _gelu_dense(x, kernel, bias):
    return _dense(_gelu_erf(x), kernel, bias)


def _gelu_dense_fwd(x, kernel, bias):
    return _gelu_dense(x, kernel, bias), (x, kernel)


def _gelu_dense_bwd(res, g):
    x, kernel = res
    g = _rows(g)  # [tokens, features]: plain 2-D matmuls below
    x2 = _after(_rows(x), g)
    cdf = 0.5 + 0.5 * jax.lax.erf(x2 * _SQRT_HALF)
    pdf = jnp.exp(-0.5 * x2 * x2) * _INV_SQRT_2PI
    a = (x2 * cdf).astype(g.dtype)  # the activation, recomputed from the cdf the derivative needs anyway
    da, dkernel, dbias = _dense_grads(a, kernel, g)
    return (da * (cdf + x2 * pdf)).reshape(x.shape).astype(x.dtype), dkernel, dbias


_gelu_dense.defvjp(_gelu_dense_fwd, _gelu_dense_bwd)


def gelu_dense(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``gelu(x) @ kernel + bias`` (exact GELU). Its backward pass recomputes ``gelu(x)``
    from ``x`` instead of keeping it: one ``[tokens, intermediate]`` array per layer less."""
    if PLAIN:
        return _plain_dense(_gelu_plain(x), kernel, bias)
    return _gelu_dense(x, kernel, bias)


# ---------------------------------------------------------------- attention


def _logits(q, k, bias):
    return jnp.matmul(q, jnp.swapaxes(k, -1, -2)).astype(jnp.float32) + bias


def _probabilities(q, k, bias):
    """``softmax(q k^T + bias)`` in f32, with its row maxima and row sums' reciprocals ``[..., n, 1]``.

    (Not a single log-sum-exp: with the mask's ``finfo.min`` bias a fully masked row's
    maximum is ``-3.4e38``, and ``max + log(sum)`` would round back to the maximum.)"""
    s = _logits(q, k, bias)
    m = s.max(-1, keepdims=True)
    e = jnp.exp(s - m)
    inv = 1.0 / e.sum(-1, keepdims=True)
    return e * inv, m, inv


def _drop(p, keep, rate):
    return p if keep is None else jnp.where(keep, p * (1.0 / (1.0 - rate)), 0.0)


def _attention_core(q, k, v, bias, keep, rate):
    p, _, _ = _probabilities(q, k, bias)
    return jnp.matmul(_drop(p, keep, rate).astype(v.dtype), v)


_attention = jax.custom_vjp(_attention_core, nondiff_argnums=(5,))


def _attention_fwd(q, k, v, bias, keep, rate):
    p, m, inv = _probabilities(q, k, bias)
    return jnp.matmul(_drop(p, keep, rate).astype(v.dtype), v), (q, k, v, bias, keep, m, inv)


def _t(a):
    return None if a is None else jnp.swapaxes(a, -1, -2)


def _attention_bwd(rate, res, g):
    q, k, v, bias, keep, m, inv = res
    # Every input of the recomputation made to follow g: otherwise XLA reuses the forward
    # pass's broadcasts of m, inv and the bias, full [.., n, n] arrays kept alive per layer.
    q, m, inv, bias = (_after(a, g) for a in (q, m, inv, bias))
    # Transposed ([.., key, query]) throughout: dv = p^T g and dk = ds^T q are then plain
    # batched matmuls; contracting the second-to-last axis runs at half the rate on XLA:CPU.
    bias_t, keep_t = _t(bias), _t(keep)
    p_t = jnp.exp(_logits(k, q, bias_t) - _t(m)) * _t(inv)  # the probabilities again, transposed
    dv = jnp.matmul(_drop(p_t, keep_t, rate).astype(g.dtype), g)
    dp_t = _drop(jnp.matmul(v, _t(g)).astype(jnp.float32), keep_t, rate)
    ds_t = p_t * (dp_t - (dp_t * p_t).sum(-2, keepdims=True))
    dbias = _t(_summed_to(ds_t, bias_t.shape))
    ds_t = ds_t.astype(q.dtype)
    dk = _summed_to(jnp.matmul(ds_t, q), k.shape)
    dq = jnp.matmul(_t(ds_t), k)
    return dq, dk.astype(k.dtype), _summed_to(dv, v.shape).astype(v.dtype), dbias.astype(bias.dtype), None


def _summed_to(x, shape):
    """``x`` summed over the axes where ``shape`` broadcast against it (size 1 there)."""
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return (x.sum(axes, keepdims=True) if axes else x).reshape(shape)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, keep: jax.Array | None = None, rate: float = 0.0
) -> jax.Array:
    """``dropout(softmax(q k^T + bias)) v`` over ``[..., n, head_dim]`` arrays (``q`` already
    scaled), softmax in f32; ``k``, ``v`` and ``bias`` broadcast against ``q`` and the ``[..., n, n]``
    logits (a group of query heads against one key/value head: a size-1 axis); ``keep``:
    the dropout's boolean keep-mask (``None``: no dropout), kept entries scaled by ``1/(1-rate)``.

    The backward pass recomputes the probabilities from ``q``, ``k`` and the saved
    row statistics, as flash attention does, instead of keeping the ``[..., n, n]``
    probabilities of every layer until the backward pass reaches it."""
    return _attention(q, k, v, bias, keep, rate)

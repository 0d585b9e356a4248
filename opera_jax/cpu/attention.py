"""Softmax attention on XLA:CPU as one C++ kernel per pass (``csrc/attention.cc``, through the XLA FFI).

XLA:CPU has no fused attention: it runs ``q k^T``, the softmax and ``p v`` (and,
backward, five products and the softmax gradient) as separate passes over
``[batch, heads, n, n]`` arrays in memory, plus transposes of q, k, v and the
output between the projections' ``[batch, n, heads, head_dim]`` layout and the
``[batch, heads, n, head_dim]`` one of its batched matmuls. The kernel works on
one (sequence, head) pair at a time, its ``[n, n]`` scores in a per-thread buffer
(64 KB at n = 128, in cache), reads and writes the ``[batch, n, heads,
head_dim]`` layout directly, and recomputes the probabilities in the backward
pass from the saved row maxima and reciprocal row sums, as ``ops.attention`` does.
It takes the q, k, v projections without their biases, and the biases and the
logits' scale as operands: adding a bias to q, k and v would be a pass over each in
memory, one elementwise op per projection per layer (``attention``'s docstring says
how the kernel does without). Pairs are spread over XLA:CPU's intra-op threads.
Where the dense layers' products go to MKL (``blas.py``: the ``mkl`` extra, not
turned off), so do the kernel's: MKL's SGEMM reads each head in place, transposed or
not, and ran them at about twice the rate of the kernel's own tiled GEMM at n = 128
(the attention as a whole, forward and backward, ~15% faster there); elsewhere the
kernel uses its own. The results equal ``ops.attention``'s to float rounding either
way (``tests/test_cpu_attention.py``).

The kernel is compiled from source the first time a process uses it (~5 s; where and how:
``kernels.py``). Without a working compiler, or with ``OPERA_JAX_CPU_ATTENTION=0``, nothing is
compiled and the model uses ``ops.attention`` (a one-line warning says why).

Used by the model when the computation runs on CPU (``jax.default_backend()``) in
f32 with a key-padding bias; GPUs and TPUs, bf16, and other bias shapes take
``ops.attention``. Under ``jax.set_mesh`` of the train step's mesh, each device
runs the kernel on its own rows of the batch (``jax.shard_map`` over the batch
axes): no device gathers another's sequences. (A jit over several devices without
that mesh would run the custom call on gathered operands: correct, but not split.)
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from opera_jax.cpu import blas as cpu_blas
from opera_jax.cpu import kernels as cpu_kernels
from opera_jax.sharding import per_device

SOURCE = cpu_kernels.CSRC / "attention.cc"
# pass -> (XLA custom-call target, the library's handler symbol)
TARGETS = {
    "forward": ("opera_attention_forward", "OperaAttentionForward"),
    "backward": ("opera_attention_backward", "OperaAttentionBackward"),
}


ENV = "OPERA_JAX_CPU_ATTENTION"  # "0": never use the kernel


def build(compiler: str, out_dir: Path) -> Path:
    """Compile the kernel into ``out_dir`` unless it is there already (``cpu_kernels.build``)."""
    return cpu_kernels.build(SOURCE, compiler, out_dir)


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The kernel, compiled (now, if needed), loaded and registered with XLA:CPU, and given MKL's
    SGEMM where there is one (:func:`cpu_blas.sgemm_address`); once per process."""
    lib = cpu_kernels.load(SOURCE, dict(TARGETS.values()), "CPU attention runs as XLA ops (slower)")
    if lib is not None and (sgemm := cpu_blas.sgemm_address()) is not None:
        lib.OperaAttentionUseSgemm(ctypes.c_void_p(sgemm))
    return lib


def available() -> bool:
    """Whether the kernel is compiled, loaded and registered (see :func:`_library`)."""
    return _library() is not None


def applies(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> bool:
    """Whether :func:`attention` takes these operands: on CPU, f32 ``[b, n, heads, head_dim]`` q, k, v
    of one shape and a ``[b, 1, 1, n]`` f32 bias (other shapes and dtypes, and other platforms,
    go to ``ops.attention``)."""
    if jax.default_backend() != "cpu" or q.ndim != 4 or not q.shape == k.shape == v.shape:
        return False
    b, n = q.shape[:2]
    if bias.shape != (b, 1, 1, n) or any(x.dtype != jnp.float32 for x in (q, k, v, bias)):
        return False
    return cpu_kernels.wanted(ENV) and available()


def _kept_scale(keep, rate: float) -> np.float32:
    """The kernel's dropout attribute: ``1 / (1 - rate)``, or 0 for no dropout."""
    return np.float32(0.0 if keep is None or rate == 0.0 else 1.0 / (1.0 - rate))


def _kernel(kind, result_shapes, keep, rate, scale, bq, bv, q, k, v, bias2, *rest):
    """The ``kind`` kernel on ``q, k, v, bias2``, the keep-mask, the biases ``bq, bv``, then ``rest``
    (each but the biases with the batch leading), per device; ``result_shapes(local_batch)`` gives its
    results' shapes."""
    # The products go to MKL's SGEMM where the dense layers' do (``cpu_blas.applies``: MKL loaded, which
    # :func:`_library` then handed to the kernel, and not turned off with ``OPERA_JAX_CPU_BLAS=0``).
    blas = cpu_blas.applies(q)
    attrs = dict(kept_scale=_kept_scale(keep, rate), scale=np.float32(scale), blas=np.int64(blas))
    masked = keep is not None

    def call(q, k, v, bias2, *xs):
        *xs, bq, bv = xs
        mask, xs = (xs[0], xs[1:]) if masked else (jnp.ones((1,), jnp.bool_), xs)  # unread without dropout
        fn = jax.ffi.ffi_call(TARGETS[kind][0], result_shapes(q.shape[0]), vmap_method="sequential")
        return fn(q, k, v, bias2, mask, bq, bv, *xs, **attrs)

    args = (q, k, v, bias2, *((keep,) if masked else ()), *rest, bq, bv)
    return per_device(call, *args, whole=(len(args) - 2, len(args) - 1))


def _forward(q, k, v, bias2, keep, bq, bv, rate, scale):
    """``(out, m, inv)``: the attention and each query row's logit maximum and reciprocal exp-sum."""
    _, n, h, d = q.shape
    rows = lambda b: jax.ShapeDtypeStruct((b, h, n), jnp.float32)
    shapes = lambda b: (jax.ShapeDtypeStruct((b, n, h, d), jnp.float32), rows(b), rows(b))
    return _kernel("forward", shapes, keep, rate, scale, bq, bv, q, k, v, bias2)


def _backward(q, k, v, bias2, keep, bq, bv, m, inv, g, rate, scale):
    """``(dq, dk, dv, dbias per head [b, heads, n])``."""
    _, n, h, d = q.shape
    shapes = lambda b: (
        (jax.ShapeDtypeStruct((b, n, h, d), jnp.float32),) * 3 + (jax.ShapeDtypeStruct((b, h, n), jnp.float32),)
    )
    return _kernel("backward", shapes, keep, rate, scale, bq, bv, q, k, v, bias2, m, inv, g)


def _attention_core(q, k, v, bias, keep, bq, bv, rate, scale):
    return _forward(q, k, v, bias.reshape(bias.shape[0], -1), keep, bq, bv, rate, scale)[0]


_attention = jax.custom_vjp(_attention_core, nondiff_argnums=(7, 8))


def _attention_fwd(q, k, v, bias, keep, bq, bv, rate, scale):
    out, m, inv = _forward(q, k, v, bias.reshape(bias.shape[0], -1), keep, bq, bv, rate, scale)
    return out, (q, k, v, bias, keep, bq, bv, m, inv)


def _attention_bwd(rate, scale, res, g):
    q, k, v, bias, keep, bq, bv, m, inv = res
    dq, dk, dv, dbias = _backward(q, k, v, bias.reshape(bias.shape[0], -1), keep, bq, bv, m, inv, g, rate, scale)
    tokens = lambda x: x.sum((0, 1)).reshape(-1)  # a bias's gradient: its projection's, summed over the tokens
    return dq, dk, dv, dbias.sum(1).reshape(bias.shape), None, tokens(dq), tokens(dv)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array,
    keep: jax.Array | None = None,
    rate: float = 0.0,
    qkv_bias: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    scale: float = 1.0,
) -> jax.Array:
    """``dropout(softmax(scale (q + bq)(k + bk)^T + bias)) (v + bv)`` per head for ``[b, n, heads,
    head_dim]`` f32 ``q``, ``k``, ``v``, the projections' biases ``qkv_bias = (bq, bk, bv)`` (each
    ``[heads * head_dim]``; ``None``: none) and a ``[b, 1, 1, n]`` key bias; ``keep``: dropout's
    ``[b, heads, n, n]`` keep-mask (``None``: no dropout). Returns ``[b, n, heads, head_dim]``.

    The biases are not added to q, k and v (each a pass over memory) but taken inside the kernel
    (``csrc/attention.cc``): the key bias shifts each query's logits by one constant, which the
    softmax ignores, so ``bk``'s gradient is 0. Only where :func:`applies` says so."""
    if not available():
        raise RuntimeError("the CPU attention kernel is not available (see the log's warning)")
    if qkv_bias is None:
        bq = bv = jnp.zeros((q.shape[2] * q.shape[3],), jnp.float32)
    else:
        bq, _, bv = qkv_bias
    return _attention(q, k, v, bias, keep, bq, bv, rate, scale)

"""Self-attention for the encoders, one entry point with the implementation chosen by configuration.

``model.attention`` names it:

- ``xla``: :func:`ops.attention`, softmax attention as XLA ops (f32 softmax, recomputation in the
  backward pass, attention-probability dropout). Runs everywhere; the reference every other path
  is tested against.
- ``cpu``: the C++ kernel of ``opera_jax/cpu/attention.py`` (f32, key padding, as many key/value
  heads as query heads); other operands fall back to ``xla``.
- ``cudnn``: cuDNN's flash attention (``jax.nn.dot_product_attention(implementation="cudnn")``),
  bf16/fp16 on NVIDIA GPUs; grouped-query heads read their key/value head in place.
- ``pallas``: the Pallas TPU splash-attention kernel, grouped-query heads through its
  multi-query form; on other backends in Pallas's interpret mode (how it is tested on CPU).
  Sequences whose length is not a multiple of 128 (the TPU's lane width) take ``xla``.
- ``auto`` (the default): ``cpu`` on CPU in f32, ``cudnn`` on GPU in bf16/fp16, ``pallas`` on TPU,
  ``xla`` otherwise.

Masking is given as the ``[batch, length]`` 0/1 padding mask, plus ``causal`` for decoders; each
path builds what it takes from it (an additive bias, sequence lengths, segment ids).

The fused paths take their choices from what the kernels offer:
- No attention-probability dropout on ``cudnn`` or ``pallas``: cuDNN's dropout takes its seed as
  a compile-time constant (the same mask every step) and splash attention has none. Hidden-state
  dropout is unchanged. :func:`takes_dropout` says which paths apply it.
- ``cudnn`` reads the padding as sequence lengths, which assumes right padding: the encoder pads on
  the right whenever it is chosen (:func:`pads_right`). For Qwen3, whose tokenizer pads on the left,
  the embeddings are the same up to rounding: rotary position embeddings depend on relative
  positions only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from opera_jax.errors import InputError
from opera_jax.models import ops
from opera_jax.sharding import per_device

IMPLEMENTATIONS = ("auto", "xla", "cpu", "cudnn", "pallas")
HALF = (jnp.bfloat16, jnp.float16)

# The implementation `jax.nn.dot_product_attention` is asked for on the cudnn path. Tests on machines
# without a GPU set it to "xla" (the same function, the same arguments, XLA's math) to run the code
# around it; the cuDNN kernel itself is tested on a GPU (tests marked `gpu`).
CUDNN_IMPLEMENTATION = "cudnn"
LANES = 128  # splash attention's block sizes are multiples of this


def resolve(name: str, dtype, backend: str | None = None) -> str:
    """The implementation ``name`` stands for with a ``dtype`` computation on ``backend``
    (default: JAX's default backend). ``auto`` picks; an explicit name the backend or dtype cannot
    run is an :class:`InputError`."""
    backend = backend or jax.default_backend()
    half = jnp.dtype(dtype) in map(jnp.dtype, HALF)
    if name not in IMPLEMENTATIONS:
        raise InputError(f"model.attention {name!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    if name == "auto":
        if backend == "cpu" and not half:
            return "cpu"
        if backend in ("gpu", "cuda") and half:
            return "cudnn"
        return "pallas" if backend == "tpu" else "xla"
    if name == "cudnn" and (backend not in ("gpu", "cuda") or not half):
        raise InputError(
            f"model.attention 'cudnn' needs an NVIDIA GPU and model.dtype bfloat16 or float16 "
            f"(here: {backend}, {jnp.dtype(dtype).name})"
        )
    if name == "cpu" and backend != "cpu":
        raise InputError(f"model.attention 'cpu' runs on the CPU only (here: {backend})")
    return name


def takes_dropout(implementation: str) -> bool:
    """Whether ``implementation`` applies attention-probability dropout (see the module's docstring)."""
    return implementation in ("xla", "cpu")


def pads_right(implementation: str) -> bool:
    """Whether ``implementation`` needs right-padded batches (it reads the padding as lengths)."""
    return implementation == "cudnn"


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    implementation: str,
    causal: bool = False,
    scale: float = 1.0,
    keep: jax.Array | None = None,
    rate: float = 0.0,
    qkv_bias: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """``softmax(scale (q + bq)(k + bk)^T + mask) (v + bv)`` for ``[b, n, heads, head_dim]`` ``q`` and
    ``[b, n, kv_heads, head_dim]`` ``k``, ``v`` (query head ``j * group + r`` reads key/value head
    ``j``), returning ``[b, n, heads, head_dim]`` in ``q``'s dtype, softmax in f32.

    ``mask``: ``[b, n]``, 1 for real tokens; ``causal``: query ``i`` sees keys ``j <= i`` too.
    ``qkv_bias``: the projections' biases, each ``[heads * head_dim]`` or ``[kv_heads * head_dim]``
    (``None``: none). ``keep``: dropout's ``[b, heads, n, n]`` keep-mask (``None``: none), used by
    the paths :func:`takes_dropout` names. ``implementation``: a name :func:`resolve` returned."""
    if implementation == "cpu" and not causal and q.shape == k.shape:
        from opera_jax.cpu import attention as cpu_attention

        bias = padding_bias(mask)
        if cpu_attention.applies(q, k, v, bias):
            return cpu_attention.attention(q, k, v, bias, keep, rate, qkv_bias, scale)
    if qkv_bias is not None:
        q, k, v = (x + b.reshape(x.shape[2:]).astype(x.dtype) for x, b in zip((q, k, v), qkv_bias))
    if implementation == "cudnn":
        return _cudnn(q, k, v, mask, causal, scale)
    if implementation == "pallas" and q.shape[1] % LANES == 0:
        return _splash(q * jnp.asarray(scale, q.dtype), k, v, mask, causal)
    return _xla(q * jnp.asarray(scale, q.dtype) if scale != 1.0 else q, k, v, mask, causal, keep, rate)


def keep_mask(dropout: nnx.Dropout, shape: tuple[int, ...], like: jax.Array) -> jax.Array | None:
    """The boolean keep-mask ``dropout`` would draw for an input of ``shape`` (split over devices as
    ``like``); ``None`` when it is off."""
    if dropout.deterministic or dropout.rate == 0.0:
        return None
    return jax.random.bernoulli(dropout.rngs(), 1.0 - dropout.rate, shape, out_sharding=jax.typeof(like).sharding)


def padding_bias(mask: jax.Array) -> jax.Array:
    """``[b, n]`` 0/1 mask -> additive f32 key bias ``[b, 1, 1, n]`` (``finfo.min`` on padding)."""
    return jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def causal_bias(mask: jax.Array) -> jax.Array:
    """``[b, n]`` 0/1 mask -> additive f32 bias ``[b, 1, n, n]``: query ``i`` sees key ``j`` when
    ``j <= i`` and ``j`` is a real token. A padded query of a left-padded batch sees nothing real;
    its row stays finite (uniform weights) and its output is never read."""
    n = mask.shape[1]
    allowed = jnp.tril(jnp.ones((n, n), bool))[None] & (mask[:, None, :] > 0)
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)[:, None].astype(jnp.float32)


def _xla(q, k, v, mask, causal, keep, rate):
    """:func:`ops.attention` between head transposes; grouped-query heads as a group axis of the
    queries against one key/value head (nothing repeated in memory)."""
    b, n, heads, d = q.shape
    kv = k.shape[2]
    bias = causal_bias(mask) if causal else padding_bias(mask)  # [b, 1, n or 1, n]
    if kv == heads:
        # Explicit transposes and batched matmuls: on XLA:CPU 2.6x faster than the equivalent
        # einsums ("bqhd,bkhd->bhqk"), whose layout changes are not fused with the dots.
        t = lambda x: x.transpose(0, 2, 1, 3)
        return t(ops.attention(t(q), t(k), t(v), bias, keep, rate))
    group = heads // kv
    qg = q.reshape(b, n, kv, group, d).transpose(0, 2, 3, 1, 4)  # [b, kv, group, n, d]
    kg, vg = (x.transpose(0, 2, 1, 3)[:, :, None] for x in (k, v))  # [b, kv, 1, n, d]
    keep = None if keep is None else keep.reshape(b, kv, group, n, n)
    out = ops.attention(qg, kg, vg, bias[:, None], keep, rate)  # [b, kv, group, n, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, n, heads, d)


def _cudnn(q, k, v, mask, causal, scale):
    """cuDNN flash attention; the padding as sequence lengths (right padding: :func:`pads_right`).
    Padded query rows come back as zeros."""
    lengths = mask.sum(-1).astype(jnp.int32)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=causal,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation=CUDNN_IMPLEMENTATION,
    )


def _block(n: int) -> int:
    """The largest of 512, 256 and 128 that divides ``n``: splash attention's block for both axes."""
    return next(size for size in (512, 256, LANES) if n % size == 0)


@functools.cache
def _splash_kernel(n: int, heads: int, causal: bool, mqa: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = sm.CausalMask((n, n)) if causal else sm.FullMask((n, n))
    size = _block(n)
    blocks = sk.BlockSizes(
        block_q=size,
        block_kv=size,
        block_kv_compute=size,
        block_q_dkv=size,
        block_kv_dkv=size,
        block_kv_dkv_compute=size,
        block_q_dq=size,
        block_kv_dq=size,
    )
    make = sk.make_splash_mqa if mqa else sk.make_splash_mha
    with jax.ensure_compile_time_eval():  # its mask tables concrete arrays, not the first caller's tracers
        return make(
            sm.MultiHeadMask([one] * heads), block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret
        )


def _splash(q, k, v, mask, causal):
    """Splash attention per sequence (``q`` already scaled); padding as segment ids (real tokens 1,
    padding 0: a padded query sees padded keys only, so no row is empty). Grouped-query heads: the
    multi-query kernel per key/value head, its group of query heads against that one head. Under the
    train step's mesh each device runs it on its own sequences (``sharding.per_device``): XLA cannot
    split a Pallas call itself."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    b, n, heads, d = q.shape
    kv = k.shape[2]
    interpret = jax.default_backend() != "tpu"
    t = lambda x: x.transpose(0, 2, 1, 3)  # [b, heads, n, d]
    one = lambda kernel: lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s))
    if kv == heads:
        kernel = one(_splash_kernel(n, heads, causal, False, interpret))
        body = lambda q, k, v, s: t(jax.vmap(kernel)(t(q), t(k), t(v), s))
    else:
        group = heads // kv
        kernel = one(_splash_kernel(n, group, causal, True, interpret))
        per_seq = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over key/value heads

        def body(q, k, v, s):
            out = jax.vmap(per_seq)(t(q).reshape(-1, kv, group, n, d), t(k), t(v), s)  # [b, kv, group, n, d]
            return t(out.reshape(-1, heads, n, d))

    return per_device(body, q, k, v, (mask > 0).astype(jnp.int32))

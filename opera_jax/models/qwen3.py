"""Qwen3 decoder in Flax NNX, used as an embedder (Qwen3-Embedding).

Pre-norm decoder layers: RMSNorm -> grouped-query self-attention (per-head
RMSNorm on queries and keys, then rotary position embeddings) -> residual;
RMSNorm -> SwiGLU MLP -> residual; a final RMSNorm. Attention is causal and
ignores padded keys. There is no language-model head: a retriever pools the
last hidden states itself (the last real token for Qwen3-Embedding).

Positions are ``0 .. length - 1`` whatever the padding, as in transformers'
``Qwen3Model`` called with ``input_ids`` and ``attention_mask`` only (which is
how sentence-transformers runs Qwen3-Embedding). With left padding the real
tokens then start at a position above 0; rotary embeddings make attention
depend on relative positions only, so the embedding of a left-padded text
equals its unpadded one up to rounding.

Shapes: ``input_ids`` and ``attention_mask`` are ``[batch, length]`` int arrays;
the output is ``[batch, length, hidden]`` in the compute dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from opera_jax.errors import InputError
from opera_jax.models import attention
from opera_jax.models.bert import Precision
from opera_jax.models.remat import checkpointed, policy_name


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """The fields of a Hugging Face Qwen3 ``config.json`` that shape the network."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    attention_bias: bool = False
    attention_dropout: float = 0.0
    hidden_act: str = "silu"
    # Kept for the export only: the embedder has no language-model head.
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> Qwen3Config:
        """Build from a parsed ``config.json`` (transformers 4 or 5 layout); unknown keys are ignored."""
        if hf.get("model_type") != "qwen3":
            raise InputError(f"{source}: model_type {hf.get('model_type')!r} is not a Qwen3 model")
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        missing = [k for k in required if k not in hf]
        if missing:
            raise InputError(f"{source}: missing field(s) {', '.join(missing)}")
        # transformers 5 nests the RoPE settings in rope_parameters; 4.x has rope_theta + rope_scaling.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise InputError(f"{source}: rope_type {rope_type!r} is not supported (only 'default')")
        if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or ()):
            raise InputError(f"{source}: sliding-window attention is not supported")
        heads = hf["num_attention_heads"]
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in fields and v is not None}
        values["num_key_value_heads"] = hf.get("num_key_value_heads") or heads
        values["head_dim"] = hf.get("head_dim") or hf["hidden_size"] // heads
        values["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", cls.rope_theta)))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            values[key] = hf.get(key) if isinstance(hf.get(key), int) else None
        config = cls(**values)
        if config.hidden_act != "silu":
            raise InputError(f"{source}: hidden_act {config.hidden_act!r} is not supported (only 'silu')")
        if heads % config.num_key_value_heads:
            raise InputError(
                f"{source}: num_attention_heads {heads} is not a multiple of "
                f"num_key_value_heads {config.num_key_value_heads}"
            )
        if config.head_dim % 2:
            raise InputError(f"{source}: head_dim {config.head_dim} is odd (rotary embeddings need it even)")
        return config

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` that transformers' ``Qwen3Model`` loads (4.x and 5.x layouts both)."""
        hf = dataclasses.asdict(self)
        return {
            "architectures": ["Qwen3Model"],
            "model_type": "qwen3",
            **hf,
            "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "use_sliding_window": False,
            "sliding_window": None,
            "layer_types": ["full_attention"] * self.num_hidden_layers,
        }


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale`` over the last axis, computed in f32, returned in the compute dtype."""

    def __init__(self, dim: int, eps: float, p: Precision):
        self.eps = eps
        self.dtype = p.dtype
        self.scale = nnx.Param(jnp.ones((dim,), p.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * self.scale.get_value().astype(self.dtype)


def _linear(din: int, dout: int, bias: bool, p: Precision, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=bias, dtype=p.dtype, param_dtype=p.param_dtype, rngs=rngs)


def rotary_tables(length: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """f32 ``(cos, sin)`` of shape ``[length, head_dim]`` for positions ``0 .. length - 1``.

    Frequency ``k`` is ``theta ** (-2k / head_dim)``; both halves of the head
    dimension share the frequencies (the "rotate half" layout of transformers).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` ``[..., length, head_dim]``: ``x * cos + rotate_half(x) * sin``, in f32."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class Qwen3Attention(nnx.Module):
    """Grouped-query causal self-attention with per-head q/k RMSNorm and rotary embeddings."""

    def __init__(self, c: Qwen3Config, p: Precision, implementation: str, rngs: nnx.Rngs):
        self.implementation = implementation  # a name of attention.IMPLEMENTATIONS
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.head_dim = c.head_dim
        self.query = _linear(c.hidden_size, c.num_attention_heads * c.head_dim, c.attention_bias, p, rngs)
        self.key = _linear(c.hidden_size, c.num_key_value_heads * c.head_dim, c.attention_bias, p, rngs)
        self.value = _linear(c.hidden_size, c.num_key_value_heads * c.head_dim, c.attention_bias, p, rngs)
        self.out = _linear(c.num_attention_heads * c.head_dim, c.hidden_size, c.attention_bias, p, rngs)
        self.query_norm = RMSNorm(c.head_dim, c.rms_norm_eps, p)
        self.key_norm = RMSNorm(c.head_dim, c.rms_norm_eps, p)
        self.attn_dropout = nnx.Dropout(c.attention_dropout, rngs=rngs)

    def __call__(self, h: jax.Array, rope: tuple[jax.Array, jax.Array], mask: jax.Array) -> jax.Array:
        b, n, _ = h.shape
        heads, kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        implementation = attention.resolve(self.implementation, self.query.dtype)
        cos, sin = (x[:, None] for x in rope)  # [n, 1, hd]: over the heads
        # [b, n, heads, hd] against [b, n, kv, hd]: query head j * group + r reads key/value head j
        # (transformers' repeat_kv order); nothing is repeated in memory.
        q = apply_rotary(self.query_norm(self.query(h).reshape(b, n, heads, hd)), cos, sin)
        k = apply_rotary(self.key_norm(self.key(h).reshape(b, n, kv, hd)), cos, sin)
        v = self.value(h).reshape(b, n, kv, hd)
        keep = (
            attention.keep_mask(self.attn_dropout, (b, heads, n, n), q)
            if attention.takes_dropout(implementation)
            else None
        )
        ctx = attention.attend(
            q,
            k,
            v,
            mask,
            implementation=implementation,
            causal=True,
            scale=hd**-0.5,
            keep=keep,
            rate=self.attn_dropout.rate,
        )
        return self.out(ctx.reshape(b, n, heads * hd))


class Qwen3MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, c: Qwen3Config, p: Precision, rngs: nnx.Rngs):
        self.gate = _linear(c.hidden_size, c.intermediate_size, False, p, rngs)
        self.up = _linear(c.hidden_size, c.intermediate_size, False, p, rngs)
        self.down = _linear(c.intermediate_size, c.hidden_size, False, p, rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(h)) * self.up(h))


class Qwen3Layer(nnx.Module):
    def __init__(self, c: Qwen3Config, p: Precision, implementation: str, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, p)
        self.attention = Qwen3Attention(c, p, implementation, rngs)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, p)
        self.mlp = Qwen3MLP(c, p, rngs)

    def __call__(self, h: jax.Array, rope: tuple[jax.Array, jax.Array], mask: jax.Array) -> jax.Array:
        h = h + self.attention(self.attention_norm(h), rope, mask)
        return h + self.mlp(self.mlp_norm(h))


class Qwen3Model(nnx.Module):
    """Token ids -> last hidden states. ``remat``: a policy of ``remat.py`` (``True`` = ``"full"``), per
    layer; ``attention``: a name of ``attention.IMPLEMENTATIONS`` (``"auto"``: by backend and dtype)."""

    def __init__(
        self,
        config: Qwen3Config,
        *,
        precision: Precision = Precision(),
        remat: bool | str = False,
        attention: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.remat = policy_name(remat)
        self.embed = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=precision.dtype, param_dtype=precision.param_dtype, rngs=rngs
        )
        self.layers = nnx.List(
            [Qwen3Layer(config, precision, attention, rngs) for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, precision)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        c = self.config
        rope = rotary_tables(input_ids.shape[1], c.head_dim, c.rope_theta)
        h = self.embed(input_ids)
        for layer in self.layers:
            h = checkpointed(layer, self.remat)(h, rope, attention_mask)
        return self.norm(h)

"""BERT-family encoder in Flax NNX (MiniLM, BGE, E5, Contriever).

The module tree mirrors the Hugging Face ``BertModel`` so that the weight-name
mapping in ``bert_params.py`` stays a table. There is no pooler: retrievers
pool the last hidden states themselves (``encoder.pool``). Attention runs through
``attention.attend``, its implementation chosen by ``model.attention``.

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
from opera_jax.models import attention, ops
from opera_jax.models.remat import checkpointed, policy_name

_ACTIVATIONS = {
    "gelu": ops.gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT ``config.json`` that shape the network."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> BertConfig:
        """Build from a parsed ``config.json``; unknown keys are ignored."""
        if hf.get("model_type") not in ("bert", None):
            raise InputError(f"{source}: model_type {hf.get('model_type')!r} is not a BERT model")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise InputError(
                f"{source}: position_embedding_type {hf['position_embedding_type']!r} "
                "is not supported (only 'absolute')"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in hf]
        if missing:
            raise InputError(f"{source}: missing field(s) {', '.join(missing)}")
        config = cls(**{k: v for k, v in hf.items() if k in fields})
        if config.hidden_act not in _ACTIVATIONS:
            raise InputError(f"{source}: hidden_act {config.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")
        if config.hidden_size % config.num_attention_heads:
            raise InputError(
                f"{source}: hidden_size {config.hidden_size} is not divisible by "
                f"num_attention_heads {config.num_attention_heads}"
            )
        return config

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` that transformers' ``BertModel`` loads."""
        return {
            "architectures": ["BertModel"],
            "model_type": "bert",
            "position_embedding_type": "absolute",
            **dataclasses.asdict(self),
        }


@dataclasses.dataclass(frozen=True)
class Precision:
    """Compute and parameter dtypes (bf16 compute with f32 master weights is one option)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @classmethod
    def named(cls, dtype: str, param_dtype: str = "float32", backend: str | None = None) -> Precision:
        """From the config's names; ``dtype`` ``"auto"``: bfloat16 on GPUs and TPUs (f32 master
        weights), float32 on CPU, whose bf16 arithmetic is emulated. ``backend``: JAX's default."""
        if dtype == "auto":
            dtype = "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"
        return cls(dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype))


def _linear(din: int, dout: int, p: Precision, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, dtype=p.dtype, param_dtype=p.param_dtype, rngs=rngs)


def _weights(linear: nnx.Linear) -> tuple[jax.Array, jax.Array]:
    """``linear``'s kernel and bias in its compute dtype."""
    return linear.kernel[...].astype(linear.dtype), linear.bias[...].astype(linear.dtype)


def _apply_linear(linear: nnx.Linear, x: jax.Array) -> jax.Array:
    """``linear(x)`` through :func:`ops.dense` (its backward pass keeps the weight gradient's
    dot in the layout XLA:CPU runs fastest; ``ops.PLAIN`` gives the plain dot)."""
    return ops.dense(x.astype(linear.dtype), *_weights(linear))


def _norm(dim: int, eps: float, p: Precision, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=eps, dtype=p.dtype, param_dtype=p.param_dtype, rngs=rngs)


def _apply_norm(norm: nnx.LayerNorm, x: jax.Array) -> jax.Array:
    """``norm(x)`` through :func:`ops.layer_norm` (its hand-written backward pass)."""
    if ops.PLAIN:
        return norm(x)
    return ops.layer_norm(x.astype(norm.dtype), norm.scale[...], norm.bias[...], norm.epsilon)


class BertEmbeddings(nnx.Module):
    def __init__(self, c: BertConfig, p: Precision, rngs: nnx.Rngs):
        embed = lambda n: nnx.Embed(n, c.hidden_size, dtype=p.dtype, param_dtype=p.param_dtype, rngs=rngs)
        self.word = embed(c.vocab_size)
        self.position = embed(c.max_position_embeddings)
        self.token_type = embed(c.type_vocab_size)
        self.norm = _norm(c.hidden_size, c.layer_norm_eps, p, rngs)
        self.dropout = nnx.Dropout(c.hidden_dropout_prob, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        length = input_ids.shape[1]
        # Token type 0 everywhere: retrievers encode single segments.
        h = self.word(input_ids) + self.position.embedding[None, :length] + self.token_type.embedding[0]
        return self.dropout(_apply_norm(self.norm, h.astype(self.norm.dtype)))


class BertAttention(nnx.Module):
    """Multi-head self-attention with the residual LayerNorm of BERT's output block."""

    def __init__(self, c: BertConfig, p: Precision, implementation: str, rngs: nnx.Rngs):
        self.implementation = implementation  # a name of attention.IMPLEMENTATIONS
        self.num_heads = c.num_attention_heads
        self.query = _linear(c.hidden_size, c.hidden_size, p, rngs)
        self.key = _linear(c.hidden_size, c.hidden_size, p, rngs)
        self.value = _linear(c.hidden_size, c.hidden_size, p, rngs)
        self.out = _linear(c.hidden_size, c.hidden_size, p, rngs)
        self.norm = _norm(c.hidden_size, c.layer_norm_eps, p, rngs)
        self.attn_dropout = nnx.Dropout(c.attention_probs_dropout_prob, rngs=rngs)
        self.dropout = nnx.Dropout(c.hidden_dropout_prob, rngs=rngs)

    def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
        b, n, d = h.shape
        implementation = attention.resolve(self.implementation, self.query.dtype)
        # The projections without their biases: the attention takes those, and the 1/sqrt(head_dim)
        # scale, itself (on CPU inside its kernel, saving a pass over q, k and v each).
        projections = [_weights(x) for x in (self.query, self.key, self.value)]
        x = h.astype(self.query.dtype)
        q, k, v = (ops.dense(x, w, None).reshape(b, n, self.num_heads, -1) for w, _ in projections)
        keep = (
            attention.keep_mask(self.attn_dropout, (b, self.num_heads, n, n), q)
            if attention.takes_dropout(implementation)
            else None
        )
        ctx = attention.attend(
            q,
            k,
            v,
            mask,
            implementation=implementation,
            scale=1.0 / (d // self.num_heads) ** 0.5,
            keep=keep,
            rate=self.attn_dropout.rate,
            qkv_bias=tuple(b_ for _, b_ in projections),
        )
        return _apply_norm(self.norm, h + self.dropout(_apply_linear(self.out, ctx.reshape(b, n, d))))


class BertMLP(nnx.Module):
    def __init__(self, c: BertConfig, p: Precision, rngs: nnx.Rngs):
        self.act = _ACTIVATIONS[c.hidden_act]
        self.intermediate = _linear(c.hidden_size, c.intermediate_size, p, rngs)
        self.output = _linear(c.intermediate_size, c.hidden_size, p, rngs)
        self.norm = _norm(c.hidden_size, c.layer_norm_eps, p, rngs)
        self.dropout = nnx.Dropout(c.hidden_dropout_prob, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        x = _apply_linear(self.intermediate, h)
        if self.act is ops.gelu:  # GELU and the output layer in one op (its backward keeps x only)
            y = ops.gelu_dense(x, *_weights(self.output))
        else:
            y = self.output(self.act(x))
        return _apply_norm(self.norm, h + self.dropout(y))


class BertLayer(nnx.Module):
    def __init__(self, c: BertConfig, p: Precision, implementation: str, rngs: nnx.Rngs):
        self.attention = BertAttention(c, p, implementation, rngs)
        self.mlp = BertMLP(c, p, rngs)

    def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
        return self.mlp(self.attention(h, mask))


class BertModel(nnx.Module):
    """Token ids -> last hidden states. ``remat``: a policy of ``remat.py`` (``True`` = ``"full"``), per
    layer; ``attention``: a name of ``attention.IMPLEMENTATIONS`` (``"auto"``: by backend and dtype)."""

    def __init__(
        self,
        config: BertConfig,
        *,
        precision: Precision = Precision(),
        remat: bool | str = False,
        attention: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.remat = policy_name(remat)
        self.embeddings = BertEmbeddings(config, precision, rngs)
        self.layers = nnx.List([BertLayer(config, precision, attention, rngs) for _ in range(config.num_hidden_layers)])

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        h = self.embeddings(input_ids)
        for layer in self.layers:
            h = checkpointed(layer, self.remat)(h, attention_mask)
        return h

"""Hugging Face ``Qwen3Model`` weight names <-> our ``Qwen3Model`` parameter paths.

PyTorch ``nn.Linear`` stores ``[out, in]``; NNX ``Linear`` stores ``[in, out]``:
the third column says which tensors are transposed. The bias rows apply only
to configs with ``attention_bias: true`` (Qwen3 has none by default); a bias in
a checkpoint whose config says false is an error, as any unexpected tensor.
"""

from __future__ import annotations

from opera_jax.models.weights import NameMap

_ATTN = "layers.{i}.self_attn"

TABLE = (
    ("embed_tokens.weight", "embed.embedding", False),
    ("layers.{i}.input_layernorm.weight", "layers.{i}.attention_norm.scale", False),
    (f"{_ATTN}.q_proj.weight", "layers.{i}.attention.query.kernel", True),
    (f"{_ATTN}.q_proj.bias", "layers.{i}.attention.query.bias", False),
    (f"{_ATTN}.k_proj.weight", "layers.{i}.attention.key.kernel", True),
    (f"{_ATTN}.k_proj.bias", "layers.{i}.attention.key.bias", False),
    (f"{_ATTN}.v_proj.weight", "layers.{i}.attention.value.kernel", True),
    (f"{_ATTN}.v_proj.bias", "layers.{i}.attention.value.bias", False),
    (f"{_ATTN}.o_proj.weight", "layers.{i}.attention.out.kernel", True),
    (f"{_ATTN}.o_proj.bias", "layers.{i}.attention.out.bias", False),
    (f"{_ATTN}.q_norm.weight", "layers.{i}.attention.query_norm.scale", False),
    (f"{_ATTN}.k_norm.weight", "layers.{i}.attention.key_norm.scale", False),
    ("layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.scale", False),
    ("layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate.kernel", True),
    ("layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.up.kernel", True),
    ("layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down.kernel", True),
    ("norm.weight", "norm.scale", False),
)

NAME_MAP = NameMap(
    TABLE,
    # Checkpoints saved from Qwen3ForCausalLM prefix the decoder with "model.".
    strip_prefixes=("model.",),
    # The language-model head (tied to embed_tokens in the small Qwen3s) is not
    # part of an embedder; old checkpoints may carry the rotary buffer.
    ignore=(r"^lm_head\.", r"(^|\.)rotary_emb\.inv_freq$"),
)

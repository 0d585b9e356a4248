"""Hugging Face ``BertModel`` weight names <-> our ``BertModel`` parameter paths.

PyTorch ``nn.Linear`` stores ``[out, in]``; NNX ``Linear`` stores ``[in, out]``:
the third column says which tensors are transposed.
"""

from __future__ import annotations

from opera_jax.models.weights import NameMap

TABLE = (
    ("embeddings.word_embeddings.weight", "embeddings.word.embedding", False),
    ("embeddings.position_embeddings.weight", "embeddings.position.embedding", False),
    ("embeddings.token_type_embeddings.weight", "embeddings.token_type.embedding", False),
    ("embeddings.LayerNorm.weight", "embeddings.norm.scale", False),
    ("embeddings.LayerNorm.bias", "embeddings.norm.bias", False),
    ("encoder.layer.{i}.attention.self.query.weight", "layers.{i}.attention.query.kernel", True),
    ("encoder.layer.{i}.attention.self.query.bias", "layers.{i}.attention.query.bias", False),
    ("encoder.layer.{i}.attention.self.key.weight", "layers.{i}.attention.key.kernel", True),
    ("encoder.layer.{i}.attention.self.key.bias", "layers.{i}.attention.key.bias", False),
    ("encoder.layer.{i}.attention.self.value.weight", "layers.{i}.attention.value.kernel", True),
    ("encoder.layer.{i}.attention.self.value.bias", "layers.{i}.attention.value.bias", False),
    ("encoder.layer.{i}.attention.output.dense.weight", "layers.{i}.attention.out.kernel", True),
    ("encoder.layer.{i}.attention.output.dense.bias", "layers.{i}.attention.out.bias", False),
    ("encoder.layer.{i}.attention.output.LayerNorm.weight", "layers.{i}.attention.norm.scale", False),
    ("encoder.layer.{i}.attention.output.LayerNorm.bias", "layers.{i}.attention.norm.bias", False),
    ("encoder.layer.{i}.intermediate.dense.weight", "layers.{i}.mlp.intermediate.kernel", True),
    ("encoder.layer.{i}.intermediate.dense.bias", "layers.{i}.mlp.intermediate.bias", False),
    ("encoder.layer.{i}.output.dense.weight", "layers.{i}.mlp.output.kernel", True),
    ("encoder.layer.{i}.output.dense.bias", "layers.{i}.mlp.output.bias", False),
    ("encoder.layer.{i}.output.LayerNorm.weight", "layers.{i}.mlp.norm.scale", False),
    ("encoder.layer.{i}.output.LayerNorm.bias", "layers.{i}.mlp.norm.bias", False),
)

NAME_MAP = NameMap(
    TABLE,
    # Checkpoints saved from BertForMaskedLM & co. prefix the encoder with "bert.".
    strip_prefixes=("bert.",),
    # The pooler and task heads are not part of a retriever; position_ids is a buffer.
    ignore=(r"^pooler\.", r"^cls\.", r"^embeddings\.position_ids$", r"^classifier\."),
    # Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
    aliases={"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"},
)

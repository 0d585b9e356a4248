"""A retriever = a backbone + pooling + optional L2 normalisation, loaded from a model reference.

``EncoderSpec`` holds what is not in the weights: pooling, normalisation, max
length, instruction prefixes and padding side. It is read from the
sentence-transformers files when a model has them (``modules.json``,
``1_Pooling/config.json``, ``sentence_bert_config.json``,
``config_sentence_transformers.json``), and every field can be overridden.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from opera_jax.errors import InputError
from opera_jax.models import attention as attention_lib
from opera_jax.models import bert, bert_params, qwen3, qwen3_params
from opera_jax.models.hub import resolve_model_dir
from opera_jax.models.weights import NameMap, load_into

POOLINGS = ("cls", "mean", "last")
# The sentence-transformers modules we implement; any other (Dense, LayerNorm, ...) would change the
# embeddings, so a model that lists one is refused rather than loaded without it.
ST_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    pooling: str = "cls"
    normalize: bool = True
    max_seq_length: int = 512
    query_prefix: str = ""
    passage_prefix: str = ""
    padding_side: str = "right"

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise InputError(f"pooling {self.pooling!r} is not one of {', '.join(POOLINGS)}")
        if self.padding_side not in ("left", "right"):
            raise InputError(f"padding_side {self.padding_side!r} is not 'left' or 'right'")
        if self.max_seq_length < 2:
            raise InputError(f"max_seq_length {self.max_seq_length} is too small")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def read_spec(model_dir: Path, max_position_embeddings: int) -> EncoderSpec:
    """The spec a model directory declares; CLS pooling and normalisation when it declares none."""
    fields: dict[str, Any] = {"max_seq_length": max_position_embeddings}
    modules_file = model_dir / "modules.json"
    if modules_file.exists():
        modules = _read_json(modules_file)
        types = _module_types(modules_file, modules)
        fields["normalize"] = "Normalize" in types
        for m, kind in zip(modules, types):
            if kind == "Pooling":
                fields["pooling"] = _pooling_from_st(model_dir / m.get("path", "") / "config.json")
    st_config = model_dir / "sentence_bert_config.json"
    if st_config.exists():
        length = _read_json(st_config).get("max_seq_length")
        if length:
            fields["max_seq_length"] = min(int(length), max_position_embeddings)
    prompts_file = model_dir / "config_sentence_transformers.json"
    if prompts_file.exists():
        prompts = _read_json(prompts_file).get("prompts") or {}
        fields["query_prefix"] = prompts.get("query", "")
        fields["passage_prefix"] = prompts.get("document", prompts.get("passage", ""))
    tok_config = model_dir / "tokenizer_config.json"
    if tok_config.exists():
        fields["padding_side"] = _read_json(tok_config).get("padding_side", "right")
    return EncoderSpec(**fields)


def _module_types(path: Path, modules: Any) -> list[str]:
    """The short type of each module ``modules.json`` lists (``Pooling`` for
    ``sentence_transformers.models.Pooling``); one we do not implement is an InputError."""
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise InputError(f"{path}: expected a list of module objects")
    types = []
    for m in modules:
        full = str(m.get("type", ""))
        kind = full.rpartition(".")[2]
        if not full.startswith("sentence_transformers.") or kind not in ST_MODULES:
            raise InputError(
                f"{path}: module {m.get('name', m.get('idx', '?'))!r} has type {full!r}, which "
                f"opera-jax does not implement (supported: {', '.join(ST_MODULES)})"
            )
        types.append(kind)
    return types


def _pooling_from_st(path: Path) -> str:
    cfg = _read_json(path)
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    if cfg.get("pooling_mode_lasttoken"):
        return "last"
    raise InputError(f"{path}: no supported pooling mode set (cls, mean or lasttoken)")


def pool(hidden: jax.Array, attention_mask: jax.Array, mode: str) -> jax.Array:
    """``[b, n, d]`` hidden states -> ``[b, d]``; padding may be on either side."""
    mask = attention_mask.astype(jnp.float32)
    if mode == "cls":
        first = jnp.argmax(mask, axis=1)
        return jnp.take_along_axis(hidden, first[:, None, None], axis=1)[:, 0]
    if mode == "mean":
        total = jnp.einsum("bnd,bn->bd", hidden.astype(jnp.float32), mask)
        return total / jnp.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
    if mode == "last":
        n = mask.shape[1]
        last = n - 1 - jnp.argmax(mask[:, ::-1], axis=1)
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    raise ValueError(f"unknown pooling {mode!r}")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """As ``torch.nn.functional.normalize``: ``x / max(||x||, eps)``."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class Retriever(nnx.Module):
    """Token ids -> one f32 embedding per text."""

    def __init__(self, backbone: nnx.Module, pooling: str, normalize: bool):
        self.backbone = backbone
        self.pooling = pooling
        self.normalize = normalize

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        hidden = self.backbone(input_ids, attention_mask)
        emb = pool(hidden, attention_mask, self.pooling).astype(jnp.float32)
        return l2_normalize(emb) if self.normalize else emb


@dataclasses.dataclass(frozen=True)
class Architecture:
    config_cls: type
    model_cls: type
    name_map: NameMap


ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture(bert.BertConfig, bert.BertModel, bert_params.NAME_MAP),
    "qwen3": Architecture(qwen3.Qwen3Config, qwen3.Qwen3Model, qwen3_params.NAME_MAP),
}


@dataclasses.dataclass
class Encoder:
    """Everything needed to embed text with a loaded model."""

    model: Retriever
    tokenizer: Any
    spec: EncoderSpec
    config: Any
    architecture: str
    source: Path


def load_encoder(
    ref: str,
    *,
    precision: bert.Precision = bert.Precision(),
    remat: bool | str = False,
    attention: str = "auto",
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> Encoder:
    """Load weights, config, tokenizer and spec for a local dir, bundled model or hub id.

    ``overrides`` replaces spec fields (pooling, normalize, prefixes, ...). ``attention``: a name of
    ``attention.IMPLEMENTATIONS``; one that reads padding as sequence lengths (cuDNN) makes the
    spec pad on the right.
    ``seed`` seeds the dropout stream only: every parameter comes from the checkpoint.
    """
    from opera_jax.data.tokens import load_tokenizer

    model_dir = resolve_model_dir(ref)
    hf_config = _read_json(model_dir / "config.json")
    arch_name = hf_config.get("model_type")
    if arch_name not in ARCHITECTURES:
        raise InputError(
            f"{model_dir / 'config.json'}: model_type {arch_name!r} is not supported "
            f"({', '.join(sorted(ARCHITECTURES))})"
        )
    arch = ARCHITECTURES[arch_name]
    config = arch.config_cls.from_hf(hf_config, source=str(model_dir / "config.json"))
    spec = read_spec(model_dir, config.max_position_embeddings)
    if overrides:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(EncoderSpec)}
        if unknown:
            raise InputError(f"unknown encoder option(s): {', '.join(sorted(unknown))}")
        spec = dataclasses.replace(spec, **overrides)
    if attention_lib.pads_right(attention_lib.resolve(attention, precision.dtype)):
        spec = dataclasses.replace(spec, padding_side="right")
    # Built abstractly (shapes only), then every parameter is set from the checkpoint: no random
    # initialisers run (on a large model, as long as the load), and the dropout streams get seed.
    build = lambda: arch.model_cls(
        config, precision=precision, remat=remat, attention=attention, rngs=nnx.Rngs(params=0, dropout=seed)
    )
    backbone = nnx.eval_shape(build)
    nnx.reseed(backbone, dropout=seed)
    load_into(backbone, model_dir, arch.name_map)
    abstract = [p for p, v in nnx.to_flat_state(nnx.state(backbone)) if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if abstract:  # state that is neither a checkpoint parameter nor a dropout stream: a model bug
        raise TypeError(f"{type(backbone).__name__}: {abstract[:3]} not set by the checkpoint or the dropout seed")
    model = Retriever(backbone, spec.pooling, spec.normalize)
    model.eval()
    return Encoder(model, load_tokenizer(model_dir), spec, config, arch_name, model_dir)

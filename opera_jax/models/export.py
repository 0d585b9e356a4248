"""Export a (finetuned) retriever as a Hugging Face / sentence-transformers model directory.

The directory holds what ``transformers.AutoModel`` and ``AutoTokenizer`` load
(``config.json``, ``model.safetensors``, the tokenizer files) plus the
sentence-transformers module files (``modules.json``, ``1_Pooling/``,
``2_Normalize/`` when embeddings are normalised, ``sentence_bert_config.json``,
``config_sentence_transformers.json``, with the version block sentence-transformers
writes) that declare the pooling, normalisation, max length and prompts, and a
``README.md`` model card (``model_card.py``). ``load_encoder`` reads the same
files back to an equal ``EncoderSpec``.

The export is atomic as a whole: everything is written into a hidden sibling
directory, which is then renamed onto the target. A target that already holds
files is moved aside first and deleted once the new directory is in place, so
a reader sees the old export or the new one, never a mix or a half-written one.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from opera_jax.errors import InputError
from opera_jax.io_utils import current_umask, write_json
from opera_jax.models.encoder import ARCHITECTURES, Encoder, EncoderSpec, Retriever
from opera_jax.models.model_card import CardInfo, card_title, hub_id, render
from opera_jax.models.weights import SINGLE_FILE, NameMap, checkpoint_files, hf_state_dict

# Tensors the transformers model class has but a retriever never uses (BERT's
# pooler), by architecture. They are copied unchanged from the source checkpoint
# when it has them, so that ``AutoModel`` loads the export with no missing keys.
# Qwen3 has none: the export is a ``Qwen3Model`` (no ``lm_head``, which the
# source's ``Qwen3ForCausalLM`` checkpoint may carry and the embedder ignores),
# with ``padding_side: left`` and last-token pooling taken from the spec.
PASSTHROUGH: dict[str, re.Pattern[str]] = {"bert": re.compile(r"^pooler\.")}

POOLING_FLAGS = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "last": "pooling_mode_lasttoken",
}


def export_encoder(
    encoder: Encoder, out_dir: str | Path, *, model: Retriever | None = None, card: CardInfo | None = None
) -> Path:
    """Write ``encoder`` (with the parameters of ``model``, by default ``encoder.model``) to ``out_dir``.

    ``model`` is typically the finetuned ``Retriever`` of a trainer: its backbone
    parameters are exported, and everything else (config, tokenizer, spec) comes
    from ``encoder``. ``card``: how it was trained, for ``README.md`` (default: the
    source model only). An existing ``out_dir`` is replaced. Returns ``out_dir``.
    """
    model = encoder.model if model is None else model
    if (model.pooling, model.normalize) != (encoder.spec.pooling, encoder.spec.normalize):
        raise ValueError(
            f"the model pools {model.pooling!r} (normalize={model.normalize}) but the spec says "
            f"{encoder.spec.pooling!r} (normalize={encoder.spec.normalize})"
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out_dir, "tmp")
    tmp.mkdir()
    try:
        _write_model(encoder, model, tmp)
        _tokenizer_files(encoder, tmp)
        _sentence_transformers_files(encoder.spec, encoder.config.hidden_size, tmp)
        card = card or CardInfo(base_model=hub_id(None, encoder.source))
        (tmp / "README.md").write_text(
            render(
                card,
                encoder.spec,
                dim=encoder.config.hidden_size,
                architecture=encoder.architecture,
                ref=str(out_dir.resolve()),
                title=card_title(out_dir),
            ),
            encoding="utf-8",
        )
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _sibling(path: Path, tag: str) -> Path:
    """A fresh hidden name beside ``path``: ``.{name}.{tag}-{random}``."""
    while True:
        candidate = path.parent / f".{path.name}.{tag}-{secrets.token_hex(4)}"
        if not candidate.exists():
            return candidate


def _swap_in(new: Path, dst: Path) -> None:
    """Rename directory ``new`` onto ``dst``; a non-empty ``dst`` is moved aside, then deleted."""
    if not (dst.exists() and any(dst.iterdir())):
        os.replace(new, dst)  # onto nothing, or onto an empty directory
        return
    old = _sibling(dst, "old")
    os.replace(dst, old)
    try:
        os.replace(new, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_model(encoder: Encoder, model: Retriever, out: Path) -> None:
    """``config.json`` and ``model.safetensors`` (float32, transformers' names)."""
    write_json(out / "config.json", {**encoder.config.to_hf(), "torch_dtype": "float32"})
    name_map = ARCHITECTURES[encoder.architecture].name_map
    tensors = hf_state_dict(model.backbone, name_map)
    passthrough = PASSTHROUGH.get(encoder.architecture)
    if passthrough is not None:
        tensors.update(_source_tensors(encoder.source, name_map, passthrough))
    save_file(tensors, str(out / SINGLE_FILE), metadata={"format": "pt"})
    os.chmod(out / SINGLE_FILE, 0o666 & ~current_umask())  # safetensors makes it 0600 whatever the umask


def _source_tensors(model_dir: Path, name_map: NameMap, pattern: re.Pattern[str]) -> dict[str, np.ndarray]:
    """The tensors of the checkpoint in ``model_dir`` whose canonical name matches ``pattern``, as float32."""
    out = {}
    for f in checkpoint_files(model_dir):
        with safe_open(str(f), framework="flax") as st:
            for name in st.keys():
                canonical = name_map.canonical(name)
                if pattern.search(canonical):
                    out[canonical] = np.ascontiguousarray(np.asarray(st.get_tensor(name), dtype=np.float32))
    return out


def _tokenizer_files(encoder: Encoder, out: Path) -> None:
    """The tokenizer's own files, with ``padding_side`` set to the spec's (``read_spec`` reads it there)."""
    encoder.tokenizer.save_pretrained(str(out))
    tok_config = out / "tokenizer_config.json"
    config = json.loads(tok_config.read_text(encoding="utf-8"))
    config["padding_side"] = encoder.spec.padding_side
    write_json(tok_config, config)


def _sentence_transformers_files(spec: EncoderSpec, hidden_size: int, out: Path) -> None:
    """The module list and configs that sentence-transformers (and ``read_spec``) read."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if spec.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (out / "2_Normalize").mkdir()
    write_json(out / "modules.json", modules)
    write_json(
        out / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": hidden_size,
            **{flag: mode == spec.pooling for mode, flag in POOLING_FLAGS.items()},
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            # Prefixes are tokenised with the text and pooled with it.
            "include_prompt": True,
        },
    )
    write_json(out / "sentence_bert_config.json", {"max_seq_length": spec.max_seq_length, "do_lower_case": False})
    write_json(
        out / "config_sentence_transformers.json",
        {
            "model_type": "SentenceTransformer",
            "__version__": _versions(),
            "prompts": {"query": spec.query_prefix, "document": spec.passage_prefix},
            "default_prompt_name": None,
            # Retrieval here scores by inner product (cosine when normalised).
            "similarity_fn_name": "dot",
        },
    )


# The oldest sentence-transformers that reads every key written here (``prompts``, ``similarity_fn_name``):
# it warns only when this is newer than itself.
SENTENCE_TRANSFORMERS_FORMAT = "3.0.0"


def _versions() -> dict[str, str]:
    """The version block sentence-transformers writes; ``pytorch`` is absent (no torch made these files)."""
    import transformers

    import opera_jax

    return {
        "sentence_transformers": SENTENCE_TRANSFORMERS_FORMAT,
        "transformers": transformers.__version__,
        "opera_jax": opera_jax.__version__,
    }

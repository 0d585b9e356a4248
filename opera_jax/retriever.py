"""``DenseRetriever``: load a model by name or path, encode texts and search, each in one call.

The Python counterpart of ``SentenceTransformer(name).encode(texts)``: texts go
through the model's tokenizer with the instruction prompts from its own files
(``config_sentence_transformers.json``), are encoded on device in sorted,
bucket-padded batches (``eval.retrieval.encode``) and come back as NumPy
float32. ``search`` is exact inner-product top-k, as ``opera-jax eval`` ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from opera_jax.data.tokens import tokenize
from opera_jax.errors import InputError
from opera_jax.eval.retrieval import encode, exact_topk
from opera_jax.models.encoder import Encoder, load_encoder
from opera_jax.sharding import make_mesh

Passage = str | Mapping[str, str]  # a text, or {"title": ..., "text": ...} as in BEIR corpora


class DenseRetriever:
    """A retriever loaded from a local directory, a hub id or the bundled all-MiniLM-L6-v2.

    ``max_length`` caps tokens per text (default: the model's); ``batch_size`` is
    texts per device batch; other keywords override the model's spec
    (``pooling``, ``normalize``, ``query_prefix``, ``passage_prefix``, ...).
    """

    def __init__(
        self,
        model: str | Path = "sentence-transformers/all-MiniLM-L6-v2",
        *,
        max_length: int | None = None,
        batch_size: int = 128,
        **spec_overrides: Any,
    ):
        self.encoder: Encoder = load_encoder(str(model), overrides=spec_overrides or None)
        self.max_length = min(max_length or self.spec.max_seq_length, self.spec.max_seq_length)
        self.batch_size = batch_size
        self.mesh = make_mesh()

    @property
    def spec(self):
        return self.encoder.spec

    @property
    def dim(self) -> int:
        return self.encoder.config.hidden_size

    def encode_queries(self, texts: str | Sequence[str]) -> np.ndarray:
        """``[n, dim]`` float32 (``[dim]`` for one string), with the model's query prompt."""
        return self._numpy(texts, self.spec.query_prefix)

    def encode_passages(self, texts: Passage | Sequence[Passage]) -> np.ndarray:
        """``[n, dim]`` float32 (``[dim]`` for one passage), with the model's passage prompt."""
        return self._numpy(texts, self.spec.passage_prefix)

    def search(
        self, queries: Sequence[str] | Mapping[str, str], corpus: Sequence[Passage] | Mapping[str, Passage], k: int = 10
    ):
        """Exact top-``k`` by inner product: per query, ``[(corpus id, score), ...]`` best first.

        Ids are the mappings' keys, or list positions. ``queries`` as a mapping gives a
        mapping ``{query id: hits}``, as a list a list.
        """
        if k < 1:
            raise InputError(f"k: must be at least 1, got {k}")
        query_ids, query_texts = _ids_and_items(queries, "queries")
        doc_ids, docs = _ids_and_items(corpus, "corpus")
        if not docs:
            raise InputError("corpus: no passages to search")
        if not query_texts:
            return {} if isinstance(queries, Mapping) else []
        q = self._encode([_text(t, "queries") for t in query_texts], self.spec.query_prefix)
        d = self._encode([_passage(p) for p in docs], self.spec.passage_prefix)
        scores, rows = exact_topk(q, d, k, mesh=self.mesh)
        hits = [[(doc_ids[j], float(s)) for j, s in zip(r, sc)] for r, sc in zip(rows, scores)]
        return dict(zip(query_ids, hits)) if isinstance(queries, Mapping) else hits

    def save(self, path: str | Path) -> Path:
        """Export as a Hugging Face / sentence-transformers directory (with a model card)."""
        from opera_jax.models.export import export_encoder

        return export_encoder(self.encoder, path)

    # ------------------------------------------------------------------------- internals

    def _numpy(self, texts, prefix: str) -> np.ndarray:
        single = isinstance(texts, (str, Mapping))
        items = [texts] if single else list(texts)
        if not items:
            return np.zeros((0, self.dim), np.float32)
        out = np.asarray(self._encode([_passage(t) for t in items], prefix), np.float32)
        return out[0] if single else out

    def _encode(self, texts: list[str], prefix: str) -> jax.Array:
        tokens = tokenize(self.encoder.tokenizer, texts, self.max_length, prefix, use_cache=False)
        return encode(
            self.encoder.model,
            tokens,
            max_len=self.max_length,
            batch_size=self.batch_size,
            padding_side=self.spec.padding_side,
            mesh=self.mesh,
        )


def _ids_and_items(items, what: str) -> tuple[list, list]:
    if isinstance(items, Mapping):
        return list(items.keys()), list(items.values())
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise InputError(f"{what}: a list of texts or a mapping {{id: text}}, got {type(items).__name__}")
    return list(range(len(items))), list(items)


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{what}: texts must be strings, got {type(value).__name__}")
    return value


def _passage(value: Passage) -> str:
    """A passage as encoded: BEIR's ``title + " " + text`` (stripped) for a mapping."""
    if isinstance(value, Mapping):
        title, text = value.get("title", ""), value.get("text")
        if not isinstance(title, str) or not isinstance(text, str):
            raise InputError("corpus: a passage mapping needs a string 'text' (and optionally 'title')")
        return f"{title} {text}".strip()
    return _text(value, "texts")

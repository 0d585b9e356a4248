"""``{query, pos, neg}`` JSONL training files, as FlagEmbedding and the OPERA release read them.

One JSON object per line::

    {"query": str, "pos": [str, ...], "neg": [str, ...]}

``pos`` is required and non-empty; ``neg`` is optional; ``pos_scores``,
``neg_scores`` (distillation scores) and ``prompt`` (a per-line instruction)
are accepted and not used: instructions come from the model's own files. The
file (``.jsonl`` or ``.jsonl.gz``, UTF-8, blank lines ignored) becomes the
in-memory BEIR tables: every distinct passage text one corpus entry (ids
``d0``, ``d1``, ... in first-seen order), every line one query (id ``q<line>``)
with its positives graded 1, and its ``neg`` passages the query's given
negatives, which the trainer uses instead of mining.
"""

from __future__ import annotations

import os
from pathlib import Path

from opera_jax.data.beir import BeirSplit, Corpus, Queries, json_objects
from opera_jax.data.tables import TrainData
from opera_jax.errors import InputError

SUFFIXES = (".jsonl", ".jsonl.gz")


def is_pairs_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an existing ``.jsonl`` / ``.jsonl.gz`` file."""
    p = Path(path).expanduser()
    return p.name.endswith(SUFFIXES) and p.is_file()


def _strings(path: Path, n: int, obj: dict, field: str, *, required: bool) -> list[str]:
    value = obj.get(field, [] if not required else None)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{path}, line {n}: field {field!r} must be a list of strings")
    if required and not value:
        raise InputError(f"{path}, line {n}: field {field!r} is empty")
    if any(not v.strip() for v in value):
        raise InputError(f"{path}, line {n}: field {field!r} holds an empty passage")
    return value


def load_pairs_jsonl(path: str | os.PathLike) -> TrainData:
    """The file as a train split plus given negatives (no eval split: see ``tables.hold_out``)."""
    path = Path(path).expanduser()
    doc_ids: dict[str, str] = {}
    query_ids, query_texts = [], []
    qrels: dict[str, dict[str, int]] = {}
    negatives: dict[str, list[str]] = {}

    def doc(text: str) -> str:
        return doc_ids.setdefault(text, f"d{len(doc_ids)}")

    if not path.is_file():
        raise InputError(f"{path}: file not found")
    for n, obj in json_objects(path):
        query = obj.get("query")
        if not isinstance(query, str) or not query.strip():
            raise InputError(f"{path}, line {n}: field 'query' must be a non-empty string")
        pos = _strings(path, n, obj, "pos", required=True)
        neg = _strings(path, n, obj, "neg", required=False)
        query_id = f"q{n}"
        query_ids.append(query_id)
        query_texts.append(query)
        qrels[query_id] = {doc(p): 1 for p in pos}
        negatives[query_id] = [doc(t) for t in neg]
    if not query_ids:
        raise InputError(f"{path}: no training lines")
    texts = tuple(doc_ids)
    corpus = Corpus(tuple(doc_ids.values()), ("",) * len(texts), texts)
    split = BeirSplit(path.name, "train", corpus, Queries(tuple(query_ids), tuple(query_texts)), qrels)
    return TrainData(split, None, negatives)

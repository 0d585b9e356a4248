"""Training data already in memory: ``(queries, corpus, qrels)`` tables -> the splits the trainer reads.

``TrainData`` is what ``train_and_evaluate`` takes instead of a collection
folder: a train split, an optional eval split (over the same or another
corpus), and optionally given negatives (query id -> document ids) that the
trainer uses in place of mined ones.

``split_from_tables`` validates plain Python tables as strictly as the BEIR
loader validates files (every problem is one ``InputError`` naming the table
and the id), and ``hold_out`` carves an evaluation split out of the training
queries when no other one exists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from opera_jax.data.beir import BeirSplit, Corpus, Queries, positives
from opera_jax.data.training import TrainingSet
from opera_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class TrainData:
    """Loaded training data. ``eval`` None: the run is not evaluated. ``negatives``: query id -> the
    given negative document ids (e.g. a ``{query, pos, neg}`` file's ``neg``), used as the mined ones."""

    train: BeirSplit
    eval: BeirSplit | None = None
    negatives: Mapping[str, Sequence[str]] | None = None


def _id(value: Any, where: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: an id must be a non-empty string, got {value!r}")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where}: must be a string, got {type(value).__name__}")
    return value


def split_from_tables(
    queries: Mapping[Any, str],
    corpus: Mapping[Any, str | Mapping[str, str]] | Sequence[str],
    qrels: Mapping[Any, Mapping[Any, int]],
    *,
    name: str = "memory",
    split: str = "train",
) -> BeirSplit:
    """A ``BeirSplit`` from ``{query id: text}``, ``{doc id: text or {"title", "text"}}`` (or a list of
    texts, ids ``"0"``, ``"1"``, ...) and ``{query id: {doc id: grade}}``. Only judged queries are kept."""
    if not isinstance(queries, Mapping) or not isinstance(qrels, Mapping):
        raise InputError("queries and qrels must be mappings ({id: text} and {query id: {doc id: grade}})")
    if not isinstance(corpus, Mapping):
        if isinstance(corpus, (str, bytes)) or not isinstance(corpus, Sequence):
            raise InputError("corpus must be a mapping {id: text or {title, text}} or a list of texts")
        corpus = {str(i): t for i, t in enumerate(corpus)}
    ids, titles, texts = [], [], []
    for key, doc in corpus.items():
        doc_id = _id(key, "corpus")
        if isinstance(doc, Mapping):
            title = _text(doc.get("title", ""), f"corpus[{doc_id!r}]['title']")
            text = _text(doc.get("text"), f"corpus[{doc_id!r}]['text']")
        else:
            title, text = "", _text(doc, f"corpus[{doc_id!r}]")
        if not (title.strip() or text.strip()):
            raise InputError(f"corpus[{doc_id!r}]: empty text")
        ids.append(doc_id)
        titles.append(title)
        texts.append(text)
    if not ids:
        raise InputError("corpus: no documents")
    if len(set(ids)) != len(ids):
        raise InputError("corpus: duplicate ids (e.g. 1 and '1')")
    query_text = {}
    for key, text in queries.items():
        query_id = _id(key, "queries")
        if not _text(text, f"queries[{query_id!r}]").strip():
            raise InputError(f"queries[{query_id!r}]: empty text")
        query_text[query_id] = text
    doc_index = set(ids)
    table: dict[str, dict[str, int]] = {}
    for key, grades in qrels.items():
        query_id = _id(key, "qrels")
        if query_id not in query_text:
            raise InputError(f"qrels[{query_id!r}]: unknown query id (not in queries)")
        if not isinstance(grades, Mapping):
            raise InputError(f"qrels[{query_id!r}]: must be a mapping {{doc id: grade}}")
        for doc_key, grade in grades.items():
            doc_id = _id(doc_key, f"qrels[{query_id!r}]")
            if doc_id not in doc_index:
                raise InputError(f"qrels[{query_id!r}][{doc_id!r}]: unknown document id (not in corpus)")
            if not isinstance(grade, (int, np.integer)) or isinstance(grade, bool):
                raise InputError(f"qrels[{query_id!r}][{doc_id!r}]: grade must be an integer, got {grade!r}")
            table.setdefault(query_id, {})[doc_id] = int(grade)
    if not table:
        raise InputError("qrels: no judgments")
    judged = [q for q in query_text if q in table]
    return BeirSplit(
        name,
        split,
        Corpus(tuple(ids), tuple(titles), tuple(texts)),
        Queries(tuple(judged), tuple(query_text[q] for q in judged)),
        table,
    )


def subset(split: BeirSplit, query_ids: Sequence[str], name: str) -> BeirSplit:
    """The split restricted to ``query_ids`` (same corpus), named ``name``."""
    keep = set(query_ids)
    rows = [i for i, q in enumerate(split.queries.ids) if q in keep]
    queries = Queries(tuple(split.queries.ids[i] for i in rows), tuple(split.queries.texts[i] for i in rows))
    return BeirSplit(split.name, name, split.corpus, queries, {q: split.qrels[q] for q in queries.ids})


def hold_out(split: BeirSplit, fraction: float, seed: int = 0) -> tuple[BeirSplit, BeirSplit | None]:
    """``(train, validation)``: ``round(fraction * n)`` of the queries with a positive (at least 1 when
    ``fraction > 0``, and never all) drawn with ``seed`` into a ``validation`` split over the same corpus.
    ``fraction`` 0, or fewer than 2 such queries: ``(split, None)``."""
    if not 0 <= fraction < 1:
        raise InputError(f"validation: a fraction in [0, 1), got {fraction!r}")
    judged = positives(split.qrels)
    candidates = [q for q in split.queries.ids if q in judged]
    if fraction == 0 or len(candidates) < 2:
        return split, None
    count = min(max(1, round(fraction * len(candidates))), len(candidates) - 1)
    picked = np.random.default_rng(seed).choice(len(candidates), count, replace=False)
    held = {candidates[i] for i in picked}
    train = subset(split, [q for q in split.queries.ids if q not in held], split.split)
    return train, subset(split, [q for q in split.queries.ids if q in held], "validation")


def given_negatives(
    ts: TrainingSet, corpus: Corpus, negatives: Mapping[str, Sequence[str]]
) -> tuple[np.ndarray, np.ndarray]:
    """``negatives`` as the trainer's mined-negative arrays: int32 corpus rows ``[n_queries, M]``
    (-1 padded) and per-query counts, in ``ts`` order; a query's positives are left out."""
    index = corpus.index()
    rows = []
    for q, query_id in enumerate(ts.query_ids):
        pos = set(ts.pair_doc[ts.query_offsets[q] : ts.query_offsets[q + 1]].tolist())
        row = []
        for doc_id in negatives.get(query_id, ()):
            if doc_id not in index:
                raise InputError(f"negatives[{query_id!r}]: unknown document id {doc_id!r} (not in the corpus)")
            if index[doc_id] not in pos and index[doc_id] not in row:
                row.append(index[doc_id])
        rows.append(row)
    width = max(1, max(len(r) for r in rows))
    out = np.full((len(rows), width), -1, np.int32)
    for q, row in enumerate(rows):
        out[q, : len(row)] = row
    return out, np.asarray([len(r) for r in rows], np.int32)

"""The training set as integer arrays: queries, positive pairs, hard negatives.

Queries are numbered ``0..n-1`` (those of the train qrels with at least one
positive), pairs ``0..N-1`` grouped by query: the pairs of query ``q`` are
``query_offsets[q] .. query_offsets[q+1] - 1``. Documents are rows of the
corpus. This is the layout every method works on: the pipeline reads it to
build batches, DP keeps one score per pair and segments them by query.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from opera_jax.data.beir import BeirSplit, positives
from opera_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class TrainingSet:
    query_ids: tuple[str, ...]  # [n] BEIR query ids
    query_texts: tuple[str, ...]  # [n]
    pair_query: np.ndarray  # int32 [N] query of each pair
    pair_doc: np.ndarray  # int32 [N] corpus row of each pair's positive
    query_offsets: np.ndarray  # int32 [n + 1]
    negatives: np.ndarray | None = None  # int32 [n, M] corpus rows, -1 padded
    negative_counts: np.ndarray | None = None  # int32 [n]

    @property
    def num_queries(self) -> int:
        return len(self.query_ids)

    @property
    def num_pairs(self) -> int:
        return len(self.pair_doc)

    def positives_per_query(self) -> np.ndarray:
        return np.diff(self.query_offsets).astype(np.int32)

    def pair_matrix(self) -> np.ndarray:
        """int32 ``[n, max positives]``: each query's pair ids, padded with -1."""
        counts = self.positives_per_query()
        width = int(counts.max())
        cols = np.arange(width)[None, :]
        ids = self.query_offsets[:-1, None] + cols
        return np.where(cols < counts[:, None], ids, -1).astype(np.int32)

    def with_negatives(self, negatives: np.ndarray, counts: np.ndarray) -> TrainingSet:
        if negatives.shape[0] != self.num_queries or counts.shape != (self.num_queries,):
            raise ValueError("negatives must have one row per query")
        return dataclasses.replace(self, negatives=negatives.astype(np.int32), negative_counts=counts.astype(np.int32))

    def rows_in(self, parent: TrainingSet) -> np.ndarray:
        """Where each of this set's queries sits in ``parent`` (e.g. the full set a pruned one came from)."""
        index = {q: i for i, q in enumerate(parent.query_ids)}
        return np.asarray([index[q] for q in self.query_ids], np.int64)

    def subset_pairs(self, keep: np.ndarray) -> TrainingSet:
        """Keep only the pairs where ``keep`` is true; queries left with none drop out (static pruning)."""
        keep = np.asarray(keep, dtype=bool)
        counts = np.bincount(self.pair_query[keep], minlength=self.num_queries)
        kept_queries = np.flatnonzero(counts > 0)
        remap = np.full(self.num_queries, -1, np.int64)
        remap[kept_queries] = np.arange(len(kept_queries))
        offsets = np.zeros(len(kept_queries) + 1, np.int32)
        np.cumsum(counts[kept_queries], out=offsets[1:])
        return TrainingSet(
            query_ids=tuple(self.query_ids[q] for q in kept_queries),
            query_texts=tuple(self.query_texts[q] for q in kept_queries),
            pair_query=remap[self.pair_query[keep]].astype(np.int32),
            pair_doc=self.pair_doc[keep],
            query_offsets=offsets,
            negatives=None if self.negatives is None else self.negatives[kept_queries],
            negative_counts=None if self.negative_counts is None else self.negative_counts[kept_queries],
        )


def build_training_set(split: BeirSplit, pos_threshold: int = 0) -> TrainingSet:
    """Pairs from the split's qrels: documents graded above ``pos_threshold``."""
    pos = positives(split.qrels, pos_threshold)
    if not pos:
        raise InputError(f"{split.name}/qrels/{split.split}.tsv: no positive pairs (grade > {pos_threshold})")
    qindex = split.queries.index()
    dindex = split.corpus.index()
    order = sorted(pos, key=lambda q: qindex[q])  # queries in queries.jsonl order
    pair_query, pair_doc, offsets = [], [], [0]
    for i, q in enumerate(order):
        pair_query += [i] * len(pos[q])
        pair_doc += [dindex[d] for d in pos[q]]
        offsets.append(len(pair_doc))
    texts = split.queries.texts
    return TrainingSet(
        query_ids=tuple(order),
        query_texts=tuple(texts[qindex[q]] for q in order),
        pair_query=np.asarray(pair_query, np.int32),
        pair_doc=np.asarray(pair_doc, np.int32),
        query_offsets=np.asarray(offsets, np.int32),
    )

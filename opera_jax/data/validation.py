"""A validation split carved from the training queries, for choosing knobs without looking at test.

``carve(train, fraction)`` holds out ``round(fraction * n)`` of the judged training queries (at least
one, at most n - 1), drawn with a fixed generator from the query ids in file order, so that every
seed and every method sees the same split. The held-out queries keep their train judgments and the
whole corpus; they are the evaluation split of a run with ``data.valid_fraction > 0``.
"""

from __future__ import annotations

import numpy as np

from opera_jax.data.beir import BeirSplit, Queries

SPLIT_SEED = 20  # fixed: the split must not move with the run's seed


def held_out(query_ids: tuple[str, ...], fraction: float) -> frozenset[str]:
    """The ids of the held-out queries."""
    n = len(query_ids)
    k = min(max(round(fraction * n), 1), n - 1)
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    return frozenset(query_ids[i] for i in order[:k])


def _part(split: BeirSplit, ids: frozenset[str], keep: bool, name: str) -> BeirSplit:
    rows = [i for i, q in enumerate(split.queries.ids) if (q in ids) == keep]
    queries = Queries(
        tuple(split.queries.ids[i] for i in rows),
        tuple(split.queries.texts[i] for i in rows),
        split.queries.skipped_ids,
    )
    qrels = {q: g for q, g in split.qrels.items() if (q in ids) == keep}
    return BeirSplit(split.name, name, split.corpus, queries, qrels)


def carve(train: BeirSplit, fraction: float) -> tuple[BeirSplit, BeirSplit]:
    """``(train without the held-out queries, the held-out queries)``."""
    if not 0 < fraction < 1 or len(train.queries) < 2:
        raise ValueError(f"valid_fraction {fraction}: needs 0 < fraction < 1 and at least 2 training queries")
    ids = held_out(train.queries.ids, fraction)
    return _part(train, ids, False, train.split), _part(train, ids, True, f"{train.split}-valid")

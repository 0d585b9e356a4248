"""Retrieval metrics with trec_eval semantics, the OPERA release's NDCG, and TREC run files.

Pure NumPy; no trec_eval, ir-measures or scikit-learn at runtime.

Inputs
------
*Qrels* map a query id to ``{doc id: grade}`` (integer grades, as in BEIR's
``qrels/*.tsv``). A *run* maps a query id to its ranked list of
``(doc id, score)`` pairs, best first, each doc at most once.

Metrics (keys are ``<name>@<k>`` for every cutoff ``k``)
--------------------------------------------------------
``ndcg@k``
    trec_eval's ``ndcg_cut.k`` (ir-measures ``nDCG@k``). The gain of a document
    is its grade (unjudged documents and grades <= 0 give 0), discounted by
    ``log2(rank + 1)``. The ideal DCG ranks *all* judged documents of the query
    by grade, whether retrieved or not, and is cut at ``k`` too.
``recall@k``
    trec_eval's ``recall.k`` (``R@k``): relevant documents (grade >= 1) in the
    top ``k`` over all relevant documents of the query.
``mrr@k``
    ir-measures' ``RR@k``: ``1 / rank`` of the first relevant document
    (grade >= 1) within the top ``k``, else 0.
``ndcg_release@k``
    What the OPERA release reports as NDCG: scikit-learn's
    ``ndcg_score(y_true, y_score, k=k)`` over the retrieved list alone, with
    ``y_true[i] = 1`` when retrieved document ``i`` has grade > 0 and
    ``y_score`` the retrieval scores. The ideal DCG is built from the retrieved
    list only, so it reads higher than ``ndcg@k`` when relevant documents are
    missed; a query with no relevant document retrieved scores 0. It follows
    scikit-learn's defaults exactly: the ranking is by score (for a run sorted
    best first this is the given order), and tied scores share the mean gain of
    their group (``ignore_ties=False``). The release itself prints -1 in place
    of this value at cutoff 1; we report the value scikit-learn computes.

Ranking order
-------------
``ndcg``, ``recall`` and ``mrr`` take each query's ranking in the order given.
The references re-sort a run by score, descending: trec_eval (``nDCG``, ``R``)
breaks ties by doc id descending, while ir-measures computes ``RR@k`` with its
MS MARCO provider (trec_eval's ``recip_rank`` has no cutoff), which breaks them
by doc id ascending. All agree whenever scores are distinct and sorted best
first (exact top-k output), or ties are already ordered the reference's way.

Averaging
---------
Means are over the queries of the qrels with at least one relevant document
(grade >= 1), each weighted equally. Such a query missing from the run scores 0
on every metric; queries of the run missing from the qrels are ignored.
trec_eval by default averages over the queries of the run instead (and counts
a judged query with no relevant document as 0); the two agree when the run has
every query of the qrels and each of those has a relevant document.

Run files
---------
The TREC format, one line per retrieved document: ``qid Q0 docid rank score tag``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from opera_jax.errors import InputError
from opera_jax.io_utils import write_text

CUTOFFS: tuple[int, ...] = (1, 5, 10, 20, 50, 100)

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Sequence[tuple[str, float]]]


@dataclasses.dataclass(frozen=True)
class _Judged:
    """A run laid out as dense arrays over the evaluated queries.

    Rows are queries, columns are ranks (0-based). Rows shorter than the widest
    ranking (or than the largest cutoff) are padded past their end.
    """

    qids: list[str]
    grades: np.ndarray  # (Q, W) grade of the doc at each rank; 0 if unjudged or padding
    scores: np.ndarray  # (Q, W) retrieval score; -inf for padding
    retrieved: np.ndarray  # (Q, W) True where a document was retrieved
    ideal: np.ndarray  # (Q, max cutoff) positive grades of all judged docs, descending, 0-padded
    num_relevant: np.ndarray  # (Q,) judged documents with grade >= 1


def _discount(width: int) -> np.ndarray:
    """``1 / log2(rank + 1)`` for ranks ``1..width``."""
    return 1.0 / np.log2(np.arange(width) + 2.0)


def _check_cutoffs(cutoffs: Iterable[int]) -> tuple[int, ...]:
    cutoffs = tuple(cutoffs)
    if not cutoffs or any(not isinstance(k, (int, np.integer)) or k < 1 for k in cutoffs):
        raise ValueError(f"cutoffs must be positive integers, got {cutoffs}")
    return tuple(int(k) for k in cutoffs)


def _judge(qrels: Qrels, run: Run, max_cutoff: int) -> _Judged:
    qids = [qid for qid, judged in qrels.items() if any(g >= 1 for g in judged.values())]
    if not qids:
        raise ValueError("no query of the qrels has a relevant document (grade >= 1)")
    width = max(max_cutoff, max((len(run.get(qid, ())) for qid in qids), default=0))
    grades = np.zeros((len(qids), width))
    scores = np.full((len(qids), width), -np.inf)
    retrieved = np.zeros((len(qids), width), dtype=bool)
    ideal = np.zeros((len(qids), max_cutoff))
    num_relevant = np.zeros(len(qids))
    for i, qid in enumerate(qids):
        judged = qrels[qid]
        ranking = run.get(qid, ())
        n = len(ranking)
        docs = [doc for doc, _ in ranking]
        if len(set(docs)) != n:
            raise ValueError(f"the run lists a document more than once for query {qid!r}")
        grades[i, :n] = [judged.get(doc, 0) for doc in docs]
        scores[i, :n] = [score for _, score in ranking]
        retrieved[i, :n] = True
        positive = sorted((g for g in judged.values() if g > 0), reverse=True)[:max_cutoff]
        ideal[i, : len(positive)] = positive
        num_relevant[i] = sum(g >= 1 for g in judged.values())
    return _Judged(qids, grades, scores, retrieved, ideal, num_relevant)


def _trec_metrics(j: _Judged, cutoffs: tuple[int, ...]) -> dict[str, np.ndarray]:
    """``ndcg@k``, ``recall@k`` and ``mrr@k`` per query, in the order of ``j.qids``."""
    discount = _discount(j.grades.shape[1])
    dcg = np.cumsum(np.maximum(j.grades, 0.0) * discount, axis=1)
    ideal_dcg = np.cumsum(j.ideal * discount[: j.ideal.shape[1]], axis=1)  # > 0: every query has a relevant doc
    relevant = j.grades >= 1
    hits = np.cumsum(relevant, axis=1)
    first_rank = np.where(relevant.any(axis=1), relevant.argmax(axis=1) + 1, np.inf)
    out: dict[str, np.ndarray] = {}
    for k in cutoffs:
        out[f"ndcg@{k}"] = dcg[:, k - 1] / ideal_dcg[:, k - 1]
    for k in cutoffs:
        out[f"recall@{k}"] = hits[:, k - 1] / j.num_relevant
    for k in cutoffs:
        out[f"mrr@{k}"] = np.where(first_rank <= k, 1.0 / first_rank, 0.0)
    return out


def _release_ndcg(j: _Judged, cutoffs: tuple[int, ...]) -> dict[str, np.ndarray]:
    """scikit-learn's ``ndcg_score`` per query on binary gains of the retrieved list."""
    n_queries, width = j.scores.shape
    binary = j.grades > 0
    # Rank by score, as scikit-learn does; padding (-inf, after every real entry) stays last.
    order = np.argsort(-j.scores, axis=1, kind="stable")
    scores = np.take_along_axis(j.scores, order, axis=1)
    gains = np.take_along_axis(binary, order, axis=1)
    real = np.take_along_axis(j.retrieved, order, axis=1)
    # Tied scores form a group whose members all get the group's mean gain.
    starts = np.ones((n_queries, width), dtype=bool)
    starts[:, 1:] = (scores[:, 1:] != scores[:, :-1]) | (real[:, 1:] != real[:, :-1])
    group = np.cumsum(starts.ravel()) - 1  # every row begins a new group
    mean_gain = (np.bincount(group, weights=gains.ravel()) / np.bincount(group))[group]
    discount = _discount(width)
    dcg = np.cumsum(mean_gain.reshape(n_queries, width) * discount, axis=1)
    ideal_dcg_at = np.concatenate([[0.0], np.cumsum(discount)])  # [n]: DCG of n relevant docs on top
    num_retrieved_relevant = binary.sum(axis=1)
    out: dict[str, np.ndarray] = {}
    for k in cutoffs:
        ideal_dcg = ideal_dcg_at[np.minimum(num_retrieved_relevant, k)]
        out[f"ndcg_release@{k}"] = np.divide(dcg[:, k - 1], ideal_dcg, out=np.zeros(n_queries), where=ideal_dcg > 0)
    return out


def _metric_arrays(
    qrels: Qrels, run: Run, cutoffs: Iterable[int], release_ndcg: bool
) -> tuple[list[str], dict[str, np.ndarray]]:
    cutoffs = _check_cutoffs(cutoffs)
    judged = _judge(qrels, run, max(cutoffs))
    values = _trec_metrics(judged, cutoffs)
    if release_ndcg:
        values.update(_release_ndcg(judged, cutoffs))
    return judged.qids, values


def per_query(
    qrels: Qrels, run: Run, cutoffs: Iterable[int] = CUTOFFS, *, release_ndcg: bool = True
) -> dict[str, dict[str, float]]:
    """Each metric's value on each evaluated query: ``{metric: {qid: value}}``.

    The evaluated queries are those of the qrels with a relevant document, in
    qrels order; see the module docstring for the metrics.
    """
    qids, values = _metric_arrays(qrels, run, cutoffs, release_ndcg)
    return {name: dict(zip(qids, column.tolist())) for name, column in values.items()}


def evaluate_run(
    qrels: Qrels, run: Run, cutoffs: Iterable[int] = CUTOFFS, *, release_ndcg: bool = True
) -> dict[str, float]:
    """Mean of each metric over the queries of the qrels with a relevant document.

    Keys: ``ndcg@k``, ``recall@k``, ``mrr@k`` and (with ``release_ndcg``)
    ``ndcg_release@k`` for each cutoff ``k``.
    """
    _, values = _metric_arrays(qrels, run, cutoffs, release_ndcg)
    return {name: float(column.mean()) for name, column in values.items()}


def _check_token(kind: str, value: str) -> None:
    if not value or value.split() != [value]:
        raise ValueError(f"{kind} {value!r} cannot go in a TREC run file: it is empty or has whitespace")


def write_trec_run(path: str | os.PathLike, run: Run, tag: str = "opera-jax") -> None:
    """Write ``run`` as a TREC run file, atomically: ``qid Q0 docid rank score tag``.

    Ranks start at 1 in the given order; scores are written exactly (shortest
    round-trip repr). A query with an empty ranking writes no line.
    """
    _check_token("tag", tag)
    lines = []
    for qid, ranking in run.items():
        _check_token("query id", qid)
        for rank, (doc, score) in enumerate(ranking, start=1):
            _check_token("doc id", doc)
            lines.append(f"{qid} Q0 {doc} {rank} {float(score)!r} {tag}")
    write_text(path, "".join(line + "\n" for line in lines))


def read_trec_run(path: str | os.PathLike) -> dict[str, list[tuple[str, float]]]:
    """Read a TREC run file into a run, each query's documents ordered by the rank column.

    Every non-blank line must have six whitespace-separated fields with an
    integer rank and a finite score; within a query, doc ids and ranks must be
    unique. The second and sixth fields (``Q0``, tag) are not checked. Queries
    keep the order of their first line. Raises ``InputError`` naming the file
    and line of the first bad line.
    """
    path = Path(path)
    rows: dict[str, list[tuple[int, str, float]]] = {}
    seen_docs: set[tuple[str, str]] = set()
    seen_ranks: set[tuple[str, int]] = set()
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                fields = line.split()
                if not fields:
                    continue
                where = f"{path}, line {lineno}"
                if len(fields) != 6:
                    raise InputError(f"{where}: expected 6 fields 'qid Q0 docid rank score tag', found {len(fields)}")
                qid, _, doc, rank_text, score_text, _ = fields
                try:
                    rank = int(rank_text)
                except ValueError:
                    raise InputError(f"{where}: rank {rank_text!r} is not an integer") from None
                try:
                    score = float(score_text)
                except ValueError:
                    raise InputError(f"{where}: score {score_text!r} is not a number") from None
                if not math.isfinite(score):
                    raise InputError(f"{where}: score {score_text!r} is not finite")
                if (qid, doc) in seen_docs:
                    raise InputError(f"{where}: document {doc!r} is listed twice for query {qid!r}")
                if (qid, rank) in seen_ranks:
                    raise InputError(f"{where}: rank {rank} is used twice for query {qid!r}")
                seen_docs.add((qid, doc))
                seen_ranks.add((qid, rank))
                rows.setdefault(qid, []).append((rank, doc, score))
    except FileNotFoundError:
        raise InputError(f"{path}: no such run file") from None
    return {qid: [(doc, score) for _, doc, score in sorted(entries)] for qid, entries in rows.items()}

"""Hard-negative mining: a list of negative corpus rows for every training query.

``mine_negatives`` follows the OPERA release's hard-negative mining (projects/opera of lwh51200/autogluon-rag):

* ``mode="hard"``: encode the corpus and the training queries with the base
  model (the spec's prefixes, on device), exact inner-product top-``rank_end``
  (``rank_end`` clamped to the corpus size), and keep for each query the
  documents ranked ``rank_start .. rank_end - 1`` (0-based, the slice
  ``[rank_start:rank_end]``), less the query's positives and any document whose
  text equals the query text (both ``.strip()``-ed). When more than
  ``num_negatives`` remain, ``num_negatives`` of them are chosen uniformly
  without replacement; the survivors keep their rank order.
* ``mode="random"``: ``num_negatives`` documents drawn uniformly without
  replacement from the whole corpus less the query's positives (no encoding),
  stored in corpus order.

Randomness comes from one ``np.random.default_rng(seed)`` consumed query by
query in order (hard mode draws only for the queries whose list is too long),
so a seed gives one result.

The result (``MiningResult``) is saved as one ``.npz``: ``negatives`` (int32
``[n_queries, M]``, -1 padded), ``counts`` (int32 ``[n_queries]``) and
``meta``, a JSON string (0-d unicode array), so the file loads with
``allow_pickle=False``. ``meta`` holds everything the lists depend on: the
model and its spec, max lengths, mode, rank range, ``num_negatives``, seed,
sizes and a fingerprint of the corpus texts, the query texts and the positive
pairs. ``mining_meta`` computes it before any mining, and ``load_or_mine``
reuses a saved file only when its ``meta`` equals the one requested, so a
trainer can keep the artifact in its workdir and mine once per setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from opera_jax.data.tokens import TokenArrays, tokenize
from opera_jax.data.training import TrainingSet
from opera_jax.errors import InputError
from opera_jax.eval.retrieval import encode, exact_topk
from opera_jax.io_utils import atomic_path
from opera_jax.models.encoder import Encoder

log = logging.getLogger(__name__)

MODES = ("hard", "random")


@dataclasses.dataclass(frozen=True)
class MiningResult:
    negatives: np.ndarray  # int32 [n_queries, M] corpus rows, -1 padded
    counts: np.ndarray  # int32 [n_queries] valid entries at the start of each row
    meta: dict[str, Any]  # what the lists depend on; see ``mining_meta``


def fingerprint(corpus_texts: Sequence[str], ts: TrainingSet) -> str:
    """sha256 (32 hex digits) of the corpus texts, the query texts and the positive pairs."""
    h = hashlib.sha256()
    for group in (corpus_texts, ts.query_texts):
        h.update(f"{len(group)}\0".encode())
        for t in group:
            h.update(t.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
    h.update(np.ascontiguousarray(ts.query_offsets, np.int64).tobytes())
    h.update(np.ascontiguousarray(ts.pair_doc, np.int64).tobytes())
    return h.hexdigest()[:32]


def mining_meta(
    encoder: Encoder,
    ts: TrainingSet,
    corpus_texts: Sequence[str],
    *,
    rank_start: int = 10,
    rank_end: int = 100,
    num_negatives: int = 200,
    seed: int = 0,
    mode: str = "hard",
    query_max_len: int = 64,
    passage_max_len: int = 256,
    model_name: str = "",
) -> dict[str, Any]:
    """The ``meta`` that ``mine_negatives`` with these arguments records; JSON-serialisable.

    Two mining runs with equal ``meta`` give the same lists, which is what makes
    it a cache key. ``model_name`` defaults to the encoder's source directory.
    """
    _check_args(mode, rank_start, rank_end, num_negatives)
    return {
        "model": model_name or str(encoder.source),
        "spec": dataclasses.asdict(encoder.spec),
        "query_max_len": int(query_max_len),
        "passage_max_len": int(passage_max_len),
        "mode": mode,
        "rank_start": int(rank_start),
        "rank_end": int(rank_end),
        "num_negatives": int(num_negatives),
        "seed": int(seed),
        "num_queries": ts.num_queries,
        "num_docs": len(corpus_texts),
        "fingerprint": fingerprint(corpus_texts, ts),
    }


def mine_negatives(
    encoder: Encoder,
    ts: TrainingSet,
    corpus_texts: Sequence[str],
    *,
    rank_start: int = 10,
    rank_end: int = 100,
    num_negatives: int = 200,
    seed: int = 0,
    mode: str = "hard",
    query_max_len: int = 64,
    passage_max_len: int = 256,
    batch_size: int = 128,
    mesh: Mesh | None = None,
    model_name: str = "",
    doc_tokens: TokenArrays | None = None,
    query_tokens: TokenArrays | None = None,
    progress: bool = False,
) -> MiningResult:
    """Negatives for every query of ``ts``; ``corpus_texts[i]`` is the passage of corpus row ``i``.

    ``doc_tokens`` / ``query_tokens``, when given, must be ``corpus_texts`` and
    ``ts.query_texts`` tokenised with the spec's prefixes at ``passage_max_len``
    / ``query_max_len``; otherwise they are tokenised here.
    """
    meta = mining_meta(
        encoder,
        ts,
        corpus_texts,
        rank_start=rank_start,
        rank_end=rank_end,
        num_negatives=num_negatives,
        seed=seed,
        mode=mode,
        query_max_len=query_max_len,
        passage_max_len=passage_max_len,
        model_name=model_name,
    )
    rng = np.random.default_rng(seed)
    if mode == "random":
        negatives, counts = _random_negatives(ts, len(corpus_texts), num_negatives, rng)
    else:
        spec = encoder.spec
        if doc_tokens is None:
            doc_tokens = tokenize(encoder.tokenizer, corpus_texts, passage_max_len, spec.passage_prefix)
        if query_tokens is None:
            query_tokens = tokenize(encoder.tokenizer, ts.query_texts, query_max_len, spec.query_prefix)
        if len(doc_tokens) != len(corpus_texts) or len(query_tokens) != ts.num_queries:
            raise ValueError("doc_tokens / query_tokens do not match the corpus / the training queries")
        common = dict(batch_size=batch_size, padding_side=spec.padding_side, mesh=mesh)
        docs = encode(
            encoder.model,
            doc_tokens,
            max_len=passage_max_len,
            desc="mining: encode corpus" if progress else None,
            **common,
        )
        queries = encode(
            encoder.model,
            query_tokens,
            max_len=query_max_len,
            desc="mining: encode queries" if progress else None,
            **common,
        )
        _, ranked = exact_topk(queries, docs, rank_end, mesh=mesh)
        candidates = ranked[:, rank_start:rank_end]
        excluded = _excluded_keys(ts, corpus_texts)
        keep = ~np.isin(_pair_keys(np.arange(ts.num_queries)[:, None], candidates, len(corpus_texts)), excluded)
        negatives, counts = _choose(candidates, keep, num_negatives, rng)
    log.info(
        "mined %s negatives: %d queries, %.1f negatives per query on average (at most %d)",
        mode,
        ts.num_queries,
        float(counts.mean()) if len(counts) else 0.0,
        num_negatives,
    )
    return MiningResult(negatives, counts, meta)


def _check_args(mode: str, rank_start: int, rank_end: int, num_negatives: int) -> None:
    if mode not in MODES:
        raise InputError(f"mining mode {mode!r} is not one of {', '.join(MODES)}")
    if not 0 <= rank_start < rank_end:
        raise InputError(f"mining rank range {rank_start}-{rank_end}: need 0 <= start < end")
    if num_negatives < 1:
        raise InputError(f"mining num_negatives {num_negatives}: need at least 1")


def _pair_keys(query: np.ndarray, doc: np.ndarray, num_docs: int) -> np.ndarray:
    """One int64 per (query, document), for set operations with ``np.isin``."""
    return query.astype(np.int64) * num_docs + doc.astype(np.int64)


def _excluded_keys(ts: TrainingSet, corpus_texts: Sequence[str]) -> np.ndarray:
    """Keys of every (query, positive) and every (query, document whose text equals the query's)."""
    by_text: dict[str, list[int]] = {}
    for q, text in enumerate(ts.query_texts):
        by_text.setdefault(text.strip(), []).append(q)
    same_q, same_d = [], []
    for d, text in enumerate(corpus_texts):
        for q in by_text.get(text.strip(), ()):
            same_q.append(q)
            same_d.append(d)
    num_docs = len(corpus_texts)
    return np.concatenate(
        [
            _pair_keys(ts.pair_query, ts.pair_doc, num_docs),
            _pair_keys(np.asarray(same_q, np.int64), np.asarray(same_d, np.int64), num_docs),
        ]
    )


def _choose(
    candidates: np.ndarray, keep: np.ndarray, num_negatives: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the kept candidates, cut to ``num_negatives`` at random when longer; rank order kept."""
    n, width = candidates.shape
    negatives = np.full((n, min(num_negatives, width)), -1, np.int32)
    counts = np.zeros(n, np.int32)
    for q in range(n):
        row = candidates[q, keep[q]]
        if len(row) > num_negatives:
            row = row[np.sort(rng.choice(len(row), num_negatives, replace=False))]
        negatives[q, : len(row)] = row
        counts[q] = len(row)
    return negatives, counts


def _random_negatives(
    ts: TrainingSet, num_docs: int, num_negatives: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Per query, up to ``num_negatives`` distinct non-positive rows, uniform over the corpus, sorted."""
    negatives = np.full((ts.num_queries, min(num_negatives, num_docs)), -1, np.int32)
    counts = np.zeros(ts.num_queries, np.int32)
    for q in range(ts.num_queries):
        positives = np.unique(ts.pair_doc[ts.query_offsets[q] : ts.query_offsets[q + 1]])
        pool = num_docs - len(positives)
        draw = np.sort(rng.choice(pool, min(num_negatives, pool), replace=False))
        # Rank ``v`` among the non-positive rows -> its row: skip every positive at or below it.
        row = draw + np.searchsorted(positives - np.arange(len(positives)), draw, side="right")
        negatives[q, : len(row)] = row
        counts[q] = len(row)
    return negatives, counts


# ----------------------------------------------------------------------------- files


def save_mining(path: str | os.PathLike, result: MiningResult) -> None:
    """Write ``result`` as one ``.npz`` (no pickle), atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            negatives=result.negatives.astype(np.int32),
            counts=result.counts.astype(np.int32),
            meta=np.array(json.dumps(result.meta, sort_keys=True)),
        )


def load_mining(path: str | os.PathLike) -> MiningResult:
    """Read a file written by ``save_mining``; ``InputError`` naming the file when it is not one."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            negatives, counts, meta_text = z["negatives"], z["counts"], z["meta"]
        meta = json.loads(str(meta_text[()]))
    except FileNotFoundError:
        raise InputError(f"{path}: no such mined-negatives file") from None
    except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: not a mined-negatives file ({type(e).__name__}: {e})") from None
    problem = _validate(negatives, counts, meta)
    if problem:
        raise InputError(f"{path}: corrupt mined-negatives file ({problem})")
    return MiningResult(negatives.astype(np.int32), counts.astype(np.int32), meta)


def _validate(negatives: np.ndarray, counts: np.ndarray, meta: Any) -> str | None:
    """What is wrong with loaded arrays and meta, or None."""
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int) for k in ("num_queries", "num_docs")):
        return "meta is not an object with integer num_queries and num_docs"
    if negatives.ndim != 2 or not np.issubdtype(negatives.dtype, np.integer):
        return f"negatives: expected a 2-D integer array, got {negatives.dtype} {negatives.shape}"
    if counts.shape != (negatives.shape[0],) or not np.issubdtype(counts.dtype, np.integer):
        return f"counts: expected integers of shape ({negatives.shape[0]},), got {counts.dtype} {counts.shape}"
    if negatives.shape[0] != meta["num_queries"]:
        return f"{negatives.shape[0]} rows of negatives for {meta['num_queries']} queries"
    if counts.size and (counts.min() < 0 or counts.max() > negatives.shape[1]):
        return f"counts outside 0..{negatives.shape[1]}"
    valid = np.arange(negatives.shape[1])[None, :] < counts[:, None]
    if np.any(negatives[~valid] != -1) or np.any(negatives[valid] < 0) or np.any(negatives >= meta["num_docs"]):
        return f"negatives are not corpus rows below {meta['num_docs']} followed by -1 padding"
    return None


def load_or_mine(
    path: str | os.PathLike, encoder: Encoder, ts: TrainingSet, corpus_texts: Sequence[str], **kwargs: Any
) -> MiningResult:
    """The negatives saved at ``path`` when their ``meta`` matches these arguments, else mine and save them.

    ``kwargs`` are those of ``mine_negatives``. Every process mines (encoding is
    a collective); process 0 writes the file.
    """
    meta_args = inspect.signature(mining_meta).parameters
    wanted = mining_meta(encoder, ts, corpus_texts, **{k: v for k, v in kwargs.items() if k in meta_args})
    path = Path(path)
    if path.exists():
        saved = load_mining(path)
        if saved.meta == wanted:
            log.info("mined negatives: reusing %s", path)
            return saved
        log.info("mined negatives: %s was mined with other settings; mining again", path)
    result = mine_negatives(encoder, ts, corpus_texts, **kwargs)
    if jax.process_index() == 0:
        save_mining(path, result)
    return result

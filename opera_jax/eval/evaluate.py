"""Evaluate a retriever on a BEIR split: encode, exact top-k, metrics.

``Evaluator`` tokenises the split's queries and corpus once (cached on disk
too), so that a trainer can call it every N steps with new weights.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from opera_jax.data.beir import BeirSplit
from opera_jax.data.tokens import tokenize
from opera_jax.eval.metrics import CUTOFFS, evaluate_run
from opera_jax.eval.retrieval import encode, exact_topk
from opera_jax.models.encoder import EncoderSpec
from opera_jax.sharding import make_mesh

Run = dict[str, list[tuple[str, float]]]


@dataclasses.dataclass
class EvalResult:
    metrics: dict[str, float]
    run: Run
    seconds: float


class Evaluator:
    def __init__(
        self,
        split: BeirSplit,
        tokenizer,
        spec: EncoderSpec,
        *,
        max_query_len: int | None = None,
        max_passage_len: int | None = None,
        batch_size: int = 128,
        k: int = 100,
        mesh: Mesh | None = None,
        passage_text: str = "title_text",
    ):
        self.split = split
        self.spec = spec
        self.max_query_len = max_query_len or spec.max_seq_length
        self.max_passage_len = max_passage_len or spec.max_seq_length
        self.batch_size = batch_size
        self.k = k
        self.mesh = mesh or make_mesh()
        self.query_tokens = tokenize(tokenizer, split.queries.texts, self.max_query_len, spec.query_prefix)
        self.doc_tokens = tokenize(
            tokenizer, split.corpus.passages(passage_text), self.max_passage_len, spec.passage_prefix
        )

    def __call__(self, model: nnx.Module, *, progress: bool = False) -> EvalResult:
        start = time.perf_counter()
        common = dict(batch_size=self.batch_size, padding_side=self.spec.padding_side, mesh=self.mesh)
        docs = encode(
            model, self.doc_tokens, max_len=self.max_passage_len, desc="encode corpus" if progress else None, **common
        )
        queries = encode(
            model, self.query_tokens, max_len=self.max_query_len, desc="encode queries" if progress else None, **common
        )
        scores, indices = exact_topk(queries, docs, self.k, mesh=self.mesh)
        run = self._run(scores, indices)
        metrics = evaluate_run(self.split.qrels, run, CUTOFFS)
        return EvalResult(metrics, run, time.perf_counter() - start)

    def _run(self, scores: np.ndarray, indices: np.ndarray) -> Run:
        doc_ids = self.split.corpus.ids
        return {
            qid: [(doc_ids[j], float(s)) for j, s in zip(indices[i], scores[i])]
            for i, qid in enumerate(self.split.queries.ids)
        }

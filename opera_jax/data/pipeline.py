"""The data path: an epoch plan -> a Grain ``MapDataset`` -> this host's slice of each global batch.

A ``Plan`` is the sequence of draws for one stretch of training: which query,
with which positive pair, and the loss weight of the example. Every method
supplies its plans ("basic": a uniform shuffle with a uniform positive; SP: the
same over the kept pairs; DP: the plan its device kernel draws). The dataset, in
order:

1. source: plan rows;
2. seed, then ``random_map``: the ``G - 1`` hard negatives of each example,
   drawn with the example's own RNG (Grain derives it from the seed and the
   row), without replacement when the query has enough mined negatives;
3. ``batch``: the global batch, remainder dropped;
4. ``map``: bucket lengths chosen from the *global* batch (every host picks the
   same shapes), then this host's rows cut from the pre-tokenised arrays.

No tokenising happens here: sources are the ``TokenArrays`` made once. The
result is deterministic given the plan and the seed, and the iterator's state
(the next batch index) goes into the checkpoint.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from opera_jax.data.tokens import TokenArrays, bucket_for
from opera_jax.data.training import TrainingSet


@dataclasses.dataclass(frozen=True)
class Plan:
    query: np.ndarray  # int32 [E]
    pair: np.ndarray  # int32 [E]
    weight: np.ndarray | None = None  # f32 [E]; None = all ones

    def __len__(self) -> int:
        return len(self.query)


def uniform_positives(ts: TrainingSet, query: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each query, one of its pairs drawn uniformly."""
    counts = ts.positives_per_query()[query]
    return (ts.query_offsets[query] + np.floor(rng.random(len(query)) * counts)).astype(np.int32)


def uniform_plan(ts: TrainingSet, rng: np.random.Generator) -> Plan:
    """One epoch of standard finetuning: every query once, shuffled, each with a uniformly drawn positive."""
    query = rng.permutation(ts.num_queries).astype(np.int32)
    return Plan(query, uniform_positives(ts, query, rng))


def train_buckets(max_len: int, count: int) -> tuple[int, ...]:
    """The ``count`` largest power-of-two fractions of ``max_len``: few shapes, little padding."""
    return tuple(sorted({max(max_len >> i, 8) for i in range(count)}))


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    batch_size: int  # global queries per step
    group_size: int  # passages per query: 1 positive + group_size - 1 negatives
    query_max_len: int
    passage_max_len: int
    padding_side: str = "right"
    query_bucket_count: int = 2
    passage_bucket_count: int = 3


class _Example:
    """Plan row -> ``{query, pair, weight, passages}`` with the positive first, then negatives."""

    def __init__(self, plan: Plan, ts: TrainingSet, group_size: int, num_docs: int):
        self.plan, self.ts, self.need, self.num_docs = plan, ts, group_size - 1, num_docs

    def __call__(self, row: int, rng: np.random.Generator) -> dict:
        q, p = int(self.plan.query[row]), int(self.plan.pair[row])
        negs = np.empty(self.need, np.int32)
        if self.need:
            count = int(self.ts.negative_counts[q]) if self.ts.negative_counts is not None else 0
            if count == 0:
                negs[:] = rng.integers(0, self.num_docs, self.need)
            else:
                picks = rng.choice(count, self.need, replace=count < self.need)
                negs[:] = self.ts.negatives[q, picks]
        weight = 1.0 if self.plan.weight is None else float(self.plan.weight[row])
        return {
            "query": np.int32(q),
            "pair": np.int32(p),
            "weight": np.float32(weight),
            "passages": np.concatenate([[self.ts.pair_doc[p]], negs]).astype(np.int32),
        }


class _Collate:
    """A global batch of indices -> this host's token arrays, shapes fixed by the global batch."""

    def __init__(
        self,
        query_tokens: TokenArrays,
        doc_tokens: TokenArrays,
        spec: BatchSpec,
        process_index: int,
        process_count: int,
    ):
        self.q, self.d, self.spec = query_tokens, doc_tokens, spec
        self.q_buckets = train_buckets(spec.query_max_len, spec.query_bucket_count)
        self.p_buckets = train_buckets(spec.passage_max_len, spec.passage_bucket_count)
        self.lo = process_index * spec.batch_size // process_count
        self.hi = (process_index + 1) * spec.batch_size // process_count

    def __call__(self, batch: dict) -> dict:
        queries, passages = batch["query"], batch["passages"]
        q_len = bucket_for(int(min(self.q.lengths[queries].max(), self.spec.query_max_len)), self.q_buckets)
        p_len = bucket_for(int(min(self.d.lengths[passages].max(), self.spec.passage_max_len)), self.p_buckets)
        rows = slice(self.lo, self.hi)
        q_ids, q_mask = self.q.batch(queries[rows], q_len, self.spec.padding_side)
        p_ids, p_mask = self.d.batch(passages[rows].reshape(-1), p_len, self.spec.padding_side)
        return {
            "query_input_ids": q_ids,
            "query_attention_mask": q_mask,
            "passage_input_ids": p_ids,
            "passage_attention_mask": p_mask,
            "pair": batch["pair"][rows],
            "query": queries[rows],
            "weight": batch["weight"][rows],
        }


def make_dataset(
    plan: Plan,
    ts: TrainingSet,
    query_tokens: TokenArrays,
    doc_tokens: TokenArrays,
    spec: BatchSpec,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Batches of one plan: ``len(plan) // batch_size`` of them, each this host's slice."""
    if spec.batch_size % process_count:
        raise ValueError(f"global batch {spec.batch_size} does not split over {process_count} processes")
    return (
        grain.MapDataset.range(len(plan))
        .seed(seed)
        .random_map(_Example(plan, ts, spec.group_size, len(doc_tokens)))
        .batch(spec.batch_size, drop_remainder=True)
        .map(_Collate(query_tokens, doc_tokens, spec, process_index, process_count))
    )


def iterate(dataset: grain.MapDataset, state: dict | None = None, prefetch: int = 4):
    """A checkpointable iterator over ``dataset``; ``state`` is a previous ``iterator.get_state()``."""
    it = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch)))
    if state is not None:
        it.set_state(state)
    return it

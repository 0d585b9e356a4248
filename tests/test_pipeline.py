"""The Grain data path: plans, negatives, global-batch shapes, host slices, determinism, resume."""

import numpy as np
import pytest

from opera_jax.data.pipeline import BatchSpec, Plan, iterate, make_dataset, train_buckets, uniform_plan
from opera_jax.data.tokens import TokenArrays
from opera_jax.data.training import TrainingSet


def _tokens(lengths, start=1000):
    lengths = np.asarray(lengths, np.int32)
    offsets = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    # Token values encode (text, position) so tests can read back which text a row holds.
    flat = np.concatenate([np.full(n, start + i, np.int32) for i, n in enumerate(lengths)])
    return TokenArrays(flat, offsets, lengths, pad_id=0)


@pytest.fixture
def ts():
    rng = np.random.default_rng(0)
    n, docs = 10, 50
    counts = np.array([1, 2, 3, 1, 1, 2, 1, 4, 1, 1])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    pair_query = np.repeat(np.arange(n), counts).astype(np.int32)
    pair_doc = rng.choice(docs, len(pair_query), replace=False).astype(np.int32)
    negatives = np.full((n, 5), -1, np.int32)
    neg_counts = np.array([5, 5, 1, 0, 5, 5, 5, 2, 5, 5], np.int32)
    for q in range(n):
        negatives[q, : neg_counts[q]] = rng.choice(docs, neg_counts[q], replace=False)
    return TrainingSet(
        tuple(f"q{i}" for i in range(n)),
        tuple(f"text {i}" for i in range(n)),
        pair_query,
        pair_doc,
        offsets,
        negatives,
        neg_counts,
    )


@pytest.fixture
def tokens():
    rng = np.random.default_rng(1)
    return _tokens(rng.integers(3, 30, 10), 1000), _tokens(rng.integers(5, 120, 50), 5000)


def test_uniform_plan_visits_every_query_once_with_its_own_positive(ts):
    plan = uniform_plan(ts, np.random.default_rng(3))
    assert sorted(plan.query.tolist()) == list(range(ts.num_queries))
    assert (ts.pair_query[plan.pair] == plan.query).all()


def test_batches_hold_the_plan_in_order_with_valid_negatives(ts, tokens):
    qt, dt = tokens
    plan = uniform_plan(ts, np.random.default_rng(3))
    spec = BatchSpec(batch_size=4, group_size=3, query_max_len=32, passage_max_len=64)
    ds = make_dataset(plan, ts, qt, dt, spec, seed=7)
    assert len(ds) == 2  # 10 draws, batches of 4, remainder dropped
    for b in range(2):
        batch = ds[b]
        rows = slice(4 * b, 4 * b + 4)
        np.testing.assert_array_equal(batch["query"], plan.query[rows])
        np.testing.assert_array_equal(batch["pair"], plan.pair[rows])
        assert batch["query_input_ids"].shape[1] in train_buckets(32, 2)
        assert batch["passage_input_ids"].shape == (12, batch["passage_input_ids"].shape[1])
        assert batch["passage_input_ids"].shape[1] in train_buckets(64, 3)
        docs = batch["passage_input_ids"][:, 0] - 5000  # the doc each passage row holds
        for i, (q, p) in enumerate(zip(batch["query"], batch["pair"])):
            group = docs[3 * i : 3 * i + 3]
            assert group[0] == ts.pair_doc[p]
            if ts.negative_counts[q]:
                assert set(group[1:]) <= set(ts.negatives[q, : ts.negative_counts[q]])
            if ts.negative_counts[q] >= 2:
                assert group[1] != group[2]  # without replacement when there are enough
        assert (batch["weight"] == 1).all()


def test_deterministic_by_seed_and_resumable(ts, tokens):
    qt, dt = tokens
    plan = Plan(np.tile(np.arange(10, dtype=np.int32), 3), np.tile(ts.query_offsets[:-1], 3))
    spec = BatchSpec(batch_size=4, group_size=2, query_max_len=32, passage_max_len=64)
    a = list(iterate(make_dataset(plan, ts, qt, dt, spec, seed=1)))
    b = list(iterate(make_dataset(plan, ts, qt, dt, spec, seed=1)))
    c = list(iterate(make_dataset(plan, ts, qt, dt, spec, seed=2)))
    assert len(a) == 7
    assert all((x["passage_input_ids"] == y["passage_input_ids"]).all() for x, y in zip(a, b))
    assert any(
        x["passage_input_ids"].shape != y["passage_input_ids"].shape
        or (x["passage_input_ids"] != y["passage_input_ids"]).any()
        for x, y in zip(a, c)
    )
    it = iterate(make_dataset(plan, ts, qt, dt, spec, seed=1))
    for _ in range(3):
        next(it)
    state = it.get_state()
    resumed = list(iterate(make_dataset(plan, ts, qt, dt, spec, seed=1), state))
    assert len(resumed) == 4
    for x, y in zip(resumed, a[3:]):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_hosts_take_disjoint_slices_with_global_shapes(ts, tokens):
    qt, dt = tokens
    plan = uniform_plan(ts, np.random.default_rng(5))
    spec = BatchSpec(batch_size=4, group_size=2, query_max_len=32, passage_max_len=64)
    whole = make_dataset(plan, ts, qt, dt, spec, seed=3)[0]
    parts = [make_dataset(plan, ts, qt, dt, spec, seed=3, process_index=i, process_count=2)[0] for i in range(2)]
    for k in whole:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])


def test_plan_weights_reach_the_batch(ts, tokens):
    qt, dt = tokens
    plan = Plan(np.arange(8, dtype=np.int32), ts.query_offsets[:8].copy(), np.linspace(1, 2, 8).astype(np.float32))
    spec = BatchSpec(batch_size=4, group_size=1, query_max_len=32, passage_max_len=64)
    batch = make_dataset(plan, ts, qt, dt, spec, seed=0)[1]
    np.testing.assert_allclose(batch["weight"], plan.weight[4:])
    assert batch["passage_input_ids"].shape[0] == 4

"""Static pruning's kept set and InfoBatch's epoch selection, against direct NumPy statements of the rules."""

import jax
import jax.numpy as jnp
import numpy as np
import opera_oracle as oracle
import pytest

from opera_jax.data.training import TrainingSet
from opera_jax.methods import infobatch
from opera_jax.methods.static import Static, kept_pairs


def _ts(counts):
    counts = np.asarray(counts)
    n = len(counts)
    pair_query = np.repeat(np.arange(n), counts).astype(np.int32)
    return TrainingSet(
        tuple(f"q{i}" for i in range(n)),
        tuple(f"t{i}" for i in range(n)),
        pair_query,
        np.arange(len(pair_query), dtype=np.int32),
        np.concatenate([[0], np.cumsum(counts)]).astype(np.int32),
    )


def test_kept_pairs_modes():
    s = np.array([0.1, 0.9, 0.5, 0.7, 0.3, 0.9, 0.2, 0.6])
    assert np.flatnonzero(kept_pairs(s, 0.25, "highest", 0)).tolist() == [1, 5]
    assert sorted(np.flatnonzero(kept_pairs(s, 0.5, "lowest", 0)).tolist()) == [0, 2, 4, 6]
    r1, r2 = kept_pairs(s, 0.5, "random", 1), kept_pairs(s, 0.5, "random", 2)
    assert r1.sum() == r2.sum() == 4 and (r1 != r2).any()
    assert kept_pairs(s, 0.3, "highest", 0).sum() == 2  # floor(0.3 * 8)


def test_static_drops_queries_left_without_pairs():
    ts = _ts([2, 1, 3])  # pairs 0-1 -> q0, 2 -> q1, 3-5 -> q2
    scores = np.array([0.9, 0.1, 0.2, 0.8, 0.3, 0.7])
    sp = Static(ts, scores, 0.5, "highest", seed=0)  # keeps pairs 0, 3, 5
    assert sp.ts.query_ids == ("q0", "q2")
    assert sp.ts.pair_doc.tolist() == [0, 3, 5]
    assert sp.ts.query_offsets.tolist() == [0, 1, 3]
    plan = sp.plan((), 0, 0)
    assert sorted(plan.query.tolist()) == [0, 1]


def test_infobatch_prunes_a_share_of_well_learned_queries_and_reweights_the_rest():
    n, ratio, draws = 200, 0.25, 300
    losses = jnp.asarray(np.linspace(0, 2, n), jnp.float32)
    well = np.asarray(losses) < float(losses.mean())
    run = jax.jit(jax.vmap(lambda k: infobatch.select(losses, k, ratio, anneal=False)))
    orders, counts, weights = run(jax.random.split(jax.random.key(0), draws))
    orders, counts, weights = np.asarray(orders), np.asarray(counts), np.asarray(weights)
    kept_freq = np.zeros(n)
    for order, count in zip(orders, counts):
        kept_freq[order[:count]] += 1
        assert len(set(order[:count].tolist())) == count
    kept_freq /= draws
    assert (kept_freq[~well] == 1).all()  # high-loss queries always stay
    p = 1 - ratio
    assert abs(kept_freq[well].mean() - p) < 4 * np.sqrt(p * (1 - p) / (draws * well.sum()))
    for order, count, w in zip(orders[:5], counts[:5], weights[:5]):
        stay = order[:count]
        np.testing.assert_allclose(w[stay], np.where(well[stay], 1 / (1 - ratio), 1.0), rtol=1e-6)


def test_infobatch_keeps_at_least_one_batch():
    """MED: 20 training queries, batch 16; an unbounded draw left 14 and stopped the run."""
    losses = jnp.asarray(np.linspace(0, 2, 20), jnp.float32)  # 10 well learned
    run = jax.jit(jax.vmap(lambda k: infobatch.select(losses, k, 0.5, anneal=False, min_kept=16)))
    orders, counts, weights = map(np.asarray, run(jax.random.split(jax.random.key(0), 200)))
    assert counts.min() == 16 and counts.max() > 16
    for order, count in zip(orders, counts):
        assert len(set(order.tolist())) == 20 and set(order[count:].tolist()) <= set(range(10))
    free = np.asarray(
        jax.jit(jax.vmap(lambda k: infobatch.select(losses, k, 0.5, anneal=False)[1]))(
            jax.random.split(jax.random.key(0), 200)
        )
    )
    assert free.min() < 16  # without the floor the same draws go below one batch


def test_infobatch_anneals_and_records_losses():
    losses = jnp.asarray(np.linspace(0, 2, 50), jnp.float32)
    order, count, weights = infobatch.select(losses, jax.random.key(1), 0.25, anneal=True)
    assert int(count) == 50 and (np.asarray(weights) == 1).all()
    new = infobatch.update(
        jnp.full(4, infobatch.UNSEEN), {"query": jnp.array([2, 0])}, jnp.array([0.5, 1.5]), jnp.zeros(2)
    )
    np.testing.assert_allclose(new, [1.5, np.nan, 0.5, np.nan])  # NaN == NaN here


@pytest.mark.parametrize("step, annealed", [(0, False), (874, False), (875, True)])
def test_infobatch_annealing_share_is_measured_in_steps(step, annealed):
    ts = _ts([1] * 40)
    ib = infobatch.InfoBatch(ts, 0.5, 0.875, seed=0, max_steps=1000)
    state = jnp.asarray(np.linspace(0, 1, 40), jnp.float32)
    plan = ib.plan(state, 3, step)
    assert (len(plan) == 40) == annealed


def test_pruned_set_maps_back_to_its_parent_queries():
    ts = _ts([2, 1, 3])
    sp = Static(ts, np.array([0.9, 0.1, 0.2, 0.8, 0.3, 0.7]), 0.5, "highest", seed=0)
    rows = sp.ts.rows_in(ts)
    assert rows.tolist() == [0, 2]
    assert [ts.query_texts[r] for r in rows] == list(sp.ts.query_texts)


def test_infobatch_with_unseen_queries_matches_the_oracle():
    """Queries not trained on yet (NaN) are never pruned, weigh 1, and stay out of the mean."""
    rng = np.random.default_rng(4)
    n, ratio, draws = 120, 0.3, 400
    losses = rng.gamma(2.0, 0.5, n).astype(np.float32)
    losses[rng.choice(n, 15, replace=False)] = np.nan
    well, stay, weight = oracle.infobatch_selection(losses, ratio)
    run = jax.jit(jax.vmap(lambda k: infobatch.select(jnp.asarray(losses), k, ratio, anneal=False)))
    orders, counts, weights = map(np.asarray, run(jax.random.split(jax.random.key(2), draws)))
    kept_freq = np.zeros(n)
    for order, count, w in zip(orders, counts, weights):
        kept_freq[order[:count]] += 1
        np.testing.assert_allclose(w[order[:count]], weight[order[:count]], rtol=1e-6)
    kept_freq /= draws
    assert (kept_freq[~well] == 1).all()
    p = 1 - ratio
    assert abs(kept_freq[well].mean() - p) < 4 * np.sqrt(p * (1 - p) / (draws * well.sum()))
    nothing_seen = infobatch.select(jnp.full(n, infobatch.UNSEEN), jax.random.key(0), ratio, anneal=False)
    assert int(nothing_seen[1]) == n and (np.asarray(nothing_seen[2]) == 1).all()


def test_infobatch_after_scifacts_first_epoch():
    """SciFact: 809 queries in batches of 32 train 800 in epoch 1 and leave 9 unseen. With a 1e6
    placeholder the mean loss was ~11,000, every seen query counted as well learned, and epoch 2
    pruned a quarter of all of them at random, the hardest included."""
    n, batch, ratio = 809, 32, 0.25
    ib = infobatch.InfoBatch(_ts([1] * n), ratio, 0.875, seed=0, max_steps=300, min_kept=batch)
    state = ib.init_state()
    first = ib.plan(state, 0, 0)
    assert len(first) == n and (first.weight == 1).all()  # nothing is pruned before anything is seen
    trained = first.query[: (n // batch) * batch]
    loss = np.random.default_rng(0).gamma(2.0, 0.5, len(trained)).astype(np.float32)
    state = infobatch.update(state, {"query": jnp.asarray(trained)}, jnp.asarray(loss), None)
    unseen = np.setdiff1d(np.arange(n), trained)
    assert len(unseen) == 9
    losses = np.asarray(state)
    hard = np.flatnonzero(losses >= loss.mean())  # at or above the mean of the losses measured
    well = np.flatnonzero(losses < loss.mean())
    pruned_counts = []
    for segment in range(1, 6):
        plan = ib.plan(state, segment, 25)
        weight = dict(zip(plan.query.tolist(), plan.weight.tolist()))
        assert all(weight.get(q) == 1.0 for q in unseen)  # in the epoch, unweighted
        assert all(weight.get(q) == 1.0 for q in hard)  # the hard ones are never pruned
        assert all(weight.get(q, 1 / (1 - ratio)) == pytest.approx(1 / (1 - ratio)) for q in well)
        pruned_counts.append(n - len(plan))
    p = ratio
    assert abs(np.mean(pruned_counts) - p * len(well)) < 4 * np.sqrt(p * (1 - p) * len(well) / 5)

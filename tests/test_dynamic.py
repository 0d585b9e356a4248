"""DP's device kernels against the NumPy oracle (tests/opera_oracle.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import opera_oracle as oracle
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from opera_jax.config import DPConfig
from opera_jax.methods import dynamic as dp

CFG = DPConfig()  # the paper's values: q 0.25, strength 2 -> 5, c 0.25 -> 0.5, pos strength 5, cosine
TOTAL = 1000


def _problem(seed=0, n=40):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 5, n)
    pair_query = np.repeat(np.arange(n), counts).astype(np.int32)
    scores = rng.normal(0.5, 0.2, len(pair_query)).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    width = counts.max()
    matrix = np.full((n, width), -1, np.int32)
    for q in range(n):
        matrix[q, : counts[q]] = np.arange(offsets[q], offsets[q + 1])
    return scores, pair_query, matrix


def _refresh(scores, pair_query, matrix, step, key, n0):
    state = dp.DPState(jnp.asarray(scores), jnp.full(len(scores), dp.UNSEEN))
    return dp.refresh(
        state,
        step,
        key,
        jnp.asarray(pair_query),
        jnp.asarray(matrix),
        n0=n0,
        num_queries=matrix.shape[0],
        total=TOTAL,
        cfg=CFG,
    )


@pytest.mark.parametrize("t", [0, 250, 600, 1000, 1500])
def test_schedule_epoch_length_and_cutoff_match_the_oracle(t):
    for start, end in ((2.0, 5.0), (0.25, 0.5)):
        for kind in ("cosine", "linear"):
            for delta in (1.0, 0.5):
                assert float(dp.schedule(t, TOTAL, start, end, kind, delta)) == pytest.approx(
                    oracle.schedule(t, TOTAL, start, end, kind, delta), rel=1e-6
                )
    for n in (1, 7, 40, 809, 10_000):
        assert dp.epoch_length(n, 0.25, 2.0) == oracle.epoch_length(n)
    assert dp.epoch_length(800, 0.25, 2.0) == 500  # 0.625 n


@pytest.mark.parametrize("t", [0, 300, 1000])
def test_thresholds_and_kept_sets_match_the_oracle(t):
    scores, pair_query, matrix = _problem(t)
    n = matrix.shape[0]
    want = oracle.refresh_probabilities(scores.astype(np.float64), pair_query, n, t, TOTAL)
    state = dp.DPState(jnp.asarray(scores), jnp.zeros(len(scores)))
    got = dp.selection(state, t, jnp.asarray(pair_query), n0=want["n0"], num_queries=n, total=TOTAL, cfg=CFG)
    assert float(got["r"]) == pytest.approx(want["r"], rel=1e-5)
    assert float(got["theta_q"]) == pytest.approx(want["theta_q"], abs=1e-5)
    assert float(got["theta_d"]) == pytest.approx(want["theta_d"], abs=1e-5)
    np.testing.assert_array_equal(np.asarray(got["kept"]), want["kept"])
    w = np.asarray(got["pair_weight"])
    probs = np.array([w[i] / w[pair_query == pair_query[i]].sum() for i in range(len(w))])
    np.testing.assert_allclose(probs, want["pos"], rtol=1e-6)


def test_visit_and_positive_frequencies_match_the_oracle_probabilities():
    scores, pair_query, matrix = _problem(3)
    n, t, draws = matrix.shape[0], 400, 1500
    want = oracle.refresh_probabilities(scores.astype(np.float64), pair_query, n, t, TOTAL)
    n0 = want["n0"]
    run = jax.jit(jax.vmap(lambda k: _refresh(scores, pair_query, matrix, t, k, n0)[:2]))
    queries, positives = (np.asarray(x) for x in run(jax.random.split(jax.random.key(0), draws)))
    assert queries.shape == (draws, n0)
    for plan in queries[:20]:
        assert len(set(plan.tolist())) == n0  # without replacement
    visits = np.stack([(queries == q).sum(1) for q in range(n)], 1)  # [draws, n]
    freq = visits.mean(0)
    assert (freq[want["kept"]] == 1).all()  # every kept query is in every plan
    p = want["visit"][~want["kept"]]
    tol = 4 * np.sqrt(p * (1 - p) / draws) + 1e-9
    assert (np.abs(freq[~want["kept"]] - p) <= tol).all()
    # Positive choices: per visited query, frequency of each of its pairs vs w / sum(w).
    q_flat, p_flat = queries.ravel(), positives.ravel()
    assert (pair_query[p_flat] == q_flat).all()
    for q in range(n):
        chosen = p_flat[q_flat == q]
        pairs = np.flatnonzero(pair_query == q)
        for pair in pairs:
            expected = want["pos"][pair]
            observed = (chosen == pair).mean()
            assert abs(observed - expected) <= 4 * np.sqrt(expected * (1 - expected) / len(chosen)) + 1e-9


def test_same_plan_on_one_and_eight_devices(mesh1, mesh8):
    scores, pair_query, matrix = _problem(5)
    n0 = dp.epoch_length(matrix.shape[0], 0.25, 2.0)
    key = jax.random.key(11)
    plans = []
    for mesh in (mesh1, mesh8):
        put = lambda x: jax.device_put(jnp.asarray(x), NamedSharding(mesh, P()))
        state = dp.DPState(put(scores), put(np.full(len(scores), dp.UNSEEN, np.float32)))
        q, p, _ = dp.refresh(
            state,
            123,
            key,
            put(pair_query),
            put(matrix),
            n0=n0,
            num_queries=matrix.shape[0],
            total=TOTAL,
            cfg=CFG,
        )
        plans.append((np.asarray(q), np.asarray(p)))
    np.testing.assert_array_equal(plans[0][0], plans[1][0])
    np.testing.assert_array_equal(plans[0][1], plans[1][1])


def test_update_scatters_the_steps_similarities():
    state = dp.DPState(jnp.zeros(6), jnp.full(6, dp.UNSEEN))
    new = dp.update(state, {"pair": jnp.array([4, 1])}, jnp.array([0.3, 0.7]), jnp.array([0.9, -0.2]))
    np.testing.assert_allclose(new.scores, [0, -0.2, 0, 0, 0.9, 0])
    np.testing.assert_allclose(new.losses, [np.nan, 0.7, np.nan, np.nan, 0.3, np.nan])  # NaN == NaN here


def _losses(scores, pair_query, rng, unseen_queries, unseen_pairs):
    """Per-pair losses with whole queries and single pairs not trained on yet (NaN)."""
    losses = rng.gamma(2.0, 0.5, len(scores)).astype(np.float32)
    losses[np.isin(pair_query, unseen_queries)] = np.nan
    losses[unseen_pairs] = np.nan
    return losses


@pytest.mark.parametrize("keep_higher", [True, False])
@pytest.mark.parametrize("t", [0, 700])
def test_loss_criterion_leaves_unseen_pairs_out_of_means_and_quantiles(keep_higher, t):
    scores, pair_query, matrix = _problem(7)
    n = matrix.shape[0]
    rng = np.random.default_rng(t)
    losses = _losses(scores, pair_query, rng, unseen_queries=[0, 5, 17], unseen_pairs=rng.choice(len(scores), 6))
    cfg = dataclasses.replace(CFG, criterion="loss", keep_higher_query=keep_higher)
    want = oracle.refresh_probabilities(
        scores.astype(np.float64),
        pair_query,
        n,
        t,
        TOTAL,
        query_values=losses.astype(np.float64),
        keep_higher_query=keep_higher,
    )
    state = dp.DPState(jnp.asarray(scores), jnp.asarray(losses))
    got = dp.selection(state, t, jnp.asarray(pair_query), n0=want["n0"], num_queries=n, total=TOTAL, cfg=cfg)
    assert float(got["theta_q"]) == pytest.approx(want["theta_q"], abs=1e-5)
    np.testing.assert_array_equal(np.asarray(got["kept"]), want["kept"])
    assert np.asarray(got["kept"])[[0, 5, 17]].all()


@pytest.mark.parametrize("keep_higher", [True, False])
def test_loss_criterion_after_scifacts_first_epoch(keep_higher):
    """SciFact: 809 queries, n0 = 505, 15 steps of 32 before the first refresh: 480 queries trained on,
    329 not. With a finite placeholder (1e6) those 329 sat on one side of every quantile: always kept
    when keeping higher losses, always soft-pruned when keeping lower ones, and the threshold was set
    among them rather than among the losses measured."""
    rng = np.random.default_rng(0)
    n = 809
    counts = np.where(rng.random(n) < 0.1, 2, 1)
    pair_query = np.repeat(np.arange(n), counts).astype(np.int32)
    scores = rng.normal(0.5, 0.2, len(pair_query)).astype(np.float32)
    trained = rng.permutation(n)[:480]
    losses = np.full(len(scores), np.nan, np.float32)
    first = np.concatenate([[0], np.cumsum(counts)])[:-1]
    losses[first[trained]] = rng.gamma(2.0, 0.5, 480)  # one positive of each trained query
    n0 = dp.epoch_length(n, 0.25, 2.0)
    assert n0 == 505
    cfg = dataclasses.replace(CFG, criterion="loss", keep_higher_query=keep_higher)
    state = dp.DPState(jnp.asarray(scores), jnp.asarray(losses))
    got = dp.selection(state, 15, jnp.asarray(pair_query), n0=n0, num_queries=n, total=300, cfg=cfg)
    seen_means = losses[first[trained]]
    r = float(got["r"])
    assert float(got["theta_q"]) == pytest.approx(np.quantile(seen_means, 1 - r if keep_higher else r), rel=1e-5)
    kept = np.asarray(got["kept"])
    unseen = np.setdiff1d(np.arange(n), trained)
    assert kept[unseen].all()
    kept_seen = kept[trained].mean()
    assert kept_seen == pytest.approx(r, abs=2 / 480)  # the kept share is taken among the queries measured
    if not keep_higher:
        assert (losses[first[trained]][kept[trained]] <= float(got["theta_q"])).all()

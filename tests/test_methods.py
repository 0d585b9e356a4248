"""The method registry: every name a config accepts builds its method, from the config's own values."""

import numpy as np
import pytest

from opera_jax.config import METHOD_NAMES, load_config
from opera_jax.data.training import TrainingSet
from opera_jax.methods.registry import METHODS, build_method


def _ts(counts=(1, 3, 2, 1, 4, 2, 1, 2)):
    counts = np.asarray(counts)
    pair_query = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
    return TrainingSet(
        tuple(f"q{i}" for i in range(len(counts))),
        tuple(f"t{i}" for i in range(len(counts))),
        pair_query,
        np.arange(len(pair_query), dtype=np.int32),
        np.concatenate([[0], np.cumsum(counts)]).astype(np.int32),
    )


def test_the_config_accepts_exactly_the_registered_methods():
    assert set(METHOD_NAMES) == set(METHODS)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_each_method_is_built_from_its_config(name):
    ts = _ts()
    config = load_config(
        None,
        [
            f"method.name={name}",
            "seed=7",
            "optim.max_steps=40",
            "optim.batch_size=4",
            "method.sp.kept_pct=0.5",
            "method.dp.strength_start=3.0",
            "method.infobatch.ratio=0.4",
        ],
    )
    scores = np.linspace(0.0, 1.0, ts.num_pairs, dtype=np.float32)
    calls = []

    def base_scores():
        calls.append(1)
        return scores

    method = build_method(config, ts, base_scores)
    assert method.name == name
    assert len(calls) == (1 if name in ("sp", "dp") else 0)  # only the methods that start from S0 encode
    if name == "sp":  # half the pairs, the highest-scoring, on the queries that keep one
        assert method.ts.num_pairs == ts.num_pairs // 2 and method.keep[-ts.num_pairs // 2 :].all()
    else:
        assert method.ts is ts
    if name == "dp":
        assert method.cfg == config.method.dp and method.total == 40 and method.seed == 7
        np.testing.assert_array_equal(method.initial_scores, scores)
    if name == "infobatch":
        assert method.ratio == 0.4 and method.min_kept == 4 and method.anneal_from == int(0.875 * 40)
    plan = method.plan(method.init_state(), 0, 0)  # a usable plan from the fresh state
    assert len(plan) > 0 and set(np.asarray(plan.query).tolist()) <= set(range(method.ts.num_queries))

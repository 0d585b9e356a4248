"""The contrastive loss against NumPy, and the sharded train step against the 1-device step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from opera_jax.models.encoder import load_encoder
from opera_jax.sharding import batch_sharding, replicated
from opera_jax.train.loss import contrastive_loss
from opera_jax.train.optim import decay_mask, learning_rate_at, learning_rate_schedule, make_optimizer, warmup_steps
from opera_jax.train.step import init_state, make_train_step

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out: README "Tests"


def _numpy_infonce(q, p, tau, w):
    b, g = q.shape[0], p.shape[0] // q.shape[0]
    logits = q @ p.T / tau
    out = []
    for i in range(b):
        row = logits[i] - logits[i].max()
        out.append(np.log(np.exp(row).sum()) - row[i * g])
    out = np.array(out)
    return (w * out).mean(), out, np.array([q[i] @ p[i * g] for i in range(b)])


@pytest.mark.parametrize("group", [1, 2, 4])
def test_loss_matches_numpy(group):
    rng = np.random.default_rng(group)
    q = rng.normal(size=(6, 8)).astype(np.float32)
    p = rng.normal(size=(6 * group, 8)).astype(np.float32)
    w = rng.uniform(0.5, 2, size=6).astype(np.float32)
    loss, per, pos = contrastive_loss(jnp.asarray(q), jnp.asarray(p), 0.5, jnp.asarray(w))
    want_loss, want_per, want_pos = _numpy_infonce(q, p, 0.5, w)
    np.testing.assert_allclose(per, want_per, rtol=1e-5)
    np.testing.assert_allclose(pos, want_pos, rtol=1e-5)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)


def test_schedule_warms_up_then_decays_to_zero():
    lr = learning_rate_schedule(1.0, 100, 0.05)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(1.0)
    assert float(lr(50)) == pytest.approx(50 / 95) and float(lr(100)) == pytest.approx(0.0)


@pytest.mark.parametrize(
    "peak,max_steps,ratio", [(1e-3, 10, 0.3), (2e-5, 375, 0.05), (1e-4, 100, 0.01), (3e-4, 13, 0.0)]
)
def test_schedule_from_the_optimizer_state_equals_optax_with_constants(peak, max_steps, ratio):
    """The schedule's numbers are arrays in the state, and the learning rate is, to the bit, what the
    compiled ``optax.join_schedules`` of two linear schedules gives with them as constants."""
    warm = warmup_steps(max_steps, ratio)
    decay = optax.linear_schedule(peak, 0.0, max(max_steps - warm, 1))
    ref = jax.jit(decay if warm == 0 else optax.join_schedules([optax.linear_schedule(0.0, peak, warm), decay], [warm]))
    hyper = make_optimizer(peak, max_steps, warmup_ratio=ratio).init({"w": jnp.zeros(2)}).hyperparams
    assert {k: v.dtype for k, v in hyper.items()} == {"peak": jnp.float32, "warmup": jnp.int32, "decay": jnp.int32}
    ours = jax.jit(lambda count, h: learning_rate_at(count, **h, kind="linear"))
    for count in range(max_steps + 2):
        assert float(ours(jnp.int32(count), hyper)) == float(ref(jnp.int32(count))), count


def test_learning_rate_and_budget_do_not_change_the_compiled_step(tiny_bert_dir, mesh1):
    """A learning-rate sweep or another budget reuses one compiled step (the persistent cache's key)."""
    graphdef, params, rest = nnx.split(load_encoder(str(tiny_bert_dir)).model, nnx.Param, ...)
    batch = jax.device_put(_batch(), batch_sharding(mesh1))
    texts = []
    for lr, steps, ratio in [(1e-3, 10, 0.0), (2e-5, 375, 0.05)]:
        opt = make_optimizer(lr, steps, warmup_ratio=ratio)
        state = jax.device_put(init_state(params, opt, seed=0), replicated(mesh1))
        texts.append(make_train_step(graphdef, rest, opt, temperature=0.05).lower(state, batch).as_text())
    assert texts[0] == texts[1]


def test_no_weight_decay_on_layernorm_and_biases(tiny_bert_dir):
    params = nnx.state(load_encoder(str(tiny_bert_dir)).model, nnx.Param)
    flat = {
        tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey)): v
        for path, v in jax.tree_util.tree_leaves_with_path(decay_mask(params))
    }
    assert flat[("backbone", "layers", 0, "attention", "query", "kernel")]
    assert flat[("backbone", "embeddings", "word", "embedding")]
    assert not flat[("backbone", "layers", 0, "attention", "query", "bias")]
    assert not flat[("backbone", "layers", 1, "mlp", "norm", "scale")]


def _batch(b=8, g=2, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "query_input_ids": rng.integers(5, 60, (b, 8)).astype(np.int32),
        "query_attention_mask": (np.arange(8)[None] < rng.integers(2, 9, (b, 1))).astype(np.int32),
        "passage_input_ids": rng.integers(5, 60, (b * g, 16)).astype(np.int32),
        "passage_attention_mask": (np.arange(16)[None] < rng.integers(4, 17, (b * g, 1))).astype(np.int32),
        "pair": np.arange(b, dtype=np.int32),
        "query": np.arange(b, dtype=np.int32),
        "weight": np.ones(b, np.float32),
    }


def _run(tiny_bert_dir, mesh, steps=3):
    model = load_encoder(str(tiny_bert_dir), overrides={"normalize": True}).model
    model.train()  # dropout on: its keys must not depend on the sharding
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = make_optimizer(1e-3, 10, warmup_ratio=0.0)
    state = jax.device_put(init_state(params, opt, seed=0), replicated(mesh))
    step = make_train_step(graphdef, rest, opt, temperature=0.05)
    losses, pos = [], []
    for i in range(steps):
        state, out = step(state, jax.device_put(_batch(seed=i), batch_sharding(mesh)))
        losses.append(np.asarray(out["per_example_loss"]))
        pos.append(np.asarray(out["pos_sim"]))
    return np.array(losses), np.array(pos), [np.asarray(x) for x in jax.tree.leaves(state.params)], state


def test_eight_devices_equal_one_device(tiny_bert_dir, mesh1, mesh8):
    l1, s1, p1, state1 = _run(tiny_bert_dir, mesh1)
    l8, s8, p8, state8 = _run(tiny_bert_dir, mesh8)
    np.testing.assert_allclose(l8, l1, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(s8, s1, atol=1e-5)
    assert max(np.abs(a - b).max() for a, b in zip(p1, p8)) <= 1e-5
    assert int(state8.step) == 3
    assert not np.allclose(l1[0], l1[-1])  # it trained


def test_state_is_donated(tiny_bert_dir, mesh1):
    model = load_encoder(str(tiny_bert_dir)).model
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = optax.sgd(0.1)
    state = jax.device_put(init_state(jax.tree.map(jnp.copy, params), opt, seed=0), replicated(mesh1))
    step = make_train_step(graphdef, rest, opt, temperature=0.05)
    new_state, _ = step(state, jax.device_put(_batch(), batch_sharding(mesh1)))
    assert all(x.is_deleted() for x in jax.tree.leaves(state.params))
    assert not any(x.is_deleted() for x in jax.tree.leaves(new_state.params))

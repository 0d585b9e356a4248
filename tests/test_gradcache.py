"""The cached-gradient loss equals plain autodiff of the same loss, on 1 and 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train_step import _batch as train_step_batch

from opera_jax.models.encoder import load_encoder
from opera_jax.sharding import batch_sharding, replicated
from opera_jax.train.gradcache import cached_loss_and_grad, from_chunks, to_chunks
from opera_jax.train.loss import contrastive_loss

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out: README "Tests"

TAU = 0.05


def _batch(b=8, g=2, seed=0):
    """The train-step tests' batch, with uneven example weights."""
    batch = train_step_batch(b, g, seed)
    batch["weight"] = np.random.default_rng(seed).uniform(0.5, 2.0, b).astype(np.float32)
    return {k: v for k, v in batch.items() if k not in ("pair", "query")}


def _model(tiny_bert_dir, dropout: bool):
    model = load_encoder(str(tiny_bert_dir), overrides={"normalize": True}).model
    model.train() if dropout else model.eval()
    return nnx.split(model, nnx.Param, ...)


def _plain(graphdef, params, rest, batch):
    """The plain step's loss: whole batch through the encoder, autodiff end to end."""

    def loss_fn(p):
        model = nnx.merge(graphdef, p, rest, copy=True)
        q = model(batch["query_input_ids"], batch["query_attention_mask"])
        d = model(batch["passage_input_ids"], batch["passage_attention_mask"])
        loss, per, pos = contrastive_loss(q, d, TAU, batch["weight"])
        return loss, (per, pos)

    return jax.value_and_grad(loss_fn, has_aux=True)(params)


def _close(a, b, tol=1e-5):
    (la, (pa, sa)), ga = a
    (lb, (pb, sb)), gb = b
    np.testing.assert_allclose(la, lb, atol=tol, rtol=tol)
    np.testing.assert_allclose(pa, pb, atol=tol, rtol=tol)
    np.testing.assert_allclose(sa, sb, atol=tol, rtol=tol)
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), ga, gb))
    scale = max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(gb))
    assert max(diffs) <= tol * max(scale, 1.0), (max(diffs), scale)


def test_chunks_round_trip():
    x = np.arange(24).reshape(12, 2)
    c = to_chunks(jnp.asarray(x), 3)
    assert c.shape == (3, 4, 2)
    np.testing.assert_array_equal(c[1], x[1::3])
    np.testing.assert_array_equal(from_chunks(c), x)


@pytest.mark.parametrize("chunk", [1, 2, 4, 8])
def test_equals_plain_gradients_without_dropout(tiny_bert_dir, chunk):
    graphdef, params, rest = _model(tiny_bert_dir, dropout=False)
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    key = jax.random.key(0)
    cached = jax.jit(lambda p: cached_loss_and_grad(graphdef, p, rest, key, batch, TAU, chunk))(params)
    _close(cached, jax.jit(lambda p: _plain(graphdef, p, rest, batch))(params))


def test_dropout_is_reproduced_in_the_second_pass(tiny_bert_dir):
    """With dropout on, the cached gradient equals autodiff through the same chunked, same-key forward."""
    graphdef, params, rest = _model(tiny_bert_dir, dropout=True)
    batch = {k: jnp.asarray(v) for k, v in _batch(seed=3).items()}
    key, n = jax.random.key(7), 2  # 2 chunks of 4 queries: the fewest that cross a chunk boundary

    def chunked_loss(p):
        def encode(prefix, offset):
            outs = []
            for c in range(n):
                model = nnx.merge(graphdef, p, rest, copy=True)
                nnx.reseed(model, dropout=jax.random.fold_in(key, offset + c))
                outs.append(
                    model(
                        to_chunks(batch[f"{prefix}_input_ids"], n)[c],
                        to_chunks(batch[f"{prefix}_attention_mask"], n)[c],
                    )
                )
            return from_chunks(jnp.stack(outs))

        loss, per, pos = contrastive_loss(encode("query", 0), encode("passage", n), TAU, batch["weight"])
        return loss, (per, pos)

    want = jax.jit(lambda p: jax.value_and_grad(chunked_loss, has_aux=True)(p))(params)
    cached = jax.jit(lambda p, k: cached_loss_and_grad(graphdef, p, rest, k, batch, TAU, 8 // n))
    got = cached(params, key)
    _close(got, want)
    # and dropout really is on: a different key gives a different loss
    other = cached(params, jax.random.key(8))
    assert abs(float(other[0][0]) - float(got[0][0])) > 1e-4


def test_sharded_on_eight_devices_equals_one_device_plain(tiny_bert_dir, mesh1, mesh8):
    graphdef, params, rest = _model(tiny_bert_dir, dropout=False)
    batch = _batch(b=16, seed=5)
    want = jax.jit(lambda p, b: _plain(graphdef, p, rest, b))(
        jax.device_put(params, replicated(mesh1)), jax.device_put(batch, batch_sharding(mesh1))
    )
    key = jax.random.key(0)
    got = jax.jit(lambda p, b: cached_loss_and_grad(graphdef, p, rest, key, b, TAU, 8))(
        jax.device_put(params, replicated(mesh8)), jax.device_put(batch, batch_sharding(mesh8))
    )
    _close(got, want)


def test_chunk_must_divide_the_batch(tiny_bert_dir):
    graphdef, params, rest = _model(tiny_bert_dir, dropout=False)
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    with pytest.raises(ValueError, match="does not divide"):
        cached_loss_and_grad(graphdef, params, rest, jax.random.key(0), batch, TAU, 3)


def _steps(tiny_bert_dir, mesh, chunk, steps=3, rules=()):
    """``steps`` train steps with DP's in-step score update; dropout off so the two step kinds can agree.
    ``rules``: partition rules for the state (default: replicated; ``FSDP_RULES`` splits it)."""
    from opera_jax.methods.dynamic import DPState, update
    from opera_jax.sharding import put_global, tree_shardings
    from opera_jax.train.optim import make_optimizer
    from opera_jax.train.step import init_state, make_train_step

    graphdef, params, rest = _model(tiny_bert_dir, dropout=False)
    opt = make_optimizer(1e-3, 10, warmup_ratio=0.0)
    dp = DPState(scores=jnp.zeros(40, jnp.float32), losses=jnp.zeros(40, jnp.float32))
    state = init_state(params, opt, seed=0, method=dp)
    state = put_global(state, tree_shardings(state, mesh, rules))
    step = make_train_step(graphdef, rest, opt, TAU, update, grad_cache_chunk=chunk)
    losses = []
    for i in range(steps):
        batch = {
            **_batch(b=16, seed=i),
            "pair": np.arange(16, dtype=np.int32) + 2 * i,
            "query": np.arange(16, dtype=np.int32),
        }
        state, out = step(state, jax.device_put(batch, batch_sharding(mesh)))
        losses.append(np.asarray(out["per_example_loss"]))
    return np.array(losses), np.asarray(state.method.scores), [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_cached_step_with_dp_on_eight_devices_equals_plain_step(tiny_bert_dir, mesh1, mesh8):
    l1, s1, p1 = _steps(tiny_bert_dir, mesh1, chunk=None)
    l8, s8, p8 = _steps(tiny_bert_dir, mesh8, chunk=8)
    np.testing.assert_allclose(l8, l1, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(s8, s1, atol=1e-5)  # DP's scores, scattered from the step's pos_sim
    assert np.count_nonzero(s1) > 16
    assert max(np.abs(a - b).max() for a, b in zip(p1, p8)) <= 1e-5


def test_cached_step_with_fsdp_equals_plain_step(tiny_bert_dir, mesh1):
    l1, s1, p1 = _steps(tiny_bert_dir, mesh1, chunk=None)
    from opera_jax.sharding import FSDP_RULES, make_mesh

    l8, s8, p8 = _steps(tiny_bert_dir, make_mesh(fsdp=8), chunk=8, rules=FSDP_RULES)
    np.testing.assert_allclose(l8, l1, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(s8, s1, atol=1e-5)
    for a, b in zip(p8, p1):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_fsdp_parameters_stay_split_inside_the_chunk_loops(tmp_path):
    """No loop of the cached step carries a whole FSDP-split weight: left to itself, XLA hoists the
    loop-invariant all-gathers out of the chunk loops (a BERT of width 256 carried its full
    [256, 1024] and [1000, 256] weights through all four loops, as Qwen3-8B did its 30 GiB)."""
    import json
    import re

    from conftest import GOLDEN

    from opera_jax.models.bert import BertConfig, BertModel
    from opera_jax.models.encoder import Retriever
    from opera_jax.sharding import FSDP_RULES, make_mesh, tree_shardings
    from opera_jax.train.optim import make_optimizer
    from opera_jax.train.step import init_state, make_train_step

    hf = json.loads((GOLDEN / "tiny_bert" / "config.json").read_text())
    hf.update(hidden_size=256, intermediate_size=1024, num_attention_heads=8, vocab_size=1000)
    config = BertConfig.from_hf(hf, source="test")
    model = nnx.eval_shape(lambda: Retriever(BertModel(config, rngs=nnx.Rngs(0)), "mean", True))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = make_optimizer(1e-3, 10)
    state = jax.eval_shape(lambda p: init_state(p, opt, 0), params)
    mesh = make_mesh(fsdp=8)
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, tree_shardings(state, mesh, FSDP_RULES)
    )
    rows = batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rows) for k, v in train_step_batch(64, 2).items()}
    hlo = make_train_step(graphdef, rest, opt, TAU, grad_cache_chunk=16).lower(state, batch).compile().as_text()
    carries = [line.split(" while(")[0] for line in hlo.splitlines() if " while(" in line]
    carries = [c for c in carries if re.search(r"f32\[[0-9]+,", c)]  # not the dropout RNG's loops
    assert len(carries) == 4  # embed queries, embed passages, re-encode each
    whole = {f"[{','.join(map(str, x.shape))}]" for x in jax.tree.leaves(params) if x.ndim == 2}
    assert {"[256,1024]", "[1024,256]", "[1000,256]"} <= whole
    for carry in carries:
        assert not whole & set(re.findall(r"\[[0-9,]+\]", carry)), carry[:300]

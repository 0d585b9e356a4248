"""Memory options: remat policies per layer, bf16 parameters with f32 optimizer state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import GOLDEN
from flax import nnx
from test_train_step import _batch

from opera_jax.config import REMAT_POLICIES, load_config
from opera_jax.errors import InputError
from opera_jax.models import remat
from opera_jax.models.bert import Precision
from opera_jax.models.encoder import load_encoder
from opera_jax.train.optim import in_float32, make_optimizer
from opera_jax.train.step import init_state, make_train_step

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out: README "Tests"

MODELS = {"bert": GOLDEN / "tiny_bert", "qwen3": GOLDEN / "tiny_qwen3"}


def test_config_names_the_same_policies():
    assert REMAT_POLICIES == tuple(remat.POLICIES)


@pytest.mark.parametrize("name", MODELS)
def test_every_policy_gives_the_same_gradients(name):
    ids = jnp.asarray(_batch()["passage_input_ids"])
    mask = jnp.asarray(_batch()["passage_attention_mask"])

    def grads(policy):
        model = load_encoder(str(MODELS[name]), remat=policy).model
        loss = lambda m: jnp.sum(m(ids, mask) ** 3)
        return jax.tree.leaves(nnx.grad(loss)(model))

    want = grads(False)
    for policy in [True, *REMAT_POLICIES]:
        for a, b in zip(want, grads(policy)):
            np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_policies_reach_the_layers(name):
    ids, mask = jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), jnp.int32)

    def jaxpr(policy):
        model = load_encoder(str(MODELS[name]), remat=policy).model
        return str(jax.make_jaxpr(lambda m: nnx.grad(lambda m: jnp.sum(m(ids, mask)))(m))(model))

    layers = load_encoder(str(MODELS[name])).config.num_hidden_layers
    assert "remat" not in jaxpr("none") and "checkpoint" not in jaxpr("none")
    for policy, shown in [
        ("full", "policy=<function nothing_saveable"),
        ("dots_saveable", "policy=DotsSaveable(only_if_no_batch_dims=False)"),
        ("dots_with_no_batch_dims_saveable", "policy=DotsSaveable(only_if_no_batch_dims=True)"),
    ]:
        assert jaxpr(policy).count(shown) >= layers, policy  # one checkpoint per layer


def test_remat_in_config_and_overrides():
    assert load_config(None, ["model.remat=true"]).model.remat is True
    assert load_config(None, ["model.remat=false"]).model.remat is False
    assert load_config(None, ["model.remat=dots_saveable"]).model.remat == "dots_saveable"
    with pytest.raises(InputError, match="model.remat is 'dots'.*dots_saveable"):
        load_config(None, ["model.remat=dots"])
    with pytest.raises(InputError, match="boolean or a string"):
        load_config(None, ["model.remat=1"])
    with pytest.raises(InputError, match="not one of"):
        remat.policy_name("everything")


def test_bf16_parameters_get_f32_adam_moments():
    params = {"w": {"kernel": jnp.linspace(-1, 1, 12, dtype=jnp.bfloat16).reshape(3, 4)}}
    grads = {"w": {"kernel": jnp.full((3, 4), 1e-3, jnp.bfloat16)}}
    opt = make_optimizer(1e-2, 10, warmup_ratio=0.0)
    state = opt.init(params)
    adam = state.inner_state[1][0]
    assert adam.mu["w"]["kernel"].dtype == jnp.float32 and adam.nu["w"]["kernel"].dtype == jnp.float32
    updates, state = opt.update(grads, state, params)
    assert updates["w"]["kernel"].dtype == jnp.float32
    new = optax.apply_updates(params, updates)
    assert new["w"]["kernel"].dtype == jnp.bfloat16
    # the update is computed in f32 and rounded once: the f32 optimizer on f32 copies, then bf16
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), (params, grads))
    ref_opt = make_optimizer(1e-2, 10, warmup_ratio=0.0)
    ref_updates, _ = ref_opt.update(f32[1], ref_opt.init(f32[0]), f32[0])
    want = (f32[0]["w"]["kernel"] + ref_updates["w"]["kernel"]).astype(jnp.bfloat16)
    np.testing.assert_array_equal(new["w"]["kernel"], want)


def test_in_float32_is_a_no_op_for_f32():
    params = {"kernel": jnp.arange(6.0).reshape(2, 3)}
    grads = {"kernel": jnp.ones((2, 3))}
    a, b = optax.adam(0.1), in_float32(optax.adam(0.1))
    ua, _ = a.update(grads, a.init(params), params)
    ub, _ = b.update(grads, b.init(params), params)
    np.testing.assert_array_equal(ua["kernel"], ub["kernel"])


@pytest.mark.parametrize("name", MODELS)
def test_bf16_parameters_train(name, mesh8):
    from opera_jax.sharding import FSDP_RULES, batch_sharding, make_mesh, put_global, tree_shardings

    mesh = make_mesh(fsdp=8)
    model = load_encoder(str(MODELS[name]), precision=Precision(jnp.bfloat16, jnp.bfloat16)).model
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    opt = make_optimizer(1e-3, 10, warmup_ratio=0.0)
    state = init_state(params, opt, seed=0)
    state = put_global(state, tree_shardings(state, mesh, FSDP_RULES))
    step = make_train_step(graphdef, rest, opt, temperature=0.05)
    losses = []
    for i in range(3):
        state, out = step(state, jax.device_put(_batch(seed=i), batch_sharding(mesh)))
        losses.append(float(out["loss"]))
    assert np.isfinite(losses).all() and losses[0] != losses[-1]
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state.inner_state[1][0].mu))

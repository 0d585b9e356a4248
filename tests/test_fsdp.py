"""FSDP on 8 simulated devices: the partition rules' layouts, per-device bytes, and the same
training as one device, for tiny BERT and tiny Qwen3 on (data, fsdp) = (1, 8) and (2, 4)."""

import jax
import numpy as np
import pytest
from conftest import GOLDEN
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_train_step import _batch

from opera_jax.models.encoder import load_encoder
from opera_jax.sharding import FSDP, FSDP_RULES, batch_sharding, make_mesh, put_global, replicated, tree_shardings
from opera_jax.train.optim import make_optimizer
from opera_jax.train.step import init_state, make_train_step

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out: README "Tests"

MODELS = {"bert": GOLDEN / "tiny_bert", "qwen3": GOLDEN / "tiny_qwen3"}
MESHES = [(1, 8), (2, 4)]


def _mesh(data: int, fsdp: int):
    mesh = make_mesh(fsdp=fsdp)
    assert dict(mesh.shape) == {"data": data, "fsdp": fsdp}
    return mesh


# Adam turns a rounding-level gradient difference on a near-zero gradient into an update
# difference of up to the learning rate; tiny random Qwen3 has such gradients (8-device
# data parallelism differs from 1 device by 3e-5 at 1e-3), so it trains at 1e-4 here.
LEARNING_RATE = {"bert": 1e-3, "qwen3": 1e-4}


def _setup(name: str):
    model = load_encoder(str(MODELS[name]), overrides={"normalize": True}).model
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = make_optimizer(LEARNING_RATE[name], 10, warmup_ratio=0.0)
    return graphdef, rest, opt, init_state(params, opt, seed=0)


def _leaves(tree) -> dict[str, object]:
    return {jax.tree_util.keystr(path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _expected_spec(path: str, shape: tuple, fsdp: int) -> P:
    """What the rules should give: kernels and tables split by rows, else by columns, else replicated."""
    if path.endswith(("['kernel'].value", "['embedding'].value")):
        if shape[0] % fsdp == 0:
            return P(FSDP, None)
        if shape[1] % fsdp == 0:
            return P(None, FSDP)
    return P()


@pytest.mark.parametrize("data,fsdp", MESHES)
@pytest.mark.parametrize("name", MODELS)
def test_layouts_of_parameters_and_adam_moments(name, data, fsdp):
    mesh = _mesh(data, fsdp)
    _, _, _, state = _setup(name)
    shardings = tree_shardings(state, mesh, FSDP_RULES)
    params = _leaves(state.params)
    adam = state.opt_state.inner_state[1][
        0
    ]  # inject(chain(clip, adamw)) -> adamw = chain(scale_by_adam, ...) -> ScaleByAdamState
    moments = {"mu": _leaves(adam.mu), "nu": _leaves(adam.nu)}
    adam_sh = shardings.opt_state.inner_state[1][0]
    moment_sh = {"mu": _leaves(adam_sh.mu), "nu": _leaves(adam_sh.nu)}
    sharded = 0
    for path, x in _leaves(shardings.params).items():
        want = NamedSharding(mesh, _expected_spec(path, params[path].shape, fsdp))
        assert x.is_equivalent_to(want, params[path].ndim), (path, x.spec, want.spec)
        for m in ("mu", "nu"):  # each moment sits where its parameter sits, in f32
            assert moment_sh[m][path].is_equivalent_to(want, params[path].ndim), (m, path)
            assert moments[m][path].dtype == np.float32 and moments[m][path].shape == params[path].shape
        sharded += want.spec != P()
        if params[path].ndim == 1:  # biases and norm scales stay whole
            assert want.spec == P()
    assert sharded >= 6
    assert shardings.step.spec == P() and adam_sh.count.spec == P()
    if name == "qwen3":  # vocabulary 268: rows split over 4 devices, columns over 8
        spec = _leaves(shardings.params)["['backbone']['embed']['embedding'].value"].spec
        assert spec == (P(FSDP, None) if fsdp == 4 else P(None, FSDP))


def _device0_bytes(tree) -> int:
    device = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


@pytest.mark.parametrize("name", MODELS)
def test_per_device_parameter_bytes_about_one_eighth(name):
    _, _, _, state = _setup(name)
    replicated_state = put_global(state, tree_shardings(state, _mesh(8, 1), ()))
    fsdp_state = put_global(state, tree_shardings(state, _mesh(1, 8), FSDP_RULES))
    full = _device0_bytes(replicated_state.params)
    assert full == sum(x.nbytes for x in jax.tree.leaves(state.params))
    ratio = _device0_bytes(fsdp_state.params) / full
    opt_ratio = _device0_bytes(fsdp_state.opt_state) / _device0_bytes(replicated_state.opt_state)
    print(f"{name}: device-0 parameter bytes, FSDP 8 / replicated = {ratio:.4f}; optimizer state {opt_ratio:.4f}")
    # 1/8 plus the replicated biases and norm scales (a few % of these tiny models; ~0.01% of real ones)
    assert 1 / 8 <= ratio < 1 / 8 + 0.06
    assert 1 / 8 <= opt_ratio < 1 / 8 + 0.06


def _train(name: str, mesh, rules, steps: int = 3):
    graphdef, rest, opt, state = _setup(name)
    state = put_global(state, tree_shardings(state, mesh, rules))
    step = make_train_step(graphdef, rest, opt, temperature=0.05)
    losses = []
    for i in range(steps):
        state, out = step(state, jax.device_put(_batch(seed=i), batch_sharding(mesh)))
        losses.append(np.asarray(out["per_example_loss"]))
    return np.array(losses), state


@pytest.mark.parametrize("data,fsdp", MESHES)
@pytest.mark.parametrize("name", MODELS)
def test_fsdp_step_equals_one_device_step(name, data, fsdp, mesh1):
    mesh = _mesh(data, fsdp)
    want_losses, want = _train(name, mesh1, ())
    losses, got = _train(name, mesh, FSDP_RULES)
    np.testing.assert_allclose(losses, want_losses, atol=1e-5, rtol=1e-5)
    assert not np.allclose(losses[0], losses[-1])  # it trained
    want_params, got_params = _leaves(want.params), _leaves(got.params)
    assert max(np.abs(np.asarray(got_params[k]) - np.asarray(want_params[k])).max() for k in want_params) <= 1e-5
    # the updated state keeps its FSDP layout
    expected = tree_shardings(want, mesh, FSDP_RULES)
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(expected)):
        assert x.sharding.is_equivalent_to(s, x.ndim), (jax.tree_util.keystr(path), x.sharding.spec, s.spec)


def test_replicated_rules_replicate_everything(mesh8):
    _, _, _, state = _setup("bert")
    assert all(s.is_equivalent_to(replicated(mesh8), 2) for s in jax.tree.leaves(tree_shardings(state, mesh8)))

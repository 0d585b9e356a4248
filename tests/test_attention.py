"""models/attention.py: every implementation against an independent softmax reference (values and
the gradients of q, k, v and the projections' biases), padding on either side, fully padded rows,
grouped-query heads, causal masks; the choice by backend and dtype; no CPU package off the CPU."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opera_jax.errors import InputError
from opera_jax.models import attention
from opera_jax.models.bert import Precision

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out: README "Tests"


def reference(q, k, v, mask, causal, scale, qkv_bias):
    """Softmax attention written out in f32: repeated key/value heads, a boolean mask, ``jax.nn.softmax``."""
    if qkv_bias is not None:
        q, k, v = (x + b.reshape(x.shape[2:]) for x, b in zip((q, k, v), qkv_bias))
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    n = q.shape[1]
    allowed = (mask[:, None, None, :] > 0) & (jnp.tril(jnp.ones((n, n), bool)) if causal else True)
    logits = jnp.where(allowed, logits, -1e30)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def _operands(b, n, heads, kv, d, lengths, left, dtype=jnp.float32, biases=True, seed=0):
    keys = jax.random.split(jax.random.key(seed), 7)
    q = jax.random.normal(keys[0], (b, n, heads, d))
    k, v = (jax.random.normal(key, (b, n, kv, d)) for key in keys[1:3])
    qkv_bias = None
    if biases:
        qkv_bias = tuple(0.1 * jax.random.normal(key, (h * d,)) for key, h in zip(keys[3:6], (heads, kv, kv)))
    pos = np.arange(n)[None]
    lengths = np.asarray(lengths)[:, None]
    mask = (pos >= n - lengths) if left else (pos < lengths)
    g = jax.random.normal(keys[6], (b, n, heads, d))
    cast = lambda x: x.astype(dtype)
    return cast(q), cast(k), cast(v), jnp.asarray(mask, jnp.int32), qkv_bias, g


def _value_and_grads(fn, q, k, v, mask, qkv_bias, g):
    """The output on real query rows, and the gradients of q, k, v (and the biases) of
    ``sum(out * g)`` over them: padded rows' outputs are never read, and paths differ there."""
    real = mask[:, :, None, None].astype(jnp.float32)
    args = (q, k, v) + (tuple(qkv_bias) if qkv_bias is not None else ())

    def loss(*args):
        out = fn(*args[:3], mask, args[3:] or None)
        return jnp.sum(out.astype(jnp.float32) * g * real), out

    (_, out), grads = jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True)(*args)
    return [np.asarray(out.astype(jnp.float32) * real)] + [np.asarray(x, np.float32) for x in grads]


def _check(implementation, q, k, v, mask, qkv_bias, g, causal, tol):
    scale = q.shape[-1] ** -0.5
    got = _value_and_grads(
        lambda q, k, v, m, b: attention.attend(
            q, k, v, m, implementation=implementation, causal=causal, scale=scale, qkv_bias=b
        ),
        q,
        k,
        v,
        mask,
        qkv_bias,
        g,
    )
    want = _value_and_grads(lambda q, k, v, m, b: reference(q, k, v, m, causal, scale, b), q, k, v, mask, qkv_bias, g)
    names = ["out", "dq", "dk", "dv", "dbq", "dbk", "dbv"]
    for name, a, w in zip(names, got, want):
        assert np.all(np.isfinite(a)), name
        if name == "dbk":  # a key bias shifts each query's logits by one constant: its gradient is 0
            np.testing.assert_allclose(a, 0, atol=tol * float(np.abs(want[1]).max() + 1))
            continue
        np.testing.assert_allclose(a, w, atol=tol * float(np.abs(w).max() + 1e-6), rtol=tol, err_msg=name)


CASES = {  # name: (heads, kv heads, causal, left padding)
    "bert": (4, 4, False, False),
    "bert-left-padded": (4, 4, False, True),
    "qwen3-gqa-causal-left": (4, 2, True, True),
    "qwen3-gqa-causal-right": (4, 1, True, False),
}


@pytest.fixture
def cudnn_as_xla(monkeypatch):
    """The cudnn path's code on a machine without a GPU: the same ``jax.nn.dot_product_attention``
    call, its ``implementation`` "xla" (XLA's math). The cuDNN kernel itself: ``test_cudnn_on_gpu``."""
    monkeypatch.setattr(attention, "CUDNN_IMPLEMENTATION", "xla" if jax.default_backend() != "gpu" else "cudnn")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("implementation", ["xla", "cpu", "pallas"])
def test_implementation_matches_the_reference(implementation, case):
    heads, kv, causal, left = CASES[case]
    if implementation == "cpu" and (kv != heads or causal):
        pytest.skip("the CPU kernel takes multi-head, non-causal attention (others fall back to xla)")
    n = 128  # splash attention's block: a multiple of 128
    ops = _operands(2, n, heads, kv, 32, [n, 77], left)
    _check(implementation, *ops, causal=causal, tol=2e-5)


@pytest.mark.parametrize("case", [c for c in CASES if not CASES[c][3]])  # cuDNN reads the padding as lengths
def test_cudnn_path_matches_the_reference(cudnn_as_xla, case):
    heads, kv, causal, _ = CASES[case]
    ops = _operands(3, 40, heads, kv, 16, [40, 17, 1], False)
    _check("cudnn", *ops, causal=causal, tol=2e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in CASES if not CASES[c][3]])
def test_cudnn_on_gpu(case):
    heads, kv, causal, _ = CASES[case]
    ops = _operands(2, 256, heads, kv, 64, [256, 131], False, dtype=jnp.bfloat16, biases=False)
    _check("cudnn", *ops, causal=causal, tol=3e-2)


@pytest.mark.parametrize("implementation", ["xla", "cpu", "pallas"])
def test_a_fully_padded_sequence_stays_finite(implementation):
    """A batch row with no real token (the pipeline's padding rows): finite outputs and gradients."""
    q, k, v, mask, qkv_bias, g = _operands(2, 128, 2, 2, 16, [128, 0], False)

    def loss(q, k, v):
        out = attention.attend(q, k, v, mask, implementation=implementation, scale=0.25, qkv_bias=qkv_bias)
        return jnp.sum(out * g)

    value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert np.isfinite(float(value)) and all(np.all(np.isfinite(x)) for x in grads)


def test_xla_dropout_on_grouped_heads_matches_the_reference_with_the_same_mask():
    """Attention-probability dropout on the xla path, grouped-query heads: the keep-mask applied to
    the reference's probabilities gives the same values and gradients."""
    q, k, v, mask, _, g = _operands(2, 24, 4, 2, 8, [24, 10], True, biases=False)
    keep = jax.random.bernoulli(jax.random.key(3), 0.8, (2, 4, 24, 24))

    def ref(q, k, v):
        kr, vr = (jnp.repeat(x, 2, axis=2) for x in (k, v))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, kr) * 0.5
        allowed = (mask[:, None, None, :] > 0) & jnp.tril(jnp.ones((24, 24), bool))
        p = jax.nn.softmax(jnp.where(allowed, logits, -1e30), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", jnp.where(keep, p / 0.8, 0.0), vr)

    got = lambda q, k, v: attention.attend(
        q, k, v, mask, implementation="xla", causal=True, scale=0.5, keep=keep, rate=0.2
    )
    real = mask[:, :, None, None]
    a = jax.value_and_grad(lambda *x: jnp.sum(got(*x) * g * real), argnums=(0, 1, 2))(q, k, v)
    b = jax.value_and_grad(lambda *x: jnp.sum(ref(*x) * g * real), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
    for x, y in zip(a[1], b[1]):
        np.testing.assert_allclose(x, y, atol=1e-5 * float(np.abs(y).max()))


def test_auto_picks_by_backend_and_dtype():
    assert attention.resolve("auto", jnp.float32, "cpu") == "cpu"
    assert attention.resolve("auto", jnp.bfloat16, "cpu") == "xla"
    assert attention.resolve("auto", jnp.bfloat16, "gpu") == "cudnn"
    assert attention.resolve("auto", jnp.float16, "gpu") == "cudnn"
    assert attention.resolve("auto", jnp.float32, "gpu") == "xla"  # cuDNN's flash attention is bf16/fp16
    assert attention.resolve("auto", jnp.bfloat16, "tpu") == "pallas"
    assert attention.resolve("pallas", jnp.float32, "cpu") == "pallas"  # interpret mode
    for name, dtype, backend in [
        ("cudnn", jnp.bfloat16, "cpu"),
        ("cudnn", jnp.float32, "gpu"),
        ("cpu", jnp.float32, "gpu"),
        ("flash", jnp.float32, "cpu"),
    ]:
        with pytest.raises(InputError, match="model.attention"):
            attention.resolve(name, dtype, backend)
    assert attention.takes_dropout("xla") and attention.takes_dropout("cpu")
    assert not attention.takes_dropout("cudnn") and not attention.takes_dropout("pallas")


def test_dtype_auto_is_bf16_on_accelerators_with_f32_master_weights():
    for backend in ("gpu", "tpu"):
        p = Precision.named("auto", "float32", backend)
        assert (p.dtype, p.param_dtype) == (jnp.bfloat16, jnp.float32)
    assert Precision.named("auto", backend="cpu").dtype == jnp.float32
    assert Precision.named("bfloat16", backend="cpu").dtype == jnp.bfloat16


def test_cudnn_makes_the_encoder_pad_on_the_right(tiny_bert_dir, monkeypatch):
    from opera_jax.models.encoder import load_encoder

    monkeypatch.setattr(attention, "resolve", lambda name, dtype, backend=None: "cudnn")
    encoder = load_encoder(str(tiny_bert_dir), overrides={"padding_side": "left"})
    assert encoder.spec.padding_side == "right"


ACCELERATOR_PATH = """
import sys, jax
import jax.numpy as jnp
jax.default_backend = lambda: "gpu"  # trace as a GPU host would (the arrays still live on the CPU)
from opera_jax.models import attention
attention.CUDNN_IMPLEMENTATION = "xla"
from opera_jax.models.bert import Precision
from opera_jax.models.encoder import load_encoder
from opera_jax.train.step import init_state, make_train_step
from opera_jax.train.optim import make_optimizer
from flax import nnx
import numpy as np
enc = load_encoder(sys.argv[1], precision=Precision.named("auto"))
model = enc.model
model.train()
graphdef, params, rest = nnx.split(model, nnx.Param, ...)
opt = make_optimizer(1e-4, 10)
state = init_state(params, opt, 0)
ids = np.ones((4, 16), np.int32); mask = np.ones((4, 16), np.int32); mask[1, 9:] = 0
batch = {"query_input_ids": ids, "query_attention_mask": mask, "passage_input_ids": np.tile(ids, (2, 1)),
         "passage_attention_mask": np.tile(mask, (2, 1)), "pair": np.arange(4, dtype=np.int32),
         "query": np.arange(4, dtype=np.int32), "weight": np.ones(4, np.float32)}
step = make_train_step(graphdef, rest, opt, 0.05)
text = step.lower(state, batch).as_text()
assert "bf16" in text and "@opera_" not in text, "CPU kernels on a GPU path"
state, out = step(state, batch)
assert bool(out["finite"])
loaded = sorted(m for m in sys.modules if m.startswith("opera_jax.cpu"))
print("cpu modules:", loaded)
sys.exit(1 if loaded else 0)
"""


def test_an_accelerator_path_imports_nothing_of_the_cpu_package(tiny_bert_dir):
    """The model, the step and a training update traced as on a GPU host (bf16 by default, cuDNN's
    call): no module of ``opera_jax.cpu`` is imported, no CPU kernel is in the program."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(
        [sys.executable, "-c", ACCELERATOR_PATH, str(tiny_bert_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "cpu modules: []" in run.stdout


@pytest.mark.parametrize("kv", [4, 2])
def test_pallas_under_the_step_mesh_runs_per_device_and_equals_one_device(kv):
    """Under the train step's mesh each device runs splash attention on its own sequences (no gather
    of the batch); values and gradients equal the unsharded call."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from opera_jax.sharding import BATCH_AXES, make_mesh

    mesh = make_mesh()
    q, k, v, mask, _, g = _operands(
        mesh.size, 128, 4, kv, 16, list(range(128, 0, -128 // mesh.size)), False, biases=False
    )

    def value_and_grads(q, k, v, mask, g):
        fn = lambda q, k, v: attention.attend(q, k, v, mask, implementation="pallas", causal=kv != 4, scale=0.25)
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(g))

    want = jax.jit(value_and_grads)(q, k, v, mask, g)
    args = jax.device_put((q, k, v, mask, g), NamedSharding(mesh, P(BATCH_AXES)))
    with jax.set_mesh(mesh):
        text = jax.jit(value_and_grads).lower(*args).compile().as_text()
        got = jax.jit(value_and_grads)(*args)
    for a, w in zip(got, want):
        np.testing.assert_allclose(a, w, atol=1e-5, rtol=1e-5)
    assert "all-gather" not in text

"""The NNX Qwen3 embedder against transformers + PyTorch goldens (made by golden/make_goldens.py)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GOLDEN
from flax import nnx
from safetensors.numpy import load_file, save_file

from opera_jax.data.tokens import tokenize
from opera_jax.errors import InputError
from opera_jax.models import qwen3_params
from opera_jax.models.bert import Precision
from opera_jax.models.encoder import load_encoder
from opera_jax.models.export import export_encoder
from opera_jax.models.qwen3 import Qwen3Config
from opera_jax.models.weights import hf_state_dict

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out: README "Tests"

TOL = 1e-5
TINY = GOLDEN / "tiny_qwen3"
PROMPT = "Instruct: find the passage\nQuery:"


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN / "tiny_qwen3.npz")


@pytest.fixture(scope="module")
def tiny():
    return load_encoder(str(TINY))


def _copy_model(dst):
    shutil.copytree(TINY, dst)
    return dst


def _embed(model, ids, mask):
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))


def _hidden_diff(hidden, want, mask):
    """Max abs difference over real (non-padded) positions."""
    return np.abs(np.where(np.asarray(mask)[..., None] > 0, hidden - want, 0)).max()


def _batch(encoder, texts, padding_side, prefix=""):
    tokens = tokenize(encoder.tokenizer, texts, encoder.spec.max_seq_length, prefix, use_cache=False)
    return tokens.batch(np.arange(len(tokens)), int(tokens.lengths.max()), padding_side)


# --- parity with transformers ---------------------------------------------------------------


def test_hidden_states_and_embeddings_match_transformers(tiny, golden):
    ids, mask = golden["input_ids"], golden["attention_mask"]
    assert (mask[:, 0] == 0).any(), "the golden batch must include left padding"
    hidden = np.asarray(tiny.model.backbone(jnp.asarray(ids), jnp.asarray(mask)))
    assert _hidden_diff(hidden, golden["hidden"], mask) <= TOL
    assert np.abs(_embed(tiny.model, ids, mask) - golden["embeddings"]).max() <= TOL


def test_spec_and_architecture_from_the_model_files(tiny):
    assert tiny.architecture == "qwen3"
    assert tiny.spec.pooling == "last" and tiny.spec.normalize and tiny.spec.padding_side == "left"
    assert (tiny.spec.query_prefix, tiny.spec.passage_prefix) == (PROMPT, "")
    assert tiny.spec.max_seq_length == 64
    c = tiny.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rope_theta) == (4, 2, 32, 1e6)


def test_tokenisation_appends_endoftext_and_pads_left(tiny, golden):
    """Our tokenise + left-padded batch gives the golden (transformers-padded) ids and mask."""
    texts = [str(t) for t in golden["texts"]]
    ids, mask = _batch(tiny, texts, "left")
    np.testing.assert_array_equal(ids, golden["input_ids"])
    np.testing.assert_array_equal(mask, golden["attention_mask"])
    eot = tiny.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert (ids[:, -1] == eot).all() and tiny.tokenizer.pad_token_id == eot


def test_query_prompt_is_prepended(tiny, golden):
    ids, _ = _batch(tiny, ["what is the boundary layer?"], "left", tiny.spec.query_prefix)
    np.testing.assert_array_equal(ids[0], golden["input_ids"][0])  # text 0 of the goldens carries the prompt


# --- padding and masking ---------------------------------------------------------------------


def test_left_or_right_padding_gives_the_unpadded_embedding(tiny, golden):
    """Positions are 0..L-1 whatever the padding; RoPE is relative, so padding changes only rounding."""
    texts = [str(t) for t in golden["texts"]]
    alone = np.concatenate([_embed(tiny.model, *_batch(tiny, [t], "left")) for t in texts])
    for side in ("left", "right"):
        ids, mask = _batch(tiny, texts, side)
        assert (mask == 0).any()
        assert np.abs(_embed(tiny.model, ids, mask) - alone).max() <= TOL


def test_attention_is_causal(tiny, golden):
    ids, mask = golden["input_ids"][:1], golden["attention_mask"][:1]
    changed = ids.copy()
    changed[0, -3:] = (changed[0, -3:] + 7) % tiny.config.vocab_size
    before = np.asarray(tiny.model.backbone(jnp.asarray(ids), jnp.asarray(mask)))
    after = np.asarray(tiny.model.backbone(jnp.asarray(changed), jnp.asarray(mask)))
    np.testing.assert_allclose(after[:, :-3], before[:, :-3], atol=1e-6)
    assert np.abs(after[:, -1] - before[:, -1]).max() > 1e-3


def test_padded_keys_are_ignored(tiny, golden):
    """What sits under the padding (any token id) does not change the real positions."""
    ids, mask = golden["input_ids"], golden["attention_mask"]
    scrambled = np.where(mask > 0, ids, (np.arange(ids.size).reshape(ids.shape) * 31) % tiny.config.vocab_size)
    np.testing.assert_allclose(_embed(tiny.model, scrambled, mask), _embed(tiny.model, ids, mask), atol=1e-6)


# --- weights: sharded files, name map ---------------------------------------------------------


def test_sharded_checkpoint_loads_identically(tiny, golden, tmp_path):
    model_dir = _copy_model(tmp_path / "sharded")
    tensors = load_file(str(model_dir / "model.safetensors"))
    (model_dir / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for s in range(3):
        file = f"model-{s + 1:05d}-of-00003.safetensors"
        save_file({k: tensors[k] for k in names[s::3]}, str(model_dir / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in names[s::3]})
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    ids, mask = golden["input_ids"], golden["attention_mask"]
    np.testing.assert_array_equal(_embed(load_encoder(str(model_dir)).model, ids, mask), _embed(tiny.model, ids, mask))


def test_name_map_covers_every_tensor(tiny):
    """Every checkpoint tensor maps to a parameter (lm_head aside), and back to the same name and value."""
    original = load_file(str(TINY / "model.safetensors"))
    ignored = sorted(k for k in original if qwen3_params.NAME_MAP.is_ignored(k))
    assert ignored == ["lm_head.weight"]
    assert all(qwen3_params.NAME_MAP.to_ours(k) is not None for k in original if k not in ignored)
    exported = hf_state_dict(tiny.model.backbone, qwen3_params.NAME_MAP)
    expected = {qwen3_params.NAME_MAP.canonical(k): v for k, v in original.items() if k not in ignored}
    assert set(exported) == set(expected)  # "model." prefix stripped: transformers' Qwen3Model names
    for k, v in expected.items():
        np.testing.assert_array_equal(exported[k], v)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.pop("model.layers.2.self_attn.k_norm.weight"), "lacks 1 parameter"),
        (lambda t: t.pop("model.norm.weight"), "lacks 1 parameter"),
        (lambda t: t.__setitem__("model.layers.0.self_attn.surprise.weight", np.zeros(2, np.float32)), "surprise"),
        (
            lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", np.zeros(128, np.float32)),
            "which the model lacks",
        ),
        (lambda t: t.__setitem__("model.layers.1.mlp.up_proj.weight", np.zeros((64, 128), np.float32)), "shape"),
    ],
    ids=["missing-layer-tensor", "missing-final-norm", "unexpected", "bias-without-attention_bias", "transposed"],
)
def test_bad_checkpoints_fail_clearly(tmp_path, mutate, message):
    model_dir = _copy_model(tmp_path / "bad")
    tensors = load_file(str(model_dir / "model.safetensors"))
    mutate(tensors)
    save_file(tensors, str(model_dir / "model.safetensors"))
    with pytest.raises(InputError, match=message):
        load_encoder(str(model_dir))


def test_attention_bias_flag(tiny, golden, tmp_path):
    """attention_bias: true adds q/k/v/o biases, loaded from the checkpoint like any tensor."""
    model_dir = _copy_model(tmp_path / "bias")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(InputError, match="lacks 12 parameter"):
        load_encoder(str(model_dir))
    tensors = load_file(str(model_dir / "model.safetensors"))
    rng = np.random.default_rng(0)
    widths = {"q": 128, "k": 64, "v": 64, "o": 64}
    for i in range(3):
        for p, n in widths.items():
            tensors[f"model.layers.{i}.self_attn.{p}_proj.bias"] = rng.normal(0, 0.1, n).astype(np.float32)
    save_file(tensors, str(model_dir / "model.safetensors"))
    biased = load_encoder(str(model_dir))
    assert biased.config.attention_bias
    ids, mask = golden["input_ids"], golden["attention_mask"]
    assert np.abs(_embed(biased.model, ids, mask) - _embed(tiny.model, ids, mask)).max() > 1e-3
    exported = hf_state_dict(biased.model.backbone, qwen3_params.NAME_MAP)
    np.testing.assert_array_equal(
        exported["layers.2.self_attn.o_proj.bias"], tensors["model.layers.2.self_attn.o_proj.bias"]
    )


# --- config.json -----------------------------------------------------------------------------


def _hf_config():
    return json.loads((TINY / "config.json").read_text())


def test_transformers_4_config_layout_is_read():
    """Qwen3-Embedding's own config.json (transformers 4.51): rope_theta at the top, rope_scaling null."""
    hf = {k: v for k, v in _hf_config().items() if k not in ("rope_parameters", "layer_types")}
    hf.update(rope_theta=1000000, rope_scaling=None, sliding_window=None, use_sliding_window=False)
    assert Qwen3Config.from_hf(hf) == Qwen3Config.from_hf(_hf_config())
    no_head_dim = {k: v for k, v in hf.items() if k not in ("head_dim", "num_key_value_heads")}
    c = Qwen3Config.from_hf(no_head_dim)
    assert (c.head_dim, c.num_key_value_heads) == (16, 4)  # hidden / heads; plain multi-head attention


def test_to_hf_reads_back():
    c = Qwen3Config.from_hf(_hf_config())
    assert Qwen3Config.from_hf(c.to_hf()) == c


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_type 'yarn'"),
        ({"use_sliding_window": True}, "sliding-window"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"hidden_act": "gelu"}, "silu"),
        ({"model_type": "qwen2"}, "not a Qwen3"),
    ],
)
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(InputError, match=message):
        Qwen3Config.from_hf({**_hf_config(), **change})


# --- precision and remat ---------------------------------------------------------------------


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_bf16_runs_close_to_f32(golden, param_dtype):
    enc = load_encoder(str(TINY), precision=Precision(dtype=jnp.bfloat16, param_dtype=param_dtype))
    ids, mask = golden["input_ids"], golden["attention_mask"]
    hidden = enc.model.backbone(jnp.asarray(ids), jnp.asarray(mask))
    assert hidden.dtype == jnp.bfloat16
    emb = _embed(enc.model, ids, mask)
    assert emb.dtype == np.float32 and np.isfinite(emb).all()
    assert np.abs(emb - golden["embeddings"]).max() <= 0.05


def test_remat_gives_the_same_gradients(golden):
    ids, mask = jnp.asarray(golden["input_ids"]), jnp.asarray(golden["attention_mask"])

    def grads(remat):
        model = load_encoder(str(TINY), remat=remat).model
        loss = lambda m: jnp.sum(m(ids, mask) @ jnp.arange(64, dtype=jnp.float32))
        return jax.tree.leaves(nnx.grad(loss)(model))

    for a, b in zip(grads(False), grads(True)):
        np.testing.assert_allclose(a, b, atol=1e-6)


# --- export round trip -----------------------------------------------------------------------


def _finetuned(model, seed=0, scale=0.05):
    """A copy of ``model`` with seeded noise added to every parameter, as finetuning would change them."""
    model = nnx.clone(model)
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(
        model,
        jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]),
    )
    return model


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    tuned = _finetuned(tiny.model)
    return tuned, export_encoder(tiny, tmp_path_factory.mktemp("qwen3") / "export", model=tuned)


def test_export_reloads_identically(tiny, golden, exported):
    tuned, out = exported
    back = load_encoder(str(out))
    assert back.architecture == "qwen3" and back.config == tiny.config and back.spec == tiny.spec
    texts = [str(t) for t in golden["texts"]]
    ids, mask = _batch(tiny, texts, "left", PROMPT)
    np.testing.assert_array_equal((ids, mask), _batch(back, texts, "left", back.spec.query_prefix))
    want = _embed(tuned, ids, mask)
    assert np.abs(want - _embed(tiny.model, ids, mask)).max() > 1e-2  # the noise did change the model
    np.testing.assert_array_equal(_embed(back.model, ids, mask), want)


def test_export_files_declare_qwen3_embedding(exported):
    _, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3Model"]
    assert json.loads((out / "tokenizer_config.json").read_text())["padding_side"] == "left"
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_lasttoken"] and not pooling["pooling_mode_mean_tokens"]
    assert pooling["word_embedding_dimension"] == 64
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    st = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st["prompts"] == {"query": PROMPT, "document": ""}
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))


def test_transformers_loads_the_export(tiny, golden, exported):
    torch = pytest.importorskip("torch")
    from transformers import AutoModel

    tuned, out = exported
    model, info = AutoModel.from_pretrained(str(out), output_loading_info=True, attn_implementation="eager")
    assert type(model).__name__ == "Qwen3Model"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask = golden["input_ids"], golden["attention_mask"]
    with torch.no_grad():
        theirs = model.eval()(
            input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask)
        ).last_hidden_state.numpy()
    ours = np.asarray(tuned.backbone(jnp.asarray(ids), jnp.asarray(mask)))
    assert _hidden_diff(ours, theirs, mask) <= TOL
    pooled = theirs[:, -1] / np.linalg.norm(theirs[:, -1], axis=-1, keepdims=True)  # left padded: last is real
    assert np.abs(_embed(tuned, ids, mask) - pooled).max() <= TOL

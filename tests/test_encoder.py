"""The NNX BERT encoder against transformers + PyTorch goldens (made by golden/make_goldens.py)."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GOLDEN
from safetensors.numpy import load_file, save_file

from opera_jax.data.tokens import tokenize
from opera_jax.errors import InputError
from opera_jax.models import bert, bert_params
from opera_jax.models.encoder import load_encoder, pool, read_spec
from opera_jax.models.hub import resolve_model_dir
from opera_jax.models.weights import hf_state_dict

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out: README "Tests"

TOL = 1e-5


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return load_encoder(str(minilm_dir))


def test_minilm_matches_transformers(minilm):
    g = np.load(GOLDEN / "minilm.npz")
    assert minilm.spec.pooling == "mean" and minilm.spec.normalize and minilm.spec.max_seq_length == 256
    emb = np.asarray(minilm.model(jnp.asarray(g["input_ids"]), jnp.asarray(g["attention_mask"])))
    assert np.abs(emb - g["embeddings"]).max() <= TOL


def test_minilm_tokenisation_matches_transformers(minilm):
    g = np.load(GOLDEN / "minilm.npz")
    tokens = tokenize(minilm.tokenizer, [str(s) for s in g["sentences"]], 256, use_cache=False)
    ids, mask = tokens.batch(np.arange(len(tokens)), g["input_ids"].shape[1])
    np.testing.assert_array_equal(ids, g["input_ids"])
    np.testing.assert_array_equal(mask, g["attention_mask"])


def test_bundled_minilm_resolves_by_hub_id(minilm_dir):
    assert resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2") == minilm_dir


def test_tiny_bert_hidden_states_and_cls(tiny_bert_dir):
    g = np.load(GOLDEN / "tiny_bert.npz")
    enc = load_encoder(str(tiny_bert_dir))
    assert enc.spec.pooling == "cls" and not enc.spec.normalize and enc.spec.max_seq_length == 32
    ids, mask = jnp.asarray(g["input_ids"]), jnp.asarray(g["attention_mask"])
    hidden = np.asarray(enc.model.backbone(ids, mask))
    valid = g["attention_mask"][..., None] > 0
    assert np.abs(np.where(valid, hidden - g["hidden"], 0)).max() <= TOL
    assert np.abs(np.asarray(enc.model(ids, mask)) - g["cls"]).max() <= TOL


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_identically(tiny_bert_dir, tmp_path):
    model_dir = _copy_model(tiny_bert_dir, tmp_path / "sharded")
    tensors = load_file(str(model_dir / "model.safetensors"))
    (model_dir / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(model_dir / file))
        weight_map.update({k: file for k in keys})
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    g = np.load(GOLDEN / "tiny_bert.npz")
    enc = load_encoder(str(model_dir))
    emb = np.asarray(enc.model(jnp.asarray(g["input_ids"]), jnp.asarray(g["attention_mask"])))
    assert np.abs(emb - g["cls"]).max() <= TOL


def test_prefixed_and_legacy_names_load(tiny_bert_dir, tmp_path):
    """ "bert." prefixes (BertForMaskedLM checkpoints) and gamma/beta LayerNorm names."""
    model_dir = _copy_model(tiny_bert_dir, tmp_path / "legacy")
    tensors = load_file(str(model_dir / "model.safetensors"))
    renamed = {
        "bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in tensors.items()
    }
    renamed["cls.predictions.bias"] = np.zeros(3, np.float32)  # a task head: ignored
    save_file(renamed, str(model_dir / "model.safetensors"))
    g = np.load(GOLDEN / "tiny_bert.npz")
    emb = np.asarray(load_encoder(str(model_dir)).model(jnp.asarray(g["input_ids"]), jnp.asarray(g["attention_mask"])))
    assert np.abs(emb - g["cls"]).max() <= TOL


def test_name_map_round_trip(tiny_bert_dir):
    """Export names are exactly the checkpoint's names (pooler aside), with identical values."""
    enc = load_encoder(str(tiny_bert_dir))
    exported = hf_state_dict(enc.model.backbone, bert_params.NAME_MAP)
    original = {
        k: v
        for k, v in load_file(str(tiny_bert_dir / "model.safetensors")).items()
        if not bert_params.NAME_MAP.is_ignored(k)
    }
    assert set(exported) == set(original)
    for k in original:
        np.testing.assert_array_equal(exported[k], original[k])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.pop("encoder.layer.1.output.dense.bias"), "lacks 1 parameter"),
        (lambda t: t.__setitem__("encoder.layer.0.surprise.weight", np.zeros(2, np.float32)), "surprise"),
        (lambda t: t.__setitem__("embeddings.LayerNorm.bias", np.zeros(7, np.float32)), "shape"),
    ],
)
def test_bad_checkpoints_fail_clearly(tiny_bert_dir, tmp_path, mutate, message):
    model_dir = _copy_model(tiny_bert_dir, tmp_path / "bad")
    tensors = load_file(str(model_dir / "model.safetensors"))
    mutate(tensors)
    save_file(tensors, str(model_dir / "model.safetensors"))
    with pytest.raises(InputError, match=message):
        load_encoder(str(model_dir))


def test_pickle_checkpoints_are_refused(tiny_bert_dir, tmp_path):
    model_dir = _copy_model(tiny_bert_dir, tmp_path / "pickle")
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    with pytest.raises(InputError, match="pickle checkpoints are not loaded"):
        load_encoder(str(model_dir))


def test_missing_model_and_offline_hub_errors(tmp_path):
    with pytest.raises(InputError, match="no such directory"):
        resolve_model_dir(str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="not a model directory"):
        resolve_model_dir(str(tmp_path))
    with pytest.raises(InputError, match="cannot be reached|cannot be fetched"):
        resolve_model_dir("BAAI/bge-small-en-v1.5-not-cached")


def test_spec_overrides_and_prompts(tiny_bert_dir, tmp_path):
    model_dir = _copy_model(tiny_bert_dir, tmp_path / "prompts")
    (model_dir / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "query: ", "document": "passage: "}})
    )
    spec = read_spec(model_dir, 64)
    assert (spec.query_prefix, spec.passage_prefix) == ("query: ", "passage: ")
    enc = load_encoder(str(model_dir), overrides={"pooling": "mean", "normalize": True})
    assert enc.spec.pooling == "mean" and enc.model.normalize
    with pytest.raises(InputError, match="pooling"):
        load_encoder(str(model_dir), overrides={"pooling": "max"})


def test_pooling_handles_either_padding_side():
    h = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    right = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = jnp.array([[0, 1, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(pool(h, right, "cls"), h[:, 0])
    np.testing.assert_array_equal(pool(h, left, "cls"), jnp.stack([h[0, 1], h[1, 2]]))
    np.testing.assert_array_equal(pool(h, right, "last"), jnp.stack([h[0, 2], h[1, 1]]))
    np.testing.assert_array_equal(pool(h, left, "last"), h[:, 3])
    np.testing.assert_allclose(pool(h, right, "mean"), jnp.stack([h[0, :3].mean(0), h[1, :2].mean(0)]))


def test_unknown_sentence_transformers_module_is_refused(tiny_bert_dir, tmp_path):
    """A Dense layer after pooling changes the embeddings: loading without it would be silently wrong."""
    model_dir = _copy_model(tiny_bert_dir, tmp_path / "dense")
    modules = json.loads((model_dir / "modules.json").read_text())
    modules.append({"idx": len(modules), "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (model_dir / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(
        InputError,
        match=r"modules.json: module '2' has type 'sentence_transformers.models.Dense'.*"
        r"supported: Transformer, Pooling, Normalize",
    ):
        load_encoder(str(model_dir))
    assert read_spec(tiny_bert_dir, 64).pooling  # the golden's own modules are all supported


def test_loading_leaves_nothing_abstract_and_seeds_dropout(tiny_bert_dir, monkeypatch):
    """The model is built from shapes alone (no initialiser runs): every parameter comes from the
    checkpoint, every dropout stream from the seed; state of another kind is refused, not left abstract."""
    import dataclasses

    import jax
    from flax import nnx

    from opera_jax.models import encoder as enc_mod

    enc = load_encoder(str(tiny_bert_dir), seed=3)
    leaves = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(enc.model))]
    assert leaves and not any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)

    def keys(seed):
        state = nnx.state(load_encoder(str(tiny_bert_dir), seed=seed).model, nnx.RngKey)
        return np.stack([np.asarray(jax.random.key_data(v.get_value())) for _, v in nnx.to_flat_state(state)])

    assert (keys(3) == keys(3)).all() and not (keys(3) == keys(4)).any()

    class WithACounter(bert.BertModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.calls = nnx.Variable(jnp.zeros((), jnp.int32))

    arch = enc_mod.ARCHITECTURES["bert"]
    monkeypatch.setitem(enc_mod.ARCHITECTURES, "bert", dataclasses.replace(arch, model_cls=WithACounter))
    with pytest.raises(TypeError, match="calls"):
        load_encoder(str(tiny_bert_dir))

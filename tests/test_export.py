"""Exported retrievers reload identically with load_encoder and with transformers + PyTorch."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GOLDEN
from flax import nnx

from opera_jax.data.tokens import tokenize
from opera_jax.models import export
from opera_jax.models.encoder import load_encoder
from opera_jax.models.export import export_encoder

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out: README "Tests"

TEXTS = ["tiny bert", "a longer input with more characters in it", "x", "what is 2+2?"]

SPECS = {
    "default": {},
    "mean-normalized-prompts": {"pooling": "mean", "normalize": True, "query_prefix": "q: ", "passage_prefix": "p: "},
    "last-left-padded": {"pooling": "last", "padding_side": "left", "max_seq_length": 24},
}


def _finetuned(model, seed=0, scale=0.05):
    """A copy of ``model`` with seeded noise added to every parameter, as finetuning would change them."""
    model = nnx.clone(model)
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    return model


def _batch(encoder, texts, prefix=""):
    tokens = tokenize(encoder.tokenizer, texts, encoder.spec.max_seq_length, prefix, use_cache=False)
    return tokens.batch(np.arange(len(tokens)), int(tokens.lengths.max()), encoder.spec.padding_side)


def _embed(model, ids, mask):
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))


@pytest.mark.parametrize("overrides", SPECS.values(), ids=SPECS.keys())
def test_finetuned_export_reloads_identically(tiny_bert_dir, tmp_path, overrides):
    enc = load_encoder(str(tiny_bert_dir), overrides=overrides)
    tuned = _finetuned(enc.model)
    out = export_encoder(enc, tmp_path / "export", model=tuned)
    back = load_encoder(str(out))

    assert back.spec == enc.spec
    assert back.tokenizer.backend_tokenizer.to_str() == enc.tokenizer.backend_tokenizer.to_str()
    assert back.tokenizer(TEXTS)["input_ids"] == enc.tokenizer(TEXTS)["input_ids"]
    ids, mask = _batch(enc, TEXTS, enc.spec.query_prefix)
    np.testing.assert_array_equal((ids, mask), _batch(back, TEXTS, back.spec.query_prefix))

    want = _embed(tuned, ids, mask)
    assert np.abs(want - _embed(enc.model, ids, mask)).max() > 1e-2  # the noise did change the model
    assert np.abs(_embed(back.model, ids, mask) - want).max() <= 1e-6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary directory left


def _reference_pool(hidden, mask, mode, normalize):
    """sentence-transformers' pooling (+ Normalize), in NumPy, padding on either side."""
    m = mask.astype(np.float64)
    if mode == "mean":
        emb = (hidden * m[..., None]).sum(1) / np.maximum(m.sum(1, keepdims=True), 1e-9)
    else:
        pos = m.argmax(1) if mode == "cls" else m.shape[1] - 1 - m[:, ::-1].argmax(1)
        emb = hidden[np.arange(len(hidden)), pos]
    return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12) if normalize else emb


def _transformers_hidden(model_dir, ids, mask):
    torch = pytest.importorskip("torch")
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(str(model_dir), output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        out = model.eval()(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask))
    return out.last_hidden_state.double().numpy()


@pytest.mark.parametrize("overrides", SPECS.values(), ids=SPECS.keys())
def test_transformers_loads_the_export(tiny_bert_dir, tmp_path, overrides):
    pytest.importorskip("torch")
    enc = load_encoder(str(tiny_bert_dir), overrides=overrides)
    tuned = _finetuned(enc.model)
    out = export_encoder(enc, tmp_path / "export", model=tuned)
    ids, mask = _batch(enc, TEXTS, enc.spec.passage_prefix)
    theirs = _reference_pool(_transformers_hidden(out, ids, mask), mask, enc.spec.pooling, enc.spec.normalize)
    assert np.abs(_embed(tuned, ids, mask) - theirs).max() <= 1e-5


def test_minilm_export_matches_transformers(minilm_dir, tmp_path):
    pytest.importorskip("torch")
    enc = load_encoder(str(minilm_dir))
    out = export_encoder(enc, tmp_path / "minilm")
    g = np.load(GOLDEN / "minilm.npz")
    ids, mask = g["input_ids"], g["attention_mask"]
    theirs = _reference_pool(_transformers_hidden(out, ids, mask), mask, "mean", True)
    assert np.abs(theirs - g["embeddings"]).max() <= 1e-5
    assert np.abs(_embed(load_encoder(str(out)).model, ids, mask) - g["embeddings"]).max() <= 1e-5

    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Normalize"]
    assert (out / "2_Normalize").is_dir()
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling["word_embedding_dimension"] == 384 and pooling["pooling_mode_mean_tokens"]
    assert not pooling["pooling_mode_cls_token"] and not pooling["pooling_mode_lasttoken"]
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 256
    st = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st["prompts"] == {"query": "", "document": ""} and st["default_prompt_name"] is None
    assert load_encoder(str(out)).spec == enc.spec


def _snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_failed_write_leaves_the_old_export_untouched(tiny_bert_dir, tmp_path, monkeypatch):
    enc = load_encoder(str(tiny_bert_dir))
    out = export_encoder(enc, tmp_path / "export")
    before = _snapshot(out)

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "save_file", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        export_encoder(enc, out, model=_finetuned(enc.model))
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_failed_swap_restores_the_old_export(tiny_bert_dir, tmp_path, monkeypatch):
    enc = load_encoder(str(tiny_bert_dir))
    out = export_encoder(enc, tmp_path / "export")
    before = _snapshot(out)
    real_replace = os.replace

    def replace(src, dst):  # fail to rename the new directory in, after the old one was moved aside
        if os.path.basename(src).startswith(".export.tmp-"):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        export_encoder(enc, out, model=_finetuned(enc.model))
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_export_replaces_an_existing_or_empty_directory(tiny_bert_dir, tmp_path):
    enc = load_encoder(str(tiny_bert_dir))
    (tmp_path / "empty").mkdir()
    export_encoder(enc, tmp_path / "empty")
    stale = tmp_path / "full"
    stale.mkdir()
    (stale / "stale.txt").write_text("old")
    export_encoder(enc, stale, model=_finetuned(enc.model))
    assert not (stale / "stale.txt").exists() and (stale / "model.safetensors").exists()
    assert load_encoder(str(tmp_path / "empty")).spec == load_encoder(str(stale)).spec == enc.spec
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"]


def test_a_model_that_disagrees_with_the_spec_is_refused(tiny_bert_dir, tmp_path):
    enc = load_encoder(str(tiny_bert_dir))
    mean_model = load_encoder(str(tiny_bert_dir), overrides={"pooling": "mean"}).model
    with pytest.raises(ValueError, match="pools 'mean'"):
        export_encoder(enc, tmp_path / "export", model=mean_model)
    assert not any(tmp_path.iterdir())

"""Exports carry a model card and sentence-transformers' version block; publishing stops clearly offline."""

import json
import logging

import numpy as np
import pytest

from opera_jax.config import load_config
from opera_jax.errors import InputError
from opera_jax.models import publish
from opera_jax.models.encoder import load_encoder
from opera_jax.models.export import export_encoder
from opera_jax.models.model_card import CardInfo, hub_id, parse_front_matter, render

ROWS = (
    {"step": 0, "ndcg@10": 0.31234, "recall@20": 0.5, "mrr@10": 0.25, "recall@100": 0.75},
    {"step": 60, "ndcg@10": 0.41111, "recall@20": 0.625, "mrr@10": 0.375, "recall@100": 0.875},
)


def test_plain_export_has_a_card_that_parses(tiny_bert_dir, tmp_path):
    out = export_encoder(load_encoder(str(tiny_bert_dir)), tmp_path / "tiny-export")
    text = (out / "README.md").read_text()
    meta = parse_front_matter(text)
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert {"sentence-transformers", "opera-jax"} <= set(meta["tags"]) and "base_model" not in meta  # local source
    assert "# tiny-export\n" in text and f'SentenceTransformer("{out.resolve()}")' in text
    block = json.loads((out / "config_sentence_transformers.json").read_text())
    assert block["model_type"] == "SentenceTransformer"
    assert set(block["__version__"]) == {"sentence_transformers", "transformers", "opera_jax"}


def test_hub_ids_of_model_references(minilm_dir, tmp_path):
    snap = tmp_path / "hub" / "models--BAAI--bge-small-en-v1.5" / "snapshots" / "abc123"
    assert hub_id("BAAI/bge-small-en-v1.5") == "BAAI/bge-small-en-v1.5"
    assert hub_id(None, snap) == "BAAI/bge-small-en-v1.5"
    assert hub_id(None, minilm_dir) == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_id(str(tmp_path), tmp_path) is None


def test_run_card_holds_method_settings_and_the_evaluation_table(tiny_bert_dir):
    config = load_config(None, ["method.name=dp", "data.path=beir/scifact", "optim.learning_rate=1e-4"])
    enc = load_encoder(str(tiny_bert_dir), overrides={"query_prefix": "query: "})
    info = CardInfo(
        base_model="sentence-transformers/all-MiniLM-L6-v2",
        config=config,
        metrics=ROWS,
        datasets=("BeIR/scifact", "BeIR/scifact-qrels"),
        data="`beir/scifact`, split `train`",
        eval_data="`beir/scifact`, split `test`",
        train_queries=809,
        train_pairs=919,
        step=60,
        negatives="1 per query, drawn from the hard negatives mined at ranks 10-100 by the base model",
    )
    text = render(info, enc.spec, dim=32, architecture="bert", ref="/runs/x/model", title="x")
    meta = parse_front_matter(text)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["datasets"] == ["BeIR/scifact", "BeIR/scifact-qrels"] and "method-dp" in meta["tags"]
    assert "| 0 | 0.3123 | 0.5000 | 0.2500 | 0.7500 |" in text
    assert "| 60 | 0.4111 | 0.6250 | 0.3750 | 0.8750 |" in text
    assert "OPERA dynamic pruning" in text and "| learning rate | 0.0001, linear schedule" in text
    assert "strength_end=5.0" in text and "809 queries, 919 positive pairs" in text
    assert 'Query prompt: "query: "' in text


def test_push_offline_is_one_clear_error(tiny_bert_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    out = export_encoder(load_encoder(str(tiny_bert_dir)), tmp_path / "m")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="HF_HUB_OFFLINE") as e:
        publish.push_to_hub(out, "someone/tiny")
    assert str(out) in str(e.value)
    with pytest.raises(InputError, match="owner/name"):
        publish.push_to_hub(out, "not a repo id")


def test_push_uploads_every_file_with_the_card_naming_the_repo(tiny_bert_dir, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    out = export_encoder(load_encoder(str(tiny_bert_dir)), tmp_path / "m")
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private, exist_ok):
            calls["repo"] = (repo_id, private, exist_ok)

        def create_commit(self, repo_id, operations, commit_message):
            calls["ops"] = operations
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert publish.push_to_hub(out, "me/tiny", private=True) == "https://huggingface.co/me/tiny/commit/1"
    assert calls["repo"] == ("me/tiny", True, True)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted(op.path_in_repo for op in calls["ops"]) == files
    card = next(op for op in calls["ops"] if op.path_in_repo == "README.md").path_or_fileobj
    card = card if isinstance(card, bytes) else card.read()
    text = card.decode()
    assert 'SentenceTransformer("me/tiny")' in text and "# me/tiny\n" in text and str(out.resolve()) not in text
    assert parse_front_matter(text) == parse_front_matter((out / "README.md").read_text())


def test_cli_export_accepts_push_to_hub():
    from opera_jax.cli import parse_args

    args = parse_args(["export", "runs/x", "--out", "m", "--push-to-hub", "me/m", "--private"])
    assert args.push_to_hub == "me/m" and args.private


def test_sentence_transformers_loads_the_export_and_its_card(tiny_bert_dir, tmp_path, caplog):
    pytest.importorskip("torch")
    st = pytest.importorskip("sentence_transformers")
    from opera_jax.retriever import DenseRetriever

    overrides = {"pooling": "mean", "normalize": True, "query_prefix": "q: ", "passage_prefix": "p: "}
    ours = DenseRetriever(str(tiny_bert_dir), **overrides)
    out = ours.save(tmp_path / "st-export")
    with caplog.at_level(logging.WARNING):
        model = st.SentenceTransformer(str(out), device="cpu")
    assert "was created with Sentence Transformers version" not in caplog.text
    assert model._model_card_text == (out / "README.md").read_text()
    assert model.similarity_fn_name == "dot" and model.prompts["query"] == "q: "
    texts = ["tiny bert", "a longer input with more characters in it", "x"]
    theirs = model.encode_query(texts, convert_to_numpy=True)
    np.testing.assert_allclose(theirs, ours.encode_queries(texts), atol=1e-5)
    np.testing.assert_allclose(
        model.encode_document(texts, convert_to_numpy=True), ours.encode_passages(texts), atol=1e-5
    )


def test_push_without_a_network_is_one_clear_error(tiny_bert_dir, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    out = export_encoder(load_encoder(str(tiny_bert_dir)), tmp_path / "m")
    ConnectError = type("ConnectError", (Exception,), {"__module__": "httpx2._exceptions"})  # as httpx2 raises it

    class Unreachable:
        def __init__(self, token=None):
            pass

        def create_repo(self, *args, **kwargs):
            raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", Unreachable)
    with pytest.raises(InputError, match="the hub cannot be reached .*Name or service not known"):
        publish.push_to_hub(out, "me/tiny")

"""The public API: DenseRetriever against the model called directly, finetune on tables and JSONL, the README."""

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import opera_jax
from opera_jax.config import load_config
from opera_jax.errors import InputError
from opera_jax.models.encoder import load_encoder
from opera_jax.models.model_card import parse_front_matter

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out: README "Tests"

SPEC = {"pooling": "mean", "normalize": True, "query_prefix": "q: ", "passage_prefix": "p: "}
TEXTS = [f"text number {i} " + "word " * (i % 7) for i in range(21)]  # several batches and lengths


@pytest.fixture(scope="module")
def retriever(tiny_bert_dir):
    return opera_jax.DenseRetriever(str(tiny_bert_dir), batch_size=8, **SPEC)


def _direct(tiny_bert_dir, texts, prefix):
    """The reference: transformers' tokenizer padded to the longest text, one call of the model."""
    from transformers import AutoTokenizer

    enc = load_encoder(str(tiny_bert_dir), overrides=SPEC)
    batch = AutoTokenizer.from_pretrained(str(tiny_bert_dir))(
        [prefix + t for t in texts],
        padding=True,
        truncation=True,
        max_length=32,
        return_tensors="np",
        return_token_type_ids=False,
    )
    return np.asarray(enc.model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])))


def test_encode_matches_the_model_called_directly(retriever, tiny_bert_dir):
    got = retriever.encode_queries(TEXTS)
    assert got.shape == (21, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, _direct(tiny_bert_dir, TEXTS, "q: "), atol=1e-5)
    np.testing.assert_allclose(retriever.encode_passages(TEXTS), _direct(tiny_bert_dir, TEXTS, "p: "), atol=1e-5)
    np.testing.assert_allclose(
        retriever.encode_passages({"title": "T", "text": "x"}), _direct(tiny_bert_dir, ["T x"], "p: ")[0], atol=1e-5
    )
    assert retriever.encode_queries([]).shape == (0, 32)


def test_search_is_exact_top_k(retriever):
    corpus = {f"doc{i}": t for i, t in enumerate(TEXTS)}
    queries = {"a": "text number 3", "b": "word word word", "c": "number 12"}
    hits = retriever.search(queries, corpus, k=5)
    scores = retriever.encode_queries(list(queries.values())) @ retriever.encode_passages(TEXTS).T
    for row, qid in enumerate(queries):
        order = np.argsort(-scores[row], kind="stable")[:5]
        assert [d for d, _ in hits[qid]] == [f"doc{j}" for j in order]
        np.testing.assert_allclose([s for _, s in hits[qid]], scores[row, order], atol=1e-5)
    listed = retriever.search(list(queries.values()), TEXTS, k=100)
    assert [len(h) for h in listed] == [21, 21, 21] and listed[0][0][0] == int(hits["a"][0][0][3:])
    with pytest.raises(InputError, match="k: must be at least 1"):
        retriever.search(["x"], TEXTS, k=0)
    with pytest.raises(InputError, match="corpus: a list of texts"):
        retriever.search(["x"], "one string", k=1)


QUERIES = {f"q{i}": f"question about subject {i} and its properties" for i in range(20)}
CORPUS = {f"d{i}": {"title": f"Subject {i}", "text": f"an article on subject {i}"} for i in range(30)}
QRELS = {f"q{i}": {f"d{i}": 1, f"d{i + 10}": 0} for i in range(20)}


def _overrides(tiny_bert_dir):
    return dict(
        model=str(tiny_bert_dir),
        max_steps=4,
        batch_size=8,
        eval_every=2,
        learning_rate=1e-3,
        data__query_max_len=16,
        data__passage_max_len=16,
        data__eval_batch_size=32,
        mining__rank_start=0,
        mining__rank_end=10,
        train__log_every=2,
        progress=False,
    )


def test_finetune_on_tables_holds_out_and_exports(tiny_bert_dir, tmp_path):
    base = load_config(None, ["model.pooling=mean", "model.normalize=true"])  # a Config object, then overrides
    result = opera_jax.finetune(
        (QUERIES, CORPUS, QRELS), config=base, out=tmp_path / "run", validation=0.25, **_overrides(tiny_bert_dir)
    )
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4] and result.metrics == rows[-1]
    saved = load_config(result.run_dir / "config.yaml")
    assert saved.model.pooling == "mean" and saved.optim.max_steps == 4 and saved.data.path == "<in-memory>"
    card = (result.model_dir / "README.md").read_text()
    assert "split `validation`" in card and "15 queries" in card  # 5 of 20 held out
    tuned = opera_jax.DenseRetriever(result.model_dir)
    assert tuned.spec.pooling == "mean" and tuned.encode_queries("x").shape == (32,)


def test_finetune_on_jsonl_trains_on_its_own_negatives(tiny_bert_dir, tmp_path, monkeypatch):
    from opera_jax.train import trainer

    lines = [
        {
            "query": QUERIES[f"q{i}"],
            "pos": [CORPUS[f"d{i}"]["text"]],
            "neg": [CORPUS[f"d{(i + 3) % 30}"]["text"], CORPUS[f"d{(i + 7) % 30}"]["text"]],
        }
        for i in range(16)
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))

    def no_mining(*args, **kwargs):
        raise AssertionError("given negatives must replace mining")

    seen = {}
    real_build_method = trainer.build_method

    def record(config, ts, *args):
        seen["ts"] = ts
        return real_build_method(config, ts, *args)

    monkeypatch.setattr(trainer, "mine", no_mining)
    monkeypatch.setattr(trainer, "build_method", record)
    result = opera_jax.finetune(path, out=tmp_path / "run", validation=0, **_overrides(tiny_bert_dir))
    metrics_file = result.run_dir / "metrics.jsonl"
    assert result.metrics == {} and (not metrics_file.exists() or not metrics_file.read_text().strip())
    assert (result.model_dir / "model.safetensors").exists()
    ts = seen["ts"]
    from opera_jax.data.pairs_jsonl import load_pairs_jsonl

    corpus_texts = load_pairs_jsonl(path).train.corpus.texts
    for q, line in enumerate(lines):
        got = [corpus_texts[j] for j in ts.negatives[q, : ts.negative_counts[q]]]
        assert got == line["neg"], (q, got)
        assert ts.query_texts[q] == line["query"]
    assert load_config(result.run_dir / "config.yaml").data.path == str(path.resolve())


def test_finetune_refuses_eval_data_with_a_folder(tiny_bert_dir, tmp_path):
    with pytest.raises(InputError, match="eval_data"):
        opera_jax.finetune("med", eval_data=(QUERIES, CORPUS, QRELS), out=tmp_path / "r", **_overrides(tiny_bert_dir))


def test_public_names():
    assert {"DenseRetriever", "finetune", "FinetuneResult", "load_config", "push_to_hub"} <= set(opera_jax.__all__)
    for name in opera_jax.__all__:
        assert getattr(opera_jax, name) is not None
    with pytest.raises(AttributeError):
        _ = opera_jax.not_a_name


@pytest.mark.slow
def test_readme_example_runs(minilm_dir, tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "(1, 384)"
    hits = eval(out[1])
    assert hits[0][0][0] == 1 and hits[1][0][0] == 2  # the Eiffel Tower; dense retrievers
    final = [line for line in out if line.startswith("runs/api-demo ")]  # the trainer also logs its evaluations
    assert len(final) == 1 and "ndcg@10" in final[0] and "'README.md'" in final[0]
    assert eval(out[-1])[0][0][0] == "d3"
    meta = parse_front_matter((tmp_path / "runs" / "api-demo" / "model" / "README.md").read_text())
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_a_jsonl_data_path_is_read_with_a_held_out_tenth(tiny_bert_dir, tmp_path):
    from opera_jax.train.setup import prepare

    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "".join(
            json.dumps({"query": f"query {i}", "pos": [f"passage {i}"], "neg": [f"passage {i + 1}"]}) + "\n"
            for i in range(30)
        )
    )
    config = load_config(None, [f"model.name={tiny_bert_dir}", f"data.path={path}", "seed=5"])
    setup = prepare(config)
    held = setup.given.eval
    assert setup.data_dir is None and len(held.queries) == 3 and setup.ts.num_queries == 27
    assert not set(held.queries.ids) & set(setup.ts.query_ids)
    assert setup.given.negatives["q1"] == [
        setup.train_split.corpus.ids[setup.train_split.corpus.texts.index("passage 1")]
    ]

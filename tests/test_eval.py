"""Evaluation end to end: real MiniLM on a real SciFact slice (checked with ir-measures), and the eval CLI."""

import dataclasses
import json

import ir_measures
import numpy as np
import pytest
from ir_measures import RR, R, nDCG

from opera_jax.cli import main
from opera_jax.data.beir import BeirSplit, Corpus, load_split
from opera_jax.eval.evaluate import Evaluator
from opera_jax.eval.metrics import read_trec_run
from opera_jax.models.encoder import load_encoder

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out: README "Tests"


def _slice(split: BeirSplit, n_queries: int, n_docs: int, seed: int = 0) -> BeirSplit:
    """The first queries, their relevant documents and random others: a small real retrieval problem."""
    qids = split.queries.ids[:n_queries]
    rel = {d for q in qids for d in split.qrels[q]}
    rng = np.random.default_rng(seed)
    others = [i for i in rng.permutation(len(split.corpus)) if split.corpus.ids[i] not in rel][: n_docs - len(rel)]
    rows = sorted([split.corpus.index()[d] for d in rel] + [int(i) for i in others])
    c = split.corpus
    corpus = Corpus(tuple(c.ids[i] for i in rows), tuple(c.titles[i] for i in rows), tuple(c.texts[i] for i in rows))
    qindex = split.queries.index()
    queries = dataclasses.replace(
        split.queries, ids=tuple(qids), texts=tuple(split.queries.texts[qindex[q]] for q in qids)
    )
    return BeirSplit(split.name, split.split, corpus, queries, {q: split.qrels[q] for q in qids})


@pytest.mark.slow
def test_real_minilm_on_a_scifact_slice_agrees_with_ir_measures(minilm_dir, data_root, mesh1):
    split = _slice(load_split(data_root / "scifact", "test"), n_queries=30, n_docs=300)
    enc = load_encoder(str(minilm_dir))
    result = Evaluator(
        split, enc.tokenizer, enc.spec, max_query_len=64, max_passage_len=128, batch_size=32, mesh=mesh1
    )(enc.model)
    assert set(result.run) == set(split.queries.ids)
    assert all(len(docs) == 100 for docs in result.run.values())
    qrels = [ir_measures.Qrel(q, d, g) for q, docs in split.qrels.items() for d, g in docs.items()]
    run = [ir_measures.ScoredDoc(q, d, s) for q, docs in result.run.items() for d, s in docs]
    measures = {
        f"{name}@{k}": m @ k
        for name, m in (("ndcg", nDCG), ("recall", R), ("mrr", RR))
        for k in (1, 5, 10, 20, 50, 100)
    }
    want = ir_measures.calc_aggregate(list(measures.values()), qrels, run)
    for key, measure in measures.items():
        assert result.metrics[key] == pytest.approx(want[measure], abs=1e-6), key
    # A real model retrieves: the slice's relevant documents are near the top.
    assert result.metrics["ndcg@10"] > 0.5


def test_eval_cli_writes_metrics_and_run(tiny_bert_dir, tmp_path, capsys):
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_bert_dir),
                "--data",
                "med",
                "--out",
                str(tmp_path),
                "--batch-size",
                "64",
                "--max-passage-len",
                "32",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "NDCG" in printed and "Recall" in printed and "@10" in printed
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("ndcg@10", "recall@20", "mrr@10", "ndcg_release@10", "recall@100"):
        assert 0 <= metrics[key] <= 1
    assert metrics["num_queries"] == 10 and metrics["split"] == "test" and metrics["seconds"] > 0
    run = read_trec_run(tmp_path / "run.trec")
    assert len(run) == 10 and all(len(v) == 100 for v in run.values())


def test_eval_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "none"), "--data", "med"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "none" in err[0]
    bad = tmp_path / "coll"
    (bad / "qrels").mkdir(parents=True)
    (bad / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n{"_id": "d2", "text": \n')
    (bad / "queries.jsonl").write_text('{"_id": "q1", "text": "y"}\n')
    (bad / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    assert main(["eval", "--model", "sentence-transformers/all-MiniLM-L6-v2", "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "corpus.jsonl" in err and "line 2" in err

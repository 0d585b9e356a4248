"""Metrics against ir-measures (trec_eval) and scikit-learn; TREC run files."""

from __future__ import annotations

import csv
import gzip
import json
import os
from pathlib import Path

import ir_measures
import numpy as np
import pytest
from ir_measures import RR, R, nDCG

from opera_jax.errors import InputError
from opera_jax.eval.metrics import CUTOFFS, evaluate_run, per_query, read_trec_run, write_trec_run

TOL = 1e-9
IR_NAMES = {"nDCG": "ndcg", "R": "recall", "RR": "mrr"}


# --- helpers ---------------------------------------------------------------------------------


def ir_measures_list(names, cutoffs):
    return [m @ k for m in (nDCG, R, RR) if IR_NAMES[m.NAME] in names for k in cutoffs]


def ir_measures_per_query(qrels, run, cutoffs, names) -> dict[str, dict[str, float]]:
    """ir-measures' nDCG@k, R@k and RR@k per query, under our metric names."""
    ir_run = {qid: {doc: score for doc, score in ranking} for qid, ranking in run.items()}
    out: dict[str, dict[str, float]] = {}
    for row in ir_measures.iter_calc(ir_measures_list(names, cutoffs), qrels, ir_run):
        out.setdefault(f"{IR_NAMES[row.measure.NAME]}@{row.measure['cutoff']}", {})[row.query_id] = row.value
    return out


def ir_measures_aggregate(qrels, run, cutoffs, names) -> dict[str, float]:
    ir_run = {qid: {doc: score for doc, score in ranking} for qid, ranking in run.items()}
    result = ir_measures.calc_aggregate(ir_measures_list(names, cutoffs), qrels, ir_run)
    return {f"{IR_NAMES[m.NAME]}@{m['cutoff']}": v for m, v in result.items()}


def with_relevant(qrels):
    """The queries that our means are over: those with a relevant (grade >= 1) document."""
    return {qid: judged for qid, judged in qrels.items() if any(g >= 1 for g in judged.values())}


def assert_matches_ir_measures(qrels, run, cutoffs=CUTOFFS, names=("ndcg", "recall", "mrr")):
    ours = {k: v for k, v in per_query(qrels, run, cutoffs, release_ndcg=False).items() if k.split("@")[0] in names}
    theirs = ir_measures_per_query(qrels, run, cutoffs, names)
    assert ours.keys() == theirs.keys()
    for name, values in ours.items():
        assert set(values) == set(with_relevant(qrels)), name
        for qid, value in values.items():
            assert value == pytest.approx(theirs[name][qid], abs=TOL), (name, qid)
    # trec_eval also averages judged queries that have no relevant document; we do not.
    means = {k: v for k, v in evaluate_run(qrels, run, cutoffs, release_ndcg=False).items() if k in ours}
    expected = ir_measures_aggregate(with_relevant(qrels), run, cutoffs, names)
    assert means.keys() == expected.keys()
    for name, value in means.items():
        assert value == pytest.approx(expected[name], abs=TOL), name


def best_first(docs, rng) -> list[tuple[str, float]]:
    """``docs`` in the given order with distinct, descending scores."""
    scores = np.sort(rng.uniform(-1.0, 1.0, len(docs)))[::-1]
    assert len(np.unique(scores)) == len(docs)
    return list(zip(docs, scores.tolist()))


def synthetic(seed: int, n_queries: int = 40, n_docs: int = 400, depth: int = 100):
    """Graded qrels (grades 0-3) and a run of ``depth`` docs per query.

    Some relevant docs are injected at random ranks, the rest stay unretrieved.
    """
    rng = np.random.default_rng(seed)
    doc_ids = [f"d{i}" for i in range(n_docs)]
    qrels, run = {}, {}
    for q in range(n_queries):
        qid = f"q{q}"
        judged = rng.choice(n_docs, size=rng.integers(1, 20), replace=False)
        qrels[qid] = {doc_ids[d]: int(rng.integers(0, 4)) for d in judged}
        ranking = list(rng.choice(n_docs, size=depth, replace=False))
        for d in judged[: rng.integers(0, len(judged) + 1)]:
            if d not in ranking:
                ranking[rng.integers(0, depth)] = d
        run[qid] = best_first([doc_ids[d] for d in ranking], rng)
    return qrels, run


def tie_order(ranking, doc_ids_descending: bool):
    """Score descending, ties by doc id: descending is trec_eval's order (nDCG, R), ascending
    that of ir-measures' RR@k (its MS MARCO provider; trec_eval's recip_rank has no cutoff)."""
    by_doc = sorted(ranking, key=lambda pair: pair[0], reverse=doc_ids_descending)
    return sorted(by_doc, key=lambda pair: -pair[1])


# --- trec_eval semantics ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_synthetic_runs_match_ir_measures(seed):
    qrels, run = synthetic(seed)
    assert_matches_ir_measures(qrels, run)


def test_edge_cases_match_ir_measures():
    rng = np.random.default_rng(0)
    filler = [f"x{i}" for i in range(100)]
    qrels = {
        "single_hit": {"a": 1},
        "single_miss": {"a": 2},
        "none_retrieved": {"a": 3, "b": 1, "c": 2},
        "partly_retrieved": {"a": 4, "b": 3, "c": 2, "d": 1, "e": 1, "f": 0},
        "graded_top": {"a": 1, "b": 4, "c": 0},
        "negative_grade": {"a": -1, "b": 1},
        "short_list": {"a": 1, "b": 2},
    }
    run = {
        "single_hit": best_first(filler[:6] + ["a"] + filler[6:99], rng),
        "single_miss": best_first(filler, rng),
        "none_retrieved": best_first(filler, rng),
        "partly_retrieved": best_first(["x0", "d", "c"] + filler[1:40] + ["f"] + filler[40:97], rng),
        "graded_top": best_first(["a", "c", "b"] + filler[:97], rng),
        "negative_grade": best_first(["a", "x0", "b"], rng),
        "short_list": best_first(["x0", "b"], rng),
    }
    assert_matches_ir_measures(qrels, run)
    values = per_query(qrels, run, release_ndcg=False)
    assert values["mrr@10"]["single_hit"] == pytest.approx(1 / 7)
    assert values["mrr@5"]["single_hit"] == 0.0
    assert values["recall@100"]["none_retrieved"] == 0.0
    assert values["ndcg@100"]["none_retrieved"] == 0.0
    assert values["recall@100"]["partly_retrieved"] == pytest.approx(2 / 5)


def test_ties_ordered_the_reference_way_match_ir_measures():
    qrels, run = synthetic(7)
    tied = {qid: [(doc, round(s, 1)) for doc, s in ranking] for qid, ranking in run.items()}
    assert any(len({s for _, s in r}) < len(r) for r in tied.values())
    trec_order = {qid: tie_order(r, doc_ids_descending=True) for qid, r in tied.items()}
    assert_matches_ir_measures(qrels, trec_order, names=("ndcg", "recall"))
    msmarco_order = {qid: tie_order(r, doc_ids_descending=False) for qid, r in tied.items()}
    assert_matches_ir_measures(qrels, msmarco_order, names=("mrr",))


def test_averaging_over_queries_with_a_relevant_document():
    rng = np.random.default_rng(1)
    qrels = {"hit": {"a": 1}, "missing": {"b": 2}, "no_relevant": {"c": 0}}
    run = {"hit": best_first(["a", "z"], rng), "unjudged": best_first(["a"], rng)}
    values = per_query(qrels, run)
    assert all(set(v) == {"hit", "missing"} for v in values.values())
    assert all(v["missing"] == 0.0 for v in values.values())
    means = evaluate_run(qrels, run)
    assert means["ndcg@1"] == means["recall@1"] == means["mrr@1"] == means["ndcg_release@1"] == 0.5
    assert list(means) == [f"{m}@{k}" for m in ("ndcg", "recall", "mrr", "ndcg_release") for k in CUTOFFS]


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="relevant"):
        evaluate_run({"q": {"a": 0}}, {"q": [("a", 1.0)]})
    with pytest.raises(ValueError, match="more than once"):
        evaluate_run({"q": {"a": 1}}, {"q": [("a", 2.0), ("a", 1.0)]})
    with pytest.raises(ValueError, match="cutoffs"):
        evaluate_run({"q": {"a": 1}}, {"q": [("a", 1.0)]}, cutoffs=(0, 10))


# --- real qrels ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_data() -> Path:
    root = Path(os.environ.get("OPERA_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not root.is_dir():
        pytest.fail(f"no BEIR data at {root}: set OPERA_DATA_DIR")
    return root


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    return qrels


def read_doc_ids(collection: Path) -> list[str]:
    plain = collection / "corpus.jsonl"
    if plain.exists():
        f = plain.open(encoding="utf-8")
    else:
        f = gzip.open(collection / "corpus.jsonl.gz", "rt", encoding="utf-8")
    with f:
        return [json.loads(line)["_id"] for line in f]


def fixed_run(qrels, doc_ids, seed: int, depth: int = 100):
    """Shuffled real doc ids; about half of each query's relevant docs injected at spread-out ranks."""
    rng = np.random.default_rng(seed)
    run = {}
    for qid, judged in qrels.items():
        ranking = [doc_ids[i] for i in rng.permutation(len(doc_ids))[: 2 * depth]]
        relevant = [doc for doc in judged if doc not in ranking]
        inject = relevant[: (len(relevant) + 1) // 2]
        ranking = [doc for doc in ranking if doc not in judged][: depth - len(inject)]
        for doc in inject:
            ranking.insert(int(rng.integers(0, len(ranking) + 1)), doc)
        run[qid] = best_first(ranking, rng)
    return run


@pytest.mark.parametrize("collection", ["cranfield", "scifact"])
def test_real_qrels_match_ir_measures(shared_data, collection):
    qrels = read_qrels(shared_data / collection / "qrels" / "test.tsv")
    doc_ids = read_doc_ids(shared_data / collection)
    known = set(doc_ids)
    assert all(doc in known for judged in qrels.values() for doc in judged)
    run = fixed_run(qrels, doc_ids, seed=0)
    assert all(len(r) == 100 for r in run.values())
    assert_matches_ir_measures(qrels, run)
    means = evaluate_run(qrels, run)
    assert 0.0 < means["ndcg@10"] < means["ndcg_release@10"] <= 1.0


# --- the release's NDCG against scikit-learn -------------------------------------------------


def release_case(seed: int, n_queries: int = 30, depth: int = 50, decimals: int | None = None):
    """Random graded qrels, runs of ``depth`` docs; scores rounded to ``decimals`` to make ties."""
    rng = np.random.default_rng(seed)
    qrels, run = {}, {}
    for q in range(n_queries):
        qid = f"q{q}"
        docs = [f"d{i}" for i in rng.permutation(200)[:depth]]
        judged = rng.choice(200, size=rng.integers(1, 12), replace=False)
        qrels[qid] = {f"d{i}": int(rng.integers(0, 3)) for i in judged} | {f"d{judged[0]}": 1}
        scores = np.sort(rng.random(depth))[::-1]
        if decimals is not None:
            scores = scores.round(decimals)
        run[qid] = list(zip(docs, scores.tolist()))
    qrels["no_relevant_retrieved"] = {"absent": 1}
    run["no_relevant_retrieved"] = run["q0"]
    return qrels, run


@pytest.mark.parametrize(("seed", "decimals"), [(0, None), (1, None), (2, 1), (3, 2)])
def test_release_ndcg_matches_sklearn(seed, decimals):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    qrels, run = release_case(seed, decimals=decimals)
    cutoffs = (1, 3, 10, 50, 100)
    values = per_query(qrels, run, cutoffs)
    means = evaluate_run(qrels, run, cutoffs)
    qids = list(values["ndcg_release@1"])
    y_true = np.array([[qrels[q].get(doc, 0) > 0 for doc, _ in run[q]] for q in qids], dtype=float)
    y_score = np.array([[score for _, score in run[q]] for q in qids])
    for k in cutoffs:
        expected = [sklearn_metrics.ndcg_score(t[None], s[None], k=k) for t, s in zip(y_true, y_score)]
        assert [values[f"ndcg_release@{k}"][q] for q in qids] == pytest.approx(expected, abs=TOL)
        assert means[f"ndcg_release@{k}"] == pytest.approx(sklearn_metrics.ndcg_score(y_true, y_score, k=k), abs=TOL)
    assert values["ndcg_release@100"]["no_relevant_retrieved"] == 0.0


def test_release_ndcg_ranks_by_score_like_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    qrels = {"q": {"a": 1, "c": 2}}
    run = {"q": [("a", 0.1), ("b", 0.9), ("c", 0.5), ("d", 0.5)]}
    expected = sklearn_metrics.ndcg_score([[1, 0, 1, 0]], [[0.1, 0.9, 0.5, 0.5]], k=2)
    assert per_query(qrels, run, (2,))["ndcg_release@2"]["q"] == pytest.approx(expected, abs=TOL)


def test_release_ndcg_equals_trec_ndcg_when_every_relevant_doc_is_retrieved():
    rng = np.random.default_rng(3)
    qrels = {"q": {"a": 1, "b": 1, "c": 1}}
    run = {"q": best_first(["x", "a", "y", "b"] + [f"z{i}" for i in range(40)] + ["c"], rng)}
    means = evaluate_run(qrels, run)
    for k in CUTOFFS:
        assert means[f"ndcg_release@{k}"] == pytest.approx(means[f"ndcg@{k}"], abs=TOL)


# --- TREC run files --------------------------------------------------------------------------


def test_trec_run_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    run = {
        "q1": [(f"d{i}", s) for i, s in enumerate(np.sort(rng.random(10)).astype(np.float32)[::-1])],
        "q0": [("b", 2.5), ("a", 2.5), ("c", -1e-30)],
    }
    path = tmp_path / "runs" / "run.trec"
    write_trec_run(path, run, tag="test-tag")
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.trec"]
    lines = path.read_text().splitlines()
    assert len(lines) == 13
    assert lines[10] == "q0 Q0 b 1 2.5 test-tag"
    back = read_trec_run(path)
    assert list(back) == ["q1", "q0"]
    assert back == {qid: [(doc, float(s)) for doc, s in ranking] for qid, ranking in run.items()}


def test_read_trec_run_orders_by_rank(tmp_path):
    path = tmp_path / "run.trec"
    path.write_text("q Q0 b 2 0.5 t\n\nq 0 a 1 0.7 t\n")
    assert read_trec_run(path) == {"q": [("a", 0.7), ("b", 0.5)]}


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("q Q0 c 3 0.1", "expected 6 fields"),
        ("q Q0 c three 0.1 t", "not an integer"),
        ("q Q0 c 3 high t", "not a number"),
        ("q Q0 c 3 nan t", "not finite"),
        ("q Q0 a 3 0.1 t", "listed twice"),
        ("q Q0 c 2 0.1 t", "used twice"),
    ],
)
def test_read_trec_run_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "bad.trec"
    path.write_text(f"q Q0 a 1 0.9 t\nq Q0 b 2 0.5 t\n{bad_line}\n")
    with pytest.raises(InputError, match=message) as error:
        read_trec_run(path)
    assert f"{path}, line 3" in str(error.value)


def test_read_trec_run_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such run file"):
        read_trec_run(tmp_path / "absent.trec")


def test_write_trec_run_rejects_whitespace_in_ids(tmp_path):
    with pytest.raises(ValueError, match="whitespace"):
        write_trec_run(tmp_path / "run.trec", {"q": [("doc one", 1.0)]})
    assert not (tmp_path / "run.trec").exists()

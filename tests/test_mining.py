"""Hard-negative mining against a brute-force NumPy reference; the saved file; a real-data run."""

import json

import numpy as np
import pytest

from opera_jax.data.tokens import tokenize
from opera_jax.data.training import TrainingSet
from opera_jax.errors import InputError
from opera_jax.eval.retrieval import encode
from opera_jax.models.encoder import load_encoder
from opera_jax.train import mining
from opera_jax.train.mining import MiningResult, load_mining, load_or_mine, mine_negatives, save_mining

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out: README "Tests"

Q_LEN, P_LEN = 16, 64
SAME = 7  # corpus row whose text equals query 0's


def _training_set(query_texts, positives):
    """A TrainingSet from per-query lists of positive corpus rows."""
    pair_query = np.concatenate([[q] * len(p) for q, p in enumerate(positives)]).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in positives])]).astype(np.int32)
    return TrainingSet(
        query_ids=tuple(f"q{i}" for i in range(len(query_texts))),
        query_texts=tuple(query_texts),
        pair_query=pair_query,
        pair_doc=np.concatenate(positives).astype(np.int32),
        query_offsets=offsets,
    )


@pytest.fixture(scope="module")
def toy(tiny_bert_dir, mesh1):
    """40 documents, 5 queries, the base model's full ranking, positives inside and outside the range.

    Random letter strings of distinct word counts (1..40) under mean pooling keep every
    two scores of a query apart, so the reference ranking is unambiguous.
    """
    enc = load_encoder(str(tiny_bert_dir), overrides={"pooling": "mean", "normalize": True})
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))

    def text(n_words):
        return " ".join("".join(rng.choice(letters, rng.integers(2, 7))) for _ in range(n_words))

    queries = [text(n) for n in (3, 5, 8, 11, 13)]
    counts = rng.permutation(np.arange(1, 41))
    swap = int(np.flatnonzero(counts == 3)[0])
    counts[[swap, SAME]] = counts[[SAME, swap]]
    corpus = [text(int(n)) for n in counts]
    corpus[SAME] = f"  {queries[0]} "  # equal to query 0 after strip()
    emb = {}
    for name, texts, length in (("docs", corpus, P_LEN), ("queries", queries, Q_LEN)):
        tokens = tokenize(enc.tokenizer, texts, length, use_cache=False)
        emb[name] = np.asarray(encode(enc.model, tokens, max_len=length, batch_size=8, mesh=mesh1))
    scores = emb["queries"] @ emb["docs"].T
    ranking = np.argsort(-scores, axis=1, kind="stable")
    gaps = -np.diff(np.take_along_axis(scores, ranking, 1), axis=1)
    assert gaps.min() > 1e-5, "near-tied scores would make the reference ambiguous"
    # Positives at ranks 3 and 6 (inside every range tested) and at the last rank; query 1 has one.
    positives = [ranking[q, [3, 6, 39]] for q in range(5)]
    positives[1] = ranking[1, [4]]
    ts = _training_set(queries, positives)
    return enc, corpus, ts, ranking


def _mine(toy, mesh, **kwargs):
    enc, corpus, ts, _ = toy
    return mine_negatives(
        enc, ts, corpus, query_max_len=Q_LEN, passage_max_len=P_LEN, batch_size=8, mesh=mesh, **kwargs
    )


def _reference(toy, rank_start, rank_end, num_negatives, seed):
    """The rule, written directly: range of the full ranking, exclusions, seeded cut in rank order."""
    _, corpus, ts, ranking = toy
    rng = np.random.default_rng(seed)
    lists = []
    for q in range(ts.num_queries):
        positives = set(ts.pair_doc[ts.query_offsets[q] : ts.query_offsets[q + 1]].tolist())
        kept = [
            int(d)
            for d in ranking[q, rank_start:rank_end]
            if d not in positives and corpus[d].strip() != ts.query_texts[q].strip()
        ]
        if len(kept) > num_negatives:
            kept = [kept[i] for i in np.sort(rng.choice(len(kept), num_negatives, replace=False))]
        lists.append(kept)
    return lists


def _lists(result):
    return [result.negatives[q, :c].tolist() for q, c in enumerate(result.counts)]


@pytest.mark.parametrize("rank_start, rank_end, num_negatives", [(0, 40, 100), (2, 25, 6), (5, 1000, 8)])
def test_hard_negatives_match_the_reference(toy, mesh1, rank_start, rank_end, num_negatives):
    result = _mine(toy, mesh1, rank_start=rank_start, rank_end=rank_end, num_negatives=num_negatives, seed=3)
    want = _reference(toy, rank_start, rank_end, num_negatives, seed=3)
    assert _lists(result) == want
    width = min(num_negatives, min(rank_end, 40) - rank_start)
    assert result.negatives.shape == (5, width) and result.negatives.dtype == np.int32
    assert result.counts.tolist() == [len(w) for w in want]
    assert np.all(result.negatives[np.arange(width)[None, :] >= result.counts[:, None]] == -1)
    assert result.meta["rank_end"] == rank_end and result.meta["num_docs"] == 40


def test_exclusions_in_the_full_range(toy, mesh1):
    _, _, ts, ranking = toy
    result = _mine(toy, mesh1, rank_start=0, rank_end=40, num_negatives=100)
    for q in range(5):
        negs = set(_lists(result)[q])
        positives = set(ts.pair_doc[ts.query_offsets[q] : ts.query_offsets[q + 1]].tolist())
        assert not negs & positives
        same_text = {SAME} if q == 0 else set()
        assert negs == set(range(40)) - positives - same_text
        assert _lists(result)[q] == [d for d in ranking[q].tolist() if d in negs]  # rank order


def test_cut_is_seeded(toy, mesh1):
    runs = {seed: _mine(toy, mesh1, rank_start=0, rank_end=30, num_negatives=5, seed=seed) for seed in (0, 1)}
    again = _mine(toy, mesh1, rank_start=0, rank_end=30, num_negatives=5, seed=0)
    np.testing.assert_array_equal(again.negatives, runs[0].negatives)
    assert not np.array_equal(runs[0].negatives, runs[1].negatives)
    assert runs[0].counts.tolist() == [5] * 5


def test_random_mode_excludes_positives(toy):
    enc, corpus, _, _ = toy
    many = np.arange(3, 40)  # every document but 0, 1, 2
    ts = _training_set(["x", "y", "z"], [many, np.array([5]), np.array([0, 39])])
    result = mine_negatives(enc, ts, corpus, mode="random", num_negatives=10, seed=4)
    assert result.negatives.shape == (3, 10)
    assert result.counts.tolist() == [3, 10, 10]
    assert _lists(result)[0] == [0, 1, 2]
    for q, negs in enumerate(_lists(result)):
        positives = set(ts.pair_doc[ts.query_offsets[q] : ts.query_offsets[q + 1]].tolist())
        assert len(set(negs)) == len(negs) and not set(negs) & positives
        assert all(0 <= d < 40 for d in negs) and negs == sorted(negs)
    again = mine_negatives(enc, ts, corpus, mode="random", num_negatives=10, seed=4)
    np.testing.assert_array_equal(again.negatives, result.negatives)
    other = mine_negatives(enc, ts, corpus, mode="random", num_negatives=10, seed=5)
    assert not np.array_equal(other.negatives, result.negatives)


def test_bad_arguments(toy):
    enc, corpus, ts, _ = toy
    for kwargs in ({"mode": "bm25"}, {"rank_start": 10, "rank_end": 10}, {"num_negatives": 0}):
        with pytest.raises(InputError):
            mine_negatives(enc, ts, corpus, **kwargs)


def test_save_load_round_trip(toy, mesh1, tmp_path):
    result = _mine(toy, mesh1, rank_start=1, rank_end=20, num_negatives=7, seed=2)
    path = tmp_path / "sub" / "negatives.npz"
    save_mining(path, result)
    loaded = load_mining(path)
    np.testing.assert_array_equal(loaded.negatives, result.negatives)
    np.testing.assert_array_equal(loaded.counts, result.counts)
    assert loaded.meta == result.meta
    assert [p.name for p in path.parent.iterdir()] == ["negatives.npz"]  # no temporary left behind


def test_load_rejects_bad_files(toy, mesh1, tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    missing = tmp_path / "missing.npz"
    good = _mine(toy, mesh1, rank_start=0, rank_end=20, num_negatives=5)
    short = tmp_path / "short.npz"
    save_mining(short, MiningResult(good.negatives, good.counts[:-1], good.meta))
    outside = tmp_path / "outside.npz"
    save_mining(outside, MiningResult(good.negatives + 40, good.counts, good.meta))
    no_meta = tmp_path / "no_meta.npz"
    np.savez(no_meta, negatives=good.negatives, counts=good.counts)
    for path in (garbage, missing, short, outside, no_meta):
        with pytest.raises(InputError, match=str(path)):
            load_mining(path)


def test_load_or_mine_reuses_only_a_matching_file(toy, mesh1, tmp_path, monkeypatch):
    enc, corpus, ts, _ = toy
    path = tmp_path / "negatives.npz"
    kwargs = dict(
        rank_start=0, rank_end=20, num_negatives=5, query_max_len=Q_LEN, passage_max_len=P_LEN, batch_size=8, mesh=mesh1
    )
    first = load_or_mine(path, enc, ts, corpus, seed=0, **kwargs)
    assert load_mining(path).meta == first.meta

    def fail(*args, **kw):
        raise AssertionError("mined again")

    with monkeypatch.context() as m:
        m.setattr(mining, "mine_negatives", fail)
        reused = load_or_mine(path, enc, ts, corpus, seed=0, **kwargs)
    np.testing.assert_array_equal(reused.negatives, first.negatives)
    changed = load_or_mine(path, enc, ts, corpus, seed=1, **kwargs)
    assert changed.meta["seed"] == 1 and load_mining(path).meta == changed.meta
    other_corpus = corpus[:-1] + ["a new last document"]
    assert (
        load_or_mine(path, enc, ts, other_corpus, seed=1, **kwargs).meta["fingerprint"] != changed.meta["fingerprint"]
    )
    assert json.loads(json.dumps(changed.meta)) == changed.meta


@pytest.mark.slow
def test_minilm_on_scifact(minilm_dir, data_root, mesh1):
    from opera_jax.data.beir import load_split
    from opera_jax.data.training import build_training_set

    split = load_split(data_root / "scifact", "train")
    full = build_training_set(split)
    ts = full.subset_pairs(full.pair_query < 20)
    passages = split.corpus.passages()
    # A 500-document slice: the 20 queries' positives and the first other documents.
    positives = np.unique(ts.pair_doc)
    others = np.setdiff1d(np.arange(len(passages)), positives)[: 500 - len(positives)]
    rows = np.concatenate([positives, others])
    remap = np.full(len(passages), -1, np.int32)
    remap[rows] = np.arange(len(rows))
    ts = TrainingSet(ts.query_ids, ts.query_texts, ts.pair_query, remap[ts.pair_doc], ts.query_offsets)
    corpus = [passages[r] for r in rows]

    enc = load_encoder(str(minilm_dir))
    result = mine_negatives(
        enc,
        ts,
        corpus,
        rank_start=10,
        rank_end=100,
        num_negatives=50,
        seed=0,
        query_max_len=32,
        passage_max_len=32,
        batch_size=128,
        mesh=mesh1,
    )
    assert ts.num_queries == 20 and result.negatives.shape == (20, 50)
    assert result.counts.tolist() == [50] * 20  # 90 candidates, a few positives at most
    for q, negs in enumerate(_lists(result)):
        positives = set(ts.pair_doc[ts.query_offsets[q] : ts.query_offsets[q + 1]].tolist())
        assert not set(negs) & positives
        assert len(set(negs)) == len(negs) and all(0 <= d < 500 for d in negs)

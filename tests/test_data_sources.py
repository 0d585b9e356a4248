"""Training data from memory, from {query, pos, neg} JSONL files, and BEIR collections by hub name."""

import gzip
import json

import pytest

from opera_jax.data.beir import load_split, resolve_data_dir
from opera_jax.data.pairs_jsonl import load_pairs_jsonl
from opera_jax.data.tables import given_negatives, hold_out, split_from_tables
from opera_jax.data.training import build_training_set
from opera_jax.errors import InputError

QUERIES = {"q1": "what is a cat", "q2": "what is a dog", "q3": "unjudged", "q4": "fish?"}
CORPUS = {"c": "cats purr", "d": {"title": "Dogs", "text": "dogs bark"}, "f": "fish swim", "x": "noise"}
QRELS = {"q1": {"c": 1, "x": 0}, "q2": {"d": 2}, "q4": {"f": 1}}


def test_tables_become_a_checked_split():
    split = split_from_tables(QUERIES, CORPUS, QRELS)
    assert split.queries.ids == ("q1", "q2", "q4")  # judged only, in the given order
    assert split.corpus.ids == ("c", "d", "f", "x") and split.corpus.passage(1) == "Dogs dogs bark"
    assert split.qrels == QRELS
    listed = split_from_tables({"a": "t"}, ["zero", "one"], {"a": {1: 1}})
    assert listed.corpus.ids == ("0", "1") and listed.qrels == {"a": {"1": 1}}


@pytest.mark.parametrize(
    "qrels, message",
    [
        ({"q1": {"nope": 1}}, r"qrels\['q1'\]\['nope'\]: unknown document id"),
        ({"zz": {"c": 1}}, r"qrels\['zz'\]: unknown query id"),
        ({"q1": {"c": "1"}}, r"grade must be an integer"),
        ({}, "qrels: no judgments"),
    ],
)
def test_bad_tables_name_the_entry(qrels, message):
    with pytest.raises(InputError, match=message):
        split_from_tables(QUERIES, CORPUS, qrels)
    with pytest.raises(InputError, match=r"corpus\['e'\]: empty text"):
        split_from_tables(QUERIES, {**CORPUS, "e": " "}, QRELS)


def test_hold_out_partitions_the_queries_with_positives():
    queries = {f"q{i}": f"query {i}" for i in range(20)}
    qrels = {f"q{i}": {"c": 1 if i != 7 else 0} for i in range(20)}  # q7 has no positive: never held out
    split = split_from_tables(queries, CORPUS, qrels)
    train, held = hold_out(split, 0.25, seed=3)
    assert len(held.queries) == 5 and held.split == "validation" and "q7" not in held.qrels
    assert set(train.queries.ids) | set(held.queries.ids) == set(split.queries.ids)
    assert not set(train.queries.ids) & set(held.queries.ids)
    assert held.corpus is split.corpus and all(held.qrels[q] == qrels[q] for q in held.queries.ids)
    assert hold_out(split, 0.25, seed=3)[1].queries.ids == held.queries.ids  # seeded
    assert hold_out(split, 0.0) == (split, None)
    with pytest.raises(InputError, match="validation"):
        hold_out(split, 1.0)


def _write_jsonl(path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows) + "\n"
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


ROWS = [
    {"query": "cats?", "pos": ["cats purr"], "neg": ["dogs bark", "fish swim"], "pos_scores": [1.0], "prompt": "x"},
    {"query": "dogs?", "pos": ["dogs bark", "wolves howl"], "neg": ["cats purr", "dogs bark"]},
    {"query": "fish?", "pos": ["fish swim"]},
]


@pytest.mark.parametrize("gz", [False, True])
def test_pairs_jsonl_becomes_tables_and_negatives(tmp_path, gz):
    data = load_pairs_jsonl(_write_jsonl(tmp_path / ("t.jsonl.gz" if gz else "t.jsonl"), ROWS, gz))
    split = data.train
    texts = dict(zip(split.corpus.ids, split.corpus.texts))
    assert sorted(texts.values()) == sorted({t for r in ROWS for t in r["pos"] + r.get("neg", [])})  # deduplicated
    assert split.queries.texts == ("cats?", "dogs?", "fish?") and data.eval is None
    for qid, row in zip(split.queries.ids, ROWS):
        assert {texts[d] for d in split.qrels[qid]} == set(row["pos"])
        assert [texts[d] for d in data.negatives[qid]] == row.get("neg", [])
    ts = build_training_set(split)
    negatives, counts = given_negatives(ts, split.corpus, data.negatives)
    rows = {t: i for i, t in enumerate(split.corpus.texts)}
    assert counts.tolist() == [2, 1, 0]  # the second query's "dogs bark" is its positive: left out
    assert negatives[0, :2].tolist() == [rows["dogs bark"], rows["fish swim"]]
    assert negatives[1].tolist() == [rows["cats purr"], -1] and (negatives[2] == -1).all()


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"query": "q", "pos": []}', "line 2: field 'pos' is empty"),
        ('{"query": "q", "pos": "text"}', "line 2: field 'pos' must be a list of strings"),
        ('{"pos": ["p"]}', "line 2: field 'query' must be a non-empty string"),
        ('{"query": "q", "pos": ["p"], "neg": [1]}', "line 2: field 'neg' must be a list of strings"),
        ("{not json", "line 2: invalid JSON"),
    ],
)
def test_bad_pairs_lines_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
    with pytest.raises(InputError, match=message):
        load_pairs_jsonl(path)


# ----------------------------------------------------------------------------- the hub's BEIR layout

HUB_CORPUS = [
    {"_id": "d1", "title": "T1", "text": "first doc"},
    {"_id": 2, "title": "", "text": "second doc"},
    {"_id": "d3", "title": "", "text": "third doc", "metadata": {}},
]
HUB_QUERIES = [{"_id": "1", "text": "query one", "metadata": {}}, {"_id": "2", "text": "query two"}]
HUB_QRELS = {
    "test": "query-id\tcorpus-id\tscore\n1\td1\t1\n2\t2\t1\n",
    "train": "query-id\tcorpus-id\tscore\n2\td3\t1\n",
}


def _fake_hub(root, name, qrels=HUB_QRELS):
    """The hub cache as huggingface_hub lays it out: repo folders, refs/main, snapshots/<commit>/files."""

    def repo(repo_name, files):
        folder = root / f"datasets--BeIR--{repo_name}"
        commit = "0123456789abcdef0123456789abcdef01234567"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(commit)
        snap = folder / "snapshots" / commit
        snap.mkdir(parents=True)
        for fname, data in files.items():
            (snap / fname).write_bytes(data)

    jsonl = lambda rows: gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())  # noqa: E731
    repo(name, {"corpus.jsonl.gz": jsonl(HUB_CORPUS), "queries.jsonl.gz": jsonl(HUB_QUERIES), "README.md": b"x"})
    repo(f"{name}-qrels", {f"{s}.tsv": t.encode() for s, t in qrels.items()})


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    root = tmp_path / "hf-hub"
    root.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # nothing here may reach the network
    monkeypatch.setenv("OPERA_CACHE_DIR", str(tmp_path / "opera-cache"))
    return root


def test_beir_name_is_fetched_converted_and_validated(hub_cache, tmp_path):
    _fake_hub(hub_cache, "tiny")
    folder = resolve_data_dir("beir/tiny")
    assert folder == tmp_path / "opera-cache" / "data" / "beir" / "tiny"
    assert sorted(p.name for p in folder.iterdir()) == ["SOURCE.md", "corpus.jsonl.gz", "qrels", "queries.jsonl"]
    test = load_split(folder, "test")
    assert test.corpus.ids == ("d1", "2", "d3") and test.corpus.passage(0) == "T1 first doc"
    assert test.queries.ids == ("1", "2") and test.qrels == {"1": {"d1": 1}, "2": {"2": 1}}
    assert load_split(folder, "train").qrels == {"2": {"d3": 1}}
    assert "BeIR/tiny" in (folder / "SOURCE.md").read_text()
    import shutil

    shutil.rmtree(hub_cache / "datasets--BeIR--tiny")  # converted once: the hub is not needed again
    assert resolve_data_dir("beir/tiny") == folder


def test_offline_without_a_download_names_the_local_alternatives(hub_cache):
    with pytest.raises(InputError) as e:
        resolve_data_dir("beir/scifact")
    message = str(e.value)
    assert "BeIR/scifact" in message and "offline" in message and "scifact" in message.split("local collections:")[1]
    assert "\n" not in message


def test_hub_files_that_do_not_validate_leave_nothing(hub_cache, tmp_path):
    _fake_hub(hub_cache, "broken", qrels={"test": "query-id\tcorpus-id\tscore\n1\tmissing\t1\n"})
    with pytest.raises(InputError, match="unknown document id 'missing'"):
        resolve_data_dir("beir/broken")
    assert not (tmp_path / "opera-cache" / "data" / "beir").exists() or not any(
        (tmp_path / "opera-cache" / "data" / "beir").iterdir()
    )


def test_bad_collection_names_are_refused(hub_cache):
    for name in ("beir/../etc", "beir/scifact-qrels", "beir/"):
        with pytest.raises(InputError, match="not a BEIR collection name"):
            resolve_data_dir(name)

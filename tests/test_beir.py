"""The BEIR-layout loader: the shared collections, data-dir resolution, and every input error."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

import opera_jax
from opera_jax.data import beir
from opera_jax.data.beir import (
    DATA_ENV,
    Corpus,
    Queries,
    load_corpus,
    load_qrels,
    load_queries,
    load_split,
    positives,
    resolve_data_dir,
)
from opera_jax.errors import InputError

# From /work/shared/data/README.md: docs, queries in queries.jsonl, and per split (pairs, queries).
COLLECTIONS = {
    "scifact": (5183, 1109, {"train": (919, 809), "test": (339, 300)}),
    "cranfield": (1398, 225, {"train": (1072, 150), "test": (539, 75)}),
    "cacm": (3204, 64, {"train": (455, 34), "test": (341, 18)}),
    "med": (1033, 30, {"train": (448, 20), "test": (248, 10)}),
    "npl": (11426, 93, {"train": (1308, 62), "test": (775, 31)}),
}
SPLITS = [(name, split) for name, (_, _, splits) in COLLECTIONS.items() for split in splits]


@pytest.fixture(scope="module")
def shared_root() -> Path:
    try:
        root = resolve_data_dir()
    except InputError:
        pytest.skip("no shared data dir")
    if not (root / "scifact").is_dir():
        pytest.skip(f"{root} is not a root of the shared collections")
    return root


# --- the shared collections -------------------------------------------------------------------


@pytest.mark.parametrize(("name", "split"), SPLITS)
def test_shared_split_counts(shared_root, name, split):
    num_docs, num_queries, splits = COLLECTIONS[name]
    num_pairs, num_judged = splits[split]
    s = load_split(shared_root / name, split)
    assert (s.name, s.split) == (name, split)
    assert len(s.corpus) == num_docs and s.corpus.skipped_empty == 0
    assert len(s.queries) == num_judged
    assert sum(len(docs) for docs in s.qrels.values()) == num_pairs
    assert set(s.queries.ids) == set(s.qrels)
    all_queries = load_queries(shared_root / name)
    assert len(all_queries) == num_queries
    rows = [all_queries.index()[q] for q in s.queries.ids]
    assert rows == sorted(rows)  # queries.jsonl order
    assert s.queries.texts == tuple(all_queries.texts[r] for r in rows)
    assert all(grade >= 1 for docs in s.qrels.values() for grade in docs.values())


@pytest.mark.parametrize("name", COLLECTIONS)
def test_shared_splits_are_disjoint(shared_root, name):
    train, test = (set(load_qrels(shared_root / name, split)) for split in ("train", "test"))
    assert train and test and not train & test


def test_shared_cranfield_grades(shared_root):
    grades = {g for docs in load_qrels(shared_root / "cranfield", "test").values() for g in docs.values()}
    assert grades == {1, 2, 3, 4}


def test_shared_passages(shared_root):
    scifact = load_corpus(shared_root / "scifact")  # gzipped, with titles
    assert scifact.passage(0) == f"{scifact.titles[0]} {scifact.texts[0]}"
    med = load_corpus(shared_root / "med")  # no titles
    assert set(med.titles) == {""}
    assert med.passages() == list(med.texts)


# --- resolve_data_dir ----------------------------------------------------------------------------


def test_default_root_is_beside_the_checkout(monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    expected = Path(opera_jax.__file__).parents[2] / "shared" / "data"
    assert beir.default_data_root() == expected
    if expected.is_dir():
        assert resolve_data_dir() == expected


def test_default_root_of_an_installed_package_is_the_user_cache(tmp_path, monkeypatch):
    site = tmp_path / "site-packages" / "opera_jax"  # a wheel's package: no pyproject.toml beside it
    site.mkdir(parents=True)
    monkeypatch.setenv("OPERA_CACHE_DIR", str(tmp_path / "own"))
    assert beir.default_data_root(site) == tmp_path / "own" / "data"
    monkeypatch.delenv("OPERA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert beir.default_data_root(site) == tmp_path / "xdg" / "opera-jax" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert beir.default_data_root(site) == tmp_path / "home" / ".cache" / "opera-jax" / "data"
    (tmp_path / "site-packages" / "pyproject.toml").write_text("")  # a source checkout
    assert beir.default_data_root(site) == tmp_path / "shared" / "data"


def test_resolve_precedence(tmp_path, monkeypatch):
    explicit, env, default = (tmp_path / n for n in ("explicit", "env", "default"))
    for d in (explicit, env, default):
        (d / "coll").mkdir(parents=True)
    monkeypatch.setattr(beir, "default_data_root", lambda: default)
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert resolve_data_dir() == default
    assert resolve_data_dir("coll") == default / "coll"  # a bare name, looked up under the default root
    monkeypatch.setenv(DATA_ENV, str(env))
    assert resolve_data_dir() == env
    assert resolve_data_dir("coll") == env / "coll"  # $OPERA_DATA_DIR before the default root
    assert resolve_data_dir(explicit) == explicit
    assert resolve_data_dir(str(explicit / "coll")) == explicit / "coll"
    monkeypatch.chdir(explicit)
    assert resolve_data_dir("coll") == Path("coll")  # an existing relative path beats a bare-name lookup


def test_resolve_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(beir, "default_data_root", lambda: tmp_path / "absent")
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(InputError, match=DATA_ENV):
        resolve_data_dir()
    with pytest.raises(InputError, match="nothere") as e:
        resolve_data_dir("nothere")
    assert str(e.value).count(str(tmp_path / "absent")) == 1 and DATA_ENV in str(e.value)
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "absent"))  # the same root twice: named once
    with pytest.raises(InputError, match="nothere") as e:
        resolve_data_dir("nothere")
    assert str(e.value).count(str(tmp_path / "absent")) == 1
    monkeypatch.delenv(DATA_ENV)
    with pytest.raises(InputError, match="no such directory"):
        resolve_data_dir(tmp_path / "a" / "b")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        resolve_data_dir(tmp_path / "file")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "gone"))
    with pytest.raises(InputError, match=f"{DATA_ENV}=.*gone"):
        resolve_data_dir()


# --- synthetic collections -----------------------------------------------------------------------

DOCS = [
    {"_id": "d1", "title": "T1", "text": "one"},
    {"_id": "d2", "title": "", "text": "two"},
    {"_id": "d3", "text": "three"},
]
QUERIES = [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "second"}, {"_id": "q3", "text": "third"}]
QRELS = "query-id\tcorpus-id\tscore\nq2\td1\t1\nq1\td2\t2\nq1\td3\t0\n"


def _jsonl(rows: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def make_collection(
    root: Path,
    *,
    corpus: str | bytes | None = None,
    queries: str | bytes | None = None,
    qrels: dict[str, str] | None = None,
    gz: bool = False,
) -> Path:
    """A small collection under ``root/coll``; text arguments replace the default files."""
    folder = root / "coll"
    (folder / "qrels").mkdir(parents=True)
    corpus = _jsonl(DOCS) if corpus is None else corpus
    data = corpus.encode() if isinstance(corpus, str) else corpus
    if gz:
        (folder / "corpus.jsonl.gz").write_bytes(gzip.compress(data))
    else:
        (folder / "corpus.jsonl").write_bytes(data)
    queries = _jsonl(QUERIES) if queries is None else queries
    (folder / "queries.jsonl").write_bytes(queries.encode() if isinstance(queries, str) else queries)
    for split, text in ({"test": QRELS} if qrels is None else qrels).items():
        (folder / "qrels" / f"{split}.tsv").write_text(text)
    return folder


def assert_input_error(fn, *parts: str) -> str:
    """``fn()`` raises InputError whose message contains every part; returns the message."""
    with pytest.raises(InputError) as info:
        fn()
    message = str(info.value)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


def test_synthetic_split(tmp_path):
    s = load_split(make_collection(tmp_path), "test")
    assert s.name == "coll" and s.split == "test"
    assert s.corpus.ids == ("d1", "d2", "d3") and s.corpus.titles == ("T1", "", "")
    assert s.corpus.passages() == ["T1 one", "two", "three"]
    assert dict(s.corpus.index()) == {"d1": 0, "d2": 1, "d3": 2}
    assert s.queries.ids == ("q1", "q2")  # queries.jsonl order, not qrels order; q3 is unjudged
    assert s.queries.texts == ("first", "second") and s.queries.index()["q2"] == 1
    assert s.qrels == {"q2": {"d1": 1}, "q1": {"d2": 2, "d3": 0}}
    assert list(s.qrels) == ["q2", "q1"]  # file order


def test_gzip_corpus_and_tolerated_variants(tmp_path):
    corpus = ("\ufeff" + _jsonl([{"_id": 7, "text": "seven", "extra": [1]}])).replace("\n", "\r\n") + "\n\n  \n"
    qrels = "\nq1\t7\t-1\r\n\n q1 \t 7x \t +2 \n"  # no header; blank lines; whitespace around fields
    folder = make_collection(tmp_path, corpus=corpus, qrels={"test": qrels}, gz=True)
    corpus = load_corpus(folder)
    assert corpus.ids == ("7",) and corpus.titles == ("",)  # integer id -> str; title missing -> ""
    with pytest.raises(InputError, match="line 4: field 'corpus-id': unknown document id '7x'"):
        load_split(folder)
    assert load_qrels(folder, "test") == {"q1": {"7": -1, "7x": 2}}  # unchecked without indexes


BAD_LINES = [  # (line, field, problem)
    ('{"_id": "x", "text": "a"', "", "invalid JSON"),
    ('["_id", "text"]', "", "expected a JSON object, got an array"),
    ('{"text": "a"}', "'_id'", "is missing"),
    ('{"_id": null, "text": "a"}', "'_id'", "must be a string, got null"),
    ('{"_id": ["x"], "text": "a"}', "'_id'", "must be a string, got an array"),
    ('{"_id": true, "text": "a"}', "'_id'", "must be a string, got a boolean"),
    ('{"_id": 1.5, "text": "a"}', "'_id'", "must be a string, got a number"),
    ('{"_id": " ", "text": "a"}', "'_id'", "is empty"),
    ('{"_id": "x", "title": "a"}', "'text'", "is missing"),
    ('{"_id": "x", "text": 3}', "'text'", "must be a string, got a number"),
    ('{"_id": "x", "title": null, "text": "a"}', "'title'", "must be a string, got null"),
]


@pytest.mark.parametrize(
    ("which", "line", "field", "problem"),
    [("corpus", *case) for case in BAD_LINES]
    + [("queries", *case) for case in BAD_LINES if case[1] != "'title'"],  # queries have no title
)
def test_bad_jsonl_line(tmp_path, which, line, field, problem):
    rows = DOCS if which == "corpus" else QUERIES
    text = json.dumps(rows[0]) + "\n\n" + line + "\n" + json.dumps(rows[1]) + "\n"  # the bad line is line 3
    folder = make_collection(tmp_path, **{which: text})
    load = load_corpus if which == "corpus" else load_queries
    name = "corpus.jsonl" if which == "corpus" else "queries.jsonl"
    message = assert_input_error(lambda: load(folder), name, "line 3", field, problem)
    if problem == "invalid JSON":
        assert "column 25" in message
    assert_input_error(lambda: load_split(folder), name, "line 3", field, problem)


def test_duplicate_id_names_both_lines(tmp_path):
    folder = make_collection(tmp_path, corpus=_jsonl(DOCS + [{"_id": "d2", "text": "again"}]))
    assert_input_error(lambda: load_corpus(folder), "corpus.jsonl", "line 4", "'_id'", "'d2'", "first on line 2")
    folder = make_collection(tmp_path / "q", queries=_jsonl(QUERIES + [{"_id": "q1", "text": "again"}]))
    assert_input_error(lambda: load_queries(folder), "queries.jsonl", "line 4", "'_id'", "'q1'", "first on line 1")


def test_integer_id_duplicates_string_id(tmp_path):
    folder = make_collection(tmp_path, corpus=_jsonl([{"_id": "5", "text": "a"}, {"_id": 5, "text": "b"}]))
    assert_input_error(lambda: load_corpus(folder), "line 2", "duplicate id '5'")


@pytest.mark.parametrize("gz", [False, True])
def test_bad_utf8(tmp_path, gz):
    data = _jsonl(DOCS[:2]).encode() + b'{"_id": "d3", "text": "caf\xe9"}\n'
    folder = make_collection(tmp_path, corpus=data, gz=gz)
    assert_input_error(lambda: load_corpus(folder), "corpus.jsonl", "line 3", "invalid UTF-8", "byte 0xe9")
    folder = make_collection(tmp_path / "q", queries=b'{"_id": "q1", "text": "\xff"}\n')
    assert_input_error(lambda: load_queries(folder), "queries.jsonl", "line 1", "invalid UTF-8")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_gzip(tmp_path, damage):
    folder = make_collection(tmp_path, gz=True)
    path = folder / "corpus.jsonl.gz"
    good = path.read_bytes()
    path.write_bytes(b"not gzip at all" if damage == "garbage" else good[: len(good) // 2])
    assert_input_error(lambda: load_corpus(folder), "corpus.jsonl.gz", "corrupt gzip")


@pytest.mark.parametrize(
    ("qrels", "line", "parts"),
    [
        ("query-id\tcorpus-id\tscore\nq1\td1\n", 2, ["3 tab-separated columns", "got 2"]),
        ("q1 d1 1\n", 1, ["3 tab-separated columns", "got 1"]),  # space-separated
        ("q1\td1\t1\t0\n", 1, ["got 4"]),
        ("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t1.5\n", 3, ["field 'score'", "integer", "'1.5'"]),
        ("q1\td1\t1\nq1\td2\tscore\n", 2, ["field 'score'", "integer", "'score'"]),  # header only on line 1
        ("q1\td1\t2.0\nq1\td2\t1\n", 1, ["field 'score'", "integer", "'2.0'"]),  # not taken for a header
        ("qid\tdocid\trel\nq1\td1\t1\n", 1, ["field 'score'", "integer", "'rel'"]),  # not our column names
        ("\n\nq1\td1\t1\n\nq9\td2\t1\n", 5, ["field 'query-id'", "unknown query id 'q9'"]),
        ("q1\td1\t1\nq1\td9\t1\n", 2, ["field 'corpus-id'", "unknown document id 'd9'"]),
        ("q1\td1\t1\n\td2\t1\n", 2, ["field 'query-id'", "is empty"]),
        ("q1\td1\t1\nq1\t\t1\n", 2, ["field 'corpus-id'", "is empty"]),
        ("q1\td1\t1\nq2\td1\t1\nq1\td1\t0\n", 3, ["'query-id', 'corpus-id'", "duplicate judgment", "first on line 1"]),
    ],
)
def test_bad_qrels(tmp_path, qrels, line, parts):
    folder = make_collection(tmp_path, qrels={"test": qrels})
    assert_input_error(lambda: load_split(folder, "test"), str(Path("qrels", "test.tsv")), f"line {line}", *parts)


@pytest.mark.parametrize(
    "header", ["query-id\tcorpus-id\tscore", "QUERY_ID\tCorpus_Id\tScore", " query-id \tcorpus-id\tscore "]
)
def test_qrels_header_is_known_by_its_column_names(tmp_path, header):
    folder = make_collection(tmp_path, qrels={"test": f"{header}\nq1\td1\t2\n"})
    assert load_qrels(folder, "test") == {"q1": {"d1": 2}}


def test_qrels_without_judgments(tmp_path):
    folder = make_collection(tmp_path, qrels={"test": "query-id\tcorpus-id\tscore\n\n"})
    assert_input_error(lambda: load_qrels(folder, "test"), "test.tsv", "no judgments")


def test_missing_files(tmp_path):
    folder = make_collection(tmp_path, qrels={"train": QRELS, "test": QRELS})
    assert_input_error(
        lambda: load_split(folder, "dev"), str(Path("qrels", "dev.tsv")), "not found", "splits here: test, train"
    )
    assert_input_error(lambda: load_qrels(folder, "../queries"), "split '../queries'")
    (folder / "queries.jsonl").unlink()
    assert_input_error(lambda: load_split(folder), "queries.jsonl", "not found")
    (folder / "corpus.jsonl").unlink()
    assert_input_error(lambda: load_corpus(folder), "corpus.jsonl", "not found", "corpus.jsonl.gz")
    assert_input_error(lambda: load_corpus(tmp_path / "nothing"), "nothing", "no such collection directory")


def test_root_of_collections_is_not_a_collection(tmp_path):
    make_collection(tmp_path)
    assert_input_error(lambda: load_split(tmp_path), "corpus.jsonl", "root of collections (coll)")


def test_both_corpus_files_are_ambiguous(tmp_path):
    folder = make_collection(tmp_path)
    (folder / "corpus.jsonl.gz").write_bytes(gzip.compress(_jsonl(DOCS).encode()))
    assert_input_error(lambda: load_corpus(folder), str(folder), "corpus.jsonl and corpus.jsonl.gz", "ambiguous")


# --- empty texts ---------------------------------------------------------------------------------

EMPTY_DOC = {"_id": "d2", "title": " ", "text": "\t"}
EMPTY_QUERY = {"_id": "q1", "text": "  "}


def test_empty_texts_are_errors_by_default(tmp_path):
    folder = make_collection(tmp_path, corpus=_jsonl([DOCS[0], EMPTY_DOC, DOCS[2]]))
    assert_input_error(lambda: load_split(folder), "corpus.jsonl", "line 2", "'text'", "'d2'", "empty='skip'")
    folder = make_collection(tmp_path / "q", queries=_jsonl([EMPTY_QUERY] + QUERIES[1:]))
    assert_input_error(lambda: load_split(folder), "queries.jsonl", "line 1", "'text'", "'q1'", "empty='skip'")
    # A title alone is enough text for a document.
    folder = make_collection(tmp_path / "t", corpus=_jsonl([{"_id": "d1", "title": "T", "text": ""}]))
    assert load_corpus(folder).passages() == ["T"]


def test_empty_texts_skipped(tmp_path, caplog):
    qrels = "query-id\tcorpus-id\tscore\nq2\td1\t1\nq1\td1\t1\nq3\td2\t1\nq3\td3\t1\n"
    folder = make_collection(
        tmp_path,
        corpus=_jsonl([DOCS[0], EMPTY_DOC, DOCS[2]]),
        queries=_jsonl([EMPTY_QUERY] + QUERIES[1:]),
        qrels={"test": qrels},
    )
    with caplog.at_level(logging.WARNING, logger=beir.__name__):
        s = load_split(folder, empty="skip")
    assert s.corpus.ids == ("d1", "d3") and s.corpus.skipped_ids == ("d2",) and s.corpus.skipped_empty == 1
    assert s.queries.ids == ("q2", "q3") and s.queries.skipped_empty == 1
    assert s.qrels == {"q2": {"d1": 1}, "q3": {"d3": 1}}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3, warnings
    assert "corpus.jsonl: skipped 1 documents" in warnings[0]
    assert "queries.jsonl: skipped 1 queries" in warnings[1]
    assert "test.tsv: dropped 2 judgments" in warnings[2]


def test_nothing_left_after_skipping(tmp_path):
    folder = make_collection(tmp_path, corpus=_jsonl([EMPTY_DOC]))
    assert_input_error(lambda: load_corpus(folder, empty="skip"), "corpus.jsonl", "no documents")
    folder = make_collection(tmp_path / "q", qrels={"test": "q1\td2\t1\n"}, corpus=_jsonl([DOCS[0], EMPTY_DOC]))
    assert_input_error(lambda: load_split(folder, empty="skip"), "test.tsv", "no judgments left after dropping 1")


def test_bad_empty_mode(tmp_path):
    folder = make_collection(tmp_path)
    assert_input_error(lambda: load_split(folder, empty="ignore"), "empty", "'ignore'")


# --- helpers -------------------------------------------------------------------------------------


def test_positives_threshold():
    qrels = {"q1": {"a": 2, "b": 0, "c": 1, "d": -1}, "q2": {"e": 0}, "q3": {"f": 1}}
    assert positives(qrels) == {"q1": ["a", "c"], "q3": ["f"]}
    assert positives(qrels, threshold=1) == {"q1": ["a"]}
    assert positives(qrels, threshold=-1) == {"q1": ["a", "b", "c"], "q2": ["e"], "q3": ["f"]}
    assert positives(qrels, threshold=5) == {}


def test_direct_construction():
    corpus = Corpus(("a", "b"), ("A", ""), ("x", "y"))
    assert len(corpus) == 2 and corpus.index()["b"] == 1 and corpus.skipped_empty == 0
    assert corpus == Corpus(("a", "b"), ("A", ""), ("x", "y"))
    with pytest.raises(TypeError):
        corpus.index()["c"] = 2  # read-only
    with pytest.raises(ValueError, match="duplicate"):
        Queries(("q", "q"), ("x", "y"))
    with pytest.raises(ValueError, match="length"):
        Corpus(("a",), (), ("x",))

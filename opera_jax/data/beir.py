"""Retrieval collections in the BEIR layout, loaded with strict validation.

One collection is a folder; the folder's name is the collection's name::

    <name>/corpus.jsonl  or  <name>/corpus.jsonl.gz   {"_id": str, "title": str, "text": str}
    <name>/queries.jsonl                              {"_id": str, "text": str}
    <name>/qrels/<split>.tsv                          query-id <TAB> corpus-id <TAB> score

Rules:

* Files are UTF-8 (a leading byte-order mark is allowed); ``.gz`` files are gzip-compressed.
  Line numbers are 1-based; blank lines are ignored everywhere.
* Exactly one of ``corpus.jsonl`` and ``corpus.jsonl.gz`` exists.
* JSONL: every line is one JSON object. ``_id`` is a non-empty string (an integer is accepted and
  converted with ``str``, as some BEIR files have numeric ids) and is unique within its file.
  ``text`` is a required string, ``title`` an optional one (default ""). Other fields are ignored.
* An entry is *empty* when its text is only whitespace (documents: title and text both). With
  ``empty="error"`` (the default) that is an error; with ``empty="skip"`` the entry is dropped, so
  are the qrels lines that name it, and one warning per file gives the count.
* Qrels: three tab-separated columns; the score is an integer of any sign, and every grade is kept.
  The first line may be a header, recognised by its column names (``query-id``, ``corpus-id``,
  ``score``; case and ``_`` for ``-`` aside), never by its score: a score that is not an integer, on
  any line, is an error. Every id exists in ``queries.jsonl`` / the corpus, and a (query, document)
  pair is judged once.

Every violation raises one :class:`~opera_jax.errors.InputError` whose message names the file, the
line and the field at fault.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import zlib
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import opera_jax
from opera_jax.errors import InputError
from opera_jax.io_utils import cache_dir

log = logging.getLogger(__name__)

DATA_ENV = "OPERA_DATA_DIR"
EMPTY_MODES = ("error", "skip")
CORPUS_FILES = ("corpus.jsonl", "corpus.jsonl.gz")
QUERIES_FILE = "queries.jsonl"
QRELS_COLUMNS = ("query-id", "corpus-id", "score")

Qrels = dict[str, dict[str, int]]
"""Query id -> {document id: grade}, in file order."""

_INTEGER = re.compile(r"[+-]?[0-9]+")
_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


class _Rows:
    """What documents and queries share: rows in file order, looked up by id."""

    ids: tuple[str, ...]
    skipped_ids: tuple[str, ...]
    _index: Mapping[str, int]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def skipped_empty(self) -> int:
        """How many entries were skipped for empty text."""
        return len(self.skipped_ids)

    def index(self) -> Mapping[str, int]:
        """Id -> row (read-only)."""
        return self._index


@dataclass(frozen=True)
class Corpus(_Rows):
    """Documents in file order. ``skipped_ids``: the ids dropped for empty text (``empty="skip"``)."""

    ids: tuple[str, ...]
    titles: tuple[str, ...]
    texts: tuple[str, ...]
    skipped_ids: tuple[str, ...] = ()
    _index: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not len(self.ids) == len(self.titles) == len(self.texts):
            raise ValueError("Corpus: ids, titles and texts differ in length")
        object.__setattr__(self, "_index", _build_index(self.ids, "Corpus"))

    def passage(self, i: int, fields: str = "title_text") -> str:
        """The text to encode for row ``i``: ``title_text`` = title and text joined by a space (BEIR /
        MTEB, the default); ``text`` = the body only (what the OPERA release encodes)."""
        if fields == "text":
            return self.texts[i].strip()
        if fields != "title_text":
            raise ValueError(f"passage fields {fields!r}: title_text | text")
        return f"{self.titles[i]} {self.texts[i]}".strip()

    def passages(self, fields: str = "title_text") -> list[str]:
        """:meth:`passage` of every row, in order."""
        return [self.passage(i, fields) for i in range(len(self.ids))]


@dataclass(frozen=True)
class Queries(_Rows):
    """Queries in file order. ``skipped_ids``: the ids dropped for empty text (``empty="skip"``)."""

    ids: tuple[str, ...]
    texts: tuple[str, ...]
    skipped_ids: tuple[str, ...] = ()
    _index: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.texts):
            raise ValueError("Queries: ids and texts differ in length")
        object.__setattr__(self, "_index", _build_index(self.ids, "Queries"))


@dataclass(frozen=True)
class BeirSplit:
    """One split of a collection: the whole corpus, the judged queries and their judgments.

    ``queries`` holds only the queries that appear in ``qrels``, in ``queries.jsonl`` order.
    """

    name: str
    split: str
    corpus: Corpus
    queries: Queries
    qrels: Qrels


def default_data_root(package_dir: Path | None = None) -> Path:
    """The default root of collections: ``shared/data`` beside a source checkout (``pyproject.toml``
    next to the package); installed from a wheel, the user cache ``~/.cache/opera-jax/data``
    (``io_utils.cache_dir``), not a folder relative to site-packages."""
    package_dir = Path(opera_jax.__file__).parent if package_dir is None else package_dir
    if (package_dir.parent / "pyproject.toml").is_file():
        return package_dir.parents[1] / "shared" / "data"
    return cache_dir("data")


def resolve_data_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """A collection folder or a root of collections.

    Order: the explicit ``path`` (``beir/<name>``: the hub collection, see ``hub_data``); else ``$OPERA_DATA_DIR``; else :func:`default_data_root`. A bare
    name such as ``"scifact"`` that is not an existing path is looked up under ``$OPERA_DATA_DIR``
    (when set), then under the default root. Raises InputError when nothing exists.
    """
    env = os.environ.get(DATA_ENV) or None
    if path is not None and str(path).startswith("beir/") and not Path(path).expanduser().exists():
        from opera_jax.data.hub_data import fetch_beir  # a hub collection by name, fetched once

        return fetch_beir(str(path)[len("beir/") :])
    if path is not None:
        given = Path(path).expanduser()
        if given.exists():
            return _require_dir(given, f"data dir {given}")
        if len(given.parts) == 1:
            roots = list(dict.fromkeys(([Path(env).expanduser()] if env else []) + [default_data_root()]))
            for root in roots:
                if (root / given).is_dir():
                    return root / given
            raise InputError(
                f"data dir {str(path)!r}: no such path, nor a collection under "
                + " or ".join(str(r) for r in roots)
                + ("" if env else f" (set ${DATA_ENV} to your root of collections)")
            )
        raise InputError(f"data dir {given}: no such directory")
    if env:
        env_dir = Path(env).expanduser()
        if not env_dir.exists():
            raise InputError(f"${DATA_ENV}={env}: no such directory")
        return _require_dir(env_dir, f"${DATA_ENV}={env}")
    root = default_data_root()
    if not root.is_dir():
        raise InputError(f"no data dir given, ${DATA_ENV} is not set, and the default {root} does not exist")
    return root


def load_corpus(path: str | os.PathLike[str], *, empty: str = "error") -> Corpus:
    """The corpus of the collection folder ``path``."""
    _check_empty_mode(empty)
    file = _corpus_file(_collection_dir(path))
    ids: list[str] = []
    titles: list[str] = []
    texts: list[str] = []
    skipped: list[str] = []
    for n, doc_id, obj in _records(file):
        title = _string_field(file, n, obj, "title", required=False)
        text = _string_field(file, n, obj, "text", required=True)
        if not (title.strip() or text.strip()):
            if empty == "error":
                raise InputError(
                    f"{file}, line {n}: field 'text' is empty (and so is 'title') for _id "
                    f"{doc_id!r}; load with empty='skip' to drop such documents"
                )
            skipped.append(doc_id)
            continue
        ids.append(doc_id)
        titles.append(title)
        texts.append(text)
    _warn_skipped(file, len(skipped), "documents")
    if not ids:
        raise InputError(f"{file}: no documents")
    return Corpus(tuple(ids), tuple(titles), tuple(texts), tuple(skipped))


def load_queries(path: str | os.PathLike[str], *, empty: str = "error") -> Queries:
    """All queries of the collection folder ``path`` (judged or not), in file order."""
    _check_empty_mode(empty)
    file = _require_file(_collection_dir(path) / QUERIES_FILE)
    ids: list[str] = []
    texts: list[str] = []
    skipped: list[str] = []
    for n, query_id, obj in _records(file):
        text = _string_field(file, n, obj, "text", required=True)
        if not text.strip():
            if empty == "error":
                raise InputError(
                    f"{file}, line {n}: field 'text' is empty for _id {query_id!r}; "
                    "load with empty='skip' to drop such queries"
                )
            skipped.append(query_id)
            continue
        ids.append(query_id)
        texts.append(text)
    _warn_skipped(file, len(skipped), "queries")
    if not ids:
        raise InputError(f"{file}: no queries")
    return Queries(tuple(ids), tuple(texts), tuple(skipped))


def load_qrels(
    path: str | os.PathLike[str],
    split: str,
    *,
    corpus_index: Mapping[str, int] | None = None,
    query_index: Mapping[str, int] | None = None,
    skipped_docs: Collection[str] = (),
    skipped_queries: Collection[str] = (),
) -> Qrels:
    """The judgments of ``<path>/qrels/<split>.tsv``.

    Ids are checked against ``query_index`` / ``corpus_index`` when given. Lines naming an id in
    ``skipped_queries`` / ``skipped_docs`` (entries dropped for empty text) are dropped with a warning.
    """
    folder = _collection_dir(path)
    if not split or Path(split).name != split or split in (".", ".."):
        raise InputError(f"split {split!r}: not a plain file name (expected e.g. 'train' or 'test')")
    file = folder / "qrels" / f"{split}.tsv"
    if not file.is_file():
        available = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        raise InputError(f"{file}: not found (splits here: {', '.join(available) or 'none'})")
    qrels: Qrels = {}
    first_line: dict[tuple[str, str], int] = {}
    dropped = 0
    for k, (n, line) in enumerate(_lines(file)):
        cols = [c.strip() for c in line.split("\t")]
        if len(cols) != len(QRELS_COLUMNS):
            raise InputError(
                f"{file}, line {n}: expected {len(QRELS_COLUMNS)} tab-separated columns "
                f"({', '.join(QRELS_COLUMNS)}), got {len(cols)}"
            )
        if k == 0 and is_qrels_header(cols):
            continue
        query_id, doc_id, score = cols
        if not _INTEGER.fullmatch(score):
            raise InputError(f"{file}, line {n}: field 'score' must be an integer, got {score!r}")
        for name, value in zip(QRELS_COLUMNS, (query_id, doc_id)):
            if not value:
                raise InputError(f"{file}, line {n}: field {name!r} is empty")
        if query_id in skipped_queries or doc_id in skipped_docs:
            dropped += 1
            continue
        if query_index is not None and query_id not in query_index:
            raise InputError(
                f"{file}, line {n}: field 'query-id': unknown query id {query_id!r} (not in {QUERIES_FILE})"
            )
        if corpus_index is not None and doc_id not in corpus_index:
            raise InputError(f"{file}, line {n}: field 'corpus-id': unknown document id {doc_id!r} (not in the corpus)")
        pair = (query_id, doc_id)
        if pair in first_line:
            raise InputError(
                f"{file}, line {n}: fields 'query-id', 'corpus-id': duplicate judgment of "
                f"query {query_id!r}, document {doc_id!r} (first on line {first_line[pair]})"
            )
        first_line[pair] = n
        qrels.setdefault(query_id, {})[doc_id] = int(score)
    if dropped:
        log.warning("%s: dropped %d judgments naming documents or queries skipped for empty text", file, dropped)
    if not qrels:
        raise InputError(f"{file}: no judgments" + (f" left after dropping {dropped}" if dropped else ""))
    return qrels


def load_split(path: str | os.PathLike[str], split: str = "test", *, empty: str = "error") -> BeirSplit:
    """The corpus, the queries judged in ``split`` and the split's judgments, all cross-checked."""
    folder = _collection_dir(path)
    corpus = load_corpus(folder, empty=empty)
    queries = load_queries(folder, empty=empty)
    qindex = queries.index()
    qrels = load_qrels(
        folder,
        split,
        corpus_index=corpus.index(),
        query_index=qindex,
        skipped_docs=frozenset(corpus.skipped_ids),
        skipped_queries=frozenset(queries.skipped_ids),
    )
    rows = sorted(qindex[q] for q in qrels)
    judged = Queries(tuple(queries.ids[i] for i in rows), tuple(queries.texts[i] for i in rows), queries.skipped_ids)
    return BeirSplit(folder.resolve().name, split, corpus, judged, qrels)


def is_qrels_header(cols: list[str]) -> bool:
    """Whether a qrels line's columns are the column names (``query-id  corpus-id  score``)."""
    return [c.strip().lower().replace("_", "-") for c in cols] == list(QRELS_COLUMNS)


def positives(qrels: Qrels, threshold: int = 0) -> dict[str, list[str]]:
    """Per query, the documents graded above ``threshold``, in file order; queries with none are left out."""
    result: dict[str, list[str]] = {}
    for query_id, grades in qrels.items():
        docs = [doc_id for doc_id, grade in grades.items() if grade > threshold]
        if docs:
            result[query_id] = docs
    return result


def _build_index(ids: tuple[str, ...], what: str) -> Mapping[str, int]:
    index = {id_: i for i, id_ in enumerate(ids)}
    if len(index) != len(ids):
        raise ValueError(f"{what}: duplicate ids")
    return MappingProxyType(index)


def _check_empty_mode(empty: str) -> None:
    if empty not in EMPTY_MODES:
        raise InputError(f"empty: must be one of {', '.join(map(repr, EMPTY_MODES))}, got {empty!r}")


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise InputError(f"{what}: not a directory")
    return path


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    return path


def _collection_dir(path: str | os.PathLike[str]) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise InputError(f"{folder}: no such collection directory")
    return _require_dir(folder, str(folder))


def _corpus_file(folder: Path) -> Path:
    found = [folder / name for name in CORPUS_FILES if (folder / name).exists()]
    if len(found) > 1:
        raise InputError(f"{folder}: both {' and '.join(CORPUS_FILES)} exist, which is ambiguous; keep one")
    if not found:
        collections = sorted(
            c.name for c in folder.iterdir() if c.is_dir() and any((c / name).exists() for name in CORPUS_FILES)
        )
        hint = f"; {folder} is a root of collections ({', '.join(collections)}): pass one" if collections else ""
        raise InputError(f"{folder / CORPUS_FILES[0]}: file not found (nor {CORPUS_FILES[1]}){hint}")
    return _require_file(found[0])


def _read_text(file: Path) -> str:
    """The file decoded from UTF-8 (gunzipped first for ``.gz``), without a leading byte-order mark."""
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise InputError(f"{file}: cannot read: {e.strerror or e}") from e
    if file.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise InputError(f"{file}: corrupt gzip data: {e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        raise InputError(
            f"{file}, line {line}: invalid UTF-8 "
            f"(byte 0x{raw[e.start]:02x} at byte {e.start - line_start + 1} of the line)"
        ) from None
    return text.removeprefix("\ufeff")


def _lines(file: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) for each non-blank line."""
    for n, line in enumerate(_read_text(file).split("\n"), 1):
        if line.strip():
            yield n, line


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def json_objects(file: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file (gzipped or not), each a JSON
    object: anything else is an InputError naming the line."""
    for n, line in _lines(file):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{file}, line {n}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{file}, line {n}: expected a JSON object, got {_json_type(obj)}")
        yield n, obj


def _records(file: Path) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(line number, ``_id``, object) for each JSONL record; ids validated and unique."""
    first_line: dict[str, int] = {}
    for n, obj in json_objects(file):
        if "_id" not in obj:
            raise InputError(f"{file}, line {n}: field '_id' is missing")
        record_id = obj["_id"]
        if isinstance(record_id, int) and not isinstance(record_id, bool):
            record_id = str(record_id)
        if not isinstance(record_id, str):
            raise InputError(f"{file}, line {n}: field '_id' must be a string, got {_json_type(record_id)}")
        if not record_id.strip():
            raise InputError(f"{file}, line {n}: field '_id' is empty")
        if record_id in first_line:
            raise InputError(
                f"{file}, line {n}: field '_id': duplicate id {record_id!r} (first on line {first_line[record_id]})"
            )
        first_line[record_id] = n
        yield n, record_id, obj


def _string_field(file: Path, n: int, obj: dict[str, Any], name: str, *, required: bool) -> str:
    if name not in obj:
        if required:
            raise InputError(f"{file}, line {n}: field {name!r} is missing")
        return ""
    value = obj[name]
    if not isinstance(value, str):
        raise InputError(f"{file}, line {n}: field {name!r} must be a string, got {_json_type(value)}")
    return value


def _warn_skipped(file: Path, count: int, what: str) -> None:
    if count:
        log.warning("%s: skipped %d %s with empty text", file, count, what)

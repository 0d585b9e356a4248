"""BEIR collections by name: ``beir/<name>`` is fetched from the Hugging Face hub once, into the user cache.

The hub holds each BEIR collection as two dataset repos, ``BeIR/<name>``
(``corpus.jsonl.gz``, ``queries.jsonl.gz``) and ``BeIR/<name>-qrels``
(``<split>.tsv``). ``fetch_beir`` downloads both with ``huggingface_hub``
(through its own cache, so ``HF_HUB_OFFLINE=1`` reuses earlier downloads),
converts them to the BEIR folder layout that ``opera_jax.data.beir`` loads
(``corpus.jsonl.gz``, ``queries.jsonl``, ``qrels/<split>.tsv``), checks every
split with that loader, and renames the folder into place, so a half-converted
collection is never seen. The folder is
``$OPERA_CACHE_DIR/data/beir/<name>`` (default ``~/.cache/opera-jax/...``);
later calls use it without touching the hub.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import zlib
from pathlib import Path

from opera_jax.errors import InputError
from opera_jax.io_utils import cache_dir

PREFIX = "beir/"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def is_hub_name(ref: str | os.PathLike) -> bool:
    return str(ref).startswith(PREFIX)


def cache_root() -> Path:
    """Where fetched collections go: ``$OPERA_CACHE_DIR/data/beir`` or ``~/.cache/opera-jax/data/beir``."""
    return cache_dir("data") / "beir"


def fetch_beir(name: str, *, root: Path | None = None) -> Path:
    """The local BEIR folder of hub collection ``name`` (e.g. ``"scifact"``), downloaded on first use."""
    if not _NAME.fullmatch(name) or name.endswith("-qrels"):
        raise InputError(f"data 'beir/{name}': not a BEIR collection name (e.g. beir/scifact)")
    target = (root or cache_root()) / name
    if (target / "qrels").is_dir():
        return target
    corpus_repo = _download(f"BeIR/{name}", ["corpus.jsonl.gz", "queries.jsonl.gz", "corpus.jsonl", "queries.jsonl"])
    qrels_repo = _download(f"BeIR/{name}-qrels", ["*.tsv"])
    return convert(corpus_repo, qrels_repo, target, source=f"BeIR/{name}")


def convert(corpus_repo: Path, qrels_repo: Path, target: Path, *, source: str = "") -> Path:
    """Hub repo snapshots -> a validated BEIR folder at ``target`` (replaced atomically)."""
    from opera_jax.data.beir import load_corpus, load_qrels, load_queries

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        corpus = _one(corpus_repo, "corpus")
        shutil.copyfile(corpus, tmp / corpus.name)
        queries = _one(corpus_repo, "queries")
        (tmp / "queries.jsonl").write_bytes(_gunzip(queries) if queries.name.endswith(".gz") else queries.read_bytes())
        splits = sorted(qrels_repo.glob("*.tsv"))
        if not splits:
            raise InputError(f"{source or qrels_repo}-qrels: no <split>.tsv files")
        (tmp / "qrels").mkdir()
        for tsv in splits:
            shutil.copyfile(tsv, tmp / "qrels" / tsv.name)
        (tmp / "SOURCE.md").write_text(
            f"Fetched from the Hugging Face hub: datasets {source} ({corpus_repo.name}) and "
            f"{source}-qrels ({qrels_repo.name}); converted by opera_jax.data.hub_data.\n",
            encoding="utf-8",
        )
        docs, qs = load_corpus(tmp, empty="skip"), load_queries(tmp, empty="skip")
        for tsv in splits:
            load_qrels(
                tmp,
                tsv.stem,
                corpus_index=docs.index(),
                query_index=qs.index(),
                skipped_docs=frozenset(docs.skipped_ids),
                skipped_queries=frozenset(qs.skipped_ids),
            )
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _one(repo: Path, stem: str) -> Path:
    found = [repo / f"{stem}{s}" for s in (".jsonl.gz", ".jsonl") if (repo / f"{stem}{s}").is_file()]
    if not found:
        raise InputError(f"{repo}: no {stem}.jsonl.gz or {stem}.jsonl in the hub snapshot")
    return found[0]


def _gunzip(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"{path}: corrupt gzip data: {e}") from None


def _download(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise InputError(f"dataset {repo_id!r}: not on the Hugging Face hub (is the collection name right?)") from None
    except LocalEntryNotFoundError:
        raise InputError(
            f"dataset {repo_id!r}: not downloaded yet and the Hugging Face hub cannot be reached (offline?); "
            f"{_local_alternatives()}"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise InputError(f"dataset {repo_id!r}: cannot be fetched from the Hugging Face hub ({e})") from None


def _local_alternatives() -> str:
    """A hint naming the collections that exist locally, to pass by name or path instead."""
    from opera_jax.data import beir

    roots = [Path(p).expanduser() for p in (os.environ.get(beir.DATA_ENV), beir.default_data_root(), cache_root()) if p]
    names = sorted(
        {
            c.name
            for r in roots
            if r.is_dir()
            for c in r.iterdir()
            if c.is_dir() and any((c / f).exists() for f in beir.CORPUS_FILES)
        }
    )
    local = f"local collections: {', '.join(names)}" if names else "no local collections found"
    return f"pass a BEIR folder instead ({local})"

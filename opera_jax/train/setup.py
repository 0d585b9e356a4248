"""What a command starts from: the model, the training set tokenised, the negatives, the base scores.

``opera-jax train`` (``trainer.py``), ``mine`` and ``prune`` share these steps, so the three agree on
which data, which texts and which cache files a config means.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from opera_jax.config import Config
from opera_jax.data.beir import BeirSplit, load_split, resolve_data_dir
from opera_jax.data.pairs_jsonl import is_pairs_file, load_pairs_jsonl
from opera_jax.data.tables import TrainData, hold_out
from opera_jax.data.tokens import TokenArrays, tokenize
from opera_jax.data.training import TrainingSet, build_training_set
from opera_jax.data.validation import carve
from opera_jax.io_utils import cache_dir
from opera_jax.methods.pair_scores import pair_similarities
from opera_jax.models.bert import Precision
from opera_jax.models.encoder import Encoder, load_encoder
from opera_jax.preflight import check_batch_fits
from opera_jax.train.mining import MiningResult, load_or_mine

SPEC_FIELDS = ("pooling", "normalize", "query_prefix", "passage_prefix", "padding_side")


def load_model(config: Config) -> Encoder:
    """``model.name`` with the config's precision, remat, attention and any spec fields it overrides."""
    m = config.model
    overrides = {k: getattr(m, k) for k in SPEC_FIELDS if getattr(m, k) is not None}
    return load_encoder(
        m.name,
        precision=Precision.named(m.dtype, m.param_dtype),
        remat=m.remat,
        attention=m.attention,
        seed=config.seed,
        overrides=overrides,
    )


@dataclasses.dataclass
class Setup:
    """What every command that trains, mines or prunes starts from."""

    encoder: Encoder
    data_dir: Path | None  # None: the data came loaded (``given``)
    train_split: BeirSplit
    ts: TrainingSet
    query_tokens: TokenArrays  # the training queries, with the query prefix
    doc_tokens: TokenArrays  # the whole corpus, with the passage prefix
    eval_split: BeirSplit | None = None  # loaded when preparing a training run
    given: TrainData | None = None


def prepare(config: Config, *, training: bool = False, data: TrainData | None = None) -> Setup:
    """Model, training split and training set, tokenised. ``training``: also load the eval split and
    check that one batch fits the training set, before tokenising anything. ``data``: already-loaded
    splits (``opera_jax.finetune``), used instead of ``data.path``; a ``data.path`` naming a
    ``{query, pos, neg}`` JSONL file is read as one, with 10% of its queries held out for evaluation
    (``tables.hold_out``, seeded by ``seed``)."""
    data_cfg = config.data
    encoder = load_model(config)
    spec = encoder.spec
    if data is None and is_pairs_file(data_cfg.path):
        pairs = load_pairs_jsonl(data_cfg.path)
        data = TrainData(*hold_out(pairs.train, 0.1, config.seed), negatives=pairs.negatives)
    data_dir = None if data is not None else resolve_data_dir(data_cfg.path)
    valid_split = None  # data.valid_fraction's held-out queries: carved once, the eval split of a run
    if data is not None:
        train_split = data.train
    else:
        train_split = load_split(data_dir, data_cfg.train_split, empty=data_cfg.empty)
        if data_cfg.valid_fraction:
            train_split, valid_split = carve(train_split, data_cfg.valid_fraction)
    ts = build_training_set(train_split, data_cfg.pos_threshold)
    eval_split = None
    if training:
        if data is None:
            eval_split = valid_split if valid_split is not None else evaluation_split(config, data_dir)
        check_batch_fits(config, ts.num_queries, ts.num_pairs, data_cfg.train_split)
    query_tokens = tokenize(encoder.tokenizer, ts.query_texts, data_cfg.query_max_len, spec.query_prefix)
    doc_tokens = tokenize(
        encoder.tokenizer,
        train_split.corpus.passages(data_cfg.passage_text),
        data_cfg.passage_max_len,
        spec.passage_prefix,
    )
    return Setup(encoder, data_dir, train_split, ts, query_tokens, doc_tokens, eval_split, data)


def evaluation_split(config: Config, data_dir: Path | None = None) -> BeirSplit:
    """What a run evaluates on: ``data.eval_split``, or the validation queries carved from the training
    split when ``data.valid_fraction`` is set (then test is never looked at)."""
    data_cfg = config.data
    data_dir = data_dir or resolve_data_dir(data_cfg.path)
    if data_cfg.valid_fraction:
        return carve(load_split(data_dir, data_cfg.train_split, empty=data_cfg.empty), data_cfg.valid_fraction)[1]
    return load_split(data_dir, data_cfg.eval_split, empty=data_cfg.empty)


def mine(config: Config, setup: Setup, mesh, *, progress: bool = False, path: Path | None = None) -> MiningResult:
    """The run's hard negatives: reused from the cache when mined with the same settings."""
    data_cfg, mining = config.data, config.mining
    own = mining.model in (None, config.model.name)
    miner = setup.encoder if own else load_encoder(mining.model)
    return load_or_mine(
        path or mining_cache_path(config),
        miner,
        setup.ts,
        setup.train_split.corpus.passages(data_cfg.passage_text),
        model_name=mining.model or config.model.name,
        mode=mining.mode,
        rank_start=mining.rank_start,
        rank_end=mining.rank_end,
        num_negatives=mining.num_negatives,
        seed=config.seed,
        query_max_len=data_cfg.query_max_len,
        passage_max_len=data_cfg.passage_max_len,
        batch_size=data_cfg.eval_batch_size,
        mesh=mesh,
        query_tokens=setup.query_tokens if own else None,
        doc_tokens=setup.doc_tokens if own else None,
        progress=progress,
    )


def mining_cache_path(config: Config) -> Path:
    """Where a run's negatives are cached: shared by runs that would mine the same ones.

    ``load_or_mine`` still checks the saved metadata (model, range, M, seed, texts)
    before reusing a file, so a collision can only cost a re-mine.
    """
    m, data_cfg = config.mining, config.data
    key = json.dumps(
        [
            m.model or config.model.name,
            m.mode,
            m.rank_start,
            m.rank_end,
            m.num_negatives,
            config.seed,
            data_cfg.path,
            data_cfg.train_split,
            data_cfg.query_max_len,
            data_cfg.passage_max_len,
        ]
        + ([data_cfg.passage_text] if data_cfg.passage_text != "title_text" else [])
        + ([data_cfg.valid_fraction] if data_cfg.valid_fraction else [])
    )
    return cache_dir("negatives") / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"


def base_scores(
    config: Config, encoder: Encoder, ts: TrainingSet, query_tokens: TokenArrays, doc_tokens: TokenArrays, mesh
) -> np.ndarray:
    """f32 ``[N]``: the base model's similarity of every pair of ``ts`` (SP's and DP's starting scores)."""
    return pair_similarities(
        encoder.model,
        ts,
        query_tokens,
        doc_tokens,
        query_max_len=config.data.query_max_len,
        passage_max_len=config.data.passage_max_len,
        batch_size=config.data.eval_batch_size,
        padding_side=encoder.spec.padding_side,
        mesh=mesh,
    )

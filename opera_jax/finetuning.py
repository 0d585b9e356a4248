"""``finetune(...)``: the run ``opera-jax train`` makes, from Python, on a folder, tables or a JSONL file.

The config is a ``Config``, a YAML path (ours or an OPERA release file) or the
defaults, then keyword overrides: dotted paths written with ``__``
(``optim__learning_rate=1e-5``) or a few short names (``model``, ``method``,
``max_steps``, ``batch_size``, ``learning_rate``, ``eval_every``,
``group_size``, ``seed``). Data is one of:

* a BEIR folder, a collection name, or ``beir/<name>`` (fetched from the hub):
  train on ``data.train_split``, evaluate on ``data.eval_split``, as the CLI;
* ``(queries, corpus, qrels)`` tables (``data.tables.split_from_tables``);
* a ``{query, pos, neg}`` JSONL file (``data.pairs_jsonl``): its negatives are
  used as the mined ones (when it has none, they are mined as usual).

For tables and JSONL, ``eval_data`` (tables or a BEIR folder) is the eval
split; without it a ``validation`` fraction of the training queries (default
0.1, seeded) is held out and evaluated over the same corpus; ``validation=0``
trains without evaluation (``metrics`` is then empty).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from opera_jax.config import Config, config_to_dict, flatten, load_config
from opera_jax.data.tables import TrainData, hold_out, split_from_tables
from opera_jax.errors import InputError

ALIASES = {
    "model": "model.name",
    "method": "method.name",
    "max_steps": "optim.max_steps",
    "batch_size": "optim.batch_size",
    "learning_rate": "optim.learning_rate",
    "eval_every": "train.eval_every",
    "group_size": "data.group_size",
    "seed": "seed",
}


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
    run_dir: Path  # config.yaml, metrics.jsonl, tb/, checkpoints/, model/
    model_dir: Path  # the exported model: load it with DenseRetriever or sentence-transformers
    metrics: dict  # the final evaluation's row of metrics.jsonl ({} when not evaluated)


def finetune(
    data: Any = None,
    *,
    config: Config | str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    eval_data: Any = None,
    validation: float = 0.1,
    progress: bool = True,
    **overrides: Any,
) -> FinetuneResult:
    """Finetune, evaluate and export, exactly as ``opera-jax train``; see the module docstring for ``data``."""
    from opera_jax.train.trainer import train_and_evaluate

    settings = [f"{ALIASES.get(k, k.replace('__', '.'))}={_value(v)}" for k, v in overrides.items()]
    loaded: TrainData | None = None
    if isinstance(data, TrainData):
        loaded = data
    elif isinstance(data, (tuple, list)):
        if len(data) != 3:
            raise InputError("data: tables must be (queries, corpus, qrels)")
        loaded = TrainData(split_from_tables(*data))
        settings.append("data.path=<in-memory>")
    elif data is not None:
        from opera_jax.data.pairs_jsonl import is_pairs_file, load_pairs_jsonl

        if is_pairs_file(data):
            loaded = load_pairs_jsonl(data)
        settings.append(f"data.path={_value(str(Path(data).expanduser().resolve()) if loaded else str(data))}")
    cfg = _config(config, settings)
    if loaded is not None and loaded.eval is None:
        held = _eval_split(eval_data, cfg)
        train = loaded.train
        if held is None:
            train, held = hold_out(train, validation, cfg.seed)
        loaded = dataclasses.replace(loaded, train=train, eval=held)
    elif eval_data is not None:
        raise InputError("eval_data: only with data given as tables or a JSONL file (a folder has its own eval split)")
    run_dir = Path(out) if out is not None else Path("runs") / f"finetune-{time.strftime('%Y%m%d-%H%M%S')}"
    metrics = train_and_evaluate(cfg, run_dir, progress=progress, data=loaded)
    return FinetuneResult(run_dir, run_dir / "model", metrics)


def _value(v: Any) -> str:
    """An override's value as text that ``load_config`` parses back to ``v`` (JSON is YAML)."""
    return json.dumps(str(v) if isinstance(v, os.PathLike) else v)


def _config(config: Config | str | os.PathLike | None, settings: list[str]) -> Config:
    if isinstance(config, Config):
        flat = flatten(config_to_dict(config))
        return load_config(None, [f"{k}={_value(v)}" for k, v in flat.items()] + settings)
    return load_config(config, settings)


def _eval_split(eval_data: Any, cfg: Config):
    if eval_data is None:
        return None
    if isinstance(eval_data, (tuple, list)) and len(eval_data) == 3:
        return split_from_tables(*eval_data, name="eval", split="test")
    from opera_jax.data.beir import load_split, resolve_data_dir

    return load_split(resolve_data_dir(eval_data), cfg.data.eval_split, empty=cfg.data.empty)

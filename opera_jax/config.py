"""Run configuration: frozen dataclasses, loaded from YAML with ``key=value`` overrides.

A config file may be partial: defaults fill the rest. ``load_config(path,
["optim.learning_rate=1e-5", "seed=1"])`` applies overrides after the file;
values are parsed as YAML (``true``, ``null``, ``[1, 2]``, ``1e-5``). Every key
is checked: an unknown one is an error that suggests the closest valid key,
and types, choices and ranges are validated, each error naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from opera_jax.errors import InputError
from opera_jax.io_utils import write_text


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "sentence-transformers/all-MiniLM-L6-v2"  # local dir or hub id
    pooling: str | None = None  # cls | mean | last; None = from the model's files
    normalize: bool | None = None
    query_prefix: str | None = None
    passage_prefix: str | None = None
    padding_side: str | None = None  # left | right
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = "scifact"  # collection dir, or a name under $OPERA_DATA_DIR / ../shared/data
    train_split: str = "train"
    eval_split: str = "test"
    query_max_len: int = 64
    passage_max_len: int = 256
    group_size: int = 2  # 1 positive + group_size - 1 hard negatives per query
    pos_threshold: int = 0
    empty: str = "error"  # error | skip
    eval_batch_size: int = 128


@dataclasses.dataclass(frozen=True)
class MiningConfig:
    rank_start: int = 10
    rank_end: int = 100
    num_negatives: int = 200
    mode: str = "hard"  # hard | random
    model: str | None = None  # None = the base model


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    temperature: float = 0.05
    batch_size: int = 32  # global queries per step
    max_steps: int = 300
    schedule: str = "linear"  # linear | constant


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    eval_every: int = 50  # 0 = only at the end (step 0 is always evaluated)
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    log_every: int = 10


@dataclasses.dataclass(frozen=True)
class SPConfig:
    kept_pct: float = 0.25
    mode: str = "highest"  # highest | lowest | random


@dataclasses.dataclass(frozen=True)
class DPConfig:
    criterion: str = "sim"  # sim | loss
    query_cutoff_start: float = 0.25
    strength_start: float = 2.0
    strength_end: float = 5.0
    pos_cutoff_start: float = 0.25
    pos_cutoff_end: float = 0.5
    pos_strength: float = 5.0
    schedule: str = "cosine"  # cosine | linear
    delta: float = 1.0
    keep_higher_query: bool = True
    keep_higher_pos: bool = True
    refresh_every: int | None = None  # steps; None = one epoch of n0 draws


@dataclasses.dataclass(frozen=True)
class InfoBatchConfig:
    ratio: float = 0.25
    delta: float = 0.875


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    name: str = "basic"  # basic | sp | dp | infobatch
    sp: SPConfig = SPConfig()
    dp: DPConfig = DPConfig()
    infobatch: InfoBatchConfig = InfoBatchConfig()


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    fsdp: int = 1


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    mining: MiningConfig = MiningConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    method: MethodConfig = MethodConfig()
    mesh: MeshConfig = MeshConfig()


CHOICES = {
    "model.pooling": ("cls", "mean", "last"),
    "model.padding_side": ("left", "right"),
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "data.empty": ("error", "skip"),
    "mining.mode": ("hard", "random"),
    "optim.schedule": ("linear", "constant"),
    "method.name": ("basic", "sp", "dp", "infobatch"),
    "method.sp.mode": ("highest", "lowest", "random"),
    "method.dp.criterion": ("sim", "loss"),
    "method.dp.schedule": ("cosine", "linear"),
}

# field -> (predicate, what it must be)
RANGES = {
    "data.query_max_len": (lambda v: v >= 2, ">= 2"),
    "data.passage_max_len": (lambda v: v >= 2, ">= 2"),
    "data.group_size": (lambda v: v >= 1, ">= 1"),
    "data.eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "mining.rank_start": (lambda v: v >= 0, ">= 0"),
    "mining.num_negatives": (lambda v: v >= 1, ">= 1"),
    "optim.learning_rate": (lambda v: v >= 0, ">= 0"),
    "optim.warmup_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "optim.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optim.max_grad_norm": (lambda v: v > 0, "> 0"),
    "optim.temperature": (lambda v: v > 0, "> 0"),
    "optim.batch_size": (lambda v: v >= 1, ">= 1"),
    "optim.max_steps": (lambda v: v >= 1, ">= 1"),
    "train.eval_every": (lambda v: v >= 0, ">= 0"),
    "train.checkpoint_every": (lambda v: v >= 0, ">= 0"),
    "train.keep_checkpoints": (lambda v: v >= 1, ">= 1"),
    "train.log_every": (lambda v: v >= 1, ">= 1"),
    "method.sp.kept_pct": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "method.dp.query_cutoff_start": (lambda v: 0 < v < 1, "in (0, 1)"),
    "method.dp.strength_start": (lambda v: v > 1, "> 1"),
    "method.dp.strength_end": (lambda v: v > 1, "> 1"),
    "method.dp.pos_cutoff_start": (lambda v: 0 < v < 1, "in (0, 1)"),
    "method.dp.pos_cutoff_end": (lambda v: 0 < v < 1, "in (0, 1)"),
    "method.dp.pos_strength": (lambda v: v >= 1, ">= 1"),
    "method.dp.delta": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "method.dp.refresh_every": (lambda v: v is None or v >= 1, ">= 1 or null"),
    "method.infobatch.ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "method.infobatch.delta": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "mesh.fsdp": (lambda v: v >= 1, ">= 1"),
}


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        t = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            keys += _all_keys(t, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the field's type; PyYAML reads ``1e-5`` as a string, so numbers in strings are accepted."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    raise InputError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _build(cls, data: Any, prefix: str, source: str):
    if not isinstance(data, dict):
        raise InputError(f"{source}: '{prefix.rstrip('.') or 'the file'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            full = f"{prefix}{key}"
            close = difflib.get_close_matches(full, _all_keys(Config), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise InputError(f"{source}: unknown key '{full}'{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        where = f"{source}: {prefix}{f.name}"
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, data[f.name] or {}, f"{prefix}{f.name}.", source)
        else:
            kwargs[f.name] = _coerce(data[f.name], hint, where)
    return cls(**kwargs)


def _validate(config: Config, source: str) -> None:
    flat = _flatten(config_to_dict(config))
    for key, choices in CHOICES.items():
        if flat[key] is not None and flat[key] not in choices:
            raise InputError(f"{source}: {key} is {flat[key]!r}, not one of {', '.join(choices)}")
    for key, (ok, what) in RANGES.items():
        if not ok(flat[key]):
            raise InputError(f"{source}: {key} must be {what}, got {flat[key]!r}")
    if config.mining.rank_start >= config.mining.rank_end:
        raise InputError(f"{source}: mining.rank_start ({config.mining.rank_start}) must be below "
                         f"mining.rank_end ({config.mining.rank_end})")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _set(d: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        node = d.setdefault(p, {})
        if not isinstance(node, dict):
            raise InputError(f"override {dotted}: '{p}' is not a section")
        d = node
    d[last] = value


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    return data or {}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """The config in ``path`` (defaults when None) with ``key=value`` overrides applied, validated."""
    source = str(path) if path is not None else "config"
    data = _read_yaml(Path(path)) if path is not None else {}
    from opera_jax import release_config

    if release_config.is_release(data):
        data = release_config.to_ours(data, source)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"override {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _set(data, key.strip(), value)
    if overrides:
        source = f"{source} + overrides"
    config = _build(Config, data, "", source)
    _validate(config, source)
    return config


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def dump_config(config: Config, path: str | Path) -> None:
    """The exact config of a run, as YAML that ``load_config`` reads back to an equal ``Config``."""
    write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))

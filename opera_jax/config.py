"""Run configuration: frozen dataclasses, loaded from YAML with ``key=value`` overrides.

The format mirrors the dataclasses below: one YAML mapping per section
(``model``, ``data``, ``mining``, ``optim``, ``train``, ``method`` with its
``sp`` / ``dp`` / ``infobatch`` sub-sections, ``mesh``) plus ``seed``::

    seed: 0
    model: {name: sentence-transformers/all-MiniLM-L6-v2}
    optim: {learning_rate: 2.0e-5, batch_size: 32}
    method: {name: dp, dp: {strength_end: 5.0}}

A file may be partial: defaults fill the rest. A file may name another as its ``base:`` (a path
relative to the file): the base is read first (its own base too), and the file's keys replace the
base's, section by section. ``load_config(path,
["optim.learning_rate=1e-5", "seed=1"])`` applies overrides after the file; an
override's value is parsed as YAML (``true``, ``null``, ``[1, 2]``), and a
number written as a string (PyYAML reads ``1e-5`` as one) is accepted where a
float or int is expected. A file in the OPERA release's own format (sections
``opera``, ``optimization``, ``pretrain``, ...) is recognised and translated by
``opera_jax.release_config.from_release``.

Everything is checked, and the first problem is one ``InputError`` that names
the file (or the override) and the field: unknown keys (with the closest valid
key suggested), duplicate keys, types, choices and ranges. ``dump_config``
writes the exact config of a run; ``load_config`` reads it back to an equal
``Config``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from opera_jax.errors import InputError
from opera_jax.io_utils import write_text


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "sentence-transformers/all-MiniLM-L6-v2"  # local dir or hub id
    pooling: str | None = None  # cls | mean | last; None = from the model's files
    normalize: bool | None = None  # None = from the model's files
    query_prefix: str | None = None
    passage_prefix: str | None = None
    padding_side: str | None = None  # left | right; None = from the tokenizer
    # compute dtype: auto (bfloat16 on GPUs and TPUs, float32 on CPU) | float32 | bfloat16;
    # parameters (the master weights) stay param_dtype, softmax statistics and the loss f32
    dtype: str = "auto"
    param_dtype: str = "float32"  # float32 | bfloat16
    # attention: auto (by backend and dtype) | xla | cpu | cudnn | pallas (opera_jax/models/attention.py);
    # cudnn and pallas apply no attention-probability dropout (hidden-state dropout stays)
    attention: str = "auto"
    # per-layer rematerialisation (gradient checkpointing): false | true (= full) | a policy name,
    # none | full | dots_saveable | dots_with_no_batch_dims_saveable (opera_jax/models/remat.py)
    remat: bool | str = False


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = "scifact"  # collection dir, or a name under $OPERA_DATA_DIR / ../shared/data
    train_split: str = "train"
    eval_split: str = "test"
    query_max_len: int = 64
    passage_max_len: int = 256
    group_size: int = 2  # 1 positive + group_size - 1 hard negatives per query
    pos_threshold: int = 0  # a qrel is a positive when its score is above this
    empty: str = "error"  # error | skip: empty queries / documents
    eval_batch_size: int = 128
    passage_text: str = "title_text"  # title_text: title + " " + body (BEIR, MTEB) | text: body only (the release)
    # > 0: hold out this share of the training queries (a fixed draw, the same for every seed and
    # method) and evaluate on them instead of eval_split: knobs are chosen there, never on test
    valid_fraction: float = 0.0


@dataclasses.dataclass(frozen=True)
class MiningConfig:
    rank_start: int = 10  # the release's "range_for_sampling: 10-100"
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
    batch_size: int = 32  # GLOBAL number of queries per step
    max_steps: int = 300
    # the budget in passes over the training queries: when set, max_steps = ceil(max_epochs * n / batch_size)
    # (n: the training queries before any pruning), so one number means the same on every collection
    max_epochs: float | None = None
    schedule: str = "linear"  # linear (warmup then linear decay to 0) | constant (after warmup)
    grad_cache_chunk: int | None = None  # queries per encoder call with cached gradients (GradCache); null = off


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    eval_every: int = 50  # 0 = only at the end (step 0 is always evaluated)
    checkpoint_every: int = 50  # 0 = only at the end
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
    delta: float = 1.0  # the schedules end at delta * max_steps
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


# ----------------------------------------------------------------------------- checks
METHOD_NAMES = ("basic", "sp", "dp", "infobatch")  # methods/registry.py builds each


CHOICES = {
    "model.pooling": ("cls", "mean", "last"),
    "model.padding_side": ("left", "right"),
    "model.dtype": ("auto", "float32", "bfloat16"),
    "model.attention": ("auto", "xla", "cpu", "cudnn", "pallas"),
    "model.param_dtype": ("float32", "bfloat16"),
    "data.empty": ("error", "skip"),
    "data.passage_text": ("title_text", "text"),
    "mining.mode": ("hard", "random"),
    "optim.schedule": ("linear", "constant"),
    "method.name": METHOD_NAMES,
    "method.sp.mode": ("highest", "lowest", "random"),
    "method.dp.criterion": ("sim", "loss"),
    "method.dp.schedule": ("cosine", "linear"),
}

# model.remat: a boolean or one of these (the policies of opera_jax/models/remat.py)
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")

# field -> (predicate, what the value must be); None passes for optional fields
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.name": (lambda v: v != "", "non-empty"),
    "data.path": (lambda v: v != "", "non-empty"),
    "data.query_max_len": (lambda v: v >= 2, ">= 2"),
    "data.passage_max_len": (lambda v: v >= 2, ">= 2"),
    "data.group_size": (lambda v: v >= 1, ">= 1"),
    "data.eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "data.valid_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "mining.rank_start": (lambda v: v >= 0, ">= 0"),
    "mining.num_negatives": (lambda v: v >= 1, ">= 1"),
    "optim.learning_rate": (lambda v: v >= 0, ">= 0"),
    "optim.warmup_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "optim.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optim.max_grad_norm": (lambda v: v > 0, "> 0"),
    "optim.temperature": (lambda v: v > 0, "> 0"),
    "optim.batch_size": (lambda v: v >= 1, ">= 1"),
    "optim.max_steps": (lambda v: v >= 1, ">= 1"),
    "optim.max_epochs": (lambda v: v > 0, "> 0 (or null)"),
    "optim.grad_cache_chunk": (lambda v: v >= 1, ">= 1 (or null)"),
    "train.eval_every": (lambda v: v >= 0, ">= 0"),
    "train.checkpoint_every": (lambda v: v >= 0, ">= 0"),
    "train.keep_checkpoints": (lambda v: v >= 1, ">= 1"),
    "train.log_every": (lambda v: v >= 1, ">= 1"),
    "method.sp.kept_pct": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "method.dp.query_cutoff_start": (lambda v: 0 < v < 1, "in (0, 1)"),
    # r(t) = (x n0 - n) / (n (x - 1)) divides by x - 1: a query strength must exceed 1
    "method.dp.strength_start": (lambda v: v > 1, "> 1"),
    "method.dp.strength_end": (lambda v: v > 1, "> 1"),
    "method.dp.pos_cutoff_start": (lambda v: 0 < v < 1, "in (0, 1)"),
    "method.dp.pos_cutoff_end": (lambda v: 0 < v < 1, "in (0, 1)"),
    "method.dp.pos_strength": (lambda v: v >= 1, ">= 1"),
    "method.dp.delta": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "method.dp.refresh_every": (lambda v: v >= 1, ">= 1 (or null)"),
    "method.infobatch.ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "method.infobatch.delta": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "mesh.fsdp": (lambda v: v >= 1, ">= 1"),
}


# ----------------------------------------------------------------------------- generic machinery


@functools.cache
def _hints(cls) -> dict[str, Any]:
    """``{field name: type}`` of a config dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def _paths(cls=Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted path (sections and leaves) of ``cls`` -> its type."""
    out: dict[str, Any] = {}
    for name, hint in _hints(cls).items():
        out[prefix + name] = hint
        if dataclasses.is_dataclass(hint):
            out.update(_paths(hint, f"{prefix}{name}."))
    return out


def _unknown_key(path: str, label: str) -> InputError:
    """The error for an unknown dotted key, suggesting the closest valid one (same section first)."""
    parent = path.rpartition(".")[0]
    siblings = [p for p in _paths() if p.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(path, siblings, n=1, cutoff=0.6) or difflib.get_close_matches(
        path, list(_paths()), n=1, cutoff=0.6
    )
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return InputError(f"{label}: unknown key '{path}'{hint}")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _coerce(value: Any, hint: Any, path: str, label: str) -> Any:
    """``value`` as a field of type ``hint``. Int for float is fine, bool is not an int, and a string
    that parses as the number expected is accepted (PyYAML reads ``1e-5`` as a string)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        for inner in [a for a in typing.get_args(hint) if a is not type(None)]:
            try:
                return _coerce(value, inner, path, label)
            except InputError:
                pass
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint in (int, float) and not isinstance(value, bool):
        if isinstance(value, str):
            try:
                value = hint(value.strip())
            except ValueError:
                pass
        if isinstance(value, int) or (hint is float and isinstance(value, float)):
            value = hint(value)
            if hint is int or math.isfinite(value):
                return value
    raise InputError(f"{label}: {path} must be {_type_name(hint)}, got {value!r}")


def _build(cls, data: Any, prefix: str, label_of: Callable[[str], str]):
    """An instance of the config dataclass ``cls`` from a (partial) dict; defaults fill the rest."""
    section = prefix.rstrip(".")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        what = f"section '{section}'" if section else "the config"
        raise InputError(f"{label_of(section)}: {what} must be a mapping of keys, got {data!r}")
    hints = _hints(cls)
    for key in data:
        if key not in hints:
            path = f"{prefix}{key}"
            raise _unknown_key(path, label_of(path))
    kwargs = {}
    for name, value in data.items():
        path, hint = prefix + name, hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, path + ".", label_of)
        else:
            kwargs[name] = _coerce(value, hint, path, label_of(path))
    return cls(**kwargs)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested sections -> ``{"section.key": value}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _validate(config: Config, label_of: Callable[[str], str]) -> None:
    flat = flatten(config_to_dict(config))
    for path, choices in CHOICES.items():
        if flat[path] is not None and flat[path] not in choices:
            raise InputError(f"{label_of(path)}: {path} is {flat[path]!r}, not one of {', '.join(choices)}")
    for path, (ok, what) in RANGES.items():
        if flat[path] is not None and not ok(flat[path]):
            raise InputError(f"{label_of(path)}: {path} must be {what}, got {flat[path]!r}")
    m = config.mining
    if m.rank_start >= m.rank_end:
        raise InputError(
            f"{label_of('mining.rank_end')}: mining.rank_start ({m.rank_start}) must be below "
            f"mining.rank_end ({m.rank_end})"
        )
    if isinstance(config.model.remat, str) and config.model.remat not in REMAT_POLICIES:
        raise InputError(
            f"{label_of('model.remat')}: model.remat is {config.model.remat!r}, not one of "
            f"{', '.join(REMAT_POLICIES)} (or true / false)"
        )
    o = config.optim
    if o.grad_cache_chunk is not None and o.batch_size % o.grad_cache_chunk:
        raise InputError(
            f"{label_of('optim.grad_cache_chunk')}: optim.grad_cache_chunk ({o.grad_cache_chunk}) "
            f"must divide optim.batch_size ({o.batch_size})"
        )


# ----------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key written twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key].line + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the config ({getattr(e, 'strerror', None) or e})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise InputError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None


def _merge(base: dict, over: dict) -> dict:
    """``over``'s keys replace ``base``'s, recursively into sections that are mappings in both."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_with_base(path: Path, chain: tuple[Path, ...] = ()) -> Any:
    """The YAML of ``path`` over that of its ``base:`` file, if it names one."""
    data = _read_yaml(path)
    if not (isinstance(data, dict) and "base" in data):
        return data
    data = dict(data)
    base = data.pop("base")
    if not isinstance(base, str) or not base:
        raise InputError(f"{path}: base must be the path of another config file, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in chain or base_path == path.resolve():
        raise InputError(f"{path}: base {base!r} leads back to itself")
    parent = _read_with_base(base_path, chain + (path.resolve(),))
    if parent is None:
        parent = {}
    if not isinstance(parent, dict):
        raise InputError(f"{base_path}: the config must be a mapping of keys, got {type(parent).__name__}")
    return _merge(parent, data)


def _parse_override(item: str) -> tuple[str, Any]:
    """``'a.b=value'`` -> ``('a.b', parsed value)``, checking that ``a.b`` is a field."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    label = f"override '{item}'"
    if not sep or not key:
        raise InputError(f"{label}: expected key=value, e.g. optim.learning_rate=1e-5")
    hint = _paths().get(key)
    if hint is None:
        raise _unknown_key(key, label)
    text_field = hint is str or (
        typing.get_origin(hint) in (typing.Union, types.UnionType)
        and str in typing.get_args(hint)
        and bool not in typing.get_args(hint)
    )
    if text_field and raw.strip() not in ("null", "Null", "NULL", "~") and raw.strip()[:1] not in ("'", '"'):
        # a string field takes the text as written: ``data.path=2024`` is "2024", and
        # ``model.query_prefix=query: `` keeps its colon and trailing space
        return key, raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return key, value


def _set(d: dict, dotted: str, value: Any, label: str) -> None:
    *parents, last = dotted.split(".")
    for i, p in enumerate(parents):
        node = d.get(p)
        if node is None:
            node = d[p] = {}
        if not isinstance(node, dict):
            section = ".".join(parents[: i + 1])
            raise InputError(f"{label}: '{section}' is not a section of the config")
        d = node
    d[last] = value


# ----------------------------------------------------------------------------- API


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """The config in ``path`` (all defaults when None), with ``key=value`` overrides applied, validated.

    Raises ``InputError`` naming the file (or override) and the field at fault.
    """
    source = str(path) if path is not None else "<defaults>"
    data = _read_with_base(Path(path)) if path is not None else {}
    release_file = False
    if data is None:
        data = {}
    from opera_jax import release_config

    if release_config.is_release(data):
        data, release_file = release_config.from_release(data, source), True
    if not isinstance(data, dict):
        raise InputError(f"{source}: the config must be a mapping of keys, got {type(data).__name__}")

    def file_label(p: str) -> str:
        origin = release_config.RELEASE_ORIGIN.get(p) if release_file else None
        return f"{source} (release key {origin})" if origin else source

    _build(Config, data, "", file_label)  # the file on its own: its errors name the file

    set_by: dict[str, str] = {}
    for item in overrides:
        key, value = _parse_override(item)
        label = f"override '{item}'"
        _set(data, key, value, label)
        set_by = {p: s for p, s in set_by.items() if not (p == key or p.startswith(key + "."))}
        set_by[key] = label

    def label_of(p: str) -> str:
        for k, label in set_by.items():  # the override that set this field or its section
            if p == k or p.startswith(k + "."):
                return label
        return file_label(p)

    config = _build(Config, data, "", label_of)
    _validate(config, label_of)
    return config


def steps_for_passes(passes: float, num_queries: int, batch_size: int) -> int:
    """The steps of ``passes`` passes over ``num_queries`` queries at ``batch_size`` a step (at least 1)."""
    return max(1, math.ceil(passes * num_queries / batch_size - 1e-9))


def with_budget(config: Config, num_queries: int) -> Config:
    """``config`` with ``optim.max_steps`` from ``optim.max_epochs`` when that is set (else unchanged)."""
    o = config.optim
    if o.max_epochs is None:
        return config
    steps = steps_for_passes(o.max_epochs, num_queries, o.batch_size)
    return dataclasses.replace(config, optim=dataclasses.replace(o, max_steps=steps))


def config_to_dict(config: Config) -> dict:
    """Nested plain dict of every field (what ``dump_config`` writes)."""
    return dataclasses.asdict(config)


def dump_config(config: Config, path: str | Path) -> None:
    """The exact config of a run, as YAML that ``load_config`` reads back to an equal ``Config``."""
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True)
    write_text(path, "# opera-jax run config (every field, as used)\n" + text)

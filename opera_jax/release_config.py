"""The OPERA release's YAML configs (e.g. ``opera_bge_large_dp.yaml``), mapped onto ours.

``from_release(data, source)`` turns the release's dict into a dict in our
format, which ``opera_jax.config.load_config`` then checks and builds like any
other (overrides apply to our keys). The mapping, per the release's configs and trainer (projects/opera of lwh51200/autogluon-rag):

- method from ``opera.level``: ``none`` is basic, or SP when
  ``offline_pruning.kept_pct < 1`` (``offline_pruning.mode`` ep / hp / ran ->
  highest / lowest / random); ``query`` is DP (``opera.query_selection`` and
  ``opera.positive_selection`` -> ``method.dp``); ``infobatch`` is InfoBatch;
- ``optimization.*`` -> ``optim`` / ``model``; the release gives a batch per
  device, the global batch is that times ``release_devices`` (its runs used 8);
- ``data.train_data`` (an ir_datasets id such as ``beir/fiqa/train``) ->
  ``data.path`` and ``data.train_split``; ``mining.range_for_sampling``
  ``"10-100"`` -> ``mining.rank_start`` / ``rank_end``.

Keys that only concern the release's machinery (wandb, cache and output dirs,
FAISS index factory, ``local_rank``, logging and saving steps, ...) are
accepted and listed in one logged notice. Keys whose value changes the method
are accepted only with the value opera-jax implements. Anything else is an
``InputError``.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any

from opera_jax.errors import InputError

log = logging.getLogger(__name__)

# Top-level keys found only in release configs (ours: seed, model, data, mining, optim, ...).
RELEASE_SECTIONS = frozenset({"opera", "optimization", "pretrain", "offline_pruning", "corpus", "evaluate"})
RELEASE_DEVICES = 8

# release key -> our key, copied as is (types and ranges are checked by load_config)
DIRECT = {
    "seed": "seed",
    "data.train_group_size": "data.group_size",
    "data.query_max_len": "data.query_max_len",
    "data.passage_max_len": "data.passage_max_len",
    "data.pos_threshold": "data.pos_threshold",
    "data.query_instruction_for_retrieval": "model.query_prefix",
    "data.passage_instruction_for_retrieval": "model.passage_prefix",
    "pretrain.model_name_or_path": "model.name",
    "pretrain.padding_side": "model.padding_side",
    "mining.model_name_or_path": "mining.model",
    "mining.mode": "mining.mode",
    "mining.negative_number": "mining.num_negatives",
    "optimization.learning_rate": "optim.learning_rate",
    "optimization.max_steps": "optim.max_steps",
    "optimization.max_grad_norm": "optim.max_grad_norm",
    "optimization.warmup_ratio": "optim.warmup_ratio",
    "optimization.weight_decay": "optim.weight_decay",
    "optimization.temperature": "optim.temperature",
    "optimization.sentence_pooling_method": "model.pooling",
    "optimization.normalized": "model.normalize",
    "optimization.gradient_checkpointing": "model.remat",
    "opera.query_selection.criteria": "method.dp.criterion",
    "opera.query_selection.cutoff_ratio_start": "method.dp.query_cutoff_start",
    "opera.query_selection.sampling_strength_start": "method.dp.strength_start",
    "opera.query_selection.sampling_strength_end": "method.dp.strength_end",
    "opera.query_selection.scheduler": "method.dp.schedule",
    "opera.query_selection.delta": "method.dp.delta",
    "opera.query_selection.keep_higher": "method.dp.keep_higher_query",
    "opera.positive_selection.cutoff_ratio_start": "method.dp.pos_cutoff_start",
    "opera.positive_selection.cutoff_ratio_end": "method.dp.pos_cutoff_end",
    "opera.positive_selection.sampling_strength": "method.dp.pos_strength",
    "opera.positive_selection.keep_higher": "method.dp.keep_higher_pos",
}

# Keys handled below, one by one.
SPECIAL = {
    "opera.level",
    "offline_pruning.kept_pct",
    "offline_pruning.mode",
    "data.train_data",
    "data.test_data",
    "mining.range_for_sampling",
    "optimization.per_device_train_batch_size",
    "optimization.fp16",
    "optimization.bf16",
    "optimization.lr_scheduler_type",
    "optimization.num_train_epochs",
    "opera.positive_selection.scheduler",
    "opera.positive_selection.delta",
    "pretrain.tokenizer_name",
    "pretrain.config_name",
}

# release key -> the one value opera-jax implements (also the release's default)
REQUIRED = {
    "pairwise": False,
    "optimization.negatives_cross_device": True,  # in-batch negatives gathered over all devices
    "optimization.use_inbatch_neg": True,
    "opera.query_selection.pooling": "mean",  # a query's score: the mean of its pairs' scores
    "opera.query_selection.reset_interval": 1,  # refresh every epoch (see method.dp.refresh_every)
    "opera.positive_selection.reset_interval": 1,
    "offline_pruning.model": None,  # SP scores come from the base model
    "evaluate.add_instruction": True,
}

# Release machinery: accepted anywhere, no effect here.
MACHINERY = {
    "cache_dir",
    "output_dir",
    "logging_dir",
    "local_rank",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "save_strategy",
    "report_to",
    "run_name",
    "project",
    "wandb",
    "wandb_project",
    "wandb_entity",
    "wandb_run_name",
    "enable_cache",
    "overwrite_neg",
    "overwrite_output_dir",
    "dataloader_num_workers",
    "index_factory",
}
# Other keys accepted and ignored (with the reason opera-jax does without them).
IGNORED = {
    "architecture",  # the encoder comes from model.name's files
    "data.val_data",  # no dev split is used
    "data.max_example_num_per_dataset",
    "corpus.train_corpus",
    "corpus.val_corpus",
    "corpus.test_corpus",  # the corpus lives with the collection
    "optimization.dataloader_drop_last",  # always dropped
    "evaluate.k",
    "evaluate.cutoffs",
    "evaluate.main_metrics",
    "evaluate.bs_multiplier",  # fixed metric set
    "evaluate.batch_size",
}

MODES = {"ep": "highest", "hp": "lowest", "ran": "random"}
SCHEDULERS = {"linear": ("linear", None), "constant": ("constant", 0.0), "constant_with_warmup": ("constant", None)}

# our key -> the release key it came from, for error messages
RELEASE_ORIGIN = {ours: theirs for theirs, ours in DIRECT.items()} | {
    "method.name": "opera.level",
    "method.sp.kept_pct": "offline_pruning.kept_pct",
    "method.sp.mode": "offline_pruning.mode",
    "data.path": "data.train_data",
    "data.train_split": "data.train_data",
    "data.eval_split": "data.test_data",
    "mining.rank_start": "mining.range_for_sampling",
    "mining.rank_end": "mining.range_for_sampling",
    "optim.batch_size": "optimization.per_device_train_batch_size",
    "optim.schedule": "optimization.lr_scheduler_type",
}

_KNOWN = set(DIRECT) | SPECIAL | set(REQUIRED) | IGNORED
_SECTIONS = {k.rsplit(".", i)[0] for k in _KNOWN for i in range(1, k.count(".") + 1)}


def is_release(data: Any) -> bool:
    """Whether a loaded YAML document is in the release's format."""
    return isinstance(data, dict) and bool(RELEASE_SECTIONS & set(data))


def _flatten(data: dict, source: str, prefix: str = "") -> dict[str, Any]:
    """Dotted release key -> value. Release machinery is not descended into (``wandb`` may be a section)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if path in _SECTIONS:
            if value is not None and not isinstance(value, dict):
                raise InputError(f"{source}: '{path}' must be a mapping of keys, got {value!r}")
            out.update(_flatten(value or {}, source, path + "."))
        else:
            out[path] = value
    return out


def _set(out: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        out = out.setdefault(p, {})
    out[last] = value


def _dataset_id(value: Any, key: str, source: str) -> tuple[str, str]:
    """An ir_datasets id such as ``beir/fiqa/train`` -> ``("fiqa", "train")``."""
    parts = value.strip("/").split("/") if isinstance(value, str) else []
    if parts and parts[0] == "beir":
        parts = parts[1:]
    if len(parts) < 2 or not all(parts):
        raise InputError(f"{source}: {key} must be an ir_datasets id such as 'beir/fiqa/train', got {value!r}")
    return "/".join(parts[:-1]), parts[-1]


def _positive_int(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def from_release(data: dict, source: str, release_devices: int = RELEASE_DEVICES) -> dict:
    """Our config dict from a release config dict (see the module docstring).

    ``release_devices``: the device count the release's per-device batch is multiplied by.
    """
    flat = _flatten(data, source)
    unknown = [k for k in flat if k not in _KNOWN and k.rpartition(".")[2] not in MACHINERY]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, sorted(_KNOWN), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise InputError(f"{source}: unknown key '{key}' in an OPERA release config{hint}")

    for key, wanted in REQUIRED.items():
        if key in flat and flat[key] != wanted:
            raise InputError(f"{source}: {key} is {flat[key]!r}; opera-jax implements only {wanted!r}")

    out: dict[str, Any] = {}
    for theirs, ours in DIRECT.items():
        if flat.get(theirs) is not None:  # null: not set, our default
            _set(out, ours, flat[theirs])

    # method
    level = flat.get("opera.level", "none")
    kept = flat.get("offline_pruning.kept_pct", 1.0)
    if isinstance(kept, bool) or not isinstance(kept, (int, float)) or not 0 < kept <= 1:
        raise InputError(f"{source}: offline_pruning.kept_pct must be a number in (0, 1], got {kept!r}")
    mode = flat.get("offline_pruning.mode", "ep")
    if mode not in MODES:
        raise InputError(f"{source}: offline_pruning.mode is {mode!r}, not one of {', '.join(MODES)}")
    if level in ("none", None):
        _set(out, "method.name", "sp" if kept < 1 else "basic")
        if kept < 1:
            _set(out, "method.sp", {"kept_pct": float(kept), "mode": MODES[mode]})
    elif level in ("query", "infobatch"):
        if kept < 1:
            raise InputError(
                f"{source}: offline_pruning.kept_pct < 1 with opera.level {level!r}: "
                "opera-jax does not combine static pruning with another method"
            )
        _set(out, "method.name", "dp" if level == "query" else "infobatch")
    else:
        raise InputError(f"{source}: opera.level is {level!r}, not one of none, query, infobatch")
    for key in ("scheduler", "delta"):  # one schedule drives both levels here
        q = flat.get(f"opera.query_selection.{key}", {"scheduler": "cosine", "delta": 1.0}[key])
        p = flat.get(f"opera.positive_selection.{key}", q)
        if p != q:
            raise InputError(
                f"{source}: opera.positive_selection.{key} ({p!r}) differs from "
                f"opera.query_selection.{key} ({q!r}); opera-jax uses one for both"
            )

    # data
    if "data.train_data" in flat:
        name, split = _dataset_id(flat["data.train_data"], "data.train_data", source)
        _set(out, "data.path", name)
        _set(out, "data.train_split", split)
        if "data.test_data" in flat:
            test_name, test_split = _dataset_id(flat["data.test_data"], "data.test_data", source)
            if test_name != name:
                raise InputError(
                    f"{source}: data.test_data ({flat['data.test_data']!r}) is not from the "
                    f"training collection {name!r}; opera-jax evaluates on the same collection"
                )
            _set(out, "data.eval_split", test_split)

    # model
    model = flat.get("pretrain.model_name_or_path")
    for key in ("pretrain.tokenizer_name", "pretrain.config_name"):
        if flat.get(key) not in (None, "", model):
            raise InputError(
                f"{source}: {key} ({flat[key]!r}) differs from pretrain.model_name_or_path; "
                "opera-jax loads the tokenizer and config from the model"
            )
    if flat.get("optimization.fp16") or flat.get("optimization.bf16"):
        _set(out, "model.dtype", "bfloat16")  # mixed precision; master weights stay float32

    # mining
    rng = flat.get("mining.range_for_sampling")
    if rng is not None:
        try:
            start, end = (int(x) for x in str(rng).split("-"))
        except ValueError:
            raise InputError(
                f"{source}: mining.range_for_sampling must be 'START-END' such as '10-100', got {rng!r}"
            ) from None
        _set(out, "mining.rank_start", start)
        _set(out, "mining.rank_end", end)

    # optimisation
    notes = []
    if "optimization.per_device_train_batch_size" in flat:
        per_device = _positive_int(
            flat["optimization.per_device_train_batch_size"], "optimization.per_device_train_batch_size", source
        )
        _set(out, "optim.batch_size", per_device * release_devices)
        notes.append(
            f"global batch = per_device_train_batch_size {per_device} x {release_devices} devices "
            f"= {per_device * release_devices} queries per step"
        )
    scheduler = flat.get("optimization.lr_scheduler_type")
    if scheduler is not None:
        if scheduler not in SCHEDULERS:
            raise InputError(
                f"{source}: optimization.lr_scheduler_type is {scheduler!r}, not one of {', '.join(SCHEDULERS)}"
            )
        kind, warmup = SCHEDULERS[scheduler]
        _set(out, "optim.schedule", kind)
        if warmup is not None:
            _set(out, "optim.warmup_ratio", warmup)
    steps = flat.get("optimization.max_steps")
    if "optimization.num_train_epochs" in flat and (
        isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0
    ):
        raise InputError(
            f"{source}: optimization.num_train_epochs without a positive optimization.max_steps: "
            "opera-jax counts training in steps; set max_steps"
        )

    ignored = sorted(
        k for k in flat if k in IGNORED or k.rpartition(".")[2] in MACHINERY or k == "optimization.num_train_epochs"
    )  # max_steps decides
    if ignored:
        notes.append("ignored (no effect in opera-jax): " + ", ".join(ignored))
    if notes:
        log.warning("%s: OPERA release config: %s", source, "; ".join(notes))
    return out

"""The OPERA release's YAML configs (e.g. ``opera_bge_large_dp.yaml``), mapped onto ours.

The method comes from ``opera.level`` (``none``: basic, or SP when
``offline_pruning.kept_pct < 1``; ``query``: DP; ``infobatch``) and the rest
from the sections described in ``../shared/docs/opera.md``. The release gives a
per-device batch; the global batch is that times ``RELEASE_DEVICES`` (its runs
used 8 GPUs). Keys that only concern the release's own machinery are accepted
and ignored with one notice; any other unknown key is an error.
"""

from __future__ import annotations

import logging
from typing import Any

from opera_jax.errors import InputError

log = logging.getLogger(__name__)

RELEASE_SECTIONS = {"opera", "optimization", "pretrain", "offline_pruning", "corpus", "evaluate"}
RELEASE_DEVICES = 8

# Known keys per section that we map (value: our dotted key, or a converter) or ignore (None).
IGNORED = {
    "top": {"architecture", "pairwise", "wandb", "output_dir", "local_rank", "run_name", "project"},
    "data": {"train_data", "val_data", "test_data", "max_example_num_per_dataset", "passage_instruction_for_retrieval",
             "cache_dir"},
    "corpus": {"train_corpus", "val_corpus", "test_corpus"},
    "pretrain": {"tokenizer_name", "config_name", "cache_dir"},
    "offline_pruning": {"model", "enable_cache"},
    "mining": {"model_name_or_path", "overwrite_neg", "enable_cache"},
    "optimization": {"num_train_epochs", "logging_steps", "save_steps", "dataloader_drop_last", "fp16", "bf16",
                     "gradient_checkpointing", "negatives_cross_device", "use_inbatch_neg", "lr_scheduler_type",
                     "report_to", "output_dir"},
    "evaluate": {"k", "cutoffs", "index_factory", "main_metrics", "add_instruction", "bs_multiplier", "batch_size"},
    "opera": {"level"},
    "query_selection": {"pooling", "reset_interval"},
    "positive_selection": {"scheduler", "delta", "reset_interval", "keep_higher"},
}

MODES = {"ep": "highest", "hp": "lowest", "ran": "random"}


def is_release(data: Any) -> bool:
    return isinstance(data, dict) and bool(RELEASE_SECTIONS & set(data))


def to_ours(data: dict, source: str) -> dict:
    """Our config dict from a release config dict."""
    used: set[str] = set()
    ignored: list[str] = []

    def section(name: str) -> dict:
        value = data.get(name) or {}
        if not isinstance(value, dict):
            raise InputError(f"{source}: '{name}' must be a mapping")
        return value

    def get(sec: dict, path: str, key: str, default=None):
        used.add(f"{path}.{key}")
        return sec.get(key, default)

    out: dict[str, Any] = {"model": {}, "data": {}, "mining": {}, "optim": {}, "method": {}}
    if "seed" in data:
        out["seed"] = data["seed"]

    d = section("data")
    out["data"]["group_size"] = get(d, "data", "train_group_size", 2)
    for ours, theirs in (("query_max_len", "query_max_len"), ("passage_max_len", "passage_max_len"),
                         ("pos_threshold", "pos_threshold")):
        if theirs in d:
            out["data"][ours] = get(d, "data", theirs)
    if d.get("query_instruction_for_retrieval"):
        out["model"]["query_prefix"] = get(d, "data", "query_instruction_for_retrieval")
    used.add("data.query_instruction_for_retrieval")
    train = d.get("train_data")
    if isinstance(train, str) and train.count("/") >= 2:  # ir_datasets id, e.g. beir/fiqa/train
        _, name, split = train.split("/")[:3]
        out["data"]["path"], out["data"]["train_split"] = name, split
    test = d.get("test_data")
    if isinstance(test, str) and test.count("/") >= 2:
        out["data"]["eval_split"] = test.split("/")[2]

    p = section("pretrain")
    if "model_name_or_path" in p:
        out["model"]["name"] = get(p, "pretrain", "model_name_or_path")
    if "padding_side" in p:
        out["model"]["padding_side"] = get(p, "pretrain", "padding_side")

    o = section("optimization")
    for ours, theirs in (("learning_rate", "learning_rate"), ("max_steps", "max_steps"),
                         ("max_grad_norm", "max_grad_norm"), ("warmup_ratio", "warmup_ratio"),
                         ("weight_decay", "weight_decay"), ("temperature", "temperature")):
        if theirs in o:
            out["optim"][ours] = get(o, "optimization", theirs)
    if "per_device_train_batch_size" in o:
        out["optim"]["batch_size"] = int(get(o, "optimization", "per_device_train_batch_size")) * RELEASE_DEVICES
    if o.get("fp16") or o.get("bf16"):
        out["model"]["dtype"] = "bfloat16"
    if o.get("gradient_checkpointing"):
        out["model"]["remat"] = True
    if "sentence_pooling_method" in o:
        out["model"]["pooling"] = get(o, "optimization", "sentence_pooling_method")
    if "normalized" in o:
        out["model"]["normalize"] = bool(get(o, "optimization", "normalized"))

    m = section("mining")
    rng = get(m, "mining", "range_for_sampling")
    if rng is not None:
        try:
            start, end = (int(x) for x in str(rng).split("-"))
        except ValueError:
            raise InputError(f"{source}: mining.range_for_sampling {rng!r} is not 'START-END'") from None
        out["mining"]["rank_start"], out["mining"]["rank_end"] = start, end
    if "negative_number" in m:
        out["mining"]["num_negatives"] = get(m, "mining", "negative_number")
    if "mode" in m:
        out["mining"]["mode"] = get(m, "mining", "mode")

    sp = section("offline_pruning")
    kept = float(get(sp, "offline_pruning", "kept_pct", 1.0))
    mode = get(sp, "offline_pruning", "mode", "ep")
    if mode not in MODES:
        raise InputError(f"{source}: offline_pruning.mode {mode!r} is not one of {', '.join(MODES)}")
    op = section("opera")
    level = op.get("level", "none")
    if level == "none":
        out["method"]["name"] = "sp" if kept < 1 else "basic"
        out["method"]["sp"] = {"kept_pct": kept, "mode": MODES[mode]}
    elif level == "query":
        out["method"]["name"] = "dp"
    elif level == "infobatch":
        out["method"]["name"] = "infobatch"
    else:
        raise InputError(f"{source}: opera.level {level!r} is not one of none, query, infobatch")
    qs = op.get("query_selection") or {}
    ps = op.get("positive_selection") or {}
    dp: dict[str, Any] = {}
    for ours, theirs in (("criterion", "criteria"), ("query_cutoff_start", "cutoff_ratio_start"),
                         ("strength_start", "sampling_strength_start"), ("strength_end", "sampling_strength_end"),
                         ("schedule", "scheduler"), ("delta", "delta"), ("keep_higher_query", "keep_higher")):
        if theirs in qs:
            dp[ours] = get(qs, "query_selection", theirs)
    for ours, theirs in (("pos_cutoff_start", "cutoff_ratio_start"), ("pos_cutoff_end", "cutoff_ratio_end"),
                         ("pos_strength", "sampling_strength")):
        if theirs in ps:
            dp[ours] = get(ps, "positive_selection", theirs)
    if "keep_higher" in ps:
        dp["keep_higher_pos"] = get(ps, "positive_selection", "keep_higher")
    out["method"]["dp"] = dp

    # Everything else must be known-ignorable.
    sections = {"data": d, "pretrain": p, "optimization": o, "mining": m, "offline_pruning": sp,
                "query_selection": qs, "positive_selection": ps, "corpus": section("corpus"),
                "evaluate": section("evaluate"), "opera": {k: v for k, v in op.items()
                                                           if k not in ("query_selection", "positive_selection")}}
    for name, sec in sections.items():
        for key in sec:
            if f"{name}.{key}" in used:
                continue
            if key in IGNORED.get(name, set()):
                ignored.append(f"{name}.{key}")
            else:
                raise InputError(f"{source}: unknown release key '{name}.{key}'")
    for key in data:
        if key in sections or key in ("seed", "opera"):
            continue
        if key in IGNORED["top"]:
            ignored.append(key)
        else:
            raise InputError(f"{source}: unknown release key '{key}'")
    if ignored:
        log.warning("%s: release keys without effect here, ignored: %s", source, ", ".join(sorted(ignored)))
    return out

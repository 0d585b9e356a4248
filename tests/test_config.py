"""The run config: defaults, YAML files, overrides, strict validation, round trip, release format."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from opera_jax.config import Config, config_to_dict, dump_config, load_config
from opera_jax.errors import InputError
from opera_jax.release_config import from_release

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
RELEASE = Path(__file__).resolve().parent / "data" / "release_bge_large_dp.yaml"


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error(path, overrides=()) -> str:
    with pytest.raises(InputError) as info:
        load_config(path, overrides)
    return str(info.value)


# ----------------------------------------------------------------------------- defaults and files


def test_defaults():
    c = load_config(None)
    assert c == Config()
    assert c.seed == 0 and c.model.name == "sentence-transformers/all-MiniLM-L6-v2"
    assert c.model.pooling is None and c.model.dtype == "auto" and c.model.attention == "auto" and not c.model.remat
    assert (c.data.path, c.data.group_size, c.data.query_max_len, c.data.passage_max_len) == ("scifact", 2, 64, 256)
    assert (c.mining.rank_start, c.mining.rank_end, c.mining.num_negatives) == (10, 100, 200)
    assert (c.optim.learning_rate, c.optim.temperature, c.optim.batch_size, c.optim.max_steps) == (2e-5, 0.05, 32, 300)
    assert c.method.name == "basic" and c.method.sp.kept_pct == 0.25 and c.method.dp.refresh_every is None
    assert c.method.infobatch == dataclasses.replace(c.method.infobatch, ratio=0.25, delta=0.875)
    assert c.mesh.fsdp == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.seed = 1  # type: ignore[misc]


def test_partial_file_and_empty_sections(tmp_path):
    c = load_config(write(tmp_path, "optim:\n  learning_rate: 1.0e-4\ntrain:\nmethod: {name: dp}\n"))
    assert c.optim.learning_rate == 1e-4 and c.optim.batch_size == 32
    assert c.train == Config().train and c.method.name == "dp"
    assert load_config(write(tmp_path, "", "empty.yaml")) == Config()


def test_configs_dir_is_populated():
    names = {p.name for p in CONFIGS}
    for method in ("basic", "dp", "sp", "infobatch"):
        assert f"minilm-scifact-{method}.yaml" in names
    assert {"bge-large-basic.yaml", "bge-large-dp.yaml", "qwen3-0.6b-basic.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    c = load_config(path)
    assert c.method.name in path.stem or path.stem == "quickstart"
    if path.name.startswith("minilm-"):
        assert c.model.name == "sentence-transformers/all-MiniLM-L6-v2"
        assert (c.optim.learning_rate, c.optim.temperature, c.optim.max_steps) == (2e-5, 0.05, 300)
        assert (c.data.group_size, c.data.query_max_len, c.data.passage_max_len) == (2, 64, 256)
        assert (c.mining.rank_start, c.mining.rank_end, c.mining.num_negatives) == (10, 100, 200)
        assert c.train.eval_every == 50 and c.data.path in path.stem


def test_release_hyperparameters_in_shipped_configs():
    bge = load_config(ROOT / "configs" / "bge-large-dp.yaml")
    assert (bge.optim.learning_rate, bge.optim.temperature, bge.optim.batch_size) == (1e-6, 0.02, 128)
    assert (bge.model.pooling, bge.model.dtype, bge.data.query_max_len, bge.data.passage_max_len) == (
        "cls",
        "bfloat16",
        128,
        512,
    )
    assert bge.method.dp == Config().method.dp
    qwen = load_config(ROOT / "configs" / "qwen3-0.6b-basic.yaml")
    assert (qwen.model.pooling, qwen.model.padding_side, qwen.model.remat) == ("last", "left", True)
    assert qwen.optim.learning_rate == 1e-5 and (qwen.mining.rank_start, qwen.mining.rank_end) == (50, 500)
    assert qwen.model.query_prefix.endswith("\nQuery: ")


# ----------------------------------------------------------------------------- overrides


def test_overrides(tmp_path):
    path = write(tmp_path, "optim:\n  learning_rate: 1.0e-4\nmodel:\n  pooling: cls\n")
    c = load_config(
        path,
        [
            "optim.learning_rate=1e-5",
            "method.dp.strength_end=4",
            "model.pooling=null",
            "model.remat=true",
            "seed=7",
            "method.name=dp",
            "data.path=2024",
            "optim.temperature=0.02",
            "method.dp.refresh_every=10",
        ],
    )
    assert c.optim.learning_rate == 1e-5 and isinstance(c.optim.learning_rate, float)
    assert c.method.dp.strength_end == 4.0 and isinstance(c.method.dp.strength_end, float)
    assert c.model.pooling is None and c.model.remat is True and c.seed == 7 and c.method.name == "dp"
    assert c.data.path == "2024" and c.optim.temperature == 0.02 and c.method.dp.refresh_every == 10
    # a text field takes the text as written (trailing space kept); quotes and null still parse
    assert load_config(None, ["model.query_prefix=query: "]).model.query_prefix == "query: "
    assert load_config(None, ['model.query_prefix="a\\nb"']).model.query_prefix == "a\nb"
    assert load_config(None, ["model.query_prefix=~"]).model.query_prefix is None
    # the last override wins
    assert load_config(None, ["seed=1", "seed=2"]).seed == 2


def test_override_errors_name_the_override():
    msg = error(None, ["optim.learnig_rate=1e-5"])
    assert "override 'optim.learnig_rate=1e-5'" in msg
    assert "unknown key 'optim.learnig_rate'" in msg and "did you mean 'optim.learning_rate'" in msg
    msg = error(None, ["optim.batch_size=many"])
    assert "override 'optim.batch_size=many'" in msg and "optim.batch_size" in msg and "integer" in msg
    msg = error(None, ["optim.max_steps=0"])
    assert "override 'optim.max_steps=0'" in msg and "optim.max_steps must be >= 1" in msg
    assert "key=value" in error(None, ["seed"])
    assert error(None, ["seed.x=1"]) == "override 'seed.x=1': unknown key 'seed.x' (did you mean 'seed'?)"


# ----------------------------------------------------------------------------- strict validation


def test_unknown_key_suggests_the_closest(tmp_path):
    path = write(tmp_path, "optim:\n  learnig_rate: 1.0e-5\n")
    assert error(path) == f"{path}: unknown key 'optim.learnig_rate' (did you mean 'optim.learning_rate'?)"
    path = write(tmp_path, "methd:\n  name: dp\n")
    assert error(path) == f"{path}: unknown key 'methd' (did you mean 'method'?)"
    path = write(tmp_path, "method:\n  dp:\n    strenght_end: 4\n")
    assert "unknown key 'method.dp.strenght_end' (did you mean 'method.dp.strength_end'?)" in error(path)
    path = write(tmp_path, "zzz: 1\n")
    assert error(path) == f"{path}: unknown key 'zzz'"


@pytest.mark.parametrize(
    "text, field, what",
    [
        ("optim: {learning_rate: fast}", "optim.learning_rate", "number"),
        ("optim: {batch_size: 1.5}", "optim.batch_size", "integer"),
        ("optim: {batch_size: true}", "optim.batch_size", "integer"),  # a bool is not an int
        ("seed: [1]", "seed", "integer"),
        ("model: {remat: 1}", "model.remat", "boolean"),
        ("model: {name: 3}", "model.name", "string"),
        ("model: {pooling: 3}", "model.pooling", "string or null"),
        ("optim: {learning_rate: .nan}", "optim.learning_rate", "number"),
        ("optim: 3", "optim", "mapping"),
    ],
)
def test_type_errors_name_the_field(tmp_path, text, field, what):
    path = write(tmp_path, text + "\n")
    msg = error(path)
    assert msg.startswith(f"{path}: ") and field in msg and what in msg


def test_numbers_in_strings_and_ints_for_floats(tmp_path):
    c = load_config(write(tmp_path, "optim: {learning_rate: 1e-5, batch_size: '64', max_grad_norm: 2}\n"))
    assert c.optim.learning_rate == 1e-5 and c.optim.batch_size == 64 and c.optim.max_grad_norm == 2.0
    assert isinstance(c.optim.max_grad_norm, float)


@pytest.mark.parametrize(
    "text, field",
    [
        ("model: {pooling: max}", "model.pooling"),
        ("model: {dtype: float16}", "model.dtype"),
        ("model: {padding_side: up}", "model.padding_side"),
        ("method: {name: magic}", "method.name"),
        ("method: {sp: {mode: best}}", "method.sp.mode"),
        ("method: {dp: {criterion: grad}}", "method.dp.criterion"),
        ("method: {dp: {schedule: step}}", "method.dp.schedule"),
        ("optim: {schedule: cosine}", "optim.schedule"),
        ("data: {empty: drop}", "data.empty"),
        ("mining: {mode: easy}", "mining.mode"),
    ],
)
def test_choices(tmp_path, text, field):
    path = write(tmp_path, text + "\n")
    msg = error(path)
    assert msg.startswith(f"{path}: {field} is ") and "not one of" in msg


@pytest.mark.parametrize(
    "text, field",
    [
        ("method: {sp: {kept_pct: 0}}", "method.sp.kept_pct"),
        ("method: {sp: {kept_pct: 1.5}}", "method.sp.kept_pct"),
        ("optim: {learning_rate: -1.0e-5}", "optim.learning_rate"),
        ("optim: {weight_decay: -0.1}", "optim.weight_decay"),
        ("optim: {batch_size: 0}", "optim.batch_size"),
        ("optim: {max_steps: 0}", "optim.max_steps"),
        ("optim: {temperature: 0}", "optim.temperature"),
        ("data: {group_size: 0}", "data.group_size"),
        ("method: {dp: {delta: 0}}", "method.dp.delta"),
        ("method: {dp: {delta: 1.5}}", "method.dp.delta"),
        ("method: {dp: {query_cutoff_start: 1.0}}", "method.dp.query_cutoff_start"),
        ("method: {dp: {pos_cutoff_end: 0}}", "method.dp.pos_cutoff_end"),
        ("method: {dp: {strength_start: 1}}", "method.dp.strength_start"),
        ("method: {dp: {pos_strength: 0.5}}", "method.dp.pos_strength"),
        ("method: {dp: {refresh_every: 0}}", "method.dp.refresh_every"),
        ("method: {infobatch: {ratio: 1}}", "method.infobatch.ratio"),
        ("mesh: {fsdp: 0}", "mesh.fsdp"),
    ],
)
def test_ranges(tmp_path, text, field):
    path = write(tmp_path, text + "\n")
    assert error(path).startswith(f"{path}: {field} must be ")


def test_rank_range(tmp_path):
    path = write(tmp_path, "mining: {rank_start: 100, rank_end: 100}\n")
    msg = error(path)
    assert msg.startswith(f"{path}: ") and "mining.rank_start" in msg and "mining.rank_end" in msg
    # an override can repair a range the file alone gets wrong
    assert load_config(path, ["mining.rank_end=500"]).mining.rank_end == 500


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "seed: 0\noptim:\n  learning_rate: 1.0e-5\n   batch_size: 32\n")
    msg = error(path)
    assert msg.startswith(f"{path}, line 4") and "invalid YAML" in msg


def test_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, "optim:\n  max_steps: 10\n  max_steps: 20\n")
    msg = error(path)
    assert msg.startswith(f"{path}, line 3") and "duplicate key 'max_steps'" in msg


def test_missing_file_and_non_mapping(tmp_path):
    assert "cannot read" in error(tmp_path / "nope.yaml")
    path = write(tmp_path, "- 1\n- 2\n")
    assert error(path).startswith(f"{path}: the config must be a mapping")


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("path", [None, *CONFIGS], ids=lambda p: p.name if p else "defaults")
def test_round_trip(tmp_path, path):
    c = load_config(path, ["method.dp.refresh_every=7", "model.passage_prefix=passage: "])
    out = tmp_path / "run" / "config.yaml"
    dump_config(c, out)
    back = load_config(out)
    assert back == c and config_to_dict(back) == config_to_dict(c)
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temporary file left behind


def test_config_to_dict_is_nested_and_plain():
    d = config_to_dict(Config())
    assert d["optim"]["learning_rate"] == 2e-5 and d["method"]["dp"]["criterion"] == "sim"
    assert set(d) == {"seed", "model", "data", "mining", "optim", "train", "method", "mesh"}


# ----------------------------------------------------------------------------- the release's format


def test_release_config_maps_onto_ours(caplog):
    with caplog.at_level(logging.INFO, logger="opera_jax.release_config"):
        c = load_config(RELEASE)
    assert c.seed == 42
    assert c.method.name == "dp"
    assert c.method.dp == Config().method.dp  # the release's values are our defaults
    assert (c.model.name, c.model.pooling, c.model.normalize) == ("BAAI/bge-large-en-v1.5", "cls", True)
    assert c.model.dtype == "bfloat16" and c.model.param_dtype == "float32" and not c.model.remat
    assert c.model.query_prefix == "Represent this sentence for searching relevant passages: "
    assert c.model.passage_prefix is None
    assert (c.data.path, c.data.train_split, c.data.eval_split) == ("fiqa", "train", "test")
    assert (c.data.query_max_len, c.data.passage_max_len, c.data.group_size) == (128, 512, 2)
    assert (c.mining.rank_start, c.mining.rank_end, c.mining.num_negatives, c.mining.mode) == (10, 100, 200, "hard")
    assert c.optim.learning_rate == 1e-6 and c.optim.batch_size == 128 and c.optim.max_steps == 2000
    assert (c.optim.temperature, c.optim.warmup_ratio, c.optim.weight_decay, c.optim.max_grad_norm) == (
        0.02,
        0.05,
        0.01,
        1.0,
    )
    assert c.optim.schedule == "linear"

    notices = [r for r in caplog.records if r.name == "opera_jax.release_config"]
    assert len(notices) == 1
    text = notices[0].getMessage()
    for key in (
        "wandb",
        "local_rank",
        "optimization.logging_steps",
        "optimization.save_steps",
        "evaluate.index_factory",
        "pretrain.cache_dir",
    ):
        assert key in text
    assert "16 x 8 devices = 128" in text


def test_release_overrides_apply_to_our_keys():
    c = load_config(RELEASE, ["optim.batch_size=32", "data.path=scifact"])
    assert c.optim.batch_size == 32 and c.data.path == "scifact" and c.method.name == "dp"


def release(tmp_path: Path, edit) -> Path:
    import yaml

    data = yaml.safe_load(RELEASE.read_text())
    edit(data)
    return write(tmp_path, yaml.safe_dump(data), "release.yaml")


@pytest.mark.parametrize(
    "level, kept, mode, method",
    [
        ("none", 1.0, "ep", "basic"),
        ("none", 0.5, "hp", "sp"),
        ("none", 0.25, "ran", "sp"),
        ("infobatch", 1.0, "ep", "infobatch"),
    ],
)
def test_release_methods(tmp_path, level, kept, mode, method):
    def edit(d):
        d["opera"]["level"] = level
        d["offline_pruning"].update(kept_pct=kept, mode=mode)

    c = load_config(release(tmp_path, edit))
    assert c.method.name == method
    if method == "sp":
        assert c.method.sp.kept_pct == kept
        assert c.method.sp.mode == {"hp": "lowest", "ran": "random"}[mode]


def test_release_qwen_style(tmp_path):
    def edit(d):
        d["pretrain"].update(model_name_or_path="Qwen/Qwen3-Embedding-0.6B", padding_side="left")
        d["optimization"].update(
            fp16=False,
            bf16=True,
            gradient_checkpointing=True,
            sentence_pooling_method="last",
            learning_rate=1e-5,
            max_steps=4000,
        )
        d["mining"]["range_for_sampling"] = "50-500"
        d["data"]["query_max_len"] = 512

    c = load_config(release(tmp_path, edit))
    assert (c.model.pooling, c.model.padding_side, c.model.dtype, c.model.remat) == ("last", "left", "bfloat16", True)
    assert (c.mining.rank_start, c.mining.rank_end, c.optim.learning_rate) == (50, 500, 1e-5)


def test_release_devices_argument():
    import yaml

    ours = from_release(yaml.safe_load(RELEASE.read_text()), str(RELEASE), release_devices=2)
    assert ours["optim"]["batch_size"] == 32 and ours["method"]["name"] == "dp"


def test_release_unknown_key_is_an_error(tmp_path):
    path = release(tmp_path, lambda d: d["optimization"].update(learnig_rate=1e-5))
    msg = error(path)
    assert str(path) in msg and "optimization.learnig_rate" in msg
    assert "did you mean 'optimization.learning_rate'" in msg
    path = release(tmp_path, lambda d: d.update(mystery_section={"a": 1}))
    assert "unknown key 'mystery_section'" in error(path)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda d: d["optimization"].update(negatives_cross_device=False), "negatives_cross_device"),
        (lambda d: d["opera"]["query_selection"].update(reset_interval=2), "reset_interval"),
        (lambda d: d["opera"]["positive_selection"].update(scheduler="linear"), "positive_selection.scheduler"),
        (lambda d: d["opera"].update(level="document"), "opera.level"),
        (lambda d: d["offline_pruning"].update(mode="best"), "offline_pruning.mode"),
        (lambda d: d["offline_pruning"].update(kept_pct=0.5), "kept_pct"),  # SP combined with DP
        (lambda d: d["mining"].update(range_for_sampling="10..100"), "mining.range_for_sampling"),
        (lambda d: d["optimization"].update(per_device_train_batch_size="16"), "per_device_train_batch_size"),
        (lambda d: d["optimization"].update(lr_scheduler_type="cosine"), "lr_scheduler_type"),
        (lambda d: d["optimization"].pop("max_steps"), "max_steps"),
        (lambda d: d["data"].update(test_data="beir/nfcorpus/test"), "data.test_data"),
        (lambda d: d["pretrain"].update(tokenizer_name="bert-base-uncased"), "tokenizer_name"),
        (lambda d: d["optimization"].update(temperature=0), "optim.temperature"),
        (lambda d: d["optimization"].update(learning_rate="fast"), "optimization.learning_rate"),
        (lambda d: d.update(optimization=3), "optimization"),
    ],
)
def test_release_values_we_cannot_honour(tmp_path, edit, words):
    path = release(tmp_path, edit)
    msg = error(path)
    assert str(path) in msg and words in msg


def test_cli_overrides_go_anywhere_after_the_config(capsys):
    from opera_jax.cli import parse_args

    args = parse_args(["plan", "c.yaml", "--devices", "4", "a.b=1", "--fsdp", "2", "c=2"])
    assert (args.overrides, args.devices, args.fsdp) == (["a.b=1", "c=2"], 4, 2)
    args = parse_args(["train", "c.yaml", "x=1", "--out", "o", "y=2"])
    assert args.overrides == ["x=1", "y=2"] and str(args.out) == "o"
    for bad in (
        ["train", "c.yaml", "--bogus"],
        ["train", "c.yaml", "--out", "o", "-x=1"],
        ["export", "run", "--out", "o", "k=v"],
    ):
        with pytest.raises(SystemExit) as e:
            parse_args(bad)
        assert e.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err

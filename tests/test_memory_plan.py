"""The planner: compiled per-device memory and FLOPs of the train step, no weights allocated."""

import json

import jax
import pytest
from conftest import GOLDEN
from flax import nnx

from opera_jax.cli import main
from opera_jax.config import load_config
from opera_jax.memory_plan import model_config, plan_memory, presets
from opera_jax.models.encoder import load_encoder

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out: README "Tests"

SMALL = ["optim.batch_size=16", "data.query_max_len=16", "data.passage_max_len=32", "data.group_size=2"]
MODELS = {"bert": GOLDEN / "tiny_bert", "qwen3": GOLDEN / "tiny_qwen3"}


def _config(name, *extra):
    return load_config(None, [f"model.name={MODELS[name]}", *SMALL, *extra])


@pytest.fixture(scope="module")
def plans():
    """(model, fsdp, dtype) -> MemoryPlan, each compiled once."""
    cache = {}

    def get(name, fsdp=1, dtype="float32"):
        key = (name, fsdp, dtype)
        if key not in cache:
            cache[key] = plan_memory(_config(name, f"model.dtype={dtype}", f"model.param_dtype={dtype}"), 8, fsdp)
        return cache[key]

    return get


@pytest.mark.parametrize("name", MODELS)
def test_parameter_bytes_are_the_models(plans, name):
    p = plans(name)
    params = nnx.state(load_encoder(str(MODELS[name])).model, nnx.Param)
    assert p.num_params == sum(x.size for x in jax.tree.leaves(params))
    assert p.param_bytes == sum(x.nbytes for x in jax.tree.leaves(params))  # replicated: all of it
    assert p.optimizer_bytes >= 2 * p.param_bytes  # Adam's two f32 moments (+ step counters)
    # the compiled arguments: the state and this device's rows of the batch (XLA drops unused ones)
    batch = (16 * 16 * 2 * 4 + 32 * 32 * 2 * 4 + 16 * 3 * 4) // 8
    assert p.param_bytes + p.optimizer_bytes <= p.argument_bytes <= p.param_bytes + p.optimizer_bytes + batch + 64
    assert p.alias_bytes > 0 and p.temp_bytes > 0 and p.peak_bytes > p.argument_bytes


@pytest.mark.parametrize("name", MODELS)
def test_fsdp_divides_parameter_bytes_by_about_eight(plans, name):
    full, split = plans(name), plans(name, fsdp=8)
    ratio = split.param_bytes / full.param_bytes
    assert 1 / 8 <= ratio < 1 / 8 + 0.06, ratio
    assert 1 / 8 <= split.optimizer_bytes / full.optimizer_bytes < 1 / 8 + 0.06
    assert split.argument_bytes < full.argument_bytes / 4


@pytest.mark.parametrize("name", MODELS)
def test_flops_match_an_analytic_estimate(plans, name):
    p = plans(name)
    assert p.flops > 0
    # tiny models: elementwise work, softmax and the optimizer are a large share, so a loose factor
    assert 0.5 < p.flops / p.analytic_flops < 3, (p.flops, p.analytic_flops)


@pytest.mark.parametrize("name", MODELS)
def test_bf16_halves_parameter_bytes(plans, name):
    f32, bf16 = plans(name), plans(name, dtype="bfloat16")
    assert bf16.param_bytes == f32.param_bytes // 2
    assert bf16.optimizer_bytes == f32.optimizer_bytes  # moments stay f32
    # XLA:CPU computes bf16 elementwise work in f32 and these tiny models' temporaries are
    # mostly f32 softmax logits: their bf16 activations shrink by a few % only (bert 3%, qwen3 1%)
    assert bf16.temp_bytes <= f32.temp_bytes, (bf16.temp_bytes, f32.temp_bytes)


def test_presets_cover_the_release_models():
    assert presets() == [
        "BAAI/bge-large-en-v1.5",
        "Qwen/Qwen3-Embedding-0.6B",
        "Qwen/Qwen3-Embedding-4B",
        "Qwen/Qwen3-Embedding-8B",
    ]
    hf, source = model_config("Qwen/Qwen3-Embedding-0.6B")  # offline in tests
    assert source.startswith("architecture preset") and hf["hidden_size"] == 1024
    from opera_jax.models.qwen3 import Qwen3Config

    # parameter counts of the public checkpoints (embedders: no language-model head)
    counts = {
        "Qwen/Qwen3-Embedding-0.6B": 595_776_512,
        "Qwen/Qwen3-Embedding-4B": 4_021_774_336,
        "Qwen/Qwen3-Embedding-8B": 7_567_295_488,
    }
    for name, want in counts.items():
        c = Qwen3Config.from_hf(model_config(name)[0])
        layer = (
            c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
            + 3 * c.hidden_size * c.intermediate_size
            + 2 * c.hidden_size
            + 2 * c.head_dim
        )
        assert c.vocab_size * c.hidden_size + c.num_hidden_layers * layer + c.hidden_size == want, name


def test_cli_plan_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    args = ["plan", "-", f"model.name={MODELS['bert']}", *SMALL, "--devices", "8", "--fsdp", "8", "--json", str(out)]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 0\n")
    args[1] = str(cfg)
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "per device:" in text and "an estimate of a GPU's or TPU's memory" in text
    row = json.loads(out.read_text())
    assert row["fsdp"] == 8 and row["devices"] == 8 and row["flops"] > 0


@pytest.mark.parametrize(
    "args",
    [
        ["--devices", "8", "--fsdp", "3"],  # fsdp does not divide the devices
        ["--devices", "64"],  # more devices than this process has
        ["optim.batch_sizee=8"],  # unknown key
        ["model.name=no/such-model"],  # neither resolvable nor a preset
    ],
)
def test_cli_plan_bad_input_exits_2(tmp_path, capsys, args):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name: {MODELS['bert']}}}\n")
    assert main(["plan", str(cfg), *args]) == 2
    assert capsys.readouterr().err.startswith("error: ")

"""benchmarks/device_suite.py end to end on CPU at tiny shapes: the GPU's rare minutes are never lost
to a typo. Every section runs; PyTorch's side where torch and transformers are installed."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out: README "Tests"

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_suite_runs_end_to_end_at_tiny_shapes(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "device_suite.py"),
            "--tiny",
            "--out",
            str(tmp_path),
            "--shapes",
            "bge-large,qwen3-0.6b",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "failed:" not in run.stderr, run.stderr[-2000:]
    results = json.loads((tmp_path / "device_suite.json").read_text())
    torch = importlib.util.find_spec("torch") and importlib.util.find_spec("transformers")
    for name, row in results["train_step"].items():
        assert row["ours"]["step_s"] > 0 and row["model_flops"] > 0, name
        assert row["ours"]["loss"] > 0
        expected = ("torch", "torch-compile") if torch else ()
        for peer in expected:
            assert "step_s" in row[peer] or "skipped" in row[peer], (name, peer, row[peer])
        assert "step_s" in row["torch"] or not torch, row["torch"]
    assert results["train_step"]["bge-large"]["ours"]["attention"] == "cpu"  # auto, on CPU in f32
    encode = results["encode"]
    assert "skipped" in encode or encode["ours"]["passages_per_s"] > 0
    assert "error" not in json.dumps(results["pruning_overhead"])[:200]
    assert results["gpu_tests"]["exit"] in (0, 5)  # the gpu tests skip here
    table = (tmp_path / "device_suite.md").read_text()
    assert "| bge-large | ours (float32, cpu) |" in table and "GPU tests:" in table


def test_device_assets_minilm_in_fp16_loads_and_embeds_as_the_original(tmp_path, minilm_dir):
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from device_assets import write_minilm

    from opera_jax.data.tokens import tokenize
    from opera_jax.models.encoder import load_encoder

    small = write_minilm(tmp_path / "minilm")
    assert (small / "model.safetensors").stat().st_size < 0.55 * (minilm_dir / "model.safetensors").stat().st_size
    embeddings = []
    for path in (minilm_dir, small):
        enc = load_encoder(str(path))
        tokens = tokenize(enc.tokenizer, ["fp16 weights travel light", "dense retrieval on a GPU"], 32, use_cache=False)
        ids, mask = tokens.batch(np.arange(2), 32)
        embeddings.append(np.asarray(enc.model(jnp.asarray(ids), jnp.asarray(mask))))
    np.testing.assert_allclose(embeddings[1], embeddings[0], atol=2e-3)

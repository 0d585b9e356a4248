"""train_and_evaluate end to end on a tiny model and real data: logs, export, exact resume, divergence."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_run
from safetensors.numpy import load_file

from opera_jax.config import load_config
from opera_jax.data.tokens import tokenize
from opera_jax.errors import TrainingDiverged
from opera_jax.models.encoder import load_encoder
from opera_jax.train.export_run import export_run
from opera_jax.train.trainer import train_and_evaluate

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out: README "Tests"


def _config(tiny_bert_dir, *extra):
    return load_config(
        None,
        tiny_run(
            tiny_bert_dir,
            "optim.max_steps=8",
            "optim.temperature=0.1",
            "train.eval_every=4",
            "train.checkpoint_every=3",
            "train.log_every=2",
            *extra,
        ),
    )


def test_run_logs_evaluates_and_exports(tiny_bert_dir, tmp_path):
    cfg = _config(tiny_bert_dir)
    last = train_and_evaluate(cfg, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 4, 8]
    assert rows[-1] == last
    for r in rows:
        assert {"wall_time_s", "train_seconds", "examples_seen", "ndcg@10", "recall@20", "mrr@10"} <= set(r)
    assert rows[-1]["examples_seen"] == 64 and rows[-1]["train_seconds"] > 0
    assert rows[0]["ndcg@10"] != rows[-1]["ndcg@10"]  # it trained
    assert list((tmp_path / "tb").iterdir())
    assert (tmp_path / "config.yaml").exists()
    # The export loads back and reproduces the final evaluation's model.
    enc = load_encoder(str(tmp_path / "model"))
    assert enc.spec.pooling == "mean" and enc.spec.normalize
    tokens = tokenize(enc.tokenizer, ["fluid flow in the kidney", "cell membranes"], 16, use_cache=False)
    ids, mask = tokens.batch(np.arange(2), 16)
    emb = np.asarray(enc.model(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("method", ["basic", "dp"])
def test_resume_mid_epoch_equals_uninterrupted_run(tiny_bert_dir, tmp_path, method):
    # MED has 20 training queries: 2 batches of 8 per epoch, so the stop at step 3
    # falls mid-epoch and the resumed run crosses several epochs (DP: several refreshes).
    cfg = _config(tiny_bert_dir, f"method.name={method}")
    full = tmp_path / "full"
    train_and_evaluate(cfg, full, progress=False)
    cut = tmp_path / "cut"
    train_and_evaluate(cfg, cut, progress=False, stop_after=3)
    assert not (cut / "model").exists()
    train_and_evaluate(cfg, cut, progress=False)
    a = load_file(str(full / "model" / "model.safetensors"))
    b = load_file(str(cut / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    rows_full = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    rows_cut = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_cut] == [0, 4, 8]
    assert [r["ndcg@10"] for r in rows_cut] == [r["ndcg@10"] for r in rows_full]


def test_divergence_stops_with_the_last_good_checkpoint(tiny_bert_dir, tmp_path):
    cfg = _config(tiny_bert_dir, "optim.learning_rate=1e12", "optim.max_grad_norm=1e30", "optim.warmup_ratio=0")
    with pytest.raises(TrainingDiverged, match="NaN or Inf"):
        train_and_evaluate(cfg, tmp_path, progress=False)
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("method", ["sp", "dp", "infobatch"])
def test_pruning_methods_train_end_to_end(tiny_bert_dir, tmp_path, method):
    cfg = _config(
        tiny_bert_dir,
        f"method.name={method}",
        "method.sp.kept_pct=0.5",
        "method.dp.refresh_every=1",
        "optim.max_steps=4",
        "train.eval_every=0",
    )
    last = train_and_evaluate(cfg, tmp_path, progress=False)
    assert last["step"] == 4 and 0 <= last["ndcg@10"] <= 1


def test_export_run_reproduces_the_final_export(tiny_bert_dir, tmp_path):
    run = tmp_path / "run"
    train_and_evaluate(_config(tiny_bert_dir, "optim.max_steps=3", "train.eval_every=0"), run, progress=False)
    export_run(run, tmp_path / "again")
    a = load_file(str(run / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "again" / "model.safetensors"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_static_pruning_batches_pair_each_query_with_its_own_tokens(tiny_bert_dir, tmp_path, monkeypatch):
    """SP renumbers queries; the batches must still hold each query's own text (a real bug once)."""
    from opera_jax.train import trainer

    tokenizer = load_encoder(str(tiny_bert_dir)).tokenizer
    seen = []
    real = trainer.make_dataset

    def spy(plan, ts, query_tokens, *args, **kwargs):
        for q in np.unique(plan.query):
            want = tokenize(tokenizer, [ts.query_texts[q]], 16, use_cache=False)
            got = query_tokens.flat[query_tokens.offsets[q] : query_tokens.offsets[q] + query_tokens.lengths[q]]
            seen.append(np.array_equal(got, want.flat))
        return real(plan, ts, query_tokens, *args, **kwargs)

    monkeypatch.setattr(trainer, "make_dataset", spy)
    cfg = _config(tiny_bert_dir, "method.name=sp", "method.sp.kept_pct=0.5", "optim.max_steps=2", "train.eval_every=0")
    train_and_evaluate(cfg, tmp_path, progress=False)
    assert seen and all(seen)


def test_tiny_qwen3_runs_dp_with_cached_gradients_end_to_end(tmp_path):
    """The LLM-embedder path: last-token pooling, left padding, query prompt, DP refreshes, GradCache, export."""
    from conftest import GOLDEN

    cfg = load_config(
        None,
        [
            f"model.name={GOLDEN / 'tiny_qwen3'}",
            "data.path=med",
            "data.query_max_len=16",
            "data.passage_max_len=32",
            "data.eval_batch_size=64",
            "optim.batch_size=16",
            "optim.grad_cache_chunk=8",
            "optim.max_steps=4",
            "optim.learning_rate=1e-3",
            "train.eval_every=0",
            "method.name=dp",
            "method.dp.refresh_every=1",
            "mining.rank_start=0",
            "mining.rank_end=20",
            "mining.num_negatives=8",
        ],
    )
    last = train_and_evaluate(cfg, tmp_path, progress=False)
    assert last["step"] == 4 and 0 <= last["ndcg@10"] <= 1
    enc = load_encoder(str(tmp_path / "model"))
    assert enc.architecture == "qwen3" and enc.spec.pooling == "last" and enc.spec.padding_side == "left"


def test_metrics_log_keeps_resumed_rows_and_restarts_fresh_runs(tmp_path):
    from opera_jax.train.run_logs import MetricsLog

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "ndcg@10": s / 100} for s in (0, 15, 30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    MetricsLog(path, keep_until=15, enabled=True)  # resumed from the step-15 checkpoint
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 15]
    log = MetricsLog(path, keep_until=0, enabled=True)  # no checkpoint: the run starts over, step 0 again
    log.append(rows[0])
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0]

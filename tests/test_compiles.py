"""The train step compiles once per length bucket, ahead of the timed steps, and never mid-run."""

import json

import jax
import pytest

from opera_jax.config import load_config
from opera_jax.train.step import TrainStep
from opera_jax.train.trainer import train_and_evaluate

COMPILE = "/jax/core/compile/backend_compile_duration"


@pytest.fixture
def no_persistent_cache():
    """Every compilation reaches XLA (a persistent-cache hit would not be counted)."""
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", before)


def _collection(root):
    """A BEIR collection with a few long queries among short ones: batches of both length buckets."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    text = lambda i, n: " ".join(words[(i + j) % len(words)] for j in range(n))
    (root / "qrels").mkdir(parents=True)
    with open(root / "queries.jsonl", "w") as f:
        for i in range(48):
            f.write(json.dumps({"_id": f"q{i}", "text": text(i, 30 if i % 10 == 0 else 2)}) + "\n")
    with open(root / "corpus.jsonl", "w") as f:
        for i in range(64):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": text(i, 3 + i % 40)}) + "\n")
    for split, queries in (("train", range(40)), ("test", range(40, 48))):
        rows = "".join(f"q{i}\td{i}\t1\n" for i in queries)
        (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows)
    return root


def test_the_step_compiles_once_per_bucket_and_never_mid_run(tiny_bert_dir, tmp_path, monkeypatch, no_persistent_cache):
    phase, compiles, shapes = [None], [], []

    def listener(event, duration, **kwargs):
        if event == COMPILE:
            compiles.append(phase[0])

    def within(name, method):
        def run(self, state, batch):
            phase[0] = name
            if name == "compile":
                shapes.append(tuple(sorted((k, v.shape) for k, v in batch.items())))
            try:
                return method(self, state, batch)
            finally:
                phase[0] = None

        return run

    monkeypatch.setattr(TrainStep, "__call__", within("step", TrainStep.__call__))
    monkeypatch.setattr(TrainStep, "compile", within("compile", TrainStep.compile))
    config = load_config(
        None,
        [
            f"model.name={tiny_bert_dir}",
            "model.pooling=mean",
            f"data.path={_collection(tmp_path / 'data')}",
            "data.query_max_len=64",
            "data.passage_max_len=64",
            "optim.batch_size=8",
            "optim.max_steps=12",
            "train.eval_every=0",
            "train.checkpoint_every=0",
            "mining.rank_start=0",
            "mining.rank_end=20",
            "mining.num_negatives=8",
        ],
    )
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        train_and_evaluate(config, tmp_path / "run", progress=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(set(shapes)) == len(shapes) >= 2, shapes  # several buckets, each compiled once
    assert compiles.count("compile") >= len(shapes)  # the listener sees them
    assert "step" not in compiles  # no step compiled anything: every shape was ready before it ran

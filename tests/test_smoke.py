"""The fast tier's end-to-end check: one step of the real trainer on the tiny model and real data.

``train_and_evaluate`` as ``opera-jax train`` runs it (hard-negative mining, the Grain pipeline,
the jitted step, evaluation, a checkpoint, the export), at the smallest size that still crosses
every stage, so ``python -m pytest -m "not slow"`` catches a broken pipeline in seconds.
tests/test_trainer.py holds the longer runs (resume, methods, divergence).
"""

import json

import jax.numpy as jnp
import numpy as np
from conftest import tiny_run

from opera_jax.config import load_config
from opera_jax.data.tokens import tokenize
from opera_jax.models.encoder import load_encoder
from opera_jax.train.trainer import train_and_evaluate


def test_one_step_end_to_end(tiny_bert_dir, tmp_path):
    cfg = load_config(
        None,
        tiny_run(
            tiny_bert_dir,
            "optim.max_steps=1",
            "train.eval_every=1",
            "train.log_every=1",
            "train.checkpoint_every=1",
        ),
    )
    last = train_and_evaluate(cfg, tmp_path, progress=False)

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and rows[-1] == last
    assert last["examples_seen"] == 8 and 0 <= last["ndcg@10"] <= 1
    logs = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert logs and all(np.isfinite(r["loss"]) for r in logs)
    assert (tmp_path / "config.yaml").exists() and list((tmp_path / "checkpoints").iterdir())

    enc = load_encoder(str(tmp_path / "model"))
    tokens = tokenize(enc.tokenizer, ["fluid flow in the kidney"], 16, use_cache=False)
    ids, mask = tokens.batch(np.arange(1), 16)
    emb = np.asarray(enc.model(jnp.asarray(ids), jnp.asarray(mask)))
    assert emb.shape[0] == 1 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)

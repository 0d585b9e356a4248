"""A worker for the multi-process test: a few train steps of the tiny BERT on fixed batches.

    python tests/workers/train_steps.py OUT.json DEVICES_PER_PROCESS [COORDINATOR NUM_PROCESSES PROCESS_ID]

Every process builds the same global batches and feeds only its own rows;
process 0 writes the loss trajectory and a parameter checksum.
"""

import json
import os
import sys

out, devices = sys.argv[1], int(sys.argv[2])
os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"  # the last count wins
)
os.environ["JAX_PLATFORMS"] = "cpu"

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from opera_jax.distributed import initialize  # noqa: E402

if len(sys.argv) > 3:
    initialize(sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))

from opera_jax.models.encoder import load_encoder  # noqa: E402
from opera_jax.sharding import batch_sharding, make_mesh, put_global, replicated  # noqa: E402
from opera_jax.train.optim import make_optimizer  # noqa: E402
from opera_jax.train.step import init_state, make_train_step  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "golden" / "tiny_bert"
B, G, STEPS = 8, 2, 4

mesh = make_mesh()
model = load_encoder(str(TINY), overrides={"normalize": True}).model
model.train()
graphdef, params, rest = nnx.split(model, nnx.Param, ...)
opt = make_optimizer(1e-3, 10, warmup_ratio=0.0)
state = init_state(params, opt, seed=0)
state = put_global(state, jax.tree.map(lambda _: replicated(mesh), state))
step = make_train_step(graphdef, rest, opt, temperature=0.05)
rows = slice(jax.process_index() * B // jax.process_count(), (jax.process_index() + 1) * B // jax.process_count())
losses = []
for i in range(STEPS):
    rng = np.random.default_rng(i)
    batch = {
        "query_input_ids": rng.integers(5, 90, (B, 8)).astype(np.int32),
        "query_attention_mask": (np.arange(8)[None] < rng.integers(2, 9, (B, 1))).astype(np.int32),
        "passage_input_ids": rng.integers(5, 90, (B * G, 16)).astype(np.int32),
        "passage_attention_mask": (np.arange(16)[None] < rng.integers(4, 17, (B * G, 1))).astype(np.int32),
        "pair": np.arange(B, dtype=np.int32),
        "query": np.arange(B, dtype=np.int32),
        "weight": np.ones(B, np.float32),
    }
    local = {
        k: v[rows] if k.startswith("query") or k in ("pair", "weight") else v[rows.start * G : rows.stop * G]
        for k, v in batch.items()
    }
    global_batch = {k: jax.make_array_from_process_local_data(batch_sharding(mesh), v) for k, v in local.items()}
    state, outputs = step(state, global_batch)
    losses.append(float(outputs["loss"]))
checksum = float(sum(np.abs(np.asarray(x.addressable_data(0))).sum() for x in jax.tree.leaves(state.params)))
if jax.process_index() == 0:
    Path(out).write_text(
        json.dumps(
            {"losses": losses, "checksum": checksum, "devices": len(jax.devices()), "processes": jax.process_count()}
        )
    )

"""InfoBatch (Qin et al., ICLR 2024), the peer baseline, as the OPERA release runs it.

Each query keeps its last loss (``UNSEEN_LOSS`` until trained on, so nothing
is pruned before it has been seen). At each epoch, queries whose loss is below
the mean are "well learned"; a random ``ratio`` of them sits the epoch out, and
the well-learned ones that stay weigh ``1 / (1 - ratio)`` in the loss, so the
expected gradient is unchanged. In the last ``(1 - delta)`` share of the steps
nothing is pruned (annealing; measured in steps, see opera.md).

The loss record is updated inside the train step; the epoch's selection is a
jitted kernel; only the int32 order, the count and the weights leave the device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from opera_jax.data.pipeline import Plan, uniform_positives
from opera_jax.data.training import TrainingSet

UNSEEN_LOSS = 1e6


def update(losses: jax.Array, batch: dict, per_example_loss: jax.Array, pos_sim: jax.Array) -> jax.Array:
    return losses.at[batch["query"]].set(per_example_loss)


@functools.partial(jax.jit, static_argnames=("anneal",))
def select(losses: jax.Array, key, ratio: float, *, anneal: bool):
    """``(order [n], kept count, weights [n])``: kept queries first in ``order``, in random order."""
    n = losses.shape[0]
    k_prune, k_order = jax.random.split(key)
    well_learned = losses < jnp.mean(losses)
    if anneal:
        pruned = jnp.zeros(n, bool)
    else:
        pruned = well_learned & (jax.random.uniform(k_prune, (n,)) < ratio)
    weights = jnp.where(well_learned & ~pruned & (not anneal), 1.0 / (1.0 - ratio), 1.0)
    priority = jnp.where(pruned, 0.0, 1.0) + jax.random.uniform(k_order, (n,))
    order = jnp.argsort(-priority).astype(jnp.int32)
    return order, n - pruned.sum(), weights.astype(jnp.float32)


class InfoBatch:
    name = "infobatch"
    update = staticmethod(update)

    def __init__(self, ts: TrainingSet, ratio: float, delta: float, *, seed: int, max_steps: int):
        self.ts, self.ratio, self.seed = ts, ratio, seed
        self.anneal_from = int(delta * max_steps)

    def init_state(self) -> jax.Array:
        return jnp.full((self.ts.num_queries,), UNSEEN_LOSS, jnp.float32)

    def plan(self, state: jax.Array, segment: int, step: int) -> Plan:
        key = jax.random.fold_in(jax.random.key(self.seed), segment)
        order, count, weights = select(state, key, self.ratio, anneal=step >= self.anneal_from)
        query = np.asarray(order)[: int(count)]
        weight = np.asarray(weights)[query]
        pair = uniform_positives(self.ts, query, np.random.default_rng([self.seed, segment]))
        return Plan(query, pair, weight)

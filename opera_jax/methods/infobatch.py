"""InfoBatch (Qin et al., ICLR 2024), the peer baseline, as the OPERA release runs it.

Each query keeps its last loss (``UNSEEN``, NaN, until trained on). At each
epoch, the queries trained on so far whose loss is below the mean loss of the
queries trained on so far are "well learned"; a random ``ratio`` of them sits
the epoch out, and the well-learned ones that stay weigh ``1 / (1 - ratio)`` in
the loss, so the expected gradient is unchanged. A query not yet trained on is
never pruned and does not count in the mean: the release scores it 3.0 and a
constant as large as 1e6 would make the mean that constant's share (on SciFact,
809 queries in batches of 32 leave 9 unseen after the first epoch: a mean of
~11,000 made every seen query "well learned" and epoch 2 pruned at random). In the last ``(1 - delta)`` share of the steps
nothing is pruned (annealing; measured in steps, as in the InfoBatch paper, Qin et al., ICLR 2024).

An epoch never shrinks below ``min_kept`` queries (the trainer passes one global
batch): on a small training set (MED: 20 queries, batch 16) an unbounded draw
can leave fewer queries than one batch. When the cap binds, the queries with
the smallest draws are the ones pruned, so each well-learned query is pruned
with a probability a little below ``ratio`` and its ``1 / (1 - ratio)`` weight
over-corrects slightly, for that epoch only.

The loss record is updated inside the train step; the epoch's selection is a
jitted kernel; only the int32 order, the count and the weights leave the device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from opera_jax.config import Config
from opera_jax.data.pipeline import Plan, uniform_positives
from opera_jax.data.training import TrainingSet

UNSEEN = float("nan")  # the loss of a query not trained on yet


def seen_mean(losses: jax.Array) -> jax.Array:
    """The mean over the entries that are not ``UNSEEN`` (NaN when there are none)."""
    seen = ~jnp.isnan(losses)
    return jnp.sum(jnp.where(seen, losses, 0.0)) / jnp.sum(seen)


def update(losses: jax.Array, batch: dict, per_example_loss: jax.Array, pos_sim: jax.Array) -> jax.Array:
    return losses.at[batch["query"]].set(per_example_loss)


@functools.partial(jax.jit, static_argnames=("anneal", "min_kept"))
def select(losses: jax.Array, key, ratio: float, *, anneal: bool, min_kept: int = 0):
    """``(order [n], kept count, weights [n])``: kept queries first in ``order``, in random order;
    at most ``n - min_kept`` queries pruned."""
    n = losses.shape[0]
    k_prune, k_order = jax.random.split(key)
    well_learned = losses < seen_mean(losses)  # False for UNSEEN (NaN compares false), and when none is seen
    if anneal:
        pruned = jnp.zeros(n, bool)
    else:
        draw = jax.random.uniform(k_prune, (n,))
        pruned = well_learned & (draw < ratio)
        rank = jnp.argsort(jnp.argsort(jnp.where(pruned, draw, 2.0)))  # the pruned ones first, smallest draw first
        pruned = pruned & (rank < max(n - min_kept, 0))
    weights = jnp.where(well_learned & ~pruned & (not anneal), 1.0 / (1.0 - ratio), 1.0)
    priority = jnp.where(pruned, 0.0, 1.0) + jax.random.uniform(k_order, (n,))
    order = jnp.argsort(-priority).astype(jnp.int32)
    return order, n - pruned.sum(), weights.astype(jnp.float32)


class InfoBatch:
    name = "infobatch"
    update = staticmethod(update)

    def __init__(self, ts: TrainingSet, ratio: float, delta: float, *, seed: int, max_steps: int, min_kept: int = 0):
        self.ts, self.ratio, self.seed, self.min_kept = ts, ratio, seed, min_kept
        self.anneal_from = int(delta * max_steps)

    @classmethod
    def from_config(cls, config: Config, ts: TrainingSet, base_scores) -> InfoBatch:
        ib, optim = config.method.infobatch, config.optim
        return cls(ts, ib.ratio, ib.delta, seed=config.seed, max_steps=optim.max_steps, min_kept=optim.batch_size)

    def init_state(self) -> jax.Array:
        return jnp.full((self.ts.num_queries,), UNSEEN, jnp.float32)

    def plan(self, state: jax.Array, segment: int, step: int) -> Plan:
        key = jax.random.fold_in(jax.random.key(self.seed), segment)
        order, count, weights = select(state, key, self.ratio, anneal=step >= self.anneal_from, min_kept=self.min_kept)
        query = np.asarray(order)[: int(count)]
        weight = np.asarray(weights)[query]
        pair = uniform_positives(self.ts, query, np.random.default_rng([self.seed, segment]))
        return Plan(query, pair, weight)

"""OPERA dynamic pruning (DP), with all of its bookkeeping on the accelerator.

The method (OPERA, Fang et al., arXiv 2603.17205): keep one score per training pair,
``S``, initialised with the base model's similarities and overwritten by every
train step with that step's positive similarities. At each refresh:

1. query level: a query's score is the mean of its pairs' scores; the queries
   at or above the ``(1 - r(t))`` quantile are kept, the others soft-pruned. The
   plan holds all kept queries plus a uniform draw without replacement from the
   pruned ones, ``n0`` queries in all, shuffled;
2. positive level: pairs above the ``(1 - c(t))`` quantile of ``S`` weigh
   ``strength`` (5), the others 1; a visited query's positive is drawn with
   those weights, normalised within the query.

Under the "loss" criterion (the release's option: a pair's last loss in place
of its similarity) a pair not trained on yet has no loss (``UNSEEN``, NaN): a
query's score is the mean over its trained pairs, a query with none is kept
(never soft-pruned, whichever the direction) and left out of the quantile, so
that a placeholder can neither move the threshold nor decide a query's fate.

Here: ``S`` lives in the ``TrainState`` (``DPState``), the scatter update runs
inside the jitted train step (``update``), and ``refresh`` is one jitted
kernel from (scores, step, key) to an int32 plan, with a ``vmap`` over queries
for the positive draw. Only the plan leaves the device, to feed the Grain
pipeline. Everything below ``DPState`` is a pure function.
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from opera_jax.config import Config, DPConfig
from opera_jax.data.pipeline import Plan
from opera_jax.data.training import TrainingSet

# ----------------------------------------------------------------------------- pure math


def schedule(t, total: int, start: float, end: float, kind: str = "cosine", delta: float = 1.0):
    """A value moving from ``start`` (t = 0) to ``end`` (t >= delta * total)."""
    progress = jnp.clip(jnp.asarray(t, jnp.float32) / (delta * total), 0.0, 1.0)
    if kind == "cosine":
        return end + 0.5 * (start - end) * (1.0 + jnp.cos(jnp.pi * progress))
    if kind == "linear":
        return start + (end - start) * progress
    raise ValueError(f"unknown schedule {kind!r}")


def epoch_length(n: int, cutoff_start: float, strength_start: float) -> int:
    """``n0 = floor(n (1 - r0) / x0 + r0 n)``: the query draws of one epoch, fixed for the run."""
    return int(math.floor(n * (1 - cutoff_start) / strength_start + cutoff_start * n))


def query_cutoff(strength, n0: int, n: int):
    """``r(t) = (x n0 - n) / (n (x - 1))``: the kept share that makes kept queries ``x`` times likelier."""
    return (strength * n0 - n) / (n * (strength - 1.0))


def segment_mean(values: jax.Array, segments: jax.Array, num_segments: int) -> jax.Array:
    total = jax.ops.segment_sum(values, segments, num_segments)
    count = jax.ops.segment_sum(jnp.ones_like(values), segments, num_segments)
    return total / jnp.maximum(count, 1.0)


def seen_segment_mean(values: jax.Array, segments: jax.Array, num_segments: int) -> jax.Array:
    """Per segment, the mean of its non-NaN values; NaN for a segment without any."""
    seen = ~jnp.isnan(values)
    total = jax.ops.segment_sum(jnp.where(seen, values, 0.0), segments, num_segments)
    count = jax.ops.segment_sum(seen.astype(values.dtype), segments, num_segments)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.nan)


def threshold(values: jax.Array, share, keep_higher: bool) -> jax.Array:
    """The quantile that leaves ``share`` of ``values`` on the kept side (linear, as ``numpy.quantile``);
    NaN values (not trained on yet) are left out, as ``numpy.nanquantile`` does."""
    return jnp.nanquantile(values, 1.0 - share if keep_higher else share)


def above(values: jax.Array, theta, keep_higher: bool, *, inclusive: bool) -> jax.Array:
    """On the kept side of ``theta``: higher (or lower, for keep-lower) than it."""
    if keep_higher:
        return values >= theta if inclusive else values > theta
    return values <= theta if inclusive else values < theta


def draw_queries(key, kept: jax.Array, n0: int) -> jax.Array:
    """All kept queries plus a uniform draw from the rest, ``n0`` in all, shuffled (Gumbel top-k)."""
    k_pick, k_shuffle = jax.random.split(key)
    priority = kept.astype(jnp.float32) * 2.0 + jax.random.uniform(k_pick, kept.shape)
    chosen = jax.lax.top_k(priority, n0)[1]
    return jax.random.permutation(k_shuffle, chosen).astype(jnp.int32)


def draw_positive(key, pairs: jax.Array, weights: jax.Array) -> jax.Array:
    """One pair id from a query's padded ``pairs`` row (-1 = padding), with probability ``weights / sum``."""
    logits = jnp.where(pairs >= 0, jnp.log(weights), -jnp.inf)
    return pairs[jax.random.categorical(key, logits)]


# The loss of a pair not trained on yet: left out of query means and quantiles, its query kept.
UNSEEN = float("nan")


@flax.struct.dataclass
class DPState:
    scores: jax.Array  # f32 [N] pair similarities, updated every step
    losses: jax.Array  # f32 [N] pair losses (the "loss" criterion), UNSEEN (NaN) until trained on


def selection(state: DPState, step, pair_query, *, n0: int, num_queries: int, total: int, cfg: DPConfig) -> dict:
    """Both levels' thresholds at ``step``: r(t), theta_q, the kept queries, c(t), theta_d, pair weights."""
    if cfg.criterion == "sim":
        query_score = segment_mean(state.scores, pair_query, num_queries)
    else:  # NaN for a query none of whose pairs has been trained on: kept, and out of the quantile
        query_score = seen_segment_mean(state.losses, pair_query, num_queries)
    kind, delta = cfg.schedule, cfg.delta
    r = query_cutoff(schedule(step, total, cfg.strength_start, cfg.strength_end, kind, delta), n0, num_queries)
    theta_q = threshold(query_score, r, cfg.keep_higher_query)
    c = schedule(step, total, cfg.pos_cutoff_start, cfg.pos_cutoff_end, kind, delta)
    theta_d = threshold(state.scores, c, cfg.keep_higher_pos)
    high = above(state.scores, theta_d, cfg.keep_higher_pos, inclusive=False)  # S > theta_d
    return {
        "r": r,
        "theta_q": theta_q,
        "kept": above(query_score, theta_q, cfg.keep_higher_query, inclusive=True) | jnp.isnan(query_score),
        "c": c,
        "theta_d": theta_d,
        "pair_weight": jnp.where(high, cfg.pos_strength, 1.0),
    }


@functools.partial(jax.jit, static_argnames=("n0", "num_queries", "total", "cfg"))
def refresh(
    state: DPState,
    step,
    key,
    pair_query,
    pair_matrix,
    *,
    n0: int,
    num_queries: int,
    total: int,
    cfg: DPConfig,
):
    """The next epoch plan, on device: ``(queries [n0], positive pair ids [n0], selection stats)``."""
    stats = selection(state, step, pair_query, n0=n0, num_queries=num_queries, total=total, cfg=cfg)
    k_queries, k_pos = jax.random.split(key)
    queries = draw_queries(k_queries, stats["kept"], n0)
    rows = pair_matrix[queries]
    weights = jnp.where(rows >= 0, stats["pair_weight"][jnp.maximum(rows, 0)], 1.0)
    positives = jax.vmap(draw_positive)(jax.random.split(k_pos, n0), rows, weights)
    return queries, positives.astype(jnp.int32), stats


def update(state: DPState, batch: dict, per_example_loss: jax.Array, pos_sim: jax.Array) -> DPState:
    """Inside the train step: the trained pairs take this step's similarity (and loss)."""
    return DPState(
        scores=state.scores.at[batch["pair"]].set(pos_sim), losses=state.losses.at[batch["pair"]].set(per_example_loss)
    )


# ----------------------------------------------------------------------------- the method


class Dynamic:
    """DP as a training method: device state, in-step update, and plans from ``refresh``."""

    name = "dp"
    update = staticmethod(update)

    def __init__(
        self, ts: TrainingSet, initial_scores: np.ndarray, cfg: DPConfig, *, seed: int, max_steps: int, batch_size: int
    ):
        self.ts, self.cfg, self.seed, self.total = ts, cfg, seed, max_steps
        self.initial_scores = np.asarray(initial_scores, np.float32)
        self.n0 = epoch_length(ts.num_queries, cfg.query_cutoff_start, cfg.strength_start)
        self.pair_query = jnp.asarray(ts.pair_query)
        self.pair_matrix = jnp.asarray(ts.pair_matrix())
        steps = cfg.refresh_every or max(self.n0 // batch_size, 1)
        self.draws = steps * batch_size  # plan length between refreshes

    @classmethod
    def from_config(cls, config: Config, ts: TrainingSet, base_scores) -> Dynamic:
        optim = config.optim
        return cls(
            ts,
            base_scores(),
            config.method.dp,
            seed=config.seed,
            max_steps=optim.max_steps,
            batch_size=optim.batch_size,
        )

    def init_state(self) -> DPState:
        n = self.ts.num_pairs
        return DPState(scores=jnp.asarray(self.initial_scores), losses=jnp.full((n,), UNSEEN, jnp.float32))

    def plan(self, state: DPState, segment: int, step: int) -> Plan:
        """``draws`` plan rows: whole refreshed epochs of ``n0``, each from the scores as they are now."""
        queries, pairs = [], []
        for i in range(-(-self.draws // self.n0)):
            key = jax.random.fold_in(jax.random.key(self.seed), segment * 1024 + i)
            q, p, _ = refresh(
                state,
                step,
                key,
                self.pair_query,
                self.pair_matrix,
                n0=self.n0,
                num_queries=self.ts.num_queries,
                total=self.total,
                cfg=self.cfg,
            )
            queries.append(q)
            pairs.append(p)
        q = np.asarray(jnp.concatenate(queries))[: self.draws]  # the one device -> host transfer
        p = np.asarray(jnp.concatenate(pairs))[: self.draws]
        return Plan(q, p)

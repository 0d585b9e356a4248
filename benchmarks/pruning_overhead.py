"""DP bookkeeping cost: on device (opera-jax) against the release's host procedure, per step and per refresh.

    python benchmarks/pruning_overhead.py [--pairs 1e3,1e4,1e5,1e6,1e7] [--batch 128] [--out results.json]

For N pairs (two per query on average, 1-3 at random) it times, in one run:
- per step: opera-jax's scatter of the step's positive similarities into the
  device score array (jitted, donated) against a NumPy fancy-index assignment
  (the release keeps scores in Python/NumPy structures on the host);
- per refresh: opera-jax's jitted ``refresh`` kernel (segment means, both
  quantiles, the kept set, the Gumbel top-k plan, the vmapped positive draw;
  the int32 plan copied to the host) against a NumPy transcription of the
  release's procedure (pad the per-query score lists, quantiles, then one
  ``rng.choice`` per visited query for its positive);
and reports ratios (host / device) and DP's overhead as a share of a real
MiniLM train step (shape 16 x 64 + 32 x 128, measured here too) when the plan
is refreshed once per epoch of ``n0 / batch`` steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from opera_jax.config import DPConfig
from opera_jax.methods import dynamic as dp


def make_problem(n_pairs: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 4, n_pairs)  # 1-3 positives per query, 2 on average
    counts = counts[: np.searchsorted(np.cumsum(counts), n_pairs) + 1]
    counts[-1] -= counts.sum() - n_pairs
    counts = counts[counts > 0]
    pair_query = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    matrix = np.full((len(counts), counts.max()), -1, np.int32)
    for j in range(counts.max()):
        has = counts > j
        matrix[has, j] = offsets[:-1][has] + j
    return rng.normal(0.5, 0.2, n_pairs).astype(np.float32), pair_query, matrix, offsets


def host_refresh(scores, offsets, n0, t, total, rng):
    """The release's procedure in NumPy: padded per-query lists, quantiles, one choice per visited query."""
    n = len(offsets) - 1
    width = int(np.diff(offsets).max())
    padded = np.full((n, width), np.nan, np.float32)
    for q in range(n):
        padded[q, : offsets[q + 1] - offsets[q]] = scores[offsets[q] : offsets[q + 1]]
    m = np.nanmean(padded, axis=1)
    x = float(dp.schedule(t, total, 2.0, 5.0))
    r = (x * n0 - n) / (n * (x - 1))
    kept = np.flatnonzero(m >= np.quantile(m, 1 - r))
    rest = np.setdiff1d(np.arange(n), kept)
    plan = np.concatenate([kept, rng.choice(rest, n0 - len(kept), replace=False)])
    rng.shuffle(plan)
    theta = np.quantile(scores, 1 - float(dp.schedule(t, total, 0.25, 0.5)))
    positives = np.empty(len(plan), np.int64)
    for i, q in enumerate(plan):
        s = scores[offsets[q] : offsets[q + 1]]
        w = np.where(s > theta, 5.0, 1.0)
        positives[i] = offsets[q] + rng.choice(len(s), p=w / w.sum())
    return plan, positives


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def train_step_seconds(tiny: bool = False) -> float:
    """A real MiniLM train step at shape 16 x 64 + 32 x 128 (random weights and tokens); ``tiny``: a
    2-layer, 32-wide BERT instead, for the device suite's CPU dry run (the same code, compiled in seconds)."""
    from flax import nnx

    from opera_jax.models.bert import BertConfig, BertModel, Precision
    from opera_jax.models.encoder import Retriever
    from opera_jax.train.optim import make_optimizer
    from opera_jax.train.step import init_state, make_train_step

    if tiny:
        config = BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
    else:
        config = BertConfig(
            vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
        )
    model = Retriever(BertModel(config, precision=Precision.named("auto"), rngs=nnx.Rngs(0)), "mean", True)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = make_optimizer(1e-5, 100)
    state = init_state(params, opt, 0)
    step = make_train_step(graphdef, rest, opt, 0.05)
    rng = np.random.default_rng(0)
    batch = {
        "query_input_ids": rng.integers(1000, 20000, (16, 64)).astype(np.int32),
        "query_attention_mask": np.ones((16, 64), np.int32),
        "passage_input_ids": rng.integers(1000, 20000, (32, 128)).astype(np.int32),
        "passage_attention_mask": np.ones((32, 128), np.int32),
        "pair": np.arange(16, dtype=np.int32),
        "query": np.arange(16, dtype=np.int32),
        "weight": np.ones(16, np.float32),
    }
    batch = jax.device_put(batch)
    for _ in range(2):
        state, out = step(state, batch)
    jax.block_until_ready(out["loss"])
    times = []
    for _ in range(3):
        t = time.perf_counter()
        state, out = step(state, batch)
        jax.block_until_ready(out["loss"])
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default="1e3,1e4,1e5,1e6,1e7")
    p.add_argument("--batch", type=int, default=128, help="queries per step (the release's global batch)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--tiny", action="store_true", help="time a tiny BERT's step, not MiniLM's (a dry run)")
    args = p.parse_args(argv)

    step_s = train_step_seconds(args.tiny)
    scatter = jax.jit(lambda s, i, v: s.at[i].set(v), donate_argnums=0)
    rows = []
    for n_pairs in (int(float(x)) for x in args.pairs.split(",")):
        scores, pair_query, matrix, offsets = make_problem(n_pairs)
        n = len(offsets) - 1
        n0 = dp.epoch_length(n, 0.25, 2.0)
        state = dp.DPState(jnp.asarray(scores), jnp.zeros(n_pairs, jnp.float32))
        pq, pm = jnp.asarray(pair_query), jnp.asarray(matrix)
        key = jax.random.key(0)

        def device_refresh():
            q, pos, _ = dp.refresh(state, 500, key, pq, pm, n0=n0, num_queries=n, total=1000, cfg=DPConfig())
            np.asarray(q), np.asarray(pos)  # the plan goes to the host, as in training

        device_refresh()
        dev_refresh = timed(device_refresh, args.repeats)
        rng = np.random.default_rng(0)
        host_repeats = 1 if n_pairs >= 1_000_000 else args.repeats
        host_refresh_s = timed(lambda: host_refresh(scores, offsets, n0, 500, 1000, rng), host_repeats)

        idx = jnp.asarray(rng.integers(0, n_pairs, args.batch).astype(np.int32))
        vals = jnp.asarray(rng.normal(size=args.batch).astype(np.float32))
        s_dev = jnp.asarray(scores)
        s_dev = scatter(s_dev, idx, vals).block_until_ready()

        def dev_update():
            nonlocal s_dev
            s_dev = scatter(s_dev, idx, vals)
            s_dev.block_until_ready()

        dev_update_s = timed(dev_update, 20)
        host_scores, hidx, hvals = scores.copy(), np.asarray(idx), np.asarray(vals)
        host_update_s = timed(lambda: host_scores.__setitem__(hidx, hvals), 20)
        steps_per_refresh = max(n0 // args.batch, 1)
        per_step = dev_update_s + dev_refresh / steps_per_refresh
        rows.append(
            {
                "pairs": n_pairs,
                "queries": n,
                "n0": n0,
                "steps_per_refresh": steps_per_refresh,
                "device_refresh_s": dev_refresh,
                "host_refresh_s": host_refresh_s,
                "refresh_speedup": host_refresh_s / dev_refresh,
                "device_update_s": dev_update_s,
                "host_update_s": host_update_s,
                "device_overhead_per_step_s": per_step,
                "share_of_train_step": per_step / step_s,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    result = {"train_step_s": step_s, "devices": [str(d) for d in jax.devices()], "rows": rows}
    if args.out:
        from opera_jax.io_utils import write_json

        write_json(args.out, result)
    print(f"train step: {step_s:.3f} s")
    print("| pairs | device refresh | host refresh | speed-up | device update | DP share of a step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['pairs']:.0e} | {r['device_refresh_s'] * 1e3:.2f} ms | {r['host_refresh_s'] * 1e3:.1f} ms "
            f"| {r['refresh_speedup']:.1f}x | {r['device_update_s'] * 1e6:.0f} us | {100 * r['share_of_train_step']:.3f}% |"
        )
    return result


if __name__ == "__main__":
    main()

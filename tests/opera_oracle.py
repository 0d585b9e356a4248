"""A plain NumPy transcription of OPERA's sampling semantics (../shared/docs/opera.md), for tests.

Written from the specification, independently of opera_jax.methods.dynamic: it
gives the exact probabilities a refresh should realise, which the device
kernel's empirical frequencies are checked against.
"""

import math

import numpy as np


def schedule(t, total, start, end, kind="cosine", delta=1.0):
    progress = min(max(t / (delta * total), 0.0), 1.0)
    if kind == "cosine":
        return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))
    return start + (end - start) * progress


def epoch_length(n, r0=0.25, x0=2.0):
    return math.floor(n * (1 - r0) / x0 + r0 * n)


def refresh_probabilities(
    scores,
    pair_query,
    n,
    t,
    total,
    *,
    r0=0.25,
    x0=2.0,
    x1=5.0,
    c0=0.25,
    c1=0.5,
    strength_d=5.0,
    kind="cosine",
    delta=1.0,
    query_values=None,
    keep_higher_query=True,
):
    """n0, r(t), theta_q, kept queries, per-query visit probability, theta_d, per-pair positive probability.

    ``query_values``: the per-pair values of the query level (default ``scores``; the "loss" criterion
    passes losses, NaN for a pair not trained on yet). A query's value is the mean of its pairs' values
    that are not NaN; a query with none is kept and left out of the quantile.
    """
    n0 = epoch_length(n, r0, x0)
    x = schedule(t, total, x0, x1, kind, delta)
    r = (x * n0 - n) / (n * (x - 1))
    values = scores if query_values is None else query_values
    m = np.full(n, np.nan)
    for q in range(n):
        v = values[pair_query == q]
        v = v[~np.isnan(v)]
        if len(v):
            m[q] = v.mean()
    unseen = np.isnan(m)
    if unseen.all():
        theta_q, kept = np.nan, unseen
    else:
        theta_q = np.quantile(m[~unseen], 1 - r if keep_higher_query else r)
        kept = unseen | ((m >= theta_q) if keep_higher_query else (m <= theta_q))
    # every kept query once (a random n0 of them if there are more), the rest of the n0 draws from the others
    visit = np.where(kept, min(1.0, n0 / kept.sum()), max(n0 - kept.sum(), 0) / max((~kept).sum(), 1))
    c = schedule(t, total, c0, c1, kind, delta)
    theta_d = np.quantile(scores, 1 - c)
    w = np.where(scores > theta_d, strength_d, 1.0)
    pos = np.array([w[i] / w[pair_query == pair_query[i]].sum() for i in range(len(scores))])
    return dict(n0=n0, r=r, theta_q=theta_q, kept=kept, visit=visit, theta_d=theta_d, pos=pos)


def infobatch_selection(losses, ratio):
    """InfoBatch's epoch rule: well learned = trained on (not NaN) and below the mean loss of the queries
    trained on; each is pruned with probability ``ratio``, the rest weigh 1 / (1 - ratio).
    Returns (well_learned, probability of staying in the epoch, weight when staying)."""
    losses = np.asarray(losses, np.float64)
    seen = ~np.isnan(losses)
    well = np.zeros(len(losses), bool)
    if seen.any():
        well[seen] = losses[seen] < losses[seen].mean()
    return well, np.where(well, 1 - ratio, 1.0), np.where(well, 1 / (1 - ratio), 1.0)

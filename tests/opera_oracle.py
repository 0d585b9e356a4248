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


def refresh_probabilities(scores, pair_query, n, t, total, *, r0=0.25, x0=2.0, x1=5.0, c0=0.25, c1=0.5,
                          strength_d=5.0, kind="cosine", delta=1.0):
    """n0, r(t), theta_q, kept queries, per-query visit probability, theta_d, per-pair positive probability."""
    n0 = epoch_length(n, r0, x0)
    x = schedule(t, total, x0, x1, kind, delta)
    r = (x * n0 - n) / (n * (x - 1))
    m = np.array([scores[pair_query == q].mean() for q in range(n)])
    theta_q = np.quantile(m, 1 - r)
    kept = m >= theta_q
    visit = np.where(kept, 1.0, (n0 - kept.sum()) / (~kept).sum())
    c = schedule(t, total, c0, c1, kind, delta)
    theta_d = np.quantile(scores, 1 - c)
    w = np.where(scores > theta_d, strength_d, 1.0)
    pos = np.array([w[i] / w[pair_query == pair_query[i]].sum() for i in range(len(scores))])
    return dict(n0=n0, r=r, theta_q=theta_q, kept=kept, visit=visit, theta_d=theta_d, pos=pos)

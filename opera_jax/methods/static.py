"""Static pruning (SP): before training, keep a share of the pairs by base-model similarity.

Modes: ``highest`` (the release's "easy positives", default), ``lowest`` ("hard
positives"), ``random``. ``floor(kept_pct * N)`` pairs stay; queries left
without a pair drop out; then training proceeds as standard finetuning on
what is left.
"""

from __future__ import annotations

import math

import numpy as np

from opera_jax.config import Config
from opera_jax.data.training import TrainingSet
from opera_jax.io_utils import write_text
from opera_jax.methods.basic import Basic

MODES = ("highest", "lowest", "random")


def kept_pairs(scores: np.ndarray, kept_pct: float, mode: str, seed: int) -> np.ndarray:
    """Boolean ``[N]``: the pairs SP keeps. Ties go to the lower pair id."""
    n = len(scores)
    k = math.floor(kept_pct * n)
    if mode == "highest":
        order = np.argsort(-scores, kind="stable")
    elif mode == "lowest":
        order = np.argsort(scores, kind="stable")
    elif mode == "random":
        order = np.random.default_rng(seed).permutation(n)
    else:
        raise ValueError(f"unknown static pruning mode {mode!r} ({', '.join(MODES)})")
    keep = np.zeros(n, bool)
    keep[order[:k]] = True
    return keep


class Static(Basic):
    """Standard finetuning over the pairs SP keeps."""

    name = "sp"

    def __init__(self, ts: TrainingSet, scores: np.ndarray, kept_pct: float, mode: str, seed: int):
        self.keep = kept_pairs(scores, kept_pct, mode, seed)
        self.scores = scores
        super().__init__(ts.subset_pairs(self.keep), seed)

    @classmethod
    def from_config(cls, config: Config, ts: TrainingSet, base_scores) -> Static:
        sp = config.method.sp
        return cls(ts, base_scores(), sp.kept_pct, sp.mode, config.seed)


def write_kept_pairs(path, ts: TrainingSet, doc_ids, scores: np.ndarray, keep: np.ndarray) -> None:
    """The kept pairs as TSV: ``query-id  corpus-id  score`` (base-model similarity), header first."""
    lines = ["query-id\tcorpus-id\tscore"]
    for pair in np.flatnonzero(keep):
        lines.append(f"{ts.query_ids[ts.pair_query[pair]]}\t{doc_ids[ts.pair_doc[pair]]}\t{scores[pair]:.6f}")
    write_text(path, "\n".join(lines) + "\n")

"""The base model's similarity for every training pair, ``s0(q, d+)``, computed on device.

Static pruning ranks pairs by it; dynamic pruning starts its scores from it.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from opera_jax.data.tokens import TokenArrays
from opera_jax.data.training import TrainingSet
from opera_jax.eval.retrieval import encode


def pair_similarities(
    model: nnx.Module,
    ts: TrainingSet,
    query_tokens: TokenArrays,
    doc_tokens: TokenArrays,
    *,
    query_max_len: int,
    passage_max_len: int,
    batch_size: int = 128,
    padding_side: str = "right",
    mesh: Mesh | None = None,
) -> np.ndarray:
    """float32 ``[num_pairs]``: ``<E(q), E(d+)>`` for every pair, with ``model`` as it is (eval mode)."""
    docs, remap = np.unique(ts.pair_doc, return_inverse=True)  # encode each positive document once
    common = dict(batch_size=batch_size, padding_side=padding_side, mesh=mesh)
    q = encode(model, query_tokens, max_len=query_max_len, **common)
    d = encode(model, doc_tokens.take(docs), max_len=passage_max_len, **common)
    s = jnp.sum(q[jnp.asarray(ts.pair_query)] * d[jnp.asarray(remap.astype(np.int32))], axis=-1)
    return np.asarray(s, np.float32)

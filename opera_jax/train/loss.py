"""The contrastive loss of every method: InfoNCE over the global batch.

Query ``i`` is scored against all ``B * G`` passages of the global batch (its
positive, its ``G - 1`` hard negatives and every other query's passages);
logits are divided by the temperature and the target is the query's own
positive, at passage index ``i * G``. Under ``jit`` with a sharded batch, the
``q @ p.T`` product gathers the passages of every device (and host): in-batch
negatives are global without any explicit collective.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def contrastive_loss(
    q: jax.Array,
    p: jax.Array,
    temperature: float,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(loss, per_example_loss, positive_similarity)``.

    q: ``[B, d]`` query embeddings; p: ``[B * G, d]`` passages, query ``i``'s
    group at rows ``i*G .. i*G + G - 1`` with its positive first. ``weights``
    (``[B]``, default ones) scale each example's loss in the mean, as
    InfoBatch's ``1 / (1 - r)`` rescaling does. ``positive_similarity`` is
    ``<q_i, p_i+>`` (the target logit times the temperature): the score DP
    keeps for the pair, at no extra forward pass.
    """
    b = q.shape[0]
    group = p.shape[0] // b
    logits = (q.astype(jnp.float32) @ p.astype(jnp.float32).T) / temperature
    targets = jnp.arange(b) * group
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
    per_example = jax.nn.logsumexp(logits, axis=1) - target_logit
    if weights is None:
        weights = jnp.ones((b,), jnp.float32)
    loss = jnp.mean(weights * per_example)
    return loss, per_example, target_logit * temperature

"""AdamW with linear warmup and decay, global-norm clipping, no decay on LayerNorm or biases."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(peak: float, max_steps: int, warmup_ratio: float, kind: str = "linear") -> optax.Schedule:
    """Linear warmup over ``ceil(warmup_ratio * max_steps)`` steps, then linear decay to 0 (or constant)."""
    warmup = int(-(-warmup_ratio * max_steps // 1))
    if kind == "constant":
        after = optax.constant_schedule(peak)
    else:
        after = optax.linear_schedule(peak, 0.0, max(max_steps - warmup, 1))
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(params) -> object:
    """True for weights that decay: dense kernels and embedding tables; not LayerNorm or biases."""
    def decays(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return names[-1] in ("kernel", "embedding")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    learning_rate: float,
    max_steps: int,
    *,
    warmup_ratio: float = 0.05,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    schedule: str = "linear",
) -> optax.GradientTransformation:
    lr = learning_rate_schedule(learning_rate, max_steps, warmup_ratio, schedule)
    return optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, mask=decay_mask),
    )

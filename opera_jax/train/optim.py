"""AdamW with linear warmup and decay, global-norm clipping, no decay on LayerNorm or biases.

The optimizer works in f32 whatever the parameter dtype: with bf16 parameters
(``model.param_dtype: bfloat16``) gradients are clipped and both Adam moments
are kept in f32, and the f32 update is rounded once, when it is added to the
parameter. (The other bf16 option, ``model.dtype: bfloat16`` with f32
parameters, keeps f32 master weights and computes in bf16.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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
    return in_float32(
        optax.chain(
            optax.clip_by_global_norm(max_grad_norm),
            optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, mask=decay_mask),
        )
    )


def optimizer_for(optim) -> optax.GradientTransformation:
    """``make_optimizer`` with the settings of an ``OptimConfig`` (what a run and the planner use)."""
    return make_optimizer(
        optim.learning_rate,
        optim.max_steps,
        warmup_ratio=optim.warmup_ratio,
        weight_decay=optim.weight_decay,
        max_grad_norm=optim.max_grad_norm,
        schedule=optim.schedule,
    )


def _f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def in_float32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` run on f32 copies of the gradients and parameters: its state (Adam's
    moments) is f32 and so are the updates; ``optax.apply_updates`` adds them to the
    parameters in f32 and rounds to the parameter dtype. A no-op for f32 parameters."""

    def init(params):
        return inner.init(_f32(params))

    def update(grads, state, params=None):
        return inner.update(_f32(grads), state, None if params is None else _f32(params))

    return optax.GradientTransformation(init, update)

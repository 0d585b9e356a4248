"""AdamW with linear warmup and decay, global-norm clipping, no decay on LayerNorm or biases.

The schedule's numbers (peak learning rate, warmup and decay steps) live in the
optimizer state as arrays (``optax.inject_hyperparams``), not in the compiled
program: runs that differ only in them (a learning-rate sweep, another budget)
share one compiled train step, across processes through the persistent
compilation cache. The schedule gives, to the bit, what ``optax.join_schedules``
of two linear schedules compiles to with constant numbers. The weight decay and
the clipping norm stay constants: as arrays, XLA fuses the update differently
and the parameters move by an ulp.

The optimizer works in f32 whatever the parameter dtype: with bf16 parameters
(``model.param_dtype: bfloat16``) gradients are clipped and both Adam moments
are kept in f32, and the f32 update is rounded once, when it is added to the
parameter. (The other bf16 option, ``model.dtype: bfloat16`` with f32
parameters, keeps f32 master weights and computes in bf16.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax


def warmup_steps(max_steps: int, warmup_ratio: float) -> int:
    """``ceil(warmup_ratio * max_steps)``."""
    return int(-(-warmup_ratio * max_steps // 1))


def learning_rate_schedule(peak: float, max_steps: int, warmup_ratio: float, kind: str = "linear") -> optax.Schedule:
    """Linear warmup over ``ceil(warmup_ratio * max_steps)`` steps, then linear decay to 0 (or constant)."""
    warmup = warmup_steps(max_steps, warmup_ratio)
    return functools.partial(learning_rate_at, peak=peak, warmup=warmup, decay=max(max_steps - warmup, 1), kind=kind)


def learning_rate_at(count, *, peak, warmup, decay, kind: str):
    """The schedule at step ``count``; ``peak``, ``warmup`` and ``decay`` (steps) may be traced.
    ``optax.linear_schedule(0, peak, warmup)`` joined at ``warmup`` to ``linear_schedule(peak, 0,
    decay)`` (or a constant ``peak``), written out so that its step counts need not be constants."""
    peak = jnp.asarray(peak, jnp.float32)
    count = jnp.asarray(count, jnp.int32)

    def linear(init, end, steps, n):
        n = jnp.clip(n, 0, steps)
        # times the reciprocal: what XLA makes of optax's ``n / steps`` when ``steps`` is a constant
        return (init - end) * (1 - n * (1 / steps)) + end

    after = peak if kind == "constant" else linear(peak, 0.0, decay, count - warmup)
    # warmup 0: never below the boundary (the warmup branch, with 1 step, is computed and unused)
    return jnp.where(count < warmup, linear(0.0, peak, jnp.maximum(warmup, 1), count), after)


def decay_mask(params) -> object:
    """True for weights that decay: dense kernels and embedding tables; not LayerNorm or biases."""

    def decays(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return names[-1] in ("kernel", "embedding")

    return jax.tree_util.tree_map_with_path(decays, params)


def _adamw(peak, warmup, decay, weight_decay, max_grad_norm, kind):
    schedule = functools.partial(learning_rate_at, peak=peak, warmup=warmup, decay=decay, kind=kind)
    return optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, mask=decay_mask),
    )


def make_optimizer(
    learning_rate: float,
    max_steps: int,
    *,
    warmup_ratio: float = 0.05,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    schedule: str = "linear",
) -> optax.GradientTransformation:
    """The optimizer; its state holds the schedule's numbers (``state.hyperparams``: ``peak``,
    ``warmup``, ``decay``) and the chain's own state (``state.inner_state``)."""
    warmup = warmup_steps(max_steps, warmup_ratio)
    inject = optax.inject_hyperparams(
        _adamw, static_args=("kind", "weight_decay", "max_grad_norm"), hyperparam_dtype=jnp.float32
    )
    return in_float32(
        inject(
            peak=float(learning_rate),
            warmup=warmup,
            decay=max(max_steps - warmup, 1),
            weight_decay=float(weight_decay),
            max_grad_norm=float(max_grad_norm),
            kind=schedule,
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

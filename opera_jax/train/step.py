"""The train step: one jitted function from (state, batch) to (new state, step outputs).

The state is donated, so XLA updates parameters and optimizer moments in
place. The batch is a dict of global arrays sharded over the mesh's batch axes:

    query_input_ids, query_attention_mask        int32 [B, Lq]
    passage_input_ids, passage_attention_mask    int32 [B * G, Lp]   (query i: rows i*G.., positive first)
    pair                                         int32 [B]   global id of each query's positive pair
    query                                        int32 [B]   global query id
    weight                                       f32   [B]   per-example loss weight (InfoBatch), else 1

The step returns per-example losses and positive similarities (device arrays,
never synced here) for the pruning methods, and lets a method update its own
device state inside the same jitted call (``method_update``), so DP's scores
never leave the device.

Dropout keys are ``fold_in(state.key, state.step)``: a resumed run draws the
same dropout masks as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from opera_jax.train.gradcache import cached_loss_and_grad
from opera_jax.train.loss import contrastive_loss

MethodUpdate = Callable[[Any, dict, jax.Array, jax.Array], Any]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: nnx.State
    opt_state: optax.OptState
    key: jax.Array  # the run's base PRNG key (raw uint32 key data)
    method: Any = ()  # a pruning method's device state


def init_state(params: nnx.State, optimizer: optax.GradientTransformation, seed: int, method: Any = ()) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        key=jax.random.key_data(jax.random.key(seed)),
        method=method,
    )


def make_train_step(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    optimizer: optax.GradientTransformation,
    temperature: float,
    method_update: MethodUpdate | None = None,
    grad_cache_chunk: int | None = None,
):
    """Build the jitted step. ``graphdef`` and ``rest`` (non-parameter state) come from
    ``nnx.split(retriever, nnx.Param, ...)``; ``rest`` holds the dropout streams, reseeded per step.

    ``grad_cache_chunk``: encode the batch ``grad_cache_chunk`` queries at a time with
    cached gradients (``gradcache.py``), so the global contrastive batch can exceed
    activation memory; same loss and gradients, a second forward pass per step."""

    def loss_fn(params, rest, batch):
        model = nnx.merge(graphdef, params, rest, copy=True)
        q = model(batch["query_input_ids"], batch["query_attention_mask"])
        p = model(batch["passage_input_ids"], batch["passage_attention_mask"])
        loss, per_example, pos_sim = contrastive_loss(q, p, temperature, batch["weight"])
        return loss, (per_example, pos_sim)

    def step(state: TrainState, batch: dict, rest: nnx.State, params_sharding=None) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        if grad_cache_chunk:
            (loss, (per_example, pos_sim)), grads = cached_loss_and_grad(
                graphdef, state.params, rest, key, batch, temperature, grad_cache_chunk, params_sharding
            )
        else:
            rest = _reseed(graphdef, state.params, rest, key)
            (loss, (per_example, pos_sim)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, rest, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        method = state.method
        if method_update is not None:
            method = method_update(method, batch, per_example, pos_sim)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, method=method)
        outputs = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "per_example_loss": per_example,
            "pos_sim": pos_sim,
            "finite": jnp.isfinite(loss),
        }
        return new_state, outputs

    return TrainStep(step, rest)


class TrainStep:
    """``step(state, batch) -> (state, outputs)``; ``compile(state, batch)`` compiles ahead of time.

    ``rest`` goes in as an argument, not a closure constant: NNX only lets a
    traced function reseed variables that were created inside its trace.

    The new state keeps the layout of the state passed in (FSDP-sharded
    parameters and moments stay sharded as their rules say): without the
    constraint XLA may hand back a small replicated leaf split over devices.
    The step is traced under ``jax.set_mesh`` of the state's mesh, so that the
    models keep activations split over the batch (``sharding.constrain_batch``).
    One jitted function per state layout.
    """

    def __init__(self, step, rest: nnx.State):
        self._step, self._rest, self._jitted = step, rest, {}

    def _for(self, state: TrainState):
        """``(jitted step, the mesh to trace it under or None)`` for this state's layout."""
        shardings = [getattr(x, "sharding", None) for x in jax.tree.leaves(state)]
        pinned = all(isinstance(s, NamedSharding) for s in shardings)
        key = (jax.tree.structure(state), tuple(shardings) if pinned else None)
        if key not in self._jitted:
            layout = jax.tree.unflatten(key[0], shardings) if pinned else None

            def step(state, batch, rest):
                new_state, outputs = self._step(state, batch, rest, None if layout is None else layout.params)
                if layout is not None:
                    new_state = jax.lax.with_sharding_constraint(new_state, layout)
                return new_state, outputs

            self._jitted[key] = (jax.jit(step, donate_argnums=0), shardings[0].mesh if pinned else None)
        return self._jitted[key]

    def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        jitted, mesh = self._for(state)
        with _mesh_context(mesh):
            return jitted(state, batch, self._rest)

    def lower(self, state: TrainState, batch: dict):
        """``jax.jit(...).lower`` for these arguments (arrays or ``jax.ShapeDtypeStruct`` with shardings)."""
        jitted, mesh = self._for(state)
        with _mesh_context(mesh):
            return jitted.lower(state, batch, self._rest)

    def compile(self, state: TrainState, batch: dict) -> None:
        """Compile for these shapes without running (nothing is donated); later calls reuse it."""
        self.lower(state, batch).compile()
        if jax.default_backend() == "cpu":
            from opera_jax.cpu.host_memory import release_free_memory

            release_free_memory()  # the compiler's freed memory, back to the system (cpu/host_memory.py)


def _mesh_context(mesh):
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def _reseed(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, key: jax.Array) -> nnx.State:
    """``rest`` with every dropout stream reseeded from ``key``."""
    model = nnx.merge(graphdef, params, rest, copy=True)
    nnx.reseed(model, dropout=key)
    return nnx.split(model, nnx.Param, ...)[2]

"""Checkpoints: Orbax ``CheckpointManager`` with three items per step.

- ``state``: the ``TrainState`` (params, optimizer state, step, PRNG key, the method's device state);
- ``plan``: the current plan's int32/f32 arrays (a DP plan depends on scores that
  have moved on since it was drawn, so it is saved, not recomputed);
- ``data``: JSON — the plan segment number and the Grain iterator state.

Restoring all three continues a run exactly where it stopped. Saves are
synchronous (a checkpoint is complete when ``save`` returns), and Orbax writes
each step to a temporary directory renamed on completion, so a crash never
leaves a half-written checkpoint behind; the last ``keep`` are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from opera_jax.data.pipeline import Plan


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 3):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(), options=options, item_names=("state", "plan", "data")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, plan: Plan, data: dict) -> None:
        plan_arrays = {
            "query": plan.query,
            "pair": plan.pair,
            "weight": np.ones(len(plan), np.float32) if plan.weight is None else plan.weight,
        }
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                plan=ocp.args.StandardSave(plan_arrays),
                data=ocp.args.JsonSave(data),
            ),
        )
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, Plan, dict]:
        """Restore ``step`` into the shapes, dtypes and shardings of ``abstract_state``."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                plan=ocp.args.StandardRestore(),
                data=ocp.args.JsonRestore(),
            ),
        )
        p = out["plan"]
        plan = Plan(
            np.asarray(p["query"], np.int32), np.asarray(p["pair"], np.int32), np.asarray(p["weight"], np.float32)
        )
        return out["state"], plan, out["data"]

    def restore_params(self, step: int, params: Any) -> Any:
        """Only the parameters of ``step``, into the ``nnx.State`` ``params`` (no optimizer or method state)."""
        from flax import nnx

        raw = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["params"]
        flat = nnx.to_flat_state(params)
        for path, var in flat:
            node = raw
            for key in (*map(str, path), "value"):
                node = node[key]
            var.set_value(jax.numpy.asarray(node, dtype=var.get_value().dtype))
        return nnx.from_flat_state(flat)

    def close(self) -> None:
        self.manager.close()

"""Training methods: what to train on next. Each decides the plan; the train step is shared.

A method is an object with
- ``ts``: the ``TrainingSet`` it trains on (static pruning's is a subset);
- ``init_state()``: its device state, carried in the ``TrainState`` and checkpointed (``()`` if none);
- ``update``: ``None``, or a pure function ``(state, batch, per_example_loss, pos_sim) -> state``
  run inside the jitted train step (DP's score scatter, InfoBatch's loss record);
- ``plan(state, segment, step) -> Plan``: the draws of the next stretch of training;
- ``from_config(config, ts, base_scores)``: the constructor ``registry.build_method`` calls.

``basic`` is standard finetuning; ``sp``, ``dp`` and ``infobatch`` live beside it, each in its own
module; ``registry.py`` maps their names to them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from opera_jax.data.pipeline import Plan
from opera_jax.data.training import TrainingSet


class Method(Protocol):
    name: str
    ts: TrainingSet
    update: Callable | None

    def init_state(self) -> Any: ...

    def plan(self, state: Any, segment: int, step: int) -> Plan: ...

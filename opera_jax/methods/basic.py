"""Standard finetuning: each epoch visits every query once in random order, with a uniform positive."""

from __future__ import annotations

import numpy as np

from opera_jax.config import Config
from opera_jax.data.pipeline import Plan, uniform_plan
from opera_jax.data.training import TrainingSet


class Basic:
    name = "basic"
    update = None

    def __init__(self, ts: TrainingSet, seed: int):
        self.ts, self.seed = ts, seed

    @classmethod
    def from_config(cls, config: Config, ts: TrainingSet, base_scores) -> Basic:
        return cls(ts, config.seed)

    def init_state(self):
        return ()

    def plan(self, state, segment: int, step: int) -> Plan:
        return uniform_plan(self.ts, np.random.default_rng([self.seed, segment]))

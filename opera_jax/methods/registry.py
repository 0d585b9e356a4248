"""The training methods by name: ``build_method`` constructs the one a config names.

A method is a class with the ``Method`` protocol (``methods/__init__.py``) and a
``from_config(config, ts, base_scores)`` constructor; adding one is a row in ``METHODS``
and a name in ``config.METHOD_NAMES`` (``tests/test_methods.py`` checks that they agree).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from opera_jax.config import Config
from opera_jax.data.training import TrainingSet
from opera_jax.methods import Method
from opera_jax.methods.basic import Basic
from opera_jax.methods.dynamic import Dynamic
from opera_jax.methods.infobatch import InfoBatch
from opera_jax.methods.static import Static

METHODS: dict[str, type] = {"basic": Basic, "sp": Static, "dp": Dynamic, "infobatch": InfoBatch}


def build_method(config: Config, ts: TrainingSet, base_scores: Callable[[], np.ndarray]) -> Method:
    """``config.method.name``'s method over ``ts``. ``base_scores()`` gives the base model's similarity of
    every pair of ``ts``; it is called only by the methods that start from it (SP, DP), so the others
    encode nothing."""
    return METHODS[config.method.name].from_config(config, ts, base_scores)

"""Per-layer rematerialisation (gradient checkpointing) policies.

``model.remat`` names what a layer keeps from its forward pass for the
backward pass; the rest is recomputed:

    none                              keep everything (no remat; ``false`` in YAML)
    full                              keep only the layer's inputs (``true`` in YAML)
    dots_saveable                     keep every matmul output; recompute the elementwise ops
    dots_with_no_batch_dims_saveable  keep the matmuls against weights (no batch dimensions),
                                      recompute attention's batched matmuls and the elementwise ops

Memory falls from ``none`` to ``full``; compute rises the other way (``full``
adds about one forward pass per step).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from flax import nnx

from opera_jax.errors import InputError
from opera_jax.sharding import constrain_batch

POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def policy_name(remat: bool | str) -> str:
    """``True`` -> ``"full"``, ``False`` -> ``"none"``, a policy name -> itself (checked)."""
    if isinstance(remat, bool):
        return "full" if remat else "none"
    if remat not in POLICIES:
        raise InputError(f"remat policy {remat!r} is not one of {', '.join(POLICIES)} (or true / false)")
    return remat


def checkpointed(layer: nnx.Module, remat: bool | str) -> Callable:
    """``layer``'s ``__call__``, rematerialised in the backward pass as ``remat`` says, its
    hidden-state input kept split over the batch (``sharding.constrain_batch``)."""
    name = policy_name(remat)
    call = layer if name == "none" else functools.partial(nnx.remat(type(layer).__call__, policy=POLICIES[name]), layer)

    def run(h, *args):
        return call(constrain_batch(h), *args)

    return run

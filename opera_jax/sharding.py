"""One device mesh and the shardings built on it.

Axes: ``data`` (pure data parallelism) and ``fsdp`` (data parallelism whose
devices also split parameters, see the partition rules of the training code).
A batch is split over both axes together, so every device holds
``global_batch / num_devices`` rows.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
FSDP = "fsdp"
BATCH_AXES = (DATA, FSDP)


def make_mesh(fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all global devices), axes in Auto mode."""
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"fsdp={fsdp} does not divide the {len(devices)} devices")
    grid = np.array(devices).reshape(len(devices) // fsdp, fsdp)
    return Mesh(grid, BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def constrain_batch(x: jax.Array) -> jax.Array:
    """``x`` with its leading (batch) axis split over the mesh's batch axes, when traced under
    ``jax.set_mesh`` of a ``(data, fsdp)`` mesh (the train step is); unchanged otherwise.

    With FSDP, a layer's activations would otherwise follow its row-split weights:
    XLA's sharding propagation then gathers the batch instead of the weights (2x the
    activation memory of MiniLM at batch 32 on 8 devices). Pinned to the batch,
    each weight is gathered where it is used.
    """
    return x if batch_mesh(x) is None else jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def batch_mesh(x: jax.Array):
    """The ``(data, fsdp)`` mesh set by ``jax.set_mesh`` (the train step's) when ``x``'s leading axis
    splits evenly over it; ``None`` otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or tuple(mesh.axis_names) != BATCH_AXES or x.shape[0] % mesh.size:
        return None
    return mesh


def per_device(fn, *args, whole: tuple[int, ...] = (), summed: bool = False):
    """``fn(*args)``, each device on its own rows of the batch when traced under ``jax.set_mesh`` of a
    mesh of several devices. Every argument has the batch (or its tokens) as its leading axis, except
    those at the positions in ``whole`` (weights: every device gets all of them). The result is split
    over the batch like the arguments, or, with ``summed``, added up over the devices (a weight
    gradient: each device's product over its own tokens, then one ``psum``)."""
    mesh = batch_mesh(args[0])
    if mesh is None or mesh.size == 1 or mesh.manual_axes:  # (manual: already per device, in shard_map)
        return fn(*args)
    in_specs = tuple(P() if i in whole else P(BATCH_AXES) for i in range(len(args)))
    body = (lambda *a: jax.lax.psum(fn(*a), BATCH_AXES)) if summed else fn
    out_specs = P() if summed else P(BATCH_AXES)
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# Partition rules: (regular expression searched in a leaf's path "a/b/0/c", PartitionSpec).
# The first rule that matches wins; a leaf no rule matches is replicated. The same
# rules place optimizer moments, whose paths end with their parameter's path.
REPLICATED_RULES: tuple[tuple[str, P], ...] = ()
FSDP_RULES: tuple[tuple[str, P], ...] = (
    (r"(kernel|embedding)(/value)?$", P(FSDP, None)),  # [in, out] kernels and [vocab, dim] tables: split rows
    (r"(kernel|embedding)(/value)?$", P(None, FSDP)),  # ... else columns (Qwen3's odd vocabularies: 151669 rows)
)


def _path_str(path) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def tree_shardings(tree, mesh: Mesh, rules=REPLICATED_RULES):
    """A ``NamedSharding`` for every array leaf of ``tree``, by the first matching rule.

    A rule whose sharded dimensions do not divide evenly over the mesh axes falls
    back to replication for that leaf (small vocabularies, odd widths).
    """
    import re

    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

    def pick(path, leaf):
        name = _path_str(path)
        shape = getattr(leaf, "shape", ())
        for pattern, spec in compiled:
            if (
                pattern.search(name)
                and len(spec) <= len(shape)
                and all(axis is None or shape[i] % _axis_size(mesh, axis) == 0 for i, axis in enumerate(spec))
            ):
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(pick, tree)


def _axis_size(mesh: Mesh, axis) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    return int(np.prod([mesh.shape[n] for n in names]))


def put_global(tree, shardings):
    """Place host or single-device values onto (possibly multi-host) global shardings.

    Every process passes the same full values; each keeps the shards its own
    devices hold. Works in one process as in many (``jax.device_put`` cannot
    address other hosts' devices).
    """

    def put(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)

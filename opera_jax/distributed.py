"""Multi-process start-up: ``jax.distributed`` from explicit settings or the environment.

``initialize()`` decides, in this order:
1. explicit ``coordinator``, ``num_processes``, ``process_id`` arguments;
2. ``OPERA_COORDINATOR`` (host:port), ``OPERA_NUM_PROCESSES``, ``OPERA_PROCESS_ID``
   (what ``launch/local_multiprocess.sh`` sets);
3. a cluster JAX detects by itself (SLURM, Cloud TPU), when ``OPERA_DISTRIBUTED=auto``;
4. otherwise one process, nothing to initialise.
Call it before anything touches a device.

``OPERA_HEARTBEAT_S`` (default 100, JAX's own) is how long the job waits on a
process that stopped answering before every process fails with an error,
instead of hanging in a collective.
"""

from __future__ import annotations

import os

import jax


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Start ``jax.distributed`` when configured; returns whether it did."""
    coordinator = coordinator or os.environ.get("OPERA_COORDINATOR")
    if coordinator is not None:
        num_processes = num_processes if num_processes is not None else int(os.environ["OPERA_NUM_PROCESSES"])
        process_id = process_id if process_id is not None else int(os.environ["OPERA_PROCESS_ID"])
        jax.distributed.initialize(coordinator, num_processes, process_id, **_timeouts())
        return True
    if os.environ.get("OPERA_DISTRIBUTED") == "auto":
        jax.distributed.initialize(**_timeouts())
        return True
    return False


def _timeouts() -> dict:
    heartbeat = os.environ.get("OPERA_HEARTBEAT_S")
    return {"heartbeat_timeout_seconds": int(heartbeat)} if heartbeat else {}

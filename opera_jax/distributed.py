"""Multi-process start-up: ``jax.distributed`` from explicit settings or the environment.

``initialize()`` decides, in this order:
1. explicit ``coordinator``, ``num_processes``, ``process_id`` arguments;
2. ``OPERA_COORDINATOR`` (host:port), ``OPERA_NUM_PROCESSES``, ``OPERA_PROCESS_ID``
   (what ``launch/local_multiprocess.sh`` sets);
3. a cluster JAX detects by itself (SLURM, Cloud TPU), when ``OPERA_DISTRIBUTED=auto``;
4. otherwise one process, nothing to initialise.
Call it before anything touches a device.

The variable names are the constants below: the launch scripts set them and their tests import
them from here, so a script and this module cannot drift apart.

``OPERA_HEARTBEAT_S`` (default 100, JAX's own) is how long the job waits on a
process that stopped answering before every process fails with an error,
instead of hanging in a collective.
"""

from __future__ import annotations

import os

import jax

COORDINATOR_ENV = "OPERA_COORDINATOR"  # host:port of process 0's coordinator service
NUM_PROCESSES_ENV = "OPERA_NUM_PROCESSES"  # read only with COORDINATOR_ENV
PROCESS_ID_ENV = "OPERA_PROCESS_ID"  # read only with COORDINATOR_ENV
DISTRIBUTED_ENV = "OPERA_DISTRIBUTED"  # AUTO: JAX reads the cluster's own settings (SLURM, Cloud TPU)
AUTO = "auto"
HEARTBEAT_ENV = "OPERA_HEARTBEAT_S"  # seconds before the others give up on a silent process
# JAX's own, read by jax.distributed.initialize: the GPUs this process drives. Under SLURM with
# AUTO, JAX otherwise keeps only GPU $SLURM_LOCALID (one process per GPU); the sbatch script runs
# one process per node and sets it to all of the node's GPUs.
LOCAL_DEVICE_IDS_ENV = "JAX_LOCAL_DEVICE_IDS"


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Start ``jax.distributed`` when configured; returns whether it did."""
    coordinator = coordinator or os.environ.get(COORDINATOR_ENV)
    if coordinator is not None:
        num_processes = num_processes if num_processes is not None else int(os.environ[NUM_PROCESSES_ENV])
        process_id = process_id if process_id is not None else int(os.environ[PROCESS_ID_ENV])
        jax.distributed.initialize(coordinator, num_processes, process_id, **_timeouts())
        return True
    if os.environ.get(DISTRIBUTED_ENV) == AUTO:
        jax.distributed.initialize(**_timeouts())
        return True
    return False


def _timeouts() -> dict:
    heartbeat = os.environ.get(HEARTBEAT_ENV)
    return {"heartbeat_timeout_seconds": int(heartbeat)} if heartbeat else {}

"""Multi-host start-up and per-process data placement.

On a TPU pod or a multi-node GPU cluster every host runs the same program;
``jax.distributed.initialize`` joins them into one set of global devices. Each process then
loads only its slice of every global batch, and :func:`global_batch` assembles the slices
into arrays sharded over the whole mesh.
"""

from __future__ import annotations

import os
from typing import Any

import jax

ENV = ("JBILEVEL_COORDINATOR", "JBILEVEL_NUM_PROCESSES", "JBILEVEL_PROCESS_ID")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins a multi-process run; a no-op for a single process.

    Arguments win over the environment variables ``JBILEVEL_COORDINATOR`` (host:port),
    ``JBILEVEL_NUM_PROCESSES`` and ``JBILEVEL_PROCESS_ID``. With none of them set,
    ``jax.distributed.initialize()`` is still called on a TPU pod or under SLURM/Open MPI,
    where JAX discovers the cluster itself; elsewhere this returns False.

    A second call (``jbilevel train`` then ``eval`` in one process) keeps the first's
    connection.

    Returns:
      True if this is now one process of a multi-process run.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    coordinator = coordinator or os.environ.get(ENV[0])
    if num_processes is None and os.environ.get(ENV[1]):
        num_processes = int(os.environ[ENV[1]])
    if process_id is None and os.environ.get(ENV[2]):
        process_id = int(os.environ[ENV[2]])
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError(
            "distributed: give all of coordinator, num_processes and process_id (flags or "
            f"{', '.join(ENV)}), got coordinator={coordinator!r}, "
            f"num_processes={num_processes}, process_id={process_id}"
        )
    if all(given):
        if num_processes == 1:
            return False
        # Only the CPU client reads this; CPU processes need it for cross-host collectives.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return True
    cluster_vars = ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")
    if any(k in os.environ for k in cluster_vars):
        jax.distributed.initialize()
        return jax.process_count() > 1
    return False


def process_slice(global_size: int) -> slice:
    """This process's rows of a global batch of ``global_size`` rows."""
    count, index = jax.process_count(), jax.process_index()
    if global_size % count:
        raise ValueError(f"global batch of {global_size} rows does not split over {count} "
                         "processes; make the batch size a multiple of the process count")
    per = global_size // count
    return slice(index * per, (index + 1) * per)


def global_batch(batch: dict[str, Any], sharding: jax.sharding.NamedSharding) -> dict:
    """Device arrays for a batch: the process-local rows placed into global arrays."""
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

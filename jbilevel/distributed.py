"""Multi-host start-up and per-process data placement.

On a TPU pod or a multi-node GPU cluster every host runs the same program;
``jax.distributed.initialize`` joins them into one set of global devices. Each process then
loads only its slice of every global batch, and :func:`global_batch` assembles the slices
into arrays sharded over the whole mesh.

A process that stops a run on its own (out of device memory on its devices, an error of its
own) cannot tell the others through the collectives they are blocked in. It tells them
through JAX's coordination service instead (:func:`announce_stop`); each process watches for
that while it runs (:func:`watching_for_stops`) and, unless it stops by itself within
``STOP_GRACE_S``, leaves with the stopped process's reason and exit status 3 (:func:`leave`).
Without this the others would wait in their next collective until JAX's shutdown barrier
gives up (5 minutes) and aborts every process.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any, NoReturn

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


STOP_KEY = "jbilevel/stopped"  # coordination-service key: the first stopping process's reason
STOP_GRACE_S = 60.0  # how long a process may take to stop by itself once another has (the
# failure may be every process's, e.g. a program too large for every device); then it leaves
EXIT_STOPPED = 3  # the command line's status for a run that stopped before its last step

_stopping = threading.Event()  # set once this process stops a multi-process run by itself
_first: list[bool] = []  # whether its announcement was the first (the one the others print)


def _client():
    """JAX's coordination-service client (no public API offers its key-value store)."""
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def announce_stop(reason: str) -> bool:
    """Tells the other processes of a multi-process run that this one stops, and why.

    A no-op for a single process, and after this process's first announcement. Returns True
    if this process's reason is the one the others will print (the first announced).
    """
    if jax.process_count() == 1:
        return False
    if not _first:
        _stopping.set()
        who = f"process {jax.process_index()} of {jax.process_count()}"
        try:
            _client().key_value_set(STOP_KEY, f"{who} stopped: {reason}")
            _first.append(True)
        except jax.errors.JaxRuntimeError:  # ALREADY_EXISTS: another process stopped first
            _first.append(False)
    return _first[0]


def stopped_here() -> bool:
    """True if this process stopped a multi-process run by itself (:func:`announce_stop`)."""
    return _stopping.is_set()


@contextlib.contextmanager
def watching_for_stops():
    """While the block runs, a thread waits for another process's :func:`announce_stop`.

    If this process has not stopped by itself ``STOP_GRACE_S`` after that, the thread prints
    the other's reason and calls :func:`leave` with ``EXIT_STOPPED``: this process's main
    thread is then blocked in a collective the stopped process will never join, and no
    Python exception can reach it. A no-op for a single process.
    """
    if jax.process_count() == 1:
        yield
        return
    done = threading.Event()
    watcher = threading.Thread(target=_watch, args=(done,), name="jbilevel-stop-watch",
                               daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()  # the thread sees it within a second; it must not be inside the client's
        watcher.join()  # call when the interpreter exits (C++ aborts the process then)


@contextlib.contextmanager
def stopping_together():
    """The block of a command that every process of a run executes together: it watches
    for another process's stop (:func:`watching_for_stops`) and announces an exception of
    this process's own (:func:`announce_stop`) before it propagates."""
    with watching_for_stops():
        try:
            yield
        except (Exception, KeyboardInterrupt) as e:  # this process's own error or a second
            # Ctrl-C: the others must not wait for it (a first Ctrl-C stopped them all at one
            # step, train.Interrupted: nothing to announce)
            from jbilevel.train import Interrupted

            if not isinstance(e, Interrupted):
                announce_stop(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            raise


def _watch(done: threading.Event) -> None:
    client = _client()
    while not done.is_set():
        try:
            reason = client.blocking_key_value_get(STOP_KEY, 1000)
            break
        except jax.errors.JaxRuntimeError as e:
            if "DEADLINE_EXCEEDED" not in str(e):
                return  # the service is gone: JAX itself ends this process
    else:
        return
    if done.wait(STOP_GRACE_S) or _stopping.is_set():
        return  # this process stopped too (the same failure everywhere) or finished
    print(f"jbilevel: {reason}\njbilevel: process {jax.process_index()} cannot go on without "
          f"it and leaves too (exit status {EXIT_STOPPED}); the run's results.json and last "
          "checkpoint are where the stopped process wrote them, and the same command "
          "resumes", file=sys.stderr, flush=True)
    leave(EXIT_STOPPED)


def leave(status: int) -> NoReturn:
    """Ends this process of a stopped multi-process run with ``status``, at once.

    A normal exit would wait in JAX's shutdown barrier for processes still blocked in a
    collective. Process 0 hosts the coordination service, so it leaves last: it waits up to
    ``STOP_GRACE_S`` + 60 s for the others to have left (each says so before it does).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    client, me = _client(), jax.process_index()
    try:
        client.key_value_set(f"jbilevel/left/{me}", "1")
        if me == 0:
            deadline = time.monotonic() + STOP_GRACE_S + 60
            for k in range(1, jax.process_count()):
                left_ms = max(int((deadline - time.monotonic()) * 1000), 1)
                client.blocking_key_value_get(f"jbilevel/left/{k}", left_ms)
            time.sleep(1.0)  # the last one's exit, between its word and its os._exit
    except jax.errors.JaxRuntimeError:
        pass  # a process never said it left (or the service is gone): leave anyway
    os._exit(status)

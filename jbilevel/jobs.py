"""Several runs side by side, one process each: how ``jbilevel demo`` uses every CPU core.

A small model's programs do not keep every core of a CPU busy (one fine-tuning run of the
shipped base used 1.74 of the 2 cores of the development host), so independent runs, such
as the demo's methods, finish sooner side by side than one after another: the demo's four
fine-tuning runs took 288 s two at a time against 338 s one after another (docs/results.md),
with the same numbers to the last bit. Every run is
``experiment.run`` in a fresh Python process (``python -m jbilevel.jobs``: JAX is not
fork-safe, and unlike ``multiprocessing``'s spawn this never re-imports the caller's script)
whose phase lines carry the run's name; a progress bar per process would garble the
terminal, so each logged training record gets a short line instead.

Ctrl-C or SIGTERM stops them all the way SIGTERM stops one run: every running process gets
SIGTERM, finishes its step, writes that step's checkpoint and reports itself interrupted
(rerunning resumes); runs not yet started are not started. The processes run in sessions of
their own, so a terminal's Ctrl-C reaches them only as that SIGTERM.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jbilevel.console import NORMAL, VERBOSE, Console


@dataclasses.dataclass(frozen=True)
class Job:
    """One run: ``experiment.run(config, out)`` under ``name`` (its lines' prefix)."""

    name: str
    config: Any  # an ExperimentConfig
    out: Path


@dataclasses.dataclass(frozen=True)
class Finished:
    """A job's outcome: its results record (``experiment.run``'s return) and its wall time
    in seconds, measured in its own process (loading and compiling included)."""

    result: dict
    seconds: float


class JobConsole(Console):
    """A job's console: lines prefixed with ``[name]``; instead of a bar, a short line per
    logged record (step of steps, what the bar would show) at normal verbosity, the full
    record with ``--verbose``."""

    SHOWN = ("loss", "eval_val_loss", "val_loss", "ess")

    def __init__(self, name: str, verbosity: int = NORMAL):
        super().__init__(verbosity)
        self.prefix = f"[{name}] "
        self._total = None

    def _write(self, line: str) -> None:
        super()._write(self.prefix + line)

    def train_bar(self, total: int, initial: int, desc: str) -> None:
        self._total = total  # no bar: the record lines say how far the loop is
        return None

    def record(self, step: int, record: dict[str, float]) -> None:
        if self.verbosity >= VERBOSE:
            return super().record(step, record)
        shown = [f"{k}={record[k]:.4g}" for k in self.SHOWN if k in record]
        of = f"/{self._total}" if self._total else ""
        self.info(f"step {step}{of}: " + ", ".join(shown))


def _main(job_file: str, outcome_file: str) -> None:
    """A job's process: runs the pickled ``(Job, verbosity)`` and pickles ``("done", (results,
    seconds))`` (plain values: this module is ``__main__`` here) or ``("error", (exception,
    traceback text))`` to ``outcome_file``."""
    from jbilevel.xla_options import tune_host_malloc

    tune_host_malloc()  # as the jbilevel command does, before JAX starts its threads
    job, verbosity = pickle.loads(Path(job_file).read_bytes())
    from jbilevel import experiment, train

    t0 = time.perf_counter()
    try:
        result = experiment.run(job.config, job.out, progress=True,  # JobConsole: no bar
                                console=JobConsole(job.name, verbosity))
        outcome = ("done", (result, time.perf_counter() - t0))
    except train.Preempted:  # SIGTERM: the checkpoint and results.json ("interrupted") are written
        result = json.loads((Path(job.out) / "results.json").read_text())
        outcome = ("done", (result, time.perf_counter() - t0))
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent
        text = traceback.format_exc()
        try:
            pickle.loads(pickle.dumps(e))
        except Exception:  # noqa: BLE001 - an exception that cannot travel: say what it was
            e = RuntimeError(f"{type(e).__name__}: {e}")
        outcome = ("error", (e, text))
    partial = Path(outcome_file + ".partial")
    partial.write_bytes(pickle.dumps(outcome))
    partial.replace(outcome_file)


def _start(job: Job, verbosity: int, files: Path) -> subprocess.Popen:
    """Starts ``job``'s process; it reads ``files/job`` and writes ``files/outcome``."""
    files.mkdir()
    job_file = files / "job"
    job_file.write_bytes(pickle.dumps((job, verbosity)))
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])  # this jbilevel, importable there
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "-m", "jbilevel.jobs", str(job_file),
                             str(files / "outcome")],
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)


def run_all(jobs: Sequence[Job], *, processes: int, console: Console) -> dict[str, Finished]:
    """Runs ``jobs``, at most ``processes`` at a time, in the order given (put the longest
    first: the last to start bounds the wall time).

    Returns:
      ``{job name: Finished}`` in the order given: every job, unless Ctrl-C or SIGTERM
      stopped them (then the jobs that reported; a stopped run reports ``interrupted``).
    Raises:
      The first failed job's exception (a ``UserError`` stays one), with a note naming the
      job and its traceback, once the jobs still running have finished.
    """
    if processes < 1:
        raise ValueError(f"processes={processes} must be >= 1")
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names must differ, got {names}")
    # A job's files go in a folder named by its index in ``jobs``: names may hold any text.
    pending = list(enumerate(jobs))
    running: dict[str, tuple[subprocess.Popen, Path]] = {}
    finished: dict[str, Finished] = {}
    failures: list[tuple[str, BaseException, str]] = []
    stop_requested = False

    def request_stop(signum, frame):
        nonlocal stop_requested
        stop_requested = True

    handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            handlers[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread: stopping is the caller's business
            pass
    stopping = False
    with tempfile.TemporaryDirectory(prefix="jbilevel-jobs-") as tmp:
        workdir = Path(tmp)
        try:
            while pending or running:
                while pending and len(running) < processes and not (stopping or failures):
                    index, job = pending.pop(0)
                    files = workdir / str(index)
                    process = _start(job, console.verbosity, files)
                    running[job.name] = process, files
                    console.info(f"[{job.name}] started in process {process.pid}")
                if stop_requested and not stopping:
                    stopping = True
                    pending.clear()
                    console.warn("stopping: every running job finishes its step and saves a "
                                 "checkpoint; rerun the same command to resume")
                    for process, _ in running.values():
                        process.send_signal(signal.SIGTERM)
                time.sleep(0.2)
                for name, (process, files) in list(running.items()):
                    if process.poll() is None:
                        continue
                    del running[name]
                    outcome = files / "outcome"
                    kind, payload = (pickle.loads(outcome.read_bytes()) if outcome.exists()
                                     else (None, None))
                    if kind == "done":
                        finished[name] = Finished(*payload)
                    elif kind == "error":
                        error, text = payload
                        console.warn(f"[{name}] failed: {type(error).__name__}: {error}")
                        failures.append((name, error, text))
                    elif stopping:  # stopped before its training loop could take SIGTERM
                        console.warn(f"[{name}] stopped before it had anything to save")
                    else:
                        error = RuntimeError(f"the {name} run's process ended with exit code "
                                             f"{process.returncode} before reporting a result")
                        console.warn(f"[{name}] {error}")
                        failures.append((name, error, ""))
        finally:
            for sig, previous in handlers.items():
                signal.signal(sig, previous)
            for process, _ in running.values():  # only after an exception in this loop itself
                process.terminate()
                process.wait()
    if failures:
        name, error, text = failures[0]
        error.add_note(f"in the {name} run's process" + (f":\n{text}" if text else ""))
        raise error
    return {job.name: finished[job.name] for job in jobs if job.name in finished}


if __name__ == "__main__":
    _main(*sys.argv[1:])

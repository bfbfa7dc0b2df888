"""The host loop: jitted, sharded, donated steps; evaluation, logging and checkpoints.

Each method's pure steps (``jbilevel.algorithms``) are jitted once here, with the state's
shardings from the logical-axis table and the batch split over the data axes. The loop
dispatches step N before it reads step N-1's metrics, saves composite checkpoints (state +
data-iterator position) atomically, resumes exactly from the newest one, and stops with a
clear message on a non-finite loss, leaving the last good checkpoint in place.

SIGTERM (preemption) stops the run at a step boundary: every process stops at the same step,
writes the checkpoint of that step and raises :class:`Preempted` (exit status 143 unless
caught). Ctrl-C (SIGINT) while the loop runs asks for the same stop and raises
:class:`Interrupted`, a ``KeyboardInterrupt``; a second Ctrl-C stops at once (a plain
``KeyboardInterrupt``), losing the steps since the last checkpoint.
What bounds the delay: a compiled program cannot be interrupted, and the loop
keeps one step in flight, so the programs running or queued when the signal arrives finish
first: at most two training steps and, at a bds hypergradient step, that hypergradient (one
program: ``method.hypergrad.maxiter`` Hessian-vector products over ``hessian_rows`` rows and
a JVP over ``hyper_batch_size`` rows; lower them to shorten it), an online refresh
(generation) or a ``loop.eval_every`` evaluation if one is running; then the checkpoint is
written. With several processes the agreement adds about a second (measured with 2 local
processes on this host).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jbilevel import distributed, report, weights
from jbilevel import sharding as sh
from jbilevel.algorithms.offline import (
    MethodConfig,
    Steps,
    TrainState,
    lambda_at,
    omega_optimizer,
    theta_optimizer,
)
from jbilevel.checkpoint import Checkpointer, abstract_like
from jbilevel.console import Console
from jbilevel.xla_options import train_compiler_options


class BatchSource(Protocol):
    """What the loop needs of a data iterator: batches, and a position it can save."""

    def __next__(self) -> dict[str, np.ndarray]: ...

    def state(self) -> dict: ...

    def restore(self, state: dict) -> None: ...


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is left intact."""


class OutOfMemoryError(RuntimeError):
    """A step needed more device memory than there is; the last checkpoint is left intact."""


# what lowers the memory of each phase of a training loop (docs/llm.md, docs/scale.md)
_MEMORY_HINTS = {
    "train step": "method.train_chunk (rows per reverse pass: gradient accumulation)",
    "hypergradient step": "method.hyper_chunk (rows per pass), method.hessian_rows",
    "online refresh": "online.generate_batch_size (prompts per sampler call), "
                      "online.gather_params=false",
    "evaluation": "eval_batch_size",
    "final evaluation": "eval_batch_size (prompts per decoding batch), "
                        "online.gather_params=false (the weights split while decoding)",
}


def _first_line(error: Exception) -> str:
    return next((line for line in str(error).splitlines() if line.strip()), "")[:300]


def _out_of_memory(error: Exception, doing: str, step: int, last: str) -> OutOfMemoryError:
    """The user's message for an XLA ``RESOURCE_EXHAUSTED`` raised in ``doing`` at ``step``."""
    what = _first_line(error)
    return OutOfMemoryError(
        f"step {step}: out of device memory in the {doing} ({what}). The run stopped; "
        f"nothing after the last checkpoint was saved (last: {last}), and the same command "
        f"with the {doing}'s memory lowered resumes from it. For the {doing}: "
        f"{_MEMORY_HINTS[doing]}; "
        "for every step: model.remat=true, or more devices in mesh.fsdp. "
        "scripts/compile_check.py measures each step's memory ahead of a run (docs/scale.md)")


def _last_checkpoint(ckpt) -> str:
    return f"{ckpt.directory} step {ckpt.latest_step()}" if ckpt else "none (no ckpt)"


def is_out_of_memory(error: Exception) -> bool:
    """Whether a runtime error is XLA's ``RESOURCE_EXHAUSTED`` (out of device memory, at
    compile or run time)."""
    return "RESOURCE_EXHAUSTED" in str(error)


def _raise_named(error: jax.errors.JaxRuntimeError, doing: str, step: int, last: str):
    """Raises ``error`` as :class:`OutOfMemoryError` if it is XLA's ``RESOURCE_EXHAUSTED``
    (see :func:`_out_of_memory`), else unchanged."""
    if not is_out_of_memory(error):
        raise error
    raise _out_of_memory(error, doing, step, last) from error


@contextlib.contextmanager
def naming_setup_out_of_memory(doing: str, state_gib: float | None = None):
    """Turns XLA's ``RESOURCE_EXHAUSTED`` while ``doing`` (loading the weights, building or
    restoring the train state: before any step) into a :class:`~jbilevel.errors.UserError`
    naming the settings that shrink the state; ``state_gib``: what it takes a device."""
    from jbilevel.errors import UserError

    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if not is_out_of_memory(e):
            raise
        what = _first_line(e)
        size = ("" if state_gib is None else
                f"; the train state (parameters, optimizer state, weights) takes "
                f"{state_gib:.3g} GiB a device on this mesh")
        raise UserError(
            f"out of device memory while {doing} ({what}){size}. Lower it with more "
            "devices in mesh.fsdp (each holds 1/fsdp of the state), or theta.kind=lora (the "
            "base frozen, no optimizer state for it; with model.param_dtype=bfloat16 half its "
            "size). bfloat16 weights in full fine-tuning halve the state too but round most "
            "fine-tuning steps away (docs/llm.md). scripts/compile_check.py measures the "
            "state and every step ahead of a run (docs/scale.md)") from e


@contextlib.contextmanager
def naming_out_of_memory(doing: str, step: int, last: str):
    """Turns XLA's ``RESOURCE_EXHAUSTED`` inside the block into :class:`OutOfMemoryError`
    naming ``doing`` (a key of the hints: ``"final evaluation"``, ...), the step and the
    last checkpoint ``last``; other errors pass unchanged."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        _raise_named(e, doing, step, last)


class _StoppedAt:
    """What :class:`Preempted` and :class:`Interrupted` say: the step the run stopped at
    after writing its checkpoint (``checkpoint``: that checkpoint's directory, or None)."""

    by = ""  # the signal, as the message names it
    reason = ""  # results.json's interrupted.reason

    def _at(self, step: int, checkpoint: str | None) -> None:
        self.step, self.checkpoint = step, checkpoint

    def __str__(self) -> str:
        saved = (f"its checkpoint is {self.checkpoint}; rerun the same command to resume"
                 if self.checkpoint else "no checkpoint directory was given, nothing saved")
        return f"interrupted by {self.by} at step {self.step}: {saved}"


class Preempted(_StoppedAt, SystemExit):
    """SIGTERM stopped the run at ``step`` after that step's checkpoint was written.

    A ``SystemExit`` with status 143 (128 + SIGTERM, what a shell reports for a process
    ended by SIGTERM): uncaught, the process exits with that status and no traceback, and
    ``except Exception`` handlers let it through. Rerunning the same command resumes.
    """

    EXIT_STATUS = 128 + signal.SIGTERM
    by, reason = "SIGTERM", "sigterm"

    def __init__(self, step: int, checkpoint: str | None):
        super().__init__(self.EXIT_STATUS)
        self._at(step, checkpoint)


class Interrupted(_StoppedAt, KeyboardInterrupt):
    """A first Ctrl-C (SIGINT) stopped the run at ``step`` after that step's checkpoint was
    written: a ``KeyboardInterrupt``, as a Ctrl-C is anywhere else (in a notebook too), whose
    work up to that step is kept. Rerunning the same command resumes."""

    by, reason = "Ctrl-C (SIGINT)", "sigint"

    def __init__(self, step: int, checkpoint: str | None):
        super().__init__()
        self._at(step, checkpoint)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long to train and how often to look, save and log."""

    steps: int = 1000  # total optimizer steps on theta
    steps_per_epoch: int = 0  # for bmo's lambda schedule; 0 = never advance the epoch
    log_every: int = 50  # steps between metric records (JSONL, TensorBoard, progress bar)
    checkpoint_every: int = 500  # steps between checkpoints (0 = only at the end / SIGTERM)
    keep: int = 3  # checkpoints kept on disk
    progress: bool = True  # show a progress bar
    # steps between full validation-loss evaluations (0 = never); bds / bmo runs with a ground
    # truth (a built-in task, data.truth) also score their weights then (eval_weight_auroc,
    # eval_weight_mass_on_good in metrics.jsonl)
    eval_every: int = 0

    def __post_init__(self):
        for name in ("steps", "log_every", "keep"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if min(self.checkpoint_every, self.steps_per_epoch, self.eval_every) < 0:
            raise ValueError("checkpoint_every, steps_per_epoch and eval_every must be >= 0")


def state_shardings(mesh, rules: sh.AxisRules, state_shapes: TrainState, theta_axes: Any,
                    cfg: MethodConfig, frozen_axes: Any = None) -> TrainState:
    """NamedShardings for a TrainState: optimizer moments follow their parameters.

    ``theta_axes`` / ``frozen_axes``: logical axes of theta and of the frozen base params
    (LoRA runs: ``lora_axes`` and ``Model.param_axes()``; ``frozen_axes`` unused otherwise).
    """
    rep = sh.replicated(mesh)
    frozen_sh = None
    if state_shapes.frozen is not None:
        if frozen_axes is None:
            raise ValueError("state has frozen base params: pass frozen_axes (the model's "
                             "param_axes()) to state_shardings")
        frozen_sh = sh.tree_shardings(mesh, rules, frozen_axes, state_shapes.frozen)
    theta_sh = sh.tree_shardings(mesh, rules, theta_axes, state_shapes.theta)
    omega_sh = rules.sharding(mesh, ("examples",), state_shapes.omega.shape, "omega")

    def follow(tx, opt_shapes, param_sh):
        return optax.tree_map_params(tx, lambda _, s: s, opt_shapes, param_sh,
                                     transform_non_params=lambda _: rep)

    return TrainState(
        step=rep,
        theta=theta_sh,
        opt_theta=follow(theta_optimizer(cfg), state_shapes.opt_theta, theta_sh),
        omega=omega_sh,
        opt_omega=follow(omega_optimizer(cfg), state_shapes.opt_omega, omega_sh),
        lam=rep,
        frozen=frozen_sh,
    )


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
    train: Callable
    hyper: Callable | None
    with_val: bool  # train step takes (state, batch, val_batch)
    batch_sharding: Any  # where every batch leaf goes (rows split over the data axes)
    train_offline: Callable | None = None  # online: the step before the first refresh


def compile_steps(steps: Steps, cfg: MethodConfig, mesh, rules: sh.AxisRules,
                  state_sh: TrainState) -> CompiledSteps:
    """``jax.jit`` of the method's steps with state/batch shardings and state donation."""
    rep = sh.replicated(mesh)
    batch_sh = sh.batch_sharding(mesh, rules, 1)  # a prefix: every batch leaf split on dim 0
    with_val = cfg.method == "bmo"
    n_batches = 2 if with_val else 1

    def pinned(step):  # traced with the model's activations pinned to the batch sharding
        @functools.wraps(step)
        def traced(*args):
            with sh.activation_sharding(mesh, rules, state_sh.theta):
                return step(*args)

        return traced

    def counted(step, batches: int):  # a train step that also reports the tokens it trained
        if step is None:
            return None

        @functools.wraps(step)
        def train_step(state, *args):
            state, metrics = step(state, *args)
            return state, {**metrics, **trained_tokens(*args[:batches])}

        return train_step

    options = train_compiler_options(mesh.devices.flat[0].platform)

    def jitted(step, batches: int, static: int = 0):  # compiled on its first call: an unused
        if step is None:  # step costs nothing; one program per value of a static argument
            return None
        return jax.jit(pinned(step), in_shardings=(state_sh,) + (batch_sh,) * batches,
                       out_shardings=(state_sh, rep), donate_argnums=0,
                       static_argnums=tuple(range(1 + batches, 1 + batches + static)),
                       compiler_options=options)

    return CompiledSteps(jitted(counted(steps.train, n_batches), n_batches, steps.train_static),
                         jitted(steps.hyper, 2, steps.hyper_static), with_val, batch_sh,
                         train_offline=jitted(counted(steps.train_offline, n_batches),
                                              n_batches))


def trained_tokens(*batches: dict) -> dict:
    """``{"tokens": the batches' tokens}`` (padding left out; for bmo its validation batch's
    too) for a token batch's train step, which the loop turns into ``tokens_per_s``; ``{}``
    for batches of other kinds. Online generation's rows are the step's own
    (``online_tokens``)."""
    if not all("attention_mask" in b for b in batches):
        return {}
    return {"tokens": sum(jnp.sum(b["attention_mask"]) for b in batches)}


class _Preemption:
    """SIGTERM, or a first Ctrl-C, as a request to stop at a step boundary, the same step on
    every process.

    One process: a Python handler sets a flag that :meth:`stop_at` reads. Several
    processes: JAX's preemption service (started by ``jax.distributed.initialize``, on by
    default) catches SIGTERM on any process and, in a background thread, agrees with the
    others through the coordination service on the step at which all stop (one past the
    furthest step any process had reached). :meth:`stop_at` asks it after every step: a
    local check (20-40 us measured on this host), no device collective, so the loop's
    pipelining is untouched. A Python SIGTERM handler installed after
    ``jax.distributed.initialize`` would replace the service's, hence the warning below.

    Ctrl-C: the first SIGINT is such a request (with several processes this process sends
    itself SIGTERM, which the service hears) and says so; a second one raises
    ``KeyboardInterrupt`` at once. SIGINTs that arrive while a program compiles or runs are
    handled when it returns, several of them as one. A process that ignores SIGINT (a
    shell's background job, ``nohup``) goes on ignoring it.
    """

    def __init__(self, console: Console):
        self.requested = False
        self.signum = signal.SIGTERM  # the signal that asked first
        self._console = console
        self._previous: dict[int, Any] = {}
        self._multi = jax.process_count() > 1

    def __enter__(self):
        if self._multi and callable(signal.getsignal(signal.SIGTERM)):
            import warnings

            warnings.warn("a Python SIGTERM handler is installed, so JAX's preemption "
                          "service never sees SIGTERM and the processes cannot agree on "
                          "a step to stop at; remove that handler", stacklevel=3)

        def on_sigterm(signum, frame):
            self.requested = True

        def on_sigint(signum, frame):
            if self.requested:  # the second Ctrl-C (or one after SIGTERM): stop now
                raise KeyboardInterrupt
            self.requested, self.signum = True, signal.SIGINT
            self._console.warn("Ctrl-C: stopping after this step, once its checkpoint is "
                               "written (Ctrl-C again stops at once, without it)", own=True)
            if self._multi:  # JAX's preemption service agrees on the step with the others
                os.kill(os.getpid(), signal.SIGTERM)

        handlers = {}
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # (a background job's is)
            handlers[signal.SIGINT] = on_sigint
        if not self._multi:
            handlers[signal.SIGTERM] = on_sigterm
        for signum, handler in handlers.items():
            try:
                self._previous[signum] = signal.signal(signum, handler)
            except ValueError:  # not the main thread: stopping is the caller's business
                break
        return self

    def stop_at(self, step: int) -> bool:
        """True when the run should stop after ``step`` (every process gets the same answer
        for the same step when all call this after every step)."""
        if not self._multi:
            return self.requested
        from jax.experimental import multihost_utils

        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError as e:
            raise RuntimeError(
                f"{e}: a multi-process run needs JAX's preemption service so that a SIGTERM "
                "on one process stops every process at the same step; leave "
                "jax_enable_preemption_service at its default (True)") from None

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


class MetricsLog:
    """Appends metric records to ``metrics.jsonl`` and, if available, TensorBoard.

    ``resumed_from``: the checkpoint step a resumed run starts from. It logs the later steps
    again, so TensorBoard is told to hide the earlier session's events after that step (its
    ``purge_step``), as ``report.trim_metrics`` drops them from ``metrics.jsonl``.
    """

    def __init__(self, out_dir: Path, tensorboard: bool = True, resumed_from: int = 0):
        out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(out_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        self._tb = None
        if tensorboard and jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            # tensorboardX names the file by the second it opens it in; the nanosecond suffix
            # keeps a session resumed within that second from overwriting the earlier one's
            # file, and sorts it after that file, as TensorBoard reads them.
            self._tb = SummaryWriter(str(out_dir / "tensorboard"),
                                     purge_step=resumed_from + 1 if resumed_from else None,
                                     filename_suffix=f".{time.time_ns()}")

    def write(self, step: int, record: dict[str, float]) -> None:
        self._file.write(report.to_json({"step": step, **record}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _as_floats(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


@functools.partial(jax.jit, static_argnums=1)
def _health(omega_N, weighting: str):
    return weights.health(weights.weights(omega_N, weighting))


def restore_or_init(ckpt: Checkpointer, init_fn: Callable[..., TrainState],
                    state_sh: TrainState, sources: dict[str, BatchSource],
                    init_args: tuple = ()) -> tuple[TrainState, int, float]:
    """The newest checkpoint if there is one, else a fresh state.

    Args:
      ckpt: the run's checkpoints.
      init_fn: ``init_fn(*init_args)`` builds a fresh state (traced only for its shapes when
        restoring).
      state_sh: the state's shardings on the current mesh (which may differ from the saver's).
      sources: the run's data iterators by name (as passed to :func:`run`); restored in place.
      init_args: e.g. pretrained params, passed as (donated) arguments so they never become
        constants of the init program; ``jax.ShapeDtypeStruct`` leaves suffice when a
        checkpoint exists, except for LoRA runs: their frozen base is rebuilt from them.
    Returns:
      ``(state, step, seconds)``: ``seconds`` is the run's time up to that checkpoint (what
      :func:`run`'s ``clock`` recorded; 0 for a fresh state or a checkpoint without it).
    """
    shapes = jax.eval_shape(init_fn, *init_args)
    donate = tuple(range(len(init_args)))
    if ckpt.latest_step() is None:
        return jax.jit(init_fn, out_shardings=state_sh, donate_argnums=donate)(*init_args), 0, 0.0
    state, meta = ckpt.restore(abstract_like(checkpointed(shapes), checkpointed(state_sh)))
    if shapes.frozen is not None:  # a LoRA run's base is rebuilt (read again), never saved
        state = state.replace(frozen=jax.jit(lambda *a: init_fn(*a).frozen,
                                             out_shardings=state_sh.frozen,
                                             donate_argnums=donate)(*init_args))
    for name, source in sources.items():
        if name not in meta["data"]:
            raise ValueError(f"{ckpt.directory}: checkpoint has no position for data "
                             f"source {name!r} (it has {sorted(meta['data'])})")
        source.restore(meta["data"][name])
    return state, int(meta["step"]), float(meta.get("seconds", 0.0))


def checkpointed(state: TrainState) -> TrainState:
    """The part of a state that checkpoints hold: all of it but a LoRA run's frozen base
    (the pretrained weights, up to ~16 GB at 8B; rebuilt from ``model.path`` on resume)."""
    return state.replace(frozen=None)


def data_sources(data, val_batches, hyper_batches=None) -> dict[str, BatchSource]:
    """The iterators whose positions a checkpoint must hold for an exact resume."""
    named = {"train": data, "val": val_batches, "hyper": hyper_batches}
    return {k: v for k, v in named.items() if hasattr(v, "state") and hasattr(v, "restore")}


def run(
    compiled: CompiledSteps,
    cfg: MethodConfig,
    loop: LoopConfig,
    state: TrainState,
    data: BatchSource,
    val_batches: Iterator[dict],
    *,
    start_step: int = 0,
    ckpt: Checkpointer | None = None,
    hyper_batches: Iterator[dict] | None = None,
    log: MetricsLog | None = None,
    on_log: Callable[[int, dict], None] | None = None,
    eval_fn: Callable[[Any], dict[str, float]] | None = None,
    before_step: Callable[[TrainState, int], tuple[TrainState, dict]] | None = None,
    offline_until: int = 0,
    train_args: Callable[[TrainState, int], tuple] | None = None,
    hyper_args: Callable[[TrainState, int], tuple] | None = None,
    console: Console | None = None,
    clock: Callable[[], float] | None = None,
) -> tuple[TrainState, int]:
    """Trains from ``start_step`` to ``loop.steps``, or until SIGTERM or Ctrl-C (see the
    module doc).

    Args:
      compiled: jitted steps from :func:`compile_steps`.
      cfg: the method settings (bds hypergradient period, bmo lambda schedule).
      loop: run length and logging / checkpoint periods.
      state: the state at ``start_step`` (fresh or restored).
      data: training batches: this process's rows of each global batch.
      val_batches: validation batches (bmo's penalty term, bds's outer loss). The position
        of every iterator that has ``state()``/``restore()`` is saved with each checkpoint.
      ckpt: where checkpoints go (None: no checkpoints).
      hyper_batches: bds: the training batches the hypergradient is taken over.
      log: metric sink; ``on_log(step, record)`` is also called for each record.
      eval_fn: ``state -> {name: value}`` (e.g. the loss on the whole validation set; a
        TrainState, so a LoRA run's eval sees ``state.frozen`` too), run
        every ``loop.eval_every`` steps and at the end; its values join that step's record
        with an ``eval_`` prefix.
      before_step: ``(state, step) -> (state, metrics)`` on the host before each train step
        (online generation refreshes its buffer here); non-empty metrics are logged with
        every later step until it returns new ones.
      offline_until: steps below it run ``compiled.train_offline`` (when there is one)
        instead of ``compiled.train``: online generation's steps before its first refresh,
        whose buffer is still empty (``online.start``).
      train_args: ``(state, step) -> the static arguments`` that ``compiled.train`` takes
        after its batches at that step, after ``before_step`` (online generation with
        ``data.length_buckets``: the length bucket its generated rows are drawn from).
      hyper_args: the same for ``compiled.hyper`` (online bds with ``data.length_buckets``:
        how many buffer rows it takes from each length bucket).
      console: where the progress bar (``loop.progress``) and warnings go (default: stderr).
        A hypergradient's numbers (``val_loss``, ``cg_residual``, ...) join every record
        until the next one, with ``hyper_step``: the step they were measured at.
      clock: ``() -> seconds the run has taken so far``, saved with each checkpoint as
        ``seconds`` (so a resumed run's time counts its earlier sessions; see
        ``experiment.run``'s ``train_seconds``).
    Returns:
      ``(state, step)``: the final state and the number of steps it has taken.
    Raises:
      NonFiniteLossError: a loss became NaN/inf; nothing after the last good checkpoint is
        saved.
      OutOfMemoryError: a step ran out of device memory (XLA's ``RESOURCE_EXHAUSTED``); the
        message names the phase and the settings that lower its memory; nothing after the
        last checkpoint is saved.
      Preempted: SIGTERM on any process: every process stopped at the same step and that
        step's checkpoint is written (when ``ckpt`` is given).
      Interrupted: a first Ctrl-C, the same stop (other processes of the run: Preempted).
      KeyboardInterrupt: a second Ctrl-C; nothing after the last checkpoint is saved.
    """
    if compiled.hyper is not None and hyper_batches is None:
        raise ValueError("bds needs hyper_batches: the training data the hypergradient sees")
    console = console or Console()
    progress = console.train_bar(loop.steps, start_step, cfg.method) if loop.progress else None
    pending: tuple[int, dict] | None = None  # (step, metrics) not yet read back
    state_lam_sh = state.lam.sharding
    sources = data_sources(data, val_batches, hyper_batches)

    def put(batch):  # this process's rows -> global arrays on the mesh
        return distributed.global_batch(batch, compiled.batch_sharding)

    def evaluated(at: int) -> bool:
        return eval_fn is not None and loop.eval_every > 0 and (
            at % loop.eval_every == 0 or at == loop.steps)

    def logged(at: int) -> bool:
        return at % loop.log_every == 0 or at == loop.steps or evaluated(at)

    hyper_metrics: dict = {}
    hook_metrics: dict = {}
    tokens = [0.0]  # the tokens trained since start_step (every step's, read back)
    t0 = time.perf_counter()
    step = start_step

    def save(at_step: int):
        if ckpt is not None:
            positions = {k: v.state() for k, v in sources.items()}
            meta = {"step": at_step, "data": positions}
            if clock is not None:
                meta["seconds"] = round(clock(), 3)
            ckpt.save(at_step, checkpointed(state), meta)

    def read(pending):
        at, parts = pending
        record = {}
        for phase, metrics in parts:  # in dispatch order: a failed phase fails those after it
            try:
                record.update(_as_floats(metrics))
            except jax.errors.JaxRuntimeError as e:  # raised by the program that failed,
                # which ran asynchronously: a phase of step `at`, not the one dispatched last
                _raise_named(e, phase, at, _last_checkpoint(ckpt))
        bad = [k for k, v in record.items()
               if ("loss" in k or "norm" in k) and not math.isfinite(v)]
        if bad:
            where = _last_checkpoint(ckpt)
            raise NonFiniteLossError(
                f"step {at}: non-finite {', '.join(f'{k}={record[k]}' for k in bad)}; the run "
                f"stopped and nothing after the last good checkpoint was saved (last good: "
                f"{where}). Lower lr_theta / lr_omega, or check the data for empty responses."
            )
        if record.get("hyper_step") == at:
            console.hyper_finished(at, record)
        if "tokens" in record:
            tokens[0] += record["tokens"] + record.get("online_tokens", 0.0)
        if logged(at):
            elapsed = max(time.perf_counter() - t0, 1e-9)
            record["steps_per_s"] = (at - start_step) / elapsed
            if "tokens" in record:
                record["tokens_per_s"] = tokens[0] / elapsed
            if log is not None and jax.process_index() == 0:
                log.write(at, record)
            if on_log is not None:
                on_log(at, record)
            console.record(at, record)

    stopped = False
    # the phase last started and the step it counts as in metrics.jsonl (named if the device
    # runs out of memory when it is dispatched)
    doing, doing_at = "train step", start_step + 1
    with _Preemption(console) as preempt:
        try:
            while step < loop.steps:
                if loop.steps_per_epoch and step and step % loop.steps_per_epoch == 0:
                    lam = lambda_at(cfg, step // loop.steps_per_epoch)
                    state = state.replace(lam=jax.device_put(jnp.float32(lam), state_lam_sh))
                if before_step is not None:
                    doing, doing_at = "online refresh", step
                    state, hooked = before_step(state, step)
                    hook_metrics = hooked or hook_metrics
                doing, doing_at = "train step", step + 1
                batch = put(next(data))
                train_step = (compiled.train_offline if compiled.train_offline is not None
                              and step < offline_until else compiled.train)
                static = (() if train_step is not compiled.train or train_args is None
                          else train_args(state, step))
                if compiled.with_val:
                    state, metrics = train_step(state, batch, put(next(val_batches)), *static)
                else:
                    state, metrics = train_step(state, batch, *static)
                step += 1
                parts = [("train step", {**metrics, **hook_metrics})]  # (phase, its numbers)
                if (compiled.hyper is not None and step % cfg.hyper_every == 0
                        and step >= cfg.hyper_start):
                    doing, doing_at = "hypergradient step", step
                    state, hyper_metrics = compiled.hyper(
                        state, put(next(hyper_batches)), put(next(val_batches)),
                        *(() if hyper_args is None else hyper_args(state, step)))
                    hyper_metrics = {**hyper_metrics, "hyper_step": step}
                    console.hyper_started(step)
                parts.append(("hypergradient step", hyper_metrics))  # or an earlier one's
                if logged(step):  # this step's weight health; lam copied (state is donated)
                    health = _health(state.omega, cfg.weighting)
                    parts.append((doing, {**health, "lam": jnp.copy(state.lam)}))
                if evaluated(step):
                    doing, doing_at = "evaluation", step
                    parts.append((doing, {f"eval_{k}": v for k, v in eval_fn(state).items()}))
                if pending is not None:
                    read(pending)  # step N-1's numbers, while step N runs
                pending = (step, parts)
                if progress is not None:
                    progress.update()
                if loop.checkpoint_every and step % loop.checkpoint_every == 0:
                    read(pending)
                    pending = None
                    save(step)
                if preempt.stop_at(step):
                    stopped = True
                    break
            if pending is not None:
                read(pending)
        except jax.errors.JaxRuntimeError as e:  # raised when dispatched: the phase last started
            _raise_named(e, doing, doing_at, _last_checkpoint(ckpt))
        if step > start_step and (not loop.checkpoint_every or step % loop.checkpoint_every):
            save(step)  # the final state, unless the periodic save just wrote it
    if ckpt is not None:
        ckpt.wait()
    if progress is not None:
        progress.close()
    if stopped:
        stop = Interrupted if preempt.signum == signal.SIGINT else Preempted
        raise stop(step, str(ckpt.directory / str(step)) if ckpt is not None else None)
    return state, step

"""What a command tells its user: each phase with its duration, warnings, the training bar.

``jbilevel`` commands write these lines to stderr (stdout keeps the JSON result), from the
first process only. Verbosity 0 (``--quiet``) keeps warnings only, 1 adds the phases and the
progress bar, 2 (``--verbose``) adds details such as every data-load message and a line per
logged training record. While a bar is on screen, lines go through ``tqdm.write`` so the bar
stays whole at the bottom.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

QUIET, NORMAL, VERBOSE = 0, 1, 2
CG_RESIDUAL_WARN = 1.0  # above this the hypergradient's linear solve went the wrong way


def _first_process() -> bool:
    import jax

    return jax.process_index() == 0


# JAX's events for programs it looks up in its persistent compilation cache (--compile-cache),
# and for every program it compiles or loads from there (none: the program was in memory)
_CACHE_EVENTS = {"/jax/compilation_cache/compile_requests_use_cache": 0,
                 "/jax/compilation_cache/cache_hits": 0,
                 "/jax/core/compile/backend_compile_duration": 0}
_listening = False


def _count_cache_event(event: str, *_, **__) -> None:
    if event in _CACHE_EVENTS:
        _CACHE_EVENTS[event] += 1


def _cache_lookups() -> tuple[int, int, int]:
    """(programs looked up in the persistent compilation cache, programs found there,
    programs compiled or loaded from there) in this process so far (counted from the first
    call on)."""
    global _listening
    if not _listening:
        import jax.monitoring

        jax.monitoring.register_event_listener(_count_cache_event)
        jax.monitoring.register_event_duration_secs_listener(_count_cache_event)
        _listening = True
    return tuple(_CACHE_EVENTS.values())


def device_memory() -> tuple[int, int] | None:
    """(peak bytes in use since the process started, bytes it may use) of this process's
    fullest device, where the backend keeps count (GPU, TPU); None where it does not (CPU)."""
    import jax

    counts = []
    for device in jax.local_devices():
        stats = device.memory_stats()
        if not stats or "peak_bytes_in_use" not in stats:
            return None
        counts.append((stats["peak_bytes_in_use"], stats.get("bytes_limit", 0)))
    return max(counts) if counts else None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


class Phase:
    """A running phase; set ``summary`` to say what it found (printed with its duration)."""

    def __init__(self):
        self.summary = ""
        self.seconds = 0.0


class Console:
    """Messages for the person at the terminal.

    Args:
      verbosity: QUIET, NORMAL or VERBOSE.
      stream: where lines go (default: stderr).
    """

    def __init__(self, verbosity: int = NORMAL, stream: TextIO | None = None):
        self.verbosity = verbosity
        self.stream = stream
        self._bar = None  # the TrainBar on screen, if any

    def _write(self, line: str, any_process: bool = False) -> None:
        if not (any_process or _first_process()):
            return
        stream = self.stream or sys.stderr
        if self._bar is not None:
            self._bar.write(line, stream)
        else:
            print(line, file=stream, flush=True)

    def info(self, line: str) -> None:
        """A line at normal verbosity."""
        if self.verbosity >= NORMAL:
            self._write(line)

    def detail(self, line: str) -> None:
        """A line shown with ``--verbose`` only."""
        if self.verbosity >= VERBOSE:
            self._write(line)

    def warn(self, line: str, own: bool = False) -> None:
        """A warning: shown at every verbosity, ``--quiet`` included; ``own``: news of this
        process alone (a multi-process run it stopped), written whichever process it is."""
        self._write(f"warning: {line}", any_process=own)

    @contextlib.contextmanager
    def phase(self, what: str) -> Iterator[Phase]:
        """Says ``what ...`` now and ``what: <summary> (N s)`` when the block ends."""
        self.info(f"{what} ...")
        phase = Phase()
        t0 = time.perf_counter()
        yield phase
        phase.seconds = time.perf_counter() - t0
        self.info(f"{what}: {phase.summary or 'done'} ({_seconds(phase.seconds)})")

    def first_call(self, fn: Callable | None, what: str) -> Callable | None:
        """``fn`` (a jitted step) reporting how long its first call, the compilation, took,
        and again for each batch shape it meets later (``data.length_buckets``), naming the
        sequence length.

        A jitted call returns once its program is traced, compiled and dispatched (it runs
        asynchronously), so the first call's wall time is the compile time; the bar leaves it
        out of its rate. A program JAX read from its persistent compilation cache instead
        (``--compile-cache``: a resumed or repeated run) is said to be loaded from it, and one
        this process holds already (the same program under another name) to be found. Where
        the devices count their memory (GPU, TPU), the first call is
        waited for and the line adds the fullest device's peak so far against what it may
        use: how close that step came to running out.
        """
        if fn is None:
            return None
        seen: set = set()

        @functools.wraps(fn)
        def call(*args):
            import jax

            # batch shapes, and the values of static arguments (one program each)
            shapes = tuple(getattr(x, "shape", x) for x in jax.tree.leaves(args[1:]))
            if shapes in seen:
                return fn(*args)
            name = what
            if seen:  # another shape of the same step: name the batch's padded length
                batch = next((a for a in args[1:] if isinstance(a, dict)
                              and ("input_ids" in a or "prompt_ids" in a)), None)
                if batch is None:
                    name += " again"
                elif "input_ids" in batch:
                    name += f" for sequence length {batch['input_ids'].shape[-1]}"
                else:  # a sampler's prompts
                    name += f" for prompts of {batch['prompt_ids'].shape[-1]} tokens"
                span = next((a for a in args[1:] if isinstance(a, tuple)), None)
                if span is not None:  # online: the widths of the generated rows' buckets,
                    # one (a train step) or one per block (bds's hypergradient)
                    widths = [b[1] for b in span] if isinstance(span[0], tuple) else [span[1]]
                    name += f", generated rows of {' / '.join(map(str, widths))} tokens"
            self.info(f"compiling the {name} ...")
            before = _cache_lookups()
            t0 = time.perf_counter()
            out = fn(*args)
            seconds = time.perf_counter() - t0
            looked, found, built = (a - b for a, b in zip(_cache_lookups(), before,
                                                          strict=True))
            seen.add(shapes)
            memory = ""
            if device_memory() is not None:  # the step has run: its peak is counted
                jax.block_until_ready(out)
                peak, limit = device_memory()
                memory = f"; device memory peak so far {_gib(peak)} GiB" + (
                    f" of {_gib(limit)} ({peak / limit:.0%})" if limit else "")
            if not built:  # in memory already, e.g. another split's decoding
                self.info(f"found the {name} compiled already{memory}")
            else:
                done = ("loaded the {} from the compilation cache" if looked and found == looked
                        else "compiled the {}").format(name)
                self.info(f"{done} in {_seconds(seconds)}{memory}")
            if self._bar is not None:
                self._bar.exclude(time.perf_counter() - t0)
            return out

        return call

    def train_bar(self, total: int, initial: int, desc: str) -> TrainBar | None:
        """The progress bar of a training loop (None when quiet or not the first process)."""
        if self.verbosity < NORMAL or not _first_process():
            return None
        self._bar = TrainBar(self, total, initial, desc)
        return self._bar

    def record(self, step: int, record: dict[str, float]) -> None:
        """A logged training record: onto the bar, and a line of its own with ``--verbose``."""
        if self._bar is not None:
            self._bar.record(step, record)
        self.detail(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in record.items()))

    def hyper_started(self, step: int) -> None:
        """A hypergradient step was dispatched; the bar says so until its numbers are back."""
        if self._bar is not None:
            self._bar.hyper_started(step)

    def hyper_finished(self, step: int, record: dict[str, float]) -> None:
        """A hypergradient's numbers are back: warn when its solve did not converge."""
        residual = record.get("cg_residual")
        skipped = record.get("hyper_taken") == 0.0 and record.get("hypergrad_norm", 0.0) > 0
        if record.get("cg_negative_curvature") and not record.get("cg_truncated"):
            self.warn(f"step {step}: the hypergradient's solve met negative curvature (the "
                      "Hessian plus ridge is not positive definite at this theta): the weight "
                      "step was skipped; raise method.hypergrad.ridge, or start later "
                      "(method.hyper_start / method.hyper_max_val_loss)")
        elif residual is not None and residual > CG_RESIDUAL_WARN:
            self.warn(f"step {step}: the hypergradient's CG residual is {residual:.3g} (> "
                      f"{CG_RESIDUAL_WARN:g}): the Hessian solve did not converge"
                      + (" and the weight step was skipped" if skipped else "")
                      + "; raise method.hypergrad.ridge (damping) or method.hypergrad.maxiter")
        if self._bar is not None:
            self._bar.hyper_finished(step, record)

    def closed(self, bar: TrainBar) -> None:
        if self._bar is bar:
            self._bar = None

    def close_bar(self) -> None:
        """Closes the bar if one is still open (a loop that stopped with an exception)."""
        if self._bar is not None:
            self._bar.close()


class TrainBar:
    """A tqdm bar that stays on screen: loss, validation loss, weight health, hypergradients.

    Its rate is the average since the start with compile time left out (``smoothing=0``), so
    a hypergradient step that takes minutes does not throw the ETA about.
    """

    POSTFIX = ("loss", "val_loss", "ess")

    def __init__(self, console: Console, total: int, initial: int, desc: str):
        from tqdm.auto import tqdm

        self._console = console
        self._desc = desc
        self._hyper: dict[str, str] = {}
        self._shown: dict[str, str] = {}
        self._bar = tqdm(total=total, initial=initial, desc=desc, leave=True, smoothing=0,
                         file=console.stream or sys.stderr, dynamic_ncols=True)

    def write(self, line: str, stream: TextIO) -> None:
        self._bar.write(line, file=stream)

    def exclude(self, seconds: float) -> None:
        self._bar.start_t += seconds

    def update(self) -> None:
        self._bar.update(1)

    def record(self, step: int, record: dict[str, float]) -> None:
        """A logged record: its loss, validation loss and weight health join the bar."""
        shown = {k: f"{record[k]:.4g}" for k in self.POSTFIX if k in record}
        hyper_step = record.get("hyper_step")
        if hyper_step is not None and hyper_step != step and "val_loss" in shown:
            # bds's val_loss comes from the last hypergradient's validation batch: say so
            shown[f"val_loss@{int(hyper_step)}"] = shown.pop("val_loss")
        self._shown = shown
        self._bar.set_postfix({**shown, **self._hyper}, refresh=True)

    def hyper_started(self, step: int) -> None:
        self._bar.set_description(f"{self._desc} [hypergradient at step {step} running]")
        self._bar.refresh()

    def hyper_finished(self, step: int, record: dict[str, float]) -> None:
        self._bar.set_description(self._desc, refresh=False)
        if record.get("hyper_taken", 1.0) == 0.0:
            self._hyper = {"hyper": f"skipped@{step}"}
        else:
            self._hyper = {"cg_res": f"{record.get('cg_residual', float('nan')):.3g}@{step}"}
        self._bar.set_postfix({**self._shown, **self._hyper}, refresh=True)

    def close(self) -> None:
        self._bar.close()
        self._console.closed(self)


def _seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def load_report_lines(field: str, source: str, report: Any, verbosity: int) -> list[str]:
    """The lines that say what became of a data file's rows (the first few skip/truncation
    messages at normal verbosity when any, every kept one with ``--verbose``)."""
    lines = [f"  {field} {source}: {report}"]
    if report.messages:
        shown = report.messages if verbosity >= VERBOSE else report.messages[:3]
        lines += [f"    {m}" for m in shown]
        more = report.n_skipped + report.n_truncated - len(shown)
        if more > 0:
            lines.append(f"    ... and {more} more (results.json lists the first "
                         f"{report.max_messages})")
    return lines

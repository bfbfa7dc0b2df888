"""What a command tells its user: phases with durations, warnings, the training bar."""

import io
import re
import time

import numpy as np

from jbilevel.console import NORMAL, QUIET, VERBOSE, Console


def test_phase_says_what_and_how_long_and_quiet_keeps_warnings():
    out = io.StringIO()
    console = Console(NORMAL, stream=out)
    with console.phase("reading data") as phase:
        phase.summary = "train 3"
    console.detail("hidden")
    console.warn("3 rows truncated")
    lines = out.getvalue().splitlines()
    assert lines[0] == "reading data ..."
    assert re.fullmatch(r"reading data: train 3 \(\d+\.\d s\)", lines[1])
    assert lines[2:] == ["warning: 3 rows truncated"]
    quiet = io.StringIO()
    console = Console(QUIET, stream=quiet)
    with console.phase("reading data"):
        pass
    console.warn("kept")
    assert quiet.getvalue() == "warning: kept\n"
    assert console.train_bar(10, 0, "bds") is None  # no bar when quiet


def _compiles(x):
    """``x`` through a program compiled for this call alone (a fresh jit), as a step's first
    call compiles its program."""
    import jax

    return np.asarray(jax.jit(lambda v: v * 1)(x))


def test_first_call_is_timed_as_the_compile():
    out = io.StringIO()
    console = Console(NORMAL, stream=out)
    calls = []

    def step(x):
        calls.append(x)
        time.sleep(0.05 if len(calls) == 1 else 0.0)
        return int(_compiles(x)) + 1

    timed = console.first_call(step, "bds train step")
    assert [timed(1), timed(2)] == [2, 3] and calls == [1, 2]
    lines = out.getvalue().splitlines()
    assert lines[0] == "compiling the bds train step ..."
    seconds = float(re.fullmatch(r"compiled the bds train step in (\d+\.\d) s", lines[1])[1])
    assert 0.0 < seconds < 5.0 and len(lines) == 2
    assert console.first_call(None, "hypergradient step") is None
    # a batch of another padded length (data.length_buckets) is compiled again, and said so
    train = console.first_call(lambda state, batch: _compiles(batch["input_ids"]).shape,
                               "train step")
    for length in (8, 16, 8, 16):
        assert train(None, {"input_ids": np.zeros((2, length))}) == (2, length)
    lines = out.getvalue().splitlines()[2:]
    assert [line.split(" in ")[0] for line in lines] == [
        "compiling the train step ...", "compiled the train step",
        "compiling the train step for sequence length 16 ...",
        "compiled the train step for sequence length 16"]
    # online: a train step's generated rows from one length bucket, a hypergradient's from
    # several (their widths named)
    step = console.first_call(lambda state, batch, static=None: _compiles(0), "step")
    batch = {"input_ids": np.zeros((2, 8))}
    for static in (None, (0, 64), ((0, 64, 8, 1.0), (64, 128, 8, 0.5))):
        step(None, batch, *(() if static is None else (static,)))
    assert [line.split(" in ")[0] for line in out.getvalue().splitlines()[9::2]] == [
        "compiled the step for sequence length 8, generated rows of 64 tokens",
        "compiled the step for sequence length 8, generated rows of 64 / 128 tokens"]
    # a program this process holds already (another split's decoding, say) is found, not
    # compiled: nothing was compiled or loaded for it
    import jax

    program = jax.jit(lambda x: x * 2)
    for what in ("decoding of the validation answers", "decoding of the test answers"):
        console.first_call(lambda params, batch: program(batch), what)(None, np.ones(3))
    assert [line.split(" in ")[0] for line in out.getvalue().splitlines()[-4:]] == [
        "compiling the decoding of the validation answers ...",
        "compiled the decoding of the validation answers",
        "compiling the decoding of the test answers ...",
        "found the decoding of the test answers compiled already"]


def test_first_call_reports_the_device_memory_peak_where_counted(monkeypatch):
    """On a GPU or TPU the compile line adds the fullest device's peak so far (the step has
    run); on the CPU, which keeps no count, it does not."""
    import jax

    class Device:
        def __init__(self, peak):
            self.peak = peak

        def memory_stats(self):
            return {"peak_bytes_in_use": self.peak, "bytes_limit": 80 * 2**30}

    out = io.StringIO()
    step = Console(NORMAL, stream=out).first_call(lambda x: x + 1, "hypergradient step")
    monkeypatch.setattr(jax, "local_devices", lambda: [Device(50 * 2**30), Device(53 * 2**30)])
    assert step(jax.numpy.ones(2)).tolist() == [2.0, 2.0]
    line = out.getvalue().splitlines()[1]
    assert re.fullmatch(r"compiled the hypergradient step in \d+\.\d s; device memory peak so "
                        r"far 53\.0 GiB of 80\.0 \(66%\)", line), line
    monkeypatch.undo()
    out = io.StringIO()
    Console(NORMAL, stream=out).first_call(lambda x: x, "train step")(1)
    assert "device memory" not in out.getvalue()


def test_first_call_says_a_program_came_from_the_compilation_cache(tmp_path, cache_state):
    """A resumed or repeated run (--compile-cache) reads its programs back: the line says so
    instead of calling it a compile; a program the cache does not hold is compiled."""
    import jax

    from jbilevel.xla_options import use_compilation_cache

    use_compilation_cache(tmp_path / "cache")
    lines = []
    for scale in (3.0, 3.0, 5.0):  # a fresh jit each time, as a new process has
        out = io.StringIO()
        step = Console(NORMAL, stream=out).first_call(
            jax.jit(lambda x, s=scale: jax.numpy.sin(x).sum() * s), "train step")
        step(jax.numpy.arange(4.0))
        lines.append(out.getvalue().splitlines()[1].split(" in ")[0])
    assert lines == ["compiled the train step",
                     "loaded the train step from the compilation cache",
                     "compiled the train step"]  # another program: not in the cache


def test_bar_labels_a_stale_validation_loss_and_reports_each_hypergradient():
    out = io.StringIO()
    console = Console(VERBOSE, stream=out)
    bar = console.train_bar(10, 0, "bds")
    bar.update()
    console.hyper_started(2)
    assert "bds [hypergradient at step 2 running]" in out.getvalue()
    console.hyper_finished(2, {"cg_residual": 1.7, "val_loss": 0.5})
    console.record(3, {"loss": 1.25, "val_loss": 0.5, "ess": 0.9, "hyper_step": 2.0})
    console.hyper_finished(4, {"cg_residual": 0.0, "hyper_taken": 0.0, "val_loss": 0.6})
    console.close_bar()
    text = out.getvalue()
    assert ("warning: step 2: the hypergradient's CG residual is 1.7 (> 1): the Hessian solve "
            "did not converge") in text
    assert "raise method.hypergrad.ridge (damping) or method.hypergrad.maxiter" in text
    assert "cg_res=1.7@2" in text and "val_loss@2=0.5" in text
    assert "hyper=skipped@4" in text and text.count("warning:") == 1
    assert "step 3: loss=1.25, val_loss=0.5, ess=0.9, hyper_step=2" in text  # --verbose
    assert console.train_bar(10, 10, "bds") is not None  # a fresh bar after close
    console.close_bar()

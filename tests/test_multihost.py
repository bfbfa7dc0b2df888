"""Two local processes (4 CPU devices each) as one run, as on a pod.

A SIGTERM that reaches one process stops both at the same step with one checkpoint and exit
status 143; the resumed run ends where an uninterrupted one does; evaluation (losses and
generation, the weights' scores every loop.eval_every steps), the final model and the curated
export work with params spread over both processes (mesh fsdp=8: every parameter is split
across the two).
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
from safetensors.numpy import load_file

from jbilevel import cli

CONFIG = """\
# jbilevel train --config tiny.yaml: a tiny bmo run whose params span every device
task: {base: scratch, options: {n_train: 64, n_val: 16, n_test: 16}}
model: {hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}
method: {method: bmo}
mesh: {data: 1, fsdp: -1}
loop: {steps: 12, log_every: 1, checkpoint_every: 0, progress: false, eval_every: 6}
batch_size: 16
val_batch_size: 16
eval_batch_size: 12  # not a multiple of the 8 devices: evaluation pads its batches
"""

# Launch 1 runs the config straight into A, then again into B, where process 1 sends itself
# SIGTERM at its 5th batch (step 3) and its later batches take 0.5 s, so the run cannot end
# before the notice has reached process 0 (JAX's preemption service polls about once a
# second). Launch 2 reruns B (a resume), then `jbilevel eval --run B`; it gathers the final
# model in pieces of at most 256 bytes, so step 3 below also checks the piecewise gather.
STRAIGHT_THEN_SIGTERM = """\
import os, signal, sys, time
import jax
jax.config.update("jax_num_cpu_devices", 4)
from jbilevel import cli
from jbilevel.data import Batcher
assert cli.main(["train", "--config", {config!r}, "--out", {straight!r}]) == 0
if os.environ["JBILEVEL_PROCESS_ID"] == "1":
    real, calls = Batcher.__next__, []
    def slowed(self):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        if len(calls) >= 5:
            time.sleep(0.5)
        return real(self)
    Batcher.__next__ = slowed
try:
    cli.main(["train", "--config", {config!r}, "--out", {out!r}])
except SystemExit as stop:
    print("STOPPED AT", stop.step, flush=True)
    raise
"""
RESUME_THEN_EVAL = """\
import sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
from jbilevel import cli, inputs
inputs._GATHER_BYTES = 256  # the final model gathered in many pieces (launch 1: whole leaves)
code = cli.main(["train", "--config", {config!r}, "--out", {out!r}])
sys.exit(code or cli.main(["eval", "--run", {out!r}]))
"""


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(script: str, cache) -> list[tuple[int, str, str]]:
    """Runs ``script`` as processes 0 and 1 of one run; their (status, stdout, stderr)."""
    port = _free_port()
    procs = []
    for pid in range(2):
        # one persistent compilation cache for both launches: the second compiles nothing
        env = dict(os.environ, JBILEVEL_COORDINATOR=f"127.0.0.1:{port}",
                   JBILEVEL_NUM_PROCESSES="2", JBILEVEL_PROCESS_ID=str(pid),
                   JAX_COMPILATION_CACHE_DIR=str(cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        procs.append(subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)],
                                      env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    done = []
    for p in procs:
        out, err = p.communicate(timeout=400)
        done.append((p.returncode, out.decode(), err.decode()))
    return done


def test_sigterm_on_one_process_stops_both_then_resume_eval_export(tmp_path):
    path, straight, out = tmp_path / "tiny.yaml", tmp_path / "straight", tmp_path / "run"
    path.write_text(CONFIG)
    cache = tmp_path / "jax_cache"
    paths = {"config": str(path), "straight": str(straight), "out": str(out)}

    # 1. SIGTERM reaches process 1 only; both stop at one step S, checkpoint it, exit 143.
    stopped = _two_processes(STRAIGHT_THEN_SIGTERM.format(**paths), cache)
    for code, _, err in stopped:
        assert code == 143, err[-3000:]
    steps = {line.split()[-1] for _, text, _ in stopped for line in text.splitlines()
             if line.startswith("STOPPED AT")}
    assert len(steps) == 1, steps  # the same step on both processes
    s = int(steps.pop())
    assert 3 <= s < 12
    assert sorted(os.listdir(out / "checkpoints")) == [str(s)]  # one checkpoint, that step
    interrupted = json.loads((out / "results.json").read_text())
    assert interrupted["interrupted"]["reason"] == "sigterm" and interrupted["steps"] == s
    assert interrupted["interrupted"]["last_checkpoint"] == s
    assert f"interrupted by SIGTERM at step {s}" in stopped[0][2]
    for name in ("model", "weights.csv", "weights.npy", "curated.jsonl"):
        assert not (out / name).exists(), name  # nothing that looks like a finished run

    # 2. The same command again resumes at S and finishes; then `eval` on both processes.
    resumed = _two_processes(RESUME_THEN_EVAL.format(**paths), cache)
    for code, _, err in resumed:
        assert code == 0, err[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["steps"] == 12 and result["interrupted"] is None
    assert sorted(os.listdir(out / "checkpoints")) == sorted([str(s), "12"])

    # 3. It ends exactly where the uninterrupted run did: numbers, weights, model.
    want = json.loads((straight / "results.json").read_text())
    assert result["resumed_from"] == s and want["resumed_from"] == 0
    differ = ("train_seconds", "resumed_from")
    assert {k: v for k, v in result.items() if k not in differ} == {
        k: v for k, v in want.items() if k not in differ}
    np.testing.assert_array_equal(np.load(out / "weights.npy"),
                                  np.load(straight / "weights.npy"))
    # the weights scored along the run from both processes' rows: step 12's score is the final
    last = json.loads((straight / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["eval_weight_mass_on_good"] == want["weight_mass_on_good"]
    model = load_file(out / "model" / "model.safetensors")
    reference = load_file(straight / "model" / "model.safetensors")
    assert model.keys() == reference.keys()
    for name in reference:
        np.testing.assert_array_equal(model[name], reference[name], err_msg=name)

    # 4. The model as written (gathered leaf by leaf onto process 0) scores as in memory.
    evaluated = json.loads((out / "eval.json").read_text())
    for k in ("val_loss", "test_loss", "test_accuracy"):
        np.testing.assert_allclose(evaluated[k], result[k], rtol=1e-6, err_msg=k)

    # 5. Export from the two-process run's directory.
    assert cli.main(["export", "--run", str(out), "--out", str(tmp_path / "top.jsonl"),
                     "--top-frac", "0.5"]) == 0
    assert len((tmp_path / "top.jsonl").read_text().splitlines()) == 32
    curated = (out / "curated.jsonl").read_text().splitlines()
    assert len(curated) == 64 and "weight" in json.loads(curated[0])


# Process 1 alone runs out of device memory at its 6th batch (step 6, after the step-4
# checkpoint); process 0 is then blocked in that step's collectives. sft: the fewest programs.
ONE_PROCESS_OUT_OF_MEMORY = """\
import os
import jax
jax.config.update("jax_num_cpu_devices", 4)
from jbilevel import cli, distributed
from jbilevel.data import Batcher
distributed.STOP_GRACE_S = 2.0
if os.environ["JBILEVEL_PROCESS_ID"] == "1":
    real, calls = Batcher.__next__, []
    def short_of_memory(self):
        calls.append(1)
        if len(calls) == 6:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1 "
                                             "bytes (a device of this process only)")
        return real(self)
    Batcher.__next__ = short_of_memory
cli.main(["train", "--config", {config!r}, "--out", {out!r}, "method.method=sft",
          "loop.checkpoint_every=4"])
raise AssertionError("jbilevel train returned: a stopped multi-process run leaves at once")
"""

# A finished run, then `jbilevel eval` in which process 0 alone fails (an error of its own
# host), while process 1 waits for it in the evaluation's collectives.
ONE_PROCESS_FAILS_IN_EVAL = """\
import os
import jax
jax.config.update("jax_num_cpu_devices", 4)
from jbilevel import cli, distributed, experiment
distributed.STOP_GRACE_S = 2.0
assert cli.main(["train", "--config", {config!r}, "--out", {out!r}, "method.method=sft",
                 "loop.steps=2", "loop.eval_every=0"]) == 0
if os.environ["JBILEVEL_PROCESS_ID"] == "0":
    def unreadable(*a, **k):
        raise OSError("the test split is unreadable on this host")
    experiment.score_splits = unreadable
cli.main(["eval", "--run", {out!r}])
raise AssertionError("jbilevel eval returned: a stopped multi-process run leaves at once")
"""


def test_out_of_memory_on_one_process_stops_both_with_its_reason(tmp_path):
    """Before, process 0 waited in its next collective until JAX's shutdown barrier gave up
    (5 minutes) and aborted both (status 134), and nothing wrote results.json (process 0
    writes it)."""
    path, out = tmp_path / "tiny.yaml", tmp_path / "run"
    path.write_text(CONFIG)
    done = _two_processes(ONE_PROCESS_OUT_OF_MEMORY.format(config=str(path), out=str(out)),
                          tmp_path / "jax_cache")
    for code, _, err in done:
        assert code == 3, err[-3000:]  # the stopped run's status, on both
    stopped, other = done[1][2], done[0][2]
    assert "step 6: out of device memory in the train step" in stopped
    assert "process 1 of 2 stopped: step 6: out of device memory in the train step" in other
    assert "process 0 cannot go on without it and leaves too (exit status 3)" in other
    record = json.loads((out / "results.json").read_text())
    assert record["interrupted"]["reason"] == "out_of_memory"
    assert record["interrupted"]["last_checkpoint"] == 4 and record["steps"] == 0
    assert sorted(os.listdir(out)) == sorted(  # no tmp file of either writer left behind
        ["checkpoints", "config.yaml", "metrics.jsonl", "results.json", "run.json", "tensorboard"])


def test_an_error_on_process_0_alone_in_eval_stops_both(tmp_path):
    """Process 0 hosts JAX's coordination service: it leaves after the other, with its
    traceback and status 1; the other names it and leaves with status 3."""
    path, out = tmp_path / "tiny.yaml", tmp_path / "run"
    path.write_text(CONFIG)
    (failed, _, failed_err), (code, _, err) = _two_processes(
        ONE_PROCESS_FAILS_IN_EVAL.format(config=str(path), out=str(out)), tmp_path / "cache")
    assert failed == 1 and code == 3, (failed_err[-3000:], err[-3000:])
    assert "OSError: the test split is unreadable on this host" in failed_err  # traceback
    assert ("process 0 of 2 stopped: OSError: the test split is unreadable on this host"
            in err)
    assert "process 1 cannot go on without it and leaves too (exit status 3)" in err


# A LoRA run of a built-in task over the shipped base, its params and adapters split over both
# processes' devices (fsdp=8), with online generation (each refresh samples through the
# adapters), then `jbilevel eval --run` on both: the adapters, gathered onto process 0 and
# written to adapter/, read back onto the mesh and decoded unmerged.
LORA_CONFIG = """\
task: {name: quality, base: instruct, options: {n_train: 48, n_val: 16, n_test: 16}}
theta: {kind: lora, rank: 4, alpha: 8.0, targets: [q_proj, v_proj, up_proj]}
method: {method: bmo, lr_theta: 0.01}
online: {every: 2, start: 0, fraction: 0.25, num_samples: 1, batch_size: 8, max_new_tokens: 4}
data: {length_buckets: 2}  # each process reads the buffer's buckets (allgathered) alike
mesh: {data: 1, fsdp: -1}
loop: {steps: 3, checkpoint_every: 0, progress: false}
batch_size: 16
val_batch_size: 16
eval_batch_size: 12
"""
TRAIN_THEN_EVAL = """\
import os, sys, time
import jax
jax.config.update("jax_num_cpu_devices", 4)
from jbilevel import cli, rundir
if os.environ["JBILEVEL_PROCESS_ID"] == "1":  # process 1 reads the new run directory late
    check = rundir.check_config
    rundir.check_config = lambda *a, **k: time.sleep(3) or check(*a, **k)
code = cli.main(["train", "--config", {config!r}, "--out", {out!r}])
sys.exit(code or cli.main(["eval", "--run", {out!r}]))
"""


def test_lora_run_and_its_evaluation_across_processes(tmp_path):
    """The run's adapter/ is the whole adapters (model/ is their exact merge into the float32
    base), its two refreshes logged every selected question's sample once, and the
    two-process final evaluation, `eval --run` on both processes and `eval --run` in one
    process with 8 devices give the same losses and answers. Process 1 reads the new run
    directory 3 s late: process 0 waits for it before writing the task's files there (it
    did not, and process 1 refused the directory as neither empty nor a run)."""
    from jbilevel import saved
    from jbilevel.models import load_adapter, load_pretrained, merge_lora

    path, out = tmp_path / "lora.yaml", tmp_path / "run"
    path.write_text(LORA_CONFIG)
    done = _two_processes(TRAIN_THEN_EVAL.format(config=str(path), out=str(out)),
                          tmp_path / "cache")
    for code, _, err in done:
        assert code == 0, err[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["online"] and result["theta"] == "lora"
    logged = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    for at in (0, 2):  # 12 of the 48 questions, one sample each (written by process 0 alone)
        rows = [r for r in logged if r["generated_at"] == at]
        assert len(rows) == len({r["id"] for r in rows}) == 12, at
    evaluated = json.loads((out / "eval.json").read_text())
    here = saved.evaluate_run(out)  # this process: the same 8 devices, one host
    assert evaluated["mesh"] == here["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    for k in ("val_loss", "test_loss"):
        np.testing.assert_allclose(evaluated[k], result[k], rtol=1e-6, err_msg=k)
        np.testing.assert_allclose(here[k], result[k], rtol=1e-6, err_msg=k)
    for k in ("val_accuracy", "test_accuracy", "test_corrupted"):
        assert evaluated[k] == here[k] == result[k], k
    _, base, config = load_pretrained(saved.load_config(out).model.path)
    lora = load_adapter(str(out / "adapter"), config)
    assert all(np.ptp(np.asarray(b)) > 0 for b in jax.tree.leaves(lora))  # trained, no zeros
    merged = merge_lora(base, lora, config)
    _, written, _ = load_pretrained(str(out / "model"))
    for (name, want), got in zip(jax.tree_util.tree_leaves_with_path(merged),
                                 jax.tree.leaves(written), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=str(name))

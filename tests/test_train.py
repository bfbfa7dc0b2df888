"""Trainer: sharded parity, exact resume after SIGKILL, restore onto another mesh, failures."""

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toy

from jbilevel import report, train
from jbilevel import sharding as sh
from jbilevel.checkpoint import Checkpointer

ONE = sh.MeshConfig(data=1, fsdp=1, tensor=1)
MESH_2x4 = sh.MeshConfig(data=2, fsdp=4, tensor=1)
MESH_222 = sh.MeshConfig(data=2, fsdp=2, tensor=2)
TESTS = Path(__file__).parent


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def _one_step(method, mesh_cfg, **overrides):
    train_set, val_set, _ = toy.problem()
    cfg, compiled, state_sh, init = toy.setup(method, mesh_cfg, **overrides)
    state = jax.jit(init, out_shardings=state_sh)()
    batch = toy.Batches(train_set, toy.B).__next__()
    val = toy.Batches(val_set, 16).__next__()
    if method == "bmo":
        state, metrics = compiled.train(state, batch, val)
    else:
        state, metrics = compiled.train(state, batch)
        state, hyper = compiled.hyper(state, {k: v for k, v in train_set.items()}, val)
        metrics = {**metrics, **hyper}
    return state, jax.device_get(metrics)


@pytest.mark.parametrize("method,overrides", [("bmo", {}), ("bds", {}),
                                              ("bds", {"omega_normalize": True,
                                                       "omega_optim": "sgd"})],
                         ids=["bmo", "bds", "bds-normalised-sgd"])
def test_one_step_parity_single_device_vs_2x4_mesh(method, overrides):
    """With omega_normalize the step's norm is taken over omega's shards as one vector: the
    sgd step has norm lr_omega on the mesh too."""
    single, m1 = _one_step(method, ONE, **overrides)
    sharded, m8 = _one_step(method, MESH_2x4, **overrides)
    assert sharded.theta["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    for a, b in zip(_leaves(single), _leaves(sharded), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for k in m1:
        np.testing.assert_allclose(m1[k], m8[k], rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(sharded.omega).max()) > 0  # omega moved: the hypergradient reached it
    if overrides.get("omega_normalize"):
        np.testing.assert_allclose(float(jnp.linalg.norm(sharded.omega)), 0.1, rtol=1e-5)


@pytest.mark.parametrize("method", ["bmo", "bds"])
def test_learns_clean_weights(method):
    state, step = toy.run_to(method, MESH_222, 120)
    _, _, good = toy.problem()
    s_N = np.asarray(jax.nn.softmax(state.omega))
    assert step == 120
    assert s_N[good].sum() > 0.9


def test_hyper_start_delays_the_first_hypergradient():
    # hyper_every 4, hyper_start 12: no hypergradient at steps 4 and 8, the first at step 12.
    before, _ = toy.run_to("bds", ONE, 11, hyper_start=12)
    after, _ = toy.run_to("bds", ONE, 12, hyper_start=12)
    assert float(jnp.abs(before.omega).max()) == 0.0
    assert float(jnp.abs(after.omega).max()) > 0.0


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    """Kill a run hard after its step-12 checkpoint; the resumed run ends bit-identical."""
    ckpt = tmp_path / "ckpt"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(TESTS)!r})
        import jax
        jax.config.update("jax_num_cpu_devices", 8)
        import toy
        from jbilevel import sharding as sh, train
        real_save = train.Checkpointer.save
        def save_then_die(self, step, *a, **k):
            out = real_save(self, step, *a, **k)
            if step == 12:
                self.wait()
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        train.Checkpointer.save = save_then_die
        toy.run_to("bds", sh.MeshConfig(data=2, fsdp=4, tensor=1), 20, {str(ckpt)!r}, 4)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    with Checkpointer(ckpt) as c:
        assert c.latest_step() == 12
    resumed, step = toy.run_to("bds", MESH_2x4, 20, ckpt, 4)
    straight, _ = toy.run_to("bds", MESH_2x4, 20)
    assert step == 20
    for a, b in zip(_leaves(resumed), _leaves(straight), strict=True):
        np.testing.assert_array_equal(a, b)


def test_restore_onto_another_mesh(tmp_path):
    toy.run_to("bmo", MESH_2x4, 8, tmp_path / "c", 8)
    state, step = toy.run_to("bmo", MESH_222, 8, tmp_path / "c", 8)  # nothing left to run
    reference, _ = toy.run_to("bmo", MESH_2x4, 8)
    assert step == 8
    assert state.theta["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    for a, b in zip(_leaves(state), _leaves(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_sigterm_writes_checkpoint_and_exits_143(tmp_path):
    ckpt = tmp_path / "ckpt"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(TESTS)!r})
        import toy
        from jbilevel import sharding as sh, train
        calls = []
        class Source(toy.Batches):
            def __next__(self):
                calls.append(1)
                if len(calls) == 7:
                    os.kill(os.getpid(), signal.SIGTERM)  # preemption notice mid-run
                return super().__next__()
        toy.Batches = Source
        try:
            toy.run_to("sft", sh.MeshConfig(data=-1), 1000, {str(ckpt)!r}, 0)
        except train.Preempted as stop:
            print("STOPPED AT", stop.step, "-", stop)
            raise
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert proc.returncode == 143, proc.stderr.decode()[-3000:]
    assert b"Traceback" not in proc.stderr  # a SystemExit: no traceback
    out = proc.stdout.decode()
    assert f"STOPPED AT 7 - interrupted by SIGTERM at step 7: its checkpoint is {ckpt}/7" in out
    with Checkpointer(ckpt) as c:
        assert c.all_steps() == [7]


def _ctrl_c_at(batch: int, presses: int, monkeypatch) -> list:
    """toy.Batches sends this process ``presses`` SIGINTs in a row when its ``batch``-th batch
    is read; the calls made."""
    calls = []

    class Source(toy.Batches):
        def __next__(self):
            calls.append(1)
            if len(calls) == batch:
                for _ in range(presses):
                    os.kill(os.getpid(), signal.SIGINT)
            return super().__next__()

    monkeypatch.setattr(toy, "Batches", Source)
    return calls


def test_ctrl_c_stops_at_the_step_with_its_checkpoint(tmp_path, monkeypatch, capsys):
    _ctrl_c_at(7, 1, monkeypatch)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(train.Interrupted) as stop:
        toy.run_to("sft", sh.MeshConfig(data=-1), 1000, tmp_path / "ckpt", 0)
    assert isinstance(stop.value, KeyboardInterrupt) and stop.value.step == 7
    assert str(stop.value) == (f"interrupted by Ctrl-C (SIGINT) at step 7: its checkpoint is "
                               f"{tmp_path / 'ckpt' / '7'}; rerun the same command to resume")
    assert ("warning: Ctrl-C: stopping after this step, once its checkpoint is written (Ctrl-C "
            "again stops at once, without it)") in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # the loop's handlers are gone
    with Checkpointer(tmp_path / "ckpt") as c:
        assert c.all_steps() == [7]


def test_a_process_that_ignores_ctrl_c_goes_on_ignoring_it(tmp_path, monkeypatch):
    _ctrl_c_at(3, 1, monkeypatch)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a shell's background job
    try:
        _, step = toy.run_to("sft", sh.MeshConfig(data=-1), 6, tmp_path / "ckpt", 0)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert step == 6  # the Ctrl-C at step 3 was ignored


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path, monkeypatch):
    calls = _ctrl_c_at(7, 2, monkeypatch)  # two Ctrl-Cs in a row mid-run
    with pytest.raises(KeyboardInterrupt) as stop:
        toy.run_to("sft", sh.MeshConfig(data=-1), 1000, tmp_path / "ckpt", 0)
    assert not isinstance(stop.value, train.Interrupted)
    assert len(calls) == 7  # it stopped inside the step, not at the end of it
    with Checkpointer(tmp_path / "ckpt") as c:
        assert c.all_steps() == []  # nothing saved: the steps since the last checkpoint are lost


def test_non_finite_loss_stops_with_message_and_keeps_checkpoint(tmp_path):
    train_set, val_set, _ = toy.problem()
    cfg, compiled, state_sh, init = toy.setup("sft", ONE)
    train_set = dict(train_set, y=train_set["y"].copy())
    train_set["y"][5] = np.nan
    data = toy.Batches(train_set, toy.N)  # every batch holds the NaN example
    with Checkpointer(tmp_path / "c") as ckpt:
        ckpt.save(0, jax.jit(init, out_shardings=state_sh)(),
                  {"step": 0, "data": {"train": data.state()}})
        ckpt.wait()
        state = jax.jit(init, out_shardings=state_sh)()
        loop = train.LoopConfig(steps=10, checkpoint_every=2, progress=False)
        with pytest.raises(train.NonFiniteLossError,
                           match=r"step 1: non-finite .*loss=nan.*last good: .* step 0"):
            train.run(compiled, cfg, loop, state, data, iter(()), ckpt=ckpt)
        assert ckpt.all_steps() == [0]


class _FailedResult:
    """A result of a program that failed after it was dispatched: reading it raises the
    program's error, as jax raises an asynchronous computation's error."""

    def __init__(self, error):
        self._error = error

    def copy_to_host_async(self):
        pass

    def __array__(self, *args, **kwargs):
        raise self._error


@pytest.mark.parametrize("raised", ["at dispatch", "when read"])
@pytest.mark.parametrize("phase", ["train step", "hypergradient step"])
def test_out_of_memory_names_the_phase_and_its_settings_and_keeps_the_checkpoint(tmp_path,
                                                                                 phase, raised):
    """XLA's RESOURCE_EXHAUSTED in a step (at the third train or hypergradient call, raised
    as XLA raises it: by the call, or, for a program that ran asynchronously, when its
    results are read, after the loop has dispatched the next step's phases) stops the run
    with a message naming the step, the phase, the settings that lower its memory and the
    last checkpoint, which stays for a resume; another runtime error keeps its own type."""
    train_set, val_set, _ = toy.problem()
    cfg, compiled, state_sh, init = toy.setup("bds", ONE, hyper_every=1)
    which = "train" if phase == "train step" else "hyper"

    def run_raising(error, directory):
        calls = {"train": 0, "hyper": 0}

        def failing(name, step):
            def call(*args):
                calls[name] += 1
                if name == which and calls[name] == 3:
                    if raised == "at dispatch":
                        raise error
                    state, metrics = step(*args)
                    return state, {**metrics, "loss": _FailedResult(error)}
                return step(*args)
            return call

        steps = dataclasses.replace(compiled, train=failing("train", compiled.train),
                                    hyper=failing("hyper", compiled.hyper))
        with Checkpointer(directory) as ckpt:
            loop = train.LoopConfig(steps=10, checkpoint_every=2, progress=False)
            try:
                train.run(steps, cfg, loop, jax.jit(init, out_shardings=state_sh)(),
                          toy.Batches(train_set, toy.B), toy.Batches(val_set, 16),
                          hyper_batches=toy.Batches(train_set, toy.N), ckpt=ckpt)
            finally:
                assert ckpt.all_steps() == [2]

    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL: another error"):
        run_raising(jax.errors.JaxRuntimeError("INTERNAL: another error"), tmp_path / "a")
    with pytest.raises(train.OutOfMemoryError) as e:
        run_raising(jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB."),
            tmp_path / "b")
    at = 3  # the step whose numbers metrics.jsonl would have logged (the hypergradient's too)
    hint = "method.train_chunk" if which == "train" else "method.hyper_chunk"
    assert re.fullmatch(
        rf"step {at}: out of device memory in the {phase} \(RESOURCE_EXHAUSTED: Out of memory "
        rf"while trying to allocate 1.00GiB.\)\. The run stopped; .*\(last: .*b step 2\).* "
        rf"For the {phase}: {hint} .*scripts/compile_check.py .*", str(e.value)), str(e.value)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", ["bmo", "bds"])
def test_two_processes_equal_one(tmp_path, method):
    """The same run as 2 local processes (4 CPU devices each) and as 1 process (8)."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import jax
        jax.config.update("jax_num_cpu_devices", 4)
        from jbilevel import distributed
        assert distributed.initialize()
        import numpy as np
        from jax.experimental import multihost_utils
        import toy
        from jbilevel import sharding as sh
        state, step = toy.run_to({method!r}, sh.MeshConfig(data=2, fsdp=4, tensor=1), 8)
        leaves = [np.asarray(multihost_utils.process_allgather(x, tiled=True))
                  for x in jax.tree.leaves(state)]
        if jax.process_index() == 0:
            np.savez({str(tmp_path / "out.npz")!r}, *leaves)
        """
    )
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, JBILEVEL_COORDINATOR=f"127.0.0.1:{port}",
                   JBILEVEL_NUM_PROCESSES="2", JBILEVEL_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-3000:]
    multi = np.load(tmp_path / "out.npz")
    single, _ = toy.run_to(method, MESH_2x4, 8)
    for i, want in enumerate(_leaves(single)):
        np.testing.assert_allclose(multi[f"arr_{i}"], want, rtol=1e-5, atol=1e-6)


def _tensorboard_events(path):
    """The events of a TensorBoard event file (TFRecord framing: length, its CRC, the record,
    its CRC)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    data, at, events = path.read_bytes(), 0, []
    while at < len(data):
        (n,) = struct.unpack("<Q", data[at:at + 8])
        events.append(Event.FromString(data[at + 12:at + 12 + n]))
        at += 12 + n + 4
    return events


def test_a_resumed_run_has_tensorboard_hide_the_steps_it_logs_again(tmp_path):
    """A run resumed from step 2's checkpoint logs step 3 again: its event file opens with
    TensorBoard's purge marker at step 3 (a session start, after which TensorBoard drops
    the earlier files' events from that step on), before the new step 3. The second session
    opens within the same second as the first: its file must neither overwrite the first's nor
    sort before it."""
    log = train.MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.write(step, {"loss": float(step)})
    log.close()
    resumed = train.MetricsLog(tmp_path, resumed_from=2)
    resumed.write(3, {"loss": 30.0})
    resumed.close()
    first, second = sorted((tmp_path / "tensorboard").iterdir())
    assert not any(e.HasField("session_log") for e in _tensorboard_events(first))
    logged = [("start", e.step) if e.HasField("session_log") else
              (e.summary.value[0].simple_value, e.step)
              for e in _tensorboard_events(second) if e.HasField("session_log")
              or e.HasField("summary")]
    assert logged == [("start", 3), (30.0, 3)]


def test_metrics_and_results_are_strict_json(tmp_path):
    """A non-finite number (a metric with nothing to measure) is written as null, which strict
    JSON readers accept where they refuse the bare NaN token Python writes by default, and
    read back as NaN."""

    def strict(text):
        return json.loads(text, parse_constant=lambda token: pytest.fail(f"not JSON: {token}"))

    log = train.MetricsLog(tmp_path, tensorboard=False)
    log.write(1, {"loss": 0.5, "online_gen_benign_accuracy": float("nan")})
    log.write(2, {"loss": float("inf")})
    log.close()
    path = tmp_path / "metrics.jsonl"
    assert [strict(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 0.5, "online_gen_benign_accuracy": None},
        {"step": 2, "loss": None}]
    first = report.read_metrics(path)[0]
    assert first["loss"] == 0.5 and math.isnan(first["online_gen_benign_accuracy"])
    assert report.trim_metrics(path, 1) == 1  # rewritten as strictly
    assert strict(path.read_text()) == {"step": 1, "loss": 0.5,
                                        "online_gen_benign_accuracy": None}
    assert strict(report.to_json({"a": [1.0, float("-inf"), {"b": float("nan")}], "c": "x"})
                  ) == {"a": [1.0, None, {"b": None}], "c": "x"}

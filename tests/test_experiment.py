"""End to end on the built-in quality task with a tiny model: train, resume, report, CLI."""

import csv
import json
import os
import signal

import jax
import pytest

from jbilevel import cli, experiment, train
from jbilevel.algorithms import MethodConfig

TINY = dict(
    task=experiment.TaskConfig(base="scratch", options={"n_train": 64, "n_val": 16,
                                                        "n_test": 16}),
    model=experiment.ModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
    batch_size=16, val_batch_size=16, eval_batch_size=16,
)


@pytest.mark.parametrize("method", ["bds", "mix"])
def test_run_writes_report_and_resumes(tmp_path, method, monkeypatch):
    cfg = experiment.ExperimentConfig(
        **TINY, method=MethodConfig(method=method, hyper_every=3),
        loop=train.LoopConfig(steps=6, log_every=3, checkpoint_every=3, progress=False,
                              eval_every=3))
    scored = []  # the splits the final evaluation takes a loss pass over
    mean_loss = experiment.mean_loss
    monkeypatch.setattr(experiment, "mean_loss", lambda loss, params, split, *args, **kw: (
        scored.append(len(split)) or mean_loss(loss, params, split, *args, **kw)))
    result = experiment.run(cfg, tmp_path)
    assert result["steps"] == 6 and result["test_n"] == 16
    assert 0.0 <= result["test_accuracy"] <= 1.0
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    # the validation loss is the loop's at the last step, not a second pass: the test split's
    assert result["val_loss"] == records[-1]["eval_val_loss"] and scored == [16]
    if method == "bds":  # the weights scored along the run; the last score is the final one
        assert 0.0 <= records[0]["eval_weight_auroc"] <= 1.0
        for key in ("weight_auroc", "weight_mass_on_good"):
            assert records[-1][f"eval_{key}"] == pytest.approx(result[key], rel=1e-6)
        assert records[0]["eval_weight_mass_on_good"] != records[-1]["eval_weight_mass_on_good"]
    else:  # mix learns no weights
        assert "eval_weight_auroc" not in records[-1] and "eval_val_loss" in records[-1]
    with open(tmp_path / "weights.csv") as f:
        rows = list(csv.DictReader(f))
    n = 64 if method == "bds" else 80  # mix trains on train + validation
    assert [int(r["id"]) for r in rows] == list(range(n))
    for name in ("results.json", "curves.png", "test_predictions.jsonl", "model/config.json",
                 "model/model.safetensors", "config.yaml"):
        assert (tmp_path / name).exists(), name
    if method == "bds":
        assert 0.0 <= result["weight_auroc"] <= 1.0
        assert (tmp_path / "weights.png").exists() and (tmp_path / "curated.jsonl").exists()
        assert any(abs(float(r["weight"]) - 1.0) > 1e-7 for r in rows)  # omega moved
    # The checkpoint holds the run's time so far; a resumed run's train_seconds counts it (the
    # record is set to 1000 s here so that no real session time could pass for it).
    meta_file = tmp_path / "checkpoints" / "6" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    assert 0.0 < meta["seconds"] <= result["train_seconds"]
    meta_file.write_text(json.dumps({**meta, "seconds": 1000.0}))
    # A second run resumes from the step-6 checkpoint: nothing left to train, same answer.
    scored.clear()
    again = experiment.run(cfg, tmp_path)
    assert again["steps"] == 6 and again["val_loss"] == pytest.approx(result["val_loss"])
    assert len(scored) == 2  # nothing trained, nothing evaluated: the final evaluation's own
    assert 1000.0 < again["train_seconds"] < 1000.0 + result["train_seconds"] + 60.0


def test_cli_train_config_and_errors(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(
        "task:\n  options: {n_train: 32, n_val: 16, n_test: 16}\n"
        "model: {hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}\n"
        "method: {method: sft}\nbatch_size: 16\nval_batch_size: 16\neval_batch_size: 16\n")
    code = cli.main(["train", "--config", str(path), "--out", str(tmp_path / "o"),
                     "loop.steps=2", "loop.progress=false"])
    assert code == 0
    assert json.loads((tmp_path / "o" / "results.json").read_text())["steps"] == 2
    assert cli.main(["train", "--config", str(path), "loop.stepz=2"]) == 2
    assert "unknown key 'loop.stepz'" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(path), "method.method=adam"]) == 2
    assert "method.method must be one of" in capsys.readouterr().err


def test_hypergrad_signal_script_on_a_finished_run(tmp_path, capsys):
    import _llm

    script = _llm.script("hypergrad_signal")
    cfg = experiment.ExperimentConfig(
        **TINY, method=MethodConfig(method="mix"),
        loop=train.LoopConfig(steps=2, log_every=1, checkpoint_every=0, progress=False))
    experiment.run(cfg, tmp_path)
    capsys.readouterr()
    script.main([str(tmp_path), "--ridge", "10", "--rows", "16", "--chunk", "32"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{tmp_path}: 64 training examples, 45 clean"
    rows = [line.split("|")[1:-1] for line in out if line.startswith("| 1")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("10", "16")]
    assert all(0.0 <= float(r[2]) <= 1.0 for r in rows)


@pytest.mark.parametrize("signum, raised, reason, by", [
    (signal.SIGTERM, train.Preempted, "sigterm", "SIGTERM"),
    (signal.SIGINT, train.Interrupted, "sigint", "Ctrl-C (SIGINT)"),  # a first Ctrl-C
])
def test_sigterm_marks_the_run_interrupted_and_writes_no_report(tmp_path, monkeypatch, capsys,
                                                                signum, raised, reason, by):
    from jbilevel.data import Batcher

    real, calls = Batcher.__next__, []

    def signalled(self):  # the preemption notice arrives while step 2's batch is read
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signum)
        return real(self)

    monkeypatch.setattr(Batcher, "__next__", signalled)
    cfg = experiment.ExperimentConfig(
        **TINY, method=MethodConfig(method="sft"),
        loop=train.LoopConfig(steps=50, log_every=1, checkpoint_every=0, progress=False))
    with pytest.raises(raised) as stop:
        experiment.run(cfg, tmp_path)
    assert stop.value.step == 2
    if raised is train.Preempted:  # SystemExit(143); Interrupted: a KeyboardInterrupt
        assert stop.value.code == 143
    said = "warning: Ctrl-C: stopping after this step, once its checkpoint is written"
    assert (said in capsys.readouterr().err) == (signum == signal.SIGINT)
    result = json.loads((tmp_path / "results.json").read_text())
    assert {k: result[k] for k in ("method", "online", "task", "theta", "n_train", "steps",
                                   "steps_planned")} == {
        "method": "sft", "online": False, "task": "quality", "theta": "full", "n_train": 64,
        "steps": 2, "steps_planned": 50}
    assert result["interrupted"] == {
        "reason": reason, "last_checkpoint": 2,
        "message": f"interrupted by {by} at step 2: its checkpoint is "
                   f"{tmp_path / 'checkpoints' / '2'}; rerun the same command to resume"}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["2"]
    for name in ("model", "weights.csv", "weights.npy", "test_predictions.jsonl", "curves.png"):
        assert not (tmp_path / name).exists(), name  # nothing that looks like a finished run


@pytest.mark.parametrize("method", ["sft", "bmo"])
def test_every_record_counts_the_tokens_trained(tmp_path, method):
    """A batch of every training row: each step trains on their tokens (bmo: with its
    validation batch's, every validation row), padding left out; tokens_per_s is their
    running rate."""
    from jbilevel.console import Console

    cfg = experiment.ExperimentConfig(
        **{**TINY, "batch_size": 64}, method=MethodConfig(method=method),
        loop=train.LoopConfig(steps=2, log_every=1, progress=False))
    experiment.run(cfg, tmp_path)
    task = experiment.load_data(cfg, Console(verbosity=0))
    want = int(task.train.length_N.sum()) + (
        int(task.validation.length_N.sum()) if method == "bmo" else 0)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in records] == [want, want]
    assert want < 64 * task.train.max_len  # the batch's padding is not counted
    assert all(r["tokens_per_s"] > 0 for r in records)


@pytest.mark.parametrize("eval_every", [0, 2])
def test_the_evaluation_loss_passes_share_their_programs(tmp_path, eval_every):
    """The loop's validation pass and the final evaluation's validation and test passes are
    one jitted program (the same loss, the same batch shapes): compiled once, then found."""
    import io

    from jbilevel.console import Console

    cfg = experiment.ExperimentConfig(
        **TINY, method=MethodConfig(method="sft"),
        loop=train.LoopConfig(steps=4, eval_every=eval_every, progress=False))
    out = io.StringIO()
    experiment.run(cfg, tmp_path, console=Console(stream=out))
    log = out.getvalue()
    assert log.count("compiled the validation loss pass in") == 1, log
    assert "compiling the test loss pass ...\nfound the test loss pass compiled already" in log
    assert "compiled the test loss pass" not in log, log


def test_ctrl_c_outside_the_training_loop_ends_the_command_with_one_line(tmp_path, monkeypatch,
                                                                        capsys):
    stop = [KeyboardInterrupt()]  # Ctrl-C while loading, compiling or evaluating

    def interrupted(*args, **kwargs):
        raise stop[0]

    monkeypatch.setattr(experiment, "run", interrupted)
    assert cli.main(["train", "--out", str(tmp_path), "--compile-cache", "none"]) == 130
    err = capsys.readouterr().err
    assert err.endswith("jbilevel train: interrupted (Ctrl-C); rerun the same command to "
                        "resume from the newest checkpoint\n") and "Traceback" not in err
    # in the training loop: the run has said where it stopped and what it saved
    stop[0] = train.Interrupted(5, str(tmp_path / "checkpoints" / "5"))
    assert cli.main(["train", "--out", str(tmp_path), "--compile-cache", "none"]) == 130
    assert "interrupted (Ctrl-C)" not in capsys.readouterr().err


def test_rounded_away_share_is_the_share_of_weights_a_step_leaves_as_they_were():
    import jax.numpy as jnp

    # bfloat16 keeps 8 significant bits: 1.0 ignores a step of 1e-3 (half its spacing is
    # 2**-8), 2**-10 and 0 take it; float32 takes it everywhere
    theta = {"a": jnp.array([1.0, 2.0**-10, 0.0], jnp.bfloat16),
             "b": jnp.array([4.0], jnp.bfloat16)}
    assert experiment.rounded_away_share(theta, 1e-3) == 0.5
    assert experiment.rounded_away_share(jax.tree.map(lambda x: x.astype(jnp.float32), theta),
                                         1e-3) == 0.0


def test_bfloat16_weights_that_round_the_steps_away_are_warned_of(tmp_path, capsys):
    args = ["-q", "method.method=sft", "task.options={n_train: 16, n_val: 8, n_test: 8}",
            "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
            "model.intermediate_size=64", "loop.steps=1", "batch_size=8", "val_batch_size=8",
            "eval_batch_size=8", "method.lr_theta=1e-5"]
    assert cli.main(["train", "--out", str(tmp_path / "bf16"), *args,
                     "model.param_dtype=bfloat16"]) == 0
    err = capsys.readouterr().err
    assert "warning: the trained weights are bfloat16: a step of lr_theta=1e-05 leaves " in err
    share = int(err.split("lr_theta=1e-05 leaves ")[1].split("%")[0])
    assert 50 <= share <= 100  # a random init's weights (std 0.02) ignore a 1e-5 step
    assert "Keep float32 master weights (model.param_dtype=float32 with" in err


def test_float32_weights_are_not_warned_of():
    import io

    import jax.numpy as jnp

    from jbilevel.console import Console

    out = io.StringIO()
    theta = {"w": jnp.full((4, 4), 0.05, jnp.float32)}
    experiment._warn_if_steps_round_away(theta, 1e-5, Console(stream=out))
    assert out.getvalue() == ""
    experiment._warn_if_steps_round_away(jax.tree.map(lambda x: x.astype(jnp.bfloat16), theta),
                                         1e-5, Console(stream=out))
    assert "a step of lr_theta=1e-05 leaves 100% of them unchanged" in out.getvalue()

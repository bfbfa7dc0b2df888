"""A run directory belongs to one run: what it records, what resumes, what is refused."""

import json

import _llm
import pytest

from jbilevel import cli, config, experiment, rundir
from jbilevel.console import QUIET, Console


def _cfg(*overrides):
    return config.load(experiment.ExperimentConfig, overrides=list(overrides))


def test_saved_config_lists_only_what_applies():
    files = rundir.applied(_cfg("data.train=t.jsonl", "data.validation=v.jsonl",
                                "model.path=/m", "method.method=bmo"))
    assert "task" not in files and "online" not in files
    assert set(files["model"]).isdisjoint(
        {"family", "hidden_size", "num_layers", "num_heads", "intermediate_size"})
    assert files["theta"] == {"kind": "full"}
    assert "lam" in files["method"] and "hypergrad" not in files["method"]
    assert "hyper_batch_size" not in files and "steps_per_epoch" in files["loop"]
    built_in = rundir.applied(_cfg("method.method=bds", "theta.kind=lora"))
    assert "data" not in built_in and built_in["task"]["name"] == "quality"
    assert built_in["model"]["hidden_size"] == 128 and built_in["theta"]["rank"] == 16
    assert "lam" not in built_in["method"] and "hypergrad" in built_in["method"]
    assert "steps_per_epoch" not in built_in["loop"]
    sft = rundir.applied(_cfg("method.method=sft"))
    assert set(sft["method"]).isdisjoint({"lr_omega", "weighting", "lam", "hypergrad"})
    assert "val_batch_size" not in sft


def test_config_yaml_round_trips_to_the_same_run(tmp_path):
    cfg = _cfg("data.train=t.jsonl", "data.validation=v.jsonl", "model.path=/m",
               "method.lr_theta=1e-5", "theta.kind=lora", "theta.targets=[q_proj]")
    rundir.record(tmp_path, cfg, {"data": {}, "model": None}, "llama (test)")
    text = (tmp_path / "config.yaml").read_text()
    assert text.startswith(f"# jbilevel train --config {tmp_path / 'config.yaml'} --out "
                           f"{tmp_path}\n")
    assert "# model: llama (test)\n" in text and "task:" not in text
    back = config.load(experiment.ExperimentConfig, tmp_path / "config.yaml")
    assert rundir.applied(back) == rundir.applied(cfg) and rundir.differences(back, cfg) == {}
    assert rundir.check_config(tmp_path, cfg) is True


def test_resume_allows_only_the_documented_keys(tmp_path):
    cfg = _cfg("method.method=bds")
    assert rundir.check_config(tmp_path / "new", cfg) is False  # nothing there yet
    (tmp_path / "empty").mkdir()
    assert rundir.check_config(tmp_path / "empty", cfg) is False
    rundir.record(tmp_path / "run", cfg, {"data": {}, "model": None})
    same = _cfg("method.method=bds", "loop.steps=5000", "loop.progress=false", "mesh.fsdp=2",
                "eval_batch_size=10", "model.remat=true", "method.train_chunk=16",
                "method.hyper_chunk=8", "method.lam=0.9")  # lam: not bds's
    assert rundir.check_config(tmp_path / "run", same) is True
    with pytest.raises(rundir.RunDirError) as e:
        rundir.check_config(tmp_path / "run", _cfg("method.method=bmo", "batch_size=32"))
    message = str(e.value)
    assert '  batch_size: 64 in the directory, 32 now\n' in message
    assert '  method.method: "bds" in the directory, "bmo" now\n' in message
    assert "settings that apply to only one of the two runs: " in message
    assert f"--out {tmp_path / 'run'}_2" in message and f"rm -r {tmp_path / 'run'}" in message
    for key in rundir.RESUMABLE:
        assert key in message


def test_a_directory_that_is_not_a_run_is_refused(tmp_path):
    # a run that stopped before it wrote config.yaml (bad data) may leave its compilation
    # cache behind (jbilevel train keeps it in --out): that directory is still a new run
    (tmp_path / rundir.COMPILE_CACHE).mkdir()
    assert rundir.check_config(tmp_path, _cfg()) is False
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(rundir.RunDirError, match=r"holds no jbilevel run \(no config.yaml\)"):
        rundir.check_config(tmp_path, _cfg())


def test_other_data_at_the_same_path_is_refused_before_writing(tmp_path):
    model = _llm.model_dir(tmp_path)
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    rows = [json.dumps({"question": f"q{i}", "response": f"r{i}"}) for i in range(4)]
    train.write_text("\n".join(rows) + "\n")
    val.write_text(rows[0] + "\n")
    cfg = _cfg(f"data.train={train}", f"data.validation={val}", f"model.path={model}",
               "data.max_len=64")
    out = tmp_path / "run"
    task = experiment.load_data(cfg, Console(QUIET))
    rundir.record(out, cfg, rundir.fingerprint(task, str(model)))
    recorded = (out / "run.json").read_text()
    train.write_text("\n".join(rows[:3]) + "\n")  # a row fewer, same path
    with pytest.raises(rundir.RunDirError, match=r"trained on other contents of data.train "
                                                 r".*examples then: \{'train': 4, "):
        experiment.run(cfg, out, console=Console(QUIET))
    assert (out / "run.json").read_text() == recorded and sorted(
        p.name for p in out.iterdir()) == ["config.yaml", "run.json"]


def test_steps_below_the_newest_checkpoint_are_refused(tmp_path):
    cfg = _cfg("task.base=scratch", "task.options={n_train: 16, n_val: 8, n_test: 8}",
               "loop.steps=20")
    task = experiment.load_data(cfg, Console(QUIET))
    rundir.record(tmp_path, cfg, rundir.fingerprint(task, None))
    (tmp_path / "checkpoints" / "20").mkdir(parents=True)
    (tmp_path / "checkpoints" / "10.orbax-checkpoint-tmp-1").mkdir()
    assert rundir.latest_checkpoint(tmp_path) == 20
    with pytest.raises(rundir.RunDirError, match=r"newest checkpoint is at step 20, beyond "
                                                 r"loop.steps=10; set loop.steps >= 20"):
        experiment.run(config.replace(cfg, ["loop.steps=10"]), tmp_path,
                       console=Console(QUIET))


def test_non_finite_loss_marks_the_run_interrupted(tmp_path, capsys):
    """A diverging run writes only results.json, with the reason and the last good
    checkpoint, and exits with status 3; its checkpoint stays for a resume."""
    args = ["train", "--out", str(tmp_path), "-q", "method.method=sft", "method.lr_theta=1e30",
            "method.clip=0", "task.options={n_train: 16, n_val: 8, n_test: 8}",
            "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
            "model.intermediate_size=64", "loop.steps=6", "loop.checkpoint_every=1",
            "batch_size=8", "val_batch_size=8", "eval_batch_size=8"]
    assert cli.main(args) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "warning: run interrupted (non_finite_loss): step " in err
    result = json.loads((tmp_path / "results.json").read_text())
    reason = result["interrupted"]
    assert reason["reason"] == "non_finite_loss" and ", loss=nan" in reason["message"]
    assert reason["last_checkpoint"] == rundir.latest_checkpoint(tmp_path) >= 1
    assert "val_loss" not in result and not (tmp_path / "model").exists()
    assert result["data"]["train"]["n_kept"] == 16


def test_out_of_memory_in_the_final_evaluation_stops_with_the_settings_then_resumes(
        tmp_path, capsys, monkeypatch):
    """The final evaluation out of device memory (XLA's RESOURCE_EXHAUSTED, raised as XLA
    raises it): results.json records the reason with the final checkpoint, the warning names
    the settings that lower the evaluation's memory, exit status 3; the same command with a
    smaller eval_batch_size then evaluates the saved final state without training again."""
    import jax

    args = ["train", "--out", str(tmp_path), "-q", "method.method=sft",
            "task.options={n_train: 16, n_val: 8, n_test: 8}", "model.hidden_size=32",
            "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
            "loop.steps=2", "batch_size=8", "val_batch_size=8", "eval_batch_size=8"]
    score_splits = experiment.score_splits

    def out_of_memory(*a, **k):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                         "allocate 9.00GiB.")

    monkeypatch.setattr(experiment, "score_splits", out_of_memory)
    assert cli.main(args) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert ("warning: run interrupted (out_of_memory): step 2: out of device memory in the "
            "final evaluation (RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
            "9.00GiB.)") in err
    assert "For the final evaluation: eval_batch_size (prompts per decoding batch)" in err
    stopped = json.loads((tmp_path / "results.json").read_text())
    reason = stopped["interrupted"]
    assert reason["reason"] == "out_of_memory" and reason["last_checkpoint"] == 2
    assert "val_loss" not in stopped and not (tmp_path / "model").exists()
    monkeypatch.setattr(experiment, "score_splits", score_splits)
    assert cli.main([*args[:-1], "eval_batch_size=4"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["interrupted"] is None and result["resumed_from"] == 2
    assert result["val_loss"] > 0 and (tmp_path / "model" / "config.json").exists()


def test_out_of_memory_while_initialising_the_state_is_one_message(tmp_path, capsys,
                                                                     monkeypatch):
    """A train state too large for the devices (XLA's RESOURCE_EXHAUSTED before any step) is
    a setting to change: one message with the state's size a device and the settings that
    shrink it, exit status 2, no traceback; nothing else is wrong with the directory."""
    import jax

    from jbilevel import train

    def out_of_memory(*a, **k):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                         "allocate 30.00GiB.")

    monkeypatch.setattr(train, "restore_or_init", out_of_memory)
    args = ["train", "--out", str(tmp_path), "-q", "method.method=sft",
            "task.options={n_train: 16, n_val: 8, n_test: 8}", "model.hidden_size=32",
            "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
            "loop.steps=2", "batch_size=8", "val_batch_size=8", "eval_batch_size=8"]
    assert cli.main(args) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert ("jbilevel train: error: out of device memory while initialising the train state "
            "(RESOURCE_EXHAUSTED: Out of memory while trying to allocate 30.00GiB.); the train "
            "state (parameters, optimizer state, weights) takes ") in err
    assert ("GiB a device on this mesh. Lower it with more devices in mesh.fsdp (each holds "
            "1/fsdp of the state), or theta.kind=lora (the base frozen") in err
    assert not (tmp_path / "results.json").exists()


def test_per_device_bytes_counts_one_shard_of_each_leaf():
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from jbilevel import sharding

    mesh = jax.make_mesh((8,), ("fsdp",))
    tree = {"split": jax.ShapeDtypeStruct((8, 4), jnp.float32),  # 128 bytes, a (1, 4) shard: 16
            "whole": jax.ShapeDtypeStruct((3,), jnp.bfloat16)}  # replicated: 6 bytes
    shardings = {"split": NamedSharding(mesh, PartitionSpec("fsdp")),
                 "whole": NamedSharding(mesh, PartitionSpec())}
    assert sharding.per_device_bytes(tree, shardings) == (128 + 6, 22)  # total, a device


def test_demo_refusal_names_the_demo_directory(tmp_path):
    from jbilevel import demo

    cfg = demo.demo_config("bds", steps=8)
    rundir.record(tmp_path / "bds", cfg, {"data": {}, "model": None})
    with pytest.raises(rundir.RunDirError) as e:
        demo.run(tmp_path, methods=("mix", "bds"), steps=16, console=Console(QUIET))
    assert str(e.value).startswith(f"--out {tmp_path} holds a different run ({tmp_path / 'bds'})")
    assert f"(--out {tmp_path}_2)" in str(e.value) and f"(rm -r {tmp_path})" in str(e.value)
    assert not (tmp_path / "mix").exists()  # refused before the first method ran


def test_a_moved_run_resumes_and_another_task_is_refused_before_writing(tmp_path):
    """A built-in task's run records its files by path (DIR/data/*.jsonl): after the directory
    moves, the command that started it resumes it (the files are compared by content); a
    different task seed is refused before the old run's files are written over."""
    cfg = _cfg("task.options={n_train: 16, n_val: 8, n_test: 8}", "method.method=sft",
               "loop.steps=2", "loop.checkpoint_every=1", "batch_size=8", "val_batch_size=8",
               "eval_batch_size=8")
    experiment.run(cfg, tmp_path / "a", console=Console(QUIET))
    (tmp_path / "a").rename(tmp_path / "b")
    files = {p.name: p.read_bytes() for p in (tmp_path / "b" / "data").iterdir()}
    other = config.replace(cfg, ["task.seed=1"])
    with pytest.raises(rundir.RunDirError, match=r"trained on other data: task 'quality' with "
                                                 r"seed 1 .* than its data/\{train,validation,"
                                                 r"test\}.jsonl"):
        experiment.run(other, tmp_path / "b", console=Console(QUIET))
    assert {p.name: p.read_bytes() for p in (tmp_path / "b" / "data").iterdir()} == files
    result = experiment.run(config.replace(cfg, ["loop.steps=3"]), tmp_path / "b",
                            console=Console(QUIET))
    assert result["resumed_from"] == 2 and result["steps"] == 3
    recorded = (tmp_path / "b" / "config.yaml").read_text()  # the new place from now on
    assert str(tmp_path / "b" / "data" / "train.jsonl") in recorded
    assert str(tmp_path / "a") not in recorded


def test_demo_with_another_task_option_is_refused_before_any_method_runs(tmp_path):
    """`--corruption` changes only the task's files (their paths stay): the demo compares the
    files before it starts a method, and leaves the old ones as they were."""
    from jbilevel import demo

    cfg = demo.demo_config("mix", steps=8)
    experiment.resolve(cfg, tmp_path / "mix", write=True)
    rundir.record(tmp_path / "mix", experiment.resolve(cfg, tmp_path / "mix"),
                  {"data": {}, "model": None})
    files = (tmp_path / "mix" / "data" / "train.jsonl").read_bytes()
    with pytest.raises(rundir.RunDirError, match=r"task 'quality' with seed 0 and options "
                                                 r"\{.*'corruption': 'style'"):
        demo.run(tmp_path, methods=("bds", "mix"), steps=8, corruption="style",
                 console=Console(QUIET))
    assert (tmp_path / "mix" / "data" / "train.jsonl").read_bytes() == files
    assert not (tmp_path / "bds").exists()  # refused before the first method ran


def test_a_run_whose_model_moved_resumes_and_other_weights_are_refused(tmp_path, monkeypatch):
    """The model directory is compared by content (config.json, the weight files' sizes and
    headers, samples of their bytes), not by path: after it moves, the run resumes with the
    new model.path; the same architecture with other weights is refused; a run.json from
    before the weights were sampled still needs the old path."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    monkeypatch.setattr(rundir, "WEIGHT_SAMPLE_BYTES", 256)  # sample the 109 KB fixture
    model = _llm.model_dir(tmp_path / "m1")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"question": f"q{i}", "response": f"r{i}"}) + "\n"
                             for i in range(8)))
    common = (f"data.train={train}", f"data.validation={train}", "data.max_len=32",
              "method.method=sft", "loop.checkpoint_every=1", "batch_size=8",
              "eval_batch_size=8")
    out = tmp_path / "run"
    experiment.run(_cfg(*common, f"model.path={model}", "loop.steps=2"), out,
                   console=Console(QUIET))
    (tmp_path / "m2").mkdir()
    moved = model.rename(tmp_path / "m2" / "llama")
    result = experiment.run(_cfg(*common, f"model.path={moved}", "loop.steps=3"), out,
                            console=Console(QUIET))
    assert result["resumed_from"] == 2 and result["steps"] == 3
    assert f"path: {moved}\n" in (out / "config.yaml").read_text()

    other = tmp_path / "m3" / "llama"  # another fine-tune: same config, shapes and sizes
    other.parent.mkdir()
    moved.rename(other)
    weights = load_file(str(other / "model.safetensors"))
    save_file({k: (v * np.float32(1.01)).astype(v.dtype) for k, v in weights.items()},
              str(other / "model.safetensors"), metadata={"format": "pt"})
    assert (other / "model.safetensors").stat().st_size == 109248
    with pytest.raises(rundir.RunDirError, match=r"trained on other contents of model.path"):
        experiment.run(_cfg(*common, f"model.path={other}", "loop.steps=4"), out,
                       console=Console(QUIET))

    legacy = json.loads((out / "run.json").read_text())  # as written before the sampling
    legacy["fingerprint"]["model"].pop("weights_sample_sha256")
    (out / "run.json").write_text(json.dumps(legacy))
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    back = tmp_path / "m4" / "llama"
    back.parent.mkdir()
    other.rename(back)
    with pytest.raises(rundir.RunDirError, match=r"trained on other contents of model.path"):
        experiment.run(_cfg(*common, f"model.path={back}", "loop.steps=4"), out,
                       console=Console(QUIET))
    back.rename(moved)  # where config.yaml says it was
    result = experiment.run(_cfg(*common, f"model.path={moved}", "loop.steps=4"), out,
                            console=Console(QUIET))
    assert result["resumed_from"] == 3

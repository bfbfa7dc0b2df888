"""`jbilevel eval` and `jbilevel export` on finished run directories."""

import json
import shutil
from pathlib import Path

import _llm
import numpy as np
import pytest

from jbilevel import cli, config, experiment, inputs, saved


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A 2-step bmo LoRA run of the tiny llama fixture on the SFT files."""
    root = tmp_path_factory.mktemp("run")
    model = _llm.model_dir(root)
    (root / "run.yaml").write_text(
        f"data: {{train: {_llm.DATA / 'alpaca_cleaned.json'}, "
        f"validation: {_llm.DATA / 'openorca.jsonl'}, test: {_llm.DATA / 'redorca.jsonl'}, "
        f"max_len: 160}}\nmodel: {{path: {model}}}\ntheta: {{kind: lora, rank: 4, alpha: 8}}\n"
        "method: {method: bmo, lr_theta: 0.01, lr_omega: 0.5}\n"
        "loop: {steps: 2, progress: false}\nbatch_size: 8\nval_batch_size: 8\n"
        "eval_batch_size: 8\n")
    out = root / "out"
    assert cli.main(["train", "--config", str(root / "run.yaml"), "--out", str(out)]) == 0
    return out


def test_eval_run_reproduces_the_report(lora_run, capsys, tmp_path):
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(lora_run)]) == 0
    out = capsys.readouterr()
    printed = json.loads(out.out)
    trained = json.loads((lora_run / "results.json").read_text())
    for key in ("val_loss", "test_loss"):
        np.testing.assert_allclose(printed[key], trained[key], rtol=1e-5, err_msg=key)
    assert json.loads((lora_run / "eval.json").read_text()) == printed
    # the training set, the largest file, is not read: a run whose SFT set is gone evaluates
    assert "reading and tokenising data: validation 3, test 2 (" in out.err
    assert set(printed["data"]) == {"validation", "test"}
    assert cli.main(["eval", "--run", str(lora_run), f"data.train={tmp_path / 'gone.json'}"]) == 0
    assert json.loads(capsys.readouterr().out)["val_loss"] == printed["val_loss"]


def test_eval_model_on_a_file(lora_run, capsys):
    capsys.readouterr()
    args = ["eval", "--model", str(lora_run / "model"), "--data",
            str(_llm.DATA / "openorca.jsonl"), "--max-len", "160"]
    assert cli.main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    trained = json.loads((lora_run / "results.json").read_text())
    assert printed["n"] == 3
    np.testing.assert_allclose(printed["loss"], trained["val_loss"], rtol=1e-5)
    assert (printed["mesh"], printed["param_dtype"], printed["compute_dtype"]) == (
        {"data": 8, "fsdp": 1, "tensor": 1}, "float32", "float32")


def test_eval_model_placed_and_read_as_asked(lora_run, capsys):
    """`eval` takes where the weights go and their dtype: split over fsdp and tensor the
    model scores the same; read in bfloat16 (what a model too large for float32 needs) it
    scores in bfloat16; the record says which."""
    args = ["eval", "--model", str(lora_run / "model"), "--data",
            str(_llm.DATA / "openorca.jsonl"), "--max-len", "160", "-q"]
    capsys.readouterr()
    assert cli.main(args) == 0
    whole = json.loads(capsys.readouterr().out)
    assert cli.main([*args, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]) == 0
    split = json.loads(capsys.readouterr().out)
    assert split["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    np.testing.assert_allclose(split["loss"], whole["loss"], rtol=1e-5)
    assert cli.main([*args, "mesh.data=1", "mesh.fsdp=-1", "model.param_dtype=bfloat16"]) == 0
    narrow = json.loads(capsys.readouterr().out)
    assert (narrow["mesh"], narrow["param_dtype"], narrow["compute_dtype"]) == (
        {"data": 1, "fsdp": 8, "tensor": 1}, "bfloat16", "bfloat16")
    assert 1e-5 < abs(narrow["loss"] - whole["loss"]) < 0.02 * whole["loss"]
    assert cli.main([*args, "model.compute_dtype=bfloat16"]) == 0  # float32 weights
    mixed = json.loads(capsys.readouterr().out)
    assert (mixed["param_dtype"], mixed["compute_dtype"]) == ("float32", "bfloat16")
    assert 1e-5 < abs(mixed["loss"] - whole["loss"]) < 0.02 * whole["loss"]
    # a run keeps its own settings unless told: the same file scored over fsdp
    assert cli.main(["eval", "--run", str(lora_run), "--data", str(_llm.DATA / "openorca.jsonl"),
                     "-q", "mesh.data=1", "mesh.fsdp=-1"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    np.testing.assert_allclose(run["loss"], whole["loss"], rtol=1e-5)
    # what eval does not take: named, with what it does
    assert cli.main([*args, "method.lr_theta=1"]) == 2
    assert ("method.lr_theta=1: eval takes data.*, mesh.*, model.param_dtype, "
            "model.compute_dtype only") in capsys.readouterr().err
    assert cli.main([*args, "eval_batch_size=4"]) == 2  # --model: --batch-size
    assert "eval_batch_size=4: eval takes data.*" in capsys.readouterr().err
    assert cli.main([*args, "mesh.fsdp=-1"]) == 2  # two axes left to fill
    err = capsys.readouterr().err
    assert "mesh: at most one axis may be -1" in err and "e.g. mesh.data=1 mesh.fsdp=-1" in err


def test_eval_adapter_over_its_base(lora_run, capsys, tmp_path):
    """`eval --run` scores a LoRA run through its adapter/ over the base it trained on;
    `eval --model <base> --adapter DIR` scores any PEFT adapter directory over a model; over
    this float32 base both give the run's numbers."""
    trained = json.loads((lora_run / "results.json").read_text())
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(lora_run), "--data",
                     str(_llm.DATA / "openorca.jsonl"), "-q"]) == 0  # its validation file
    np.testing.assert_allclose(json.loads(capsys.readouterr().out)["loss"],
                               trained["val_loss"], rtol=1e-5)
    base = saved.load_config(lora_run).model.path
    args = ["eval", "--model", base, "--data", str(_llm.DATA / "openorca.jsonl"),
            "--max-len", "160", "-q"]
    assert cli.main([*args, "--adapter", str(lora_run / "adapter")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["adapter"] == str(lora_run / "adapter")
    np.testing.assert_allclose(printed["loss"], trained["val_loss"], rtol=1e-5)
    assert cli.main(args) == 0  # the base alone scores otherwise: the adapters counted
    assert abs(json.loads(capsys.readouterr().out)["loss"] - trained["val_loss"]) > 1e-4
    assert cli.main(["eval", "--run", str(lora_run), "--adapter", str(lora_run)]) == 2
    assert "--adapter goes with --model" in capsys.readouterr().err
    # a LoRA run whose base has moved: one message naming where to set it
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "adapter").mkdir()
    (moved / "config.yaml").write_text((lora_run / "config.yaml").read_text().replace(
        base, str(tmp_path / "gone")))
    assert cli.main(["eval", "--run", str(moved)]) == 2
    assert (f"a LoRA run is scored through adapter/ over its base, model.path "
            f"{tmp_path / 'gone'} in {moved / 'config.yaml'}") in capsys.readouterr().err
    # ... and given on the command line, where the base is now: the run's numbers
    for name in ("adapter", "model"):
        shutil.rmtree(moved / name, ignore_errors=True)
        shutil.copytree(lora_run / name, moved / name)
    assert cli.main(["eval", "--run", str(moved), "-q", f"model.path={base}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(printed["val_loss"], trained["val_loss"], rtol=1e-5)


def test_export_top_frac_and_min_weight(lora_run, tmp_path):
    s_N = np.load(lora_run / "weights.npy")
    assert np.ptp(s_N) > 0  # bmo moved the weights
    out = tmp_path / "top.jsonl"
    assert cli.main(["export", "--run", str(lora_run), "--out", str(out),
                     "--top-frac", "0.34"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2  # ceil(0.34 * 3)
    assert sorted(r["example_id"] for r in rows) == sorted(np.argsort(-s_N)[:2].tolist())
    assert {"instruction", "input", "output", "weight"} <= set(rows[0])
    cut = float(np.sort(s_N)[1])
    assert cli.main(["export", "--run", str(lora_run), "--out", str(out),
                     "--min-weight", str(cut)]) == 0
    assert len(out.read_text().splitlines()) == 2


def test_eval_built_in_task_scores_the_test_split(tmp_path, capsys):
    cfg = experiment.ExperimentConfig(
        task=experiment.TaskConfig(base="scratch",
                                   options={"n_train": 32, "n_val": 16, "n_test": 16}),
        model=experiment.ModelSpec(hidden_size=32, num_layers=1, num_heads=2,
                                   intermediate_size=64),
        theta=inputs.ThetaConfig(kind="lora", rank=2, alpha=2.0),
        loop=config.from_dict(experiment.train.LoopConfig, {"steps": 2, "progress": False}),
        method=experiment.MethodConfig(method="sft"),
        batch_size=16, val_batch_size=16, eval_batch_size=16)
    trained = experiment.run(cfg, tmp_path)
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["test_accuracy"] == trained["test_accuracy"]
    np.testing.assert_allclose(printed["val_loss"], trained["val_loss"], rtol=1e-5)
    good_N = np.loadtxt(tmp_path / "weights.csv", delimiter=",", skiprows=1, usecols=2)
    weights_N = np.where(good_N == 1, 1.5, 0.2)  # weights that keep the good rows ...
    weights_N[np.flatnonzero(good_N == 0)[:3]] = 1.0  # ... and three bad ones
    np.save(tmp_path / "weights.npy", weights_N)
    assert cli.main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "x.jsonl"),
                     "--min-weight", "0.5"]) == 0
    good, bad = int((good_N == 1).sum()), int((good_N == 0).sum())
    assert (f": {good + 3} of 32 examples; by the ground truth {good} of {good} good and 3 of "
            f"{bad} bad rows kept (") in capsys.readouterr().err


def test_eval_and_export_errors(tmp_path, capsys):
    assert cli.main(["eval", "--model", str(tmp_path)]) == 2
    assert "--model PATH with --data PATH" in capsys.readouterr().err
    assert cli.main(["eval", "--run", str(tmp_path)]) == 2
    assert "config.yaml: not found" in capsys.readouterr().err
    assert cli.main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "config.yaml: not found" in capsys.readouterr().err


def test_data_says_what_a_configuration_would_train_on(tmp_path, capsys):
    """`jbilevel data`: each split's token lengths, the padding of the run's own batches at 1
    and 4 length buckets (what the trainer's Batcher builds, token for token), and examples with
    their trained tokens marked, earlier assistant turns included; the figures as JSON."""
    from jbilevel.data import Batcher, load_sft

    rows = [{"messages": [{"role": "user", "content": "q" * (3 + 7 * (i * 7 % 20))},
                          {"role": "assistant", "content": "a" * (1 + i % 3)},
                          {"role": "user", "content": "Again?"},
                          {"role": "assistant", "content": "b"}]} for i in range(20)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["data", f"data.train={train}", f"data.validation={train}", "data.max_len=256",
            "batch_size=4", "seed=3", "--show", "1"]
    capsys.readouterr()
    assert cli.main(args) == 0
    out = capsys.readouterr()
    got = json.loads(out.out)
    ds = load_sft(str(train), max_len=256)
    assert got["splits"]["train"]["examples"] == 20
    assert got["splits"]["train"]["sequence"]["max"] == int(ds.length_N.max())
    assert got["splits"]["train"]["trained"]["max"] == 5  # "aaa", "b" and the eos
    for pad in got["padding"]:  # the tokens of the batches a run of this config trains on
        cfg = config.load(experiment.ExperimentConfig, overrides=[
            f"data.train={train}", f"data.validation={train}",
            f"data.length_buckets={pad['length_buckets']}"])
        batches = Batcher(ds, 4, seed=3, **experiment.grouped(ds, cfg.data)).epoch_batches()
        tokens = sum(b["input_ids"].size for b in batches)
        assert pad["padded_tokens"] == tokens
        assert pad["padding_share"] == round(1 - ds.length_N.sum() / tokens, 4)
    assert [p["length_buckets"] for p in got["padding"]] == [1, 4]
    example = got["examples"][0]["text"]
    assert example == ("<bos><|user|>\nqqq\n<|assistant|>\n[[a]]\n<|user|>\nAgain?\n"
                       "<|assistant|>\n[[b<eos>]]")
    assert "data.length_buckets=1: " in out.err and "<- this configuration" in out.err
    assert f"train example 0 (train.jsonl line 1; {ds.length_N[0]} tokens, 3 trained" in out.err
    # a built-in task: its splits as the run writes them, through the shipped base's tokenizer
    shipped = Path(__file__).parents[1] / "configs" / "finetune" / "quality_bds.yaml"
    assert cli.main(["data", "--config", str(shipped), "--show", "0"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["splits"]["train"]["examples"] == 2000 and got["examples"] == []

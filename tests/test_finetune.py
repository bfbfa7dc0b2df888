"""The shipped pretrained base, and the built-in tasks as fine-tuning tasks: written as JSONL
files with a ground-truth column and read through the same path as a user's model and data."""

import csv
import dataclasses
import json
from pathlib import Path

import _llm
import numpy as np
import pytest

from jbilevel import config, demo, experiment, inputs, train
from jbilevel import saved as saved_runs
from jbilevel import sharding as sh
from jbilevel.algorithms import MethodConfig
from jbilevel.models import base_model_path, build, load_pretrained

ROOT = Path(__file__).parents[1]


CARDS = {"pretrained": "# jbilevel base model", "instruct": "# jbilevel instruction-tuned base"}


@pytest.mark.parametrize("which", ["pretrained", "instruct"])
def test_base_model_loads_in_transformers_unchanged(which):
    from transformers import AutoConfig, AutoTokenizer

    path = base_model_path(which)
    tok = AutoTokenizer.from_pretrained(path)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 17 + 25?"}],
                                   add_generation_prompt=True, tokenize=False)
    assert chat == "<|user|>: What is 17 + 25?<|end|><|assistant|>: "
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|end|>", "<|pad|>")
    digits = tok.tokenize("1234567890")
    assert digits == list("1234567890")  # every digit its own token
    hf_config = AutoConfig.from_pretrained(path)
    assert hf_config.model_type == "llama" and hf_config.vocab_size == len(tok)
    assert (Path(path) / "README.md").read_text().startswith(CARDS[which])
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    ids = [tok.bos_token_id] + tok.encode("Add 17 and 25 to get", add_special_tokens=False)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(path)(torch.tensor([ids])).logits.numpy()
    forward, params, _ = load_pretrained(path)
    got = np.asarray(forward(params, np.asarray([ids], np.int32)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("directory", ["base", "instruct"])
def test_package_data_carries_the_shipped_models(directory):
    """A non-editable install copies what pyproject's package-data globs match."""
    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["jbilevel"]
    carried = {p for pattern in patterns for p in (ROOT / "jbilevel").glob(pattern)}
    files = sorted(p for p in (ROOT / "jbilevel" / "assets" / directory).iterdir())
    assert {p.name for p in files} >= {"config.json", "model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json", "README.md"}
    assert [p for p in files if p not in carried] == []


SMALL = {"n_train": 48, "n_val": 16, "n_test": 16}


def test_built_in_task_fine_tunes_the_base_through_its_files(tmp_path):
    cfg = experiment.ExperimentConfig(
        task=experiment.TaskConfig(name="coverage", options=SMALL),
        method=MethodConfig(method="bmo", omega_optim="sgd", lr_omega=5.0),
        loop=train.LoopConfig(steps=2, log_every=1, checkpoint_every=0, progress=False),
        batch_size=16, val_batch_size=16, eval_batch_size=16)
    first = experiment.run(cfg, tmp_path / "task")
    saved = config.load(experiment.ExperimentConfig, tmp_path / "task" / "config.yaml")
    data = tmp_path / "task" / "data"
    assert saved.data.train == str(data / "train.jsonl") and saved.data.truth == "good"
    assert (saved.data.metric, saved.model.path) == ("answer", base_model_path())
    rows = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 48 and {r["skill"] for r in rows} == {"add", "sub"}
    with open(tmp_path / "task" / "weights.csv") as f:
        assert [int(r["good"]) for r in csv.DictReader(f)] == [r["good"] for r in rows]
    for key in ("test_accuracy", "test_accuracy_sub", "test_corrupted_add", "weight_auroc",
                "weight_mass_on_good", "val_accuracy", "val_accuracy_sub"):
        assert 0.0 <= first[key] <= 1.0, key
    # The validation answers are scored too (a signal for choosing settings without the test
    # split): the metric of the validation rows and the answers written beside them.
    assert saved.data.score_validation and first["val_n"] == 16 and first["test_n"] == 16
    assert first["validation_in_training"]  # bmo trains on those rows: a training score
    answers = [json.loads(x) for x in
               (tmp_path / "task" / "validation_predictions.jsonl").read_text().splitlines()]
    val_rows = [json.loads(x) for x in (data / "validation.jsonl").read_text().splitlines()]
    assert [a["question"] for a in answers] == [r["question"] for r in val_rows]
    assert first["val_accuracy"] == np.mean([a["prediction"].strip() == r["answer"]
                                             for a, r in zip(answers, val_rows, strict=True)])
    assert saved_runs.evaluate_run(tmp_path / "task")["val_accuracy"] == first["val_accuracy"]
    # The saved config trains on the files alone: the same run, number for number.
    again = experiment.run(saved, tmp_path / "files")
    assert {k: v for k, v in again.items() if k != "train_seconds"} == {
        k: v for k, v in first.items() if k != "train_seconds"}
    # A moved run directory still evaluates: its task files are read from where it is now.
    (tmp_path / "task").rename(tmp_path / "moved")
    moved = saved_runs.evaluate_run(tmp_path / "moved")
    assert moved["val_accuracy"] == first["val_accuracy"]
    assert moved["data"]["validation"]["source"] == str(
        tmp_path / "moved" / "data" / "validation.jsonl")
    assert "train" not in moved["data"]  # eval reads the validation and test files only


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_ground_truth_and_metric_errors_name_the_fix(tmp_path):
    good = [{"question": "q", "response": "r", "answer": "r", "good": 1}]
    val = _write(tmp_path / "val.jsonl", good)
    spec = experiment.ModelSpec(tokenizer="char")
    for value, match in (("maybe", r"bad.jsonl line 2: good='maybe'; the ground truth must be"),
                         (None, r"bad.jsonl line 2: good=None")):
        bad = _write(tmp_path / "bad.jsonl", good + [{**good[0], "good": value}])
        with pytest.raises(ValueError, match=match):
            inputs.load_task(None, inputs.DataConfig(train=bad, validation=val, truth="good"),
                             spec)
    missing = _write(tmp_path / "missing.jsonl", [{"question": "q", "response": "r"}])
    with pytest.raises(ValueError, match=r"missing.jsonl line 1: no column 'good' \(keys"):
        inputs.load_task(None, inputs.DataConfig(train=missing, validation=val, truth="good"),
                         spec)
    ok = _write(tmp_path / "ok.jsonl", [{**good[0], "good": g} for g in (1, 0, "0", True)])
    task = inputs.load_task(None, inputs.DataConfig(train=ok, validation=val, truth="good",
                                                    test=val, metric="answer"), spec)
    assert task.good_N.tolist() == [1, 0, 0, 1] and task.score(["r"]) == {"accuracy": 1.0,
                                                                            "n": 1}
    with pytest.raises(ValueError, match="data.metric='answer' scores answers to the test"):
        inputs.DataConfig(train=ok, validation=val, metric="answer")
    with pytest.raises(ValueError, match="score_validation=true scores the validation answers"):
        inputs.DataConfig(train=ok, validation=val, test=val, score_validation=True)
    # A column the metric reads, missing from a scored split: named before any training step.
    plain = _write(tmp_path / "plain.jsonl", [{"question": "q", "response": "r"}] * 2)
    for data, match in (
            (dict(validation=plain, test=val, metric="answer", score_validation=True),
             r"data.validation: .*plain.jsonl line 1: no column 'answer' .*which "
             r"data.metric=answer scores answers against; add it to every validation row, or "
             r"set data.score_validation=false"),
            (dict(validation=val, test=val, metric="safety"),
             r"data.test: .*val.jsonl line 1: no column 'harmful' .*add it to every test row, "
             r"or set data.metric=none")):
        with pytest.raises(ValueError, match=match):
            inputs.load_task(None, inputs.DataConfig(train=ok, **data), spec)
    assert inputs.load_task(None, inputs.DataConfig(train=ok, validation=plain, test=val,
                                                    metric="answer"), spec).scored == ("test",)


def _instruct_script():
    return _llm.script("instruct_base")


def test_distinct_problems_never_draws_an_excluded_one():
    from jbilevel.data.tasks.arith import distinct_problems

    space = 100 * 101 // 2  # differences a - b of 0..99 with a >= b
    held = {("-", a, b) for a in range(100) for b in range(a + 1) if (a + b) % 3}
    drawn = distinct_problems(np.random.default_rng(0), space - len(held), "-", nonnegative=True,
                              exclude=held)
    assert len(set(drawn)) == space - len(held) and not set(drawn) & held
    with pytest.raises(ValueError, match="outside the .* excluded"):
        distinct_problems(np.random.default_rng(0), space - len(held) + 1, "-",
                          nonnegative=True, exclude=held)
    with pytest.raises(ValueError, match="only supported with nonnegative"):
        distinct_problems(np.random.default_rng(0), 1, "+", exclude=held)


def test_instruct_rows_hold_out_the_tasks_evaluation_problems():
    """The instruction-tuned base never saw a validation or test question of the tasks."""
    from jbilevel.data.tasks import task_rows

    script = _instruct_script()
    assert script.problem_of("Subtract 25 from 67.") == ("-", 67, 25)
    with pytest.raises(ValueError, match="not an arithmetic question"):
        script.problem_of("What is 2 * 3?")
    recipe = script.Recipe(held_out_seeds=3)
    held = script.held_out_problems(recipe.held_out_seeds)
    rows = script.instruct_rows(recipe, held)
    assert {k: len(v) for k, v in rows.items()} == {"train": 2200, "validation": 200,
                                                    "test": 500}
    asked = {split: [script.problem_of(r["question"]) for r in split_rows]
             for split, split_rows in rows.items()}
    every = [p for problems in asked.values() for p in problems]
    assert len(set(every)) == len(every)  # distinct across the splits
    for seed in range(3):
        for split in ("validation", "test"):
            task = {script.problem_of(r["question"])
                    for r in task_rows("coverage", seed=seed, **demo.FINETUNE_TASKS["coverage"]
                                       )[split]}
            assert task and task <= held and not task & set(every)
    sub = [r for r in rows["train"] if r["skill"] == "sub"]
    assert len(sub) == 1100 and all(r["response"] == r["answer"] for r in rows["train"])
    assert all(int(r["answer"]) >= 0 for r in sub)
    # the shipped model's record says it was made with the script's defaults
    record = json.loads((Path(base_model_path("instruct")) / "instruct.json").read_text())
    assert record["recipe"] == dataclasses.asdict(script.Recipe())
    assert record["held_out"] == len(script.held_out_problems(script.Recipe().held_out_seeds))


def test_a_from_scratch_task_cannot_withhold_its_test_split():
    with pytest.raises(ValueError, match=r"data.score_test=false withholds the test split of "
                                         r"data files .* a from-scratch task always scores it"):
        inputs.load_task(experiment.TaskConfig(name="quality", base="scratch", options=SMALL),
                         inputs.DataConfig(score_test=False), experiment.ModelSpec())


def test_lora_adapters_answer_as_the_merged_model_over_a_float32_base(tmp_path):
    """A built-in task with LoRA: the final evaluation and `eval --run` decode through the
    adapters unmerged, on a data x fsdp x tensor mesh of the 8 devices; over a float32 base
    the merge is exact, so every score equals model/'s, and the adapters count (3 steps at
    1e-2 on half-corrupted answers move the instruction-tuned base's answers)."""
    cfg = experiment.ExperimentConfig(
        task=experiment.TaskConfig(name="quality", base="instruct", options=SMALL),
        theta=inputs.ThetaConfig(kind="lora", rank=4, alpha=8.0,
                                 targets=("q_proj", "v_proj", "up_proj")),
        method=MethodConfig(method="sft", lr_theta=1e-2),
        loop=train.LoopConfig(steps=3, checkpoint_every=0, progress=False),
        mesh=sh.MeshConfig(data=2, fsdp=2, tensor=2),  # the adapters split like their kernels
        batch_size=16, val_batch_size=16, eval_batch_size=16)
    adapted = experiment.run(cfg, tmp_path)
    assert saved_runs.evaluate_run(tmp_path)["test_accuracy"] == adapted["test_accuracy"]
    task = saved_runs.load_task(saved_runs.load_config(tmp_path), tmp_path / "model")
    _, merged, config = load_pretrained(str(tmp_path / "model"))
    for split in ("validation", "test"):
        scores = experiment.evaluate(build(config), merged, task, split, 16)
        for key in ("accuracy", "corrupted"):
            prefix = experiment.SPLIT_PREFIX[split]
            assert scores[key] == adapted[f"{prefix}_{key}"], (split, key)
    _, base, config = load_pretrained(base_model_path("instruct"))
    alone = experiment.evaluate(build(config), base, task, "test", 16)
    assert alone["accuracy"] - adapted["test_accuracy"] > 0.2, (alone, adapted)

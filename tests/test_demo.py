"""`jbilevel demo`: the comparison runs end to end and writes its table, plots and runs."""

import json
from pathlib import Path

import pytest

from jbilevel import config, demo, experiment
from jbilevel.console import QUIET, Console
from jbilevel.models import base_model_path

# The shipped instruction-tuned base fine-tuned on a small coverage task (its own files).
SMALL = {
    "task": experiment.TaskConfig(name="coverage", base="instruct",
                                  options={"n_train": 64, "n_val": 16, "n_test": 16}),
    "batch_size": 16, "val_batch_size": 16, "eval_batch_size": 16,
}


def test_demo_writes_table_plots_and_runs(tmp_path, capsys):
    summary = demo.run(tmp_path, methods=("mix", "bds", "online"), task="coverage", steps=4,
                       progress=False, changes=SMALL)
    assert [r["method"] for r in summary["rows"]] == ["mix", "bds", "online"]
    mix, bds, online = summary["rows"]
    online_cfg = summary["config"]["online"]["online"]  # coverage: one refresh at step 0
    assert (online_cfg["start"], online_cfg["every"], online_cfg["fraction"]) == (0, 4, 1.0)
    assert summary["config"]["online"]["method"]["method"] == "bds"
    assert summary["config"]["bds"]["model"]["path"] is None  # the shipped base, at run time
    saved = config.load(experiment.ExperimentConfig, tmp_path / "bds" / "config.yaml")
    assert saved.data.train == str(tmp_path / "bds" / "data" / "train.jsonl")
    assert saved.model.path == base_model_path("instruct")
    assert mix["weight_auroc"] is None and 0.0 <= bds["weight_auroc"] <= 1.0
    assert 0.0 <= bds["test_accuracy"] <= 1.0 and bds["val_loss"] > 0
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == summary["rows"]
    assert [json.loads((tmp_path / m / "results.json").read_text())["validation_in_training"]
            for m in ("mix", "bds", "online")] == [True, False, False]
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("| method | test_accuracy | corrupted | dropped_skill | val_loss | "
                            "weight_auroc")
    assert 0.0 <= bds["dropped_skill"] <= 1.0
    assert 0.0 <= bds["corrupted"] <= 1.0 - bds["test_accuracy"]
    for name in ("curves.png", "mix/results.json", "bds/weights.csv", "bds/curated.jsonl",
                 "bds/weights.png", "bds/model/config.json"):
        assert (tmp_path / name).exists(), name
    # The curves come from full validation-set evaluations logged during training.
    records = [json.loads(x) for x in (tmp_path / "bds/metrics.jsonl").read_text().split("\n")
               if x]
    assert [r["step"] for r in records if "eval_val_loss" in r] == [1, 2, 3, 4]  # every 4 // 10



def test_demo_side_by_side_gives_the_numbers_of_one_after_another(tmp_path, capfd,
                                                                   monkeypatch):
    """``jobs=2``: each method in a process of its own, the same run to the last bit."""
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "8")  # the spawned processes' world = this one's
    kw = {"task": "coverage", "steps": 4, "changes": SMALL}
    alone = demo.run(tmp_path / "alone", methods=("mix",), progress=False,
                     console=Console(QUIET), **kw)
    both = demo.run(tmp_path / "both", methods=("mix", "bmo"), jobs=2, **kw)
    assert both["jobs"] == 2 and [r["method"] for r in both["rows"]] == ["mix", "bmo"]
    assert {k: v for k, v in alone["rows"][0].items() if k != "wall_seconds"} == {
        k: v for k, v in both["rows"][0].items() if k != "wall_seconds"}
    predictions = [(tmp_path / d / "mix" / "test_predictions.jsonl").read_text()
                   for d in ("alone", "both")]
    assert predictions[0] == predictions[1]
    assert 0.0 <= both["rows"][1]["weight_auroc"] <= 1.0
    err = capfd.readouterr().err
    assert "[bmo] started in process" in err and "[mix] started in process" in err
    assert "[bmo] step 4/4: loss=" in err  # a line per logged record, not a bar
    assert "[bmo] final evaluation: val_loss" in err


def test_a_failed_side_by_side_run_raises_its_error_naming_the_run(tmp_path):
    from jbilevel import jobs
    from jbilevel.errors import UserError

    bad = demo.demo_config("mix", task="coverage", steps=4, changes={
        **SMALL, "model": experiment.ModelSpec(path=str(tmp_path / "no_model"))})
    with pytest.raises(UserError) as info:
        jobs.run_all([jobs.Job("broken", bad, tmp_path / "broken")], processes=2,
                     console=Console(QUIET))
    assert "no_model" in str(info.value)
    assert "in the broken run's process" in "".join(info.value.__notes__)


CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("method", ["mix", "bmo", "bds"])
def test_shipped_scratch_quality_configs_are_the_demo_settings(method):
    shipped = config.load(experiment.ExperimentConfig, CONFIGS / f"quality_{method}.yaml")
    want = demo.demo_config(method, base="scratch")
    assert shipped.method == want.method
    assert shipped.model == want.model and shipped.task == want.task
    assert (shipped.batch_size, shipped.val_batch_size) == (want.batch_size, want.val_batch_size)


@pytest.mark.parametrize("method", ["sft", "mix", "val", "bmo", "bds"])
def test_shipped_scratch_safety_configs_are_the_demo_task(method):
    shipped = config.load(experiment.ExperimentConfig, CONFIGS / f"safety_{method}.yaml")
    want = demo.demo_config("mix", task="safety", base="scratch")
    assert shipped.method.method == method
    assert shipped.model == want.model and shipped.task == want.task


FINETUNE = sorted((CONFIGS / "finetune").glob("*.yaml"))


@pytest.mark.parametrize("path", FINETUNE, ids=[p.stem for p in FINETUNE])
def test_shipped_finetune_configs_are_the_demo_settings(path):
    """configs/finetune/<task>_<method>.yaml is what `jbilevel demo --task <task>` runs."""
    task, method = path.stem.split("_")
    shipped = config.load(experiment.ExperimentConfig, path)
    want = demo.demo_config(method, task=task)
    for field in ("task", "model", "method", "online", "batch_size", "val_batch_size",
                  "hyper_batch_size", "seed"):
        assert getattr(shipped, field) == getattr(want, field), field
    assert (shipped.loop.steps, shipped.loop.eval_every) == (want.loop.steps,
                                                             want.loop.eval_every)


def test_finetune_configs_cover_every_task_and_demo_method():
    assert {p.stem for p in FINETUNE} >= {f"{t}_{m}" for t in demo.TASKS
                                          for m in ("mix", "bmo", "bds", "online")}


def test_table_leaves_out_columns_no_method_has():
    rows = [demo.row("mix", {"test_accuracy": 0.5, "val_loss": 1.0}, 3.0)]
    assert demo.format_table(rows).splitlines()[0] == (
        "| method | test_accuracy | val_loss | wall_seconds |")


def test_short_scratch_demo_runs_keep_four_hypergradient_steps_and_pick_the_corruption():
    cfg = demo.demo_config("bds", base="scratch", steps=400, corruption="style")
    assert cfg.task.options["corruption"] == "style"
    assert (cfg.method.hyper_start, cfg.method.hyper_every) == (200, 50)
    assert cfg.method.hyper_max_val_loss == 0.0  # no gate: the model is not trained by then
    full = demo.demo_config("bds", base="scratch").method  # 2000 steps: the shipped values
    assert (full.hyper_start, full.hyper_every, full.hyper_max_val_loss) == (0, 100, 0.5)
    with pytest.raises(ValueError, match="no corruption option"):
        demo.demo_config("mix", task="safety", corruption="style")


def test_cli_demo_refuses_a_corruption_the_task_does_not_have(tmp_path):
    from jbilevel import cli

    with pytest.raises(ValueError, match="no corruption option"):
        cli.main(["demo", "--task", "safety", "--corruption", "rule", "--out", str(tmp_path)])
    assert not (tmp_path / "results.json").exists()


def test_coverage_starts_from_the_instruction_tuned_base():
    online = demo.demo_config("online", task="coverage")
    assert online.task.base == "instruct" and online.method.method == "bds"
    assert (online.online.start, online.online.every, online.online.fraction,
            online.online.select) == (0, 300, 1.0, "random")  # one refresh of every question
    quality = demo.demo_config("online", task="quality")
    assert quality.task.base == "pretrained"
    assert (quality.online.start, quality.online.every, quality.online.fraction) == (100, 50, 0.2)
    assert demo.demo_config("mix", task="coverage", base="scratch").task.base == "scratch"

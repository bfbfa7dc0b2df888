"""scripts/reproduce.py: the mean ± std table over seeds (the sweep is smoke-tested by hand)
and the fine-tune on a run's selected rows (--retrain)."""

import json
from pathlib import Path

import _llm
import numpy as np
import pytest

from jbilevel import config, experiment, rundir
from jbilevel.console import QUIET, Console

reproduce = _llm.script("reproduce")


def test_summary_and_table():
    results = {"mix": [{"test_accuracy": 0.5, "val_loss": 1.0}, {"test_accuracy": 0.7,
                                                                "val_loss": 3.0}],
               "bds": [{"test_accuracy": 0.9, "weight_auroc": 0.8}]}
    summary = reproduce.summarise(results)
    mean, std, n = summary["mix"]["test_accuracy"]
    assert (mean, n) == (pytest.approx(0.6), 2)
    assert std == pytest.approx(0.1414213, rel=1e-5)  # sample std (ddof=1)
    assert summary["bds"]["test_accuracy"] == (0.9, 0.0, 1)
    table = reproduce.markdown(summary, "python scripts/reproduce.py --seeds 0 1", [0, 1])
    assert "| method | seeds | test_accuracy | val_loss | weight_auroc |" in table
    assert "| mix | 2 | 0.6 ± 0.14 | 2 ± 1.4 |  |" in table
    assert "| bds | 1 | 0.9 |  | 0.8 |" in table


def test_redraw_groups_runs_by_method_and_seed(tmp_path):
    runs = {"mix_s1": {"test_accuracy": 0.7}, "mix_s0": {"test_accuracy": 0.5},
            "mix_s0_before_option": {"test_accuracy": 0.1},  # a variant: not a mix run
            "bds_sigmoid_s0": {"test_accuracy": 0.2}, "bds_s0": {"test_accuracy": 0.9}}
    grouped, seeds = reproduce.group_runs(runs, ["bds", "mix"], "runs.json")
    assert list(grouped) == ["bds", "mix"]  # the order asked for
    assert grouped["mix"] == [{"test_accuracy": 0.5}, {"test_accuracy": 0.7}]  # seed order
    assert grouped["bds"] == [{"test_accuracy": 0.9}]
    assert seeds == [0, 1]
    with pytest.raises(ValueError, match=r"runs.json: no runs .* for sft"):
        reproduce.group_runs(runs, ["sft", "mix"], "runs.json")

    path = tmp_path / "runs.json"
    path.write_text(json.dumps(runs))
    assert reproduce.main(["--redraw", str(path), "--methods", "mix", "bds"]) == 0
    table = (tmp_path / "runs.md").read_text()
    assert "| mix | 2 | 0.6 ± 0.14 |" in table and "| bds | 1 | 0.9 |" in table
    assert (tmp_path / "runs.png").stat().st_size > 0
    assert reproduce.main(["--redraw", str(tmp_path / "absent.json")]) == 2


def test_retrain_fine_tunes_anew_on_the_rows_a_run_selects(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"question": f"q{i}", "response": f"r{i}"}) + "\n"
                             for i in range(16)))
    cfg = config.load(experiment.ExperimentConfig, overrides=[
        f"data.train={train}", f"data.validation={train}", "data.max_len=32",
        f"model.path={_llm.model_dir(tmp_path)}", "method.method=bmo", "loop.steps=2",
        "batch_size=8", "val_batch_size=8", "eval_batch_size=8"])
    run = tmp_path / "bmo"
    experiment.run(cfg, run, console=Console(QUIET))
    np.save(run / "weights.npy", np.where(np.arange(16) % 4 == 0, 2.0, 0.5))  # as if learned

    again = tmp_path / "bmo_w1_sft" / "seed0"
    result = reproduce.retrain_one(run, "sft", again, min_weight=1.0)
    assert result["method"] == "sft" and result["n_train"] == 4 and result["steps"] == 2
    kept = [json.loads(row)["question"] for row in
            (again.parent / "seed0.curated.jsonl").read_text().splitlines()]
    assert kept == ["q0", "q4", "q8", "q12"]
    diff = rundir_differences(run, again)  # the run's own settings but for the method
    assert diff.pop("method.method") == ("bmo", "sft")
    assert diff and all(rundir._NA in pair for pair in diff.values())  # what only bmo uses
    with pytest.raises(ValueError, match=r"no training row has weight >= 3"):
        reproduce.retrain_one(run, "sft", tmp_path / "none" / "seed0", min_weight=3.0)
    assert reproduce.main(["--retrain", "sft", "--out", str(tmp_path)]) == 2


def rundir_differences(a: Path, b: Path) -> dict:
    load = lambda d: config.load(experiment.ExperimentConfig, d / "config.yaml")  # noqa: E731
    return rundir.differences(load(a), load(b))


def test_withheld_test_split_is_scored_later_without_retraining(tmp_path, capsys):
    from jbilevel import saved

    sweep = ["--configs", str(Path(__file__).parents[1] / "configs" / "finetune"), "--task",
             "safety", "--methods", "mix", "--seeds", "0", "--out", str(tmp_path),
             "loop.steps=2", "loop.eval_every=0", "task.options.n_train=32",
             "task.options.n_val=8", "task.options.n_test=8", "eval_batch_size=8"]
    assert reproduce.main([*sweep, "--withhold-test"]) == 0
    run = tmp_path / "runs" / "safety" / "mix" / "seed0"
    printed = capsys.readouterr()
    assert (f"the test split is withheld (data.score_test=false): not read, not scored; "
            f"jbilevel eval --run {run} data.score_test=true scores it") in printed.err
    blind = json.loads((tmp_path / "safety.json").read_text())["runs"]["mix"][0]
    assert blind["test_withheld"] and blind["val_n_harmful"] + blind["val_n_benign"] == 8
    assert [k for k in blind if k.startswith("test_")] == ["test_withheld"]
    assert "| test_" not in (tmp_path / "safety.md").read_text()  # validation columns only
    assert not (run / "test_predictions.jsonl").exists()
    assert "test_loss" not in saved.evaluate_run(run, console=Console(QUIET))
    revealed = saved.evaluate_run(run, overrides=["data.score_test=true"],
                                  console=Console(QUIET))
    capsys.readouterr()
    # The same sweep without the flag evaluates the finished run again from its checkpoint.
    assert reproduce.main(sweep) == 0
    assert "test_benign_accuracy" in capsys.readouterr().out
    seen = json.loads((tmp_path / "safety.json").read_text())["runs"]["mix"][0]
    assert seen["resumed_from"] == 2 and not seen["test_withheld"]
    assert seen["val_loss"] == blind["val_loss"]
    for key in ("test_loss", "test_unsafe_compliance", "test_benign_accuracy"):
        assert seen[key] == revealed[key], key
    assert (run / "test_predictions.jsonl").exists()

"""Bad inputs: each error names the file, line/row and field with the fix; skips are counted."""

import json
import re

import pytest

from jbilevel.data import DataError, load_sft


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


GOOD = json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi."})


@pytest.fixture
def bad_file(tmp_path):
    return _write(tmp_path / "train.jsonl", [
        GOOD,
        '{"instruction": "Broken", "output": ',                               # line 2
        json.dumps({"instruction": "No output", "response": "x"}),           # line 3
        json.dumps({"instruction": "Empty", "input": "", "output": "  "}),   # line 4
        json.dumps({"instruction": 7, "input": "", "output": "seven"}),      # line 5
        json.dumps({"instruction": "x" * 500, "input": "", "output": "y"}),  # line 6
        GOOD,
    ])


def _one(tmp_path, line, **kw):
    return load_sft(_write(tmp_path / "train.jsonl", [GOOD, line]), schema="alpaca",
                    max_len=256, **kw)


def test_broken_json_line(tmp_path):
    with pytest.raises(DataError, match=r"^train.jsonl line 2: broken JSON \(.*\); fix or delete"):
        _one(tmp_path, '{"instruction": "a",')


def test_missing_key_names_available_and_fix(tmp_path):
    line = json.dumps({"instruction": "a", "response": "b"})
    with pytest.raises(DataError) as e:
        _one(tmp_path, line)
    assert str(e.value) == ("train.jsonl line 2: missing key 'output' (available: instruction, "
                            "response); set keys={'output': '<column>'}")
    assert e.value.reason == "missing_key"


def test_empty_response(tmp_path):
    with pytest.raises(DataError, match=r"^train.jsonl line 2: field 'output' is empty; fill"):
        _one(tmp_path, json.dumps({"instruction": "a", "output": ""}))


def test_non_string_field(tmp_path):
    with pytest.raises(DataError, match=r"^train.jsonl line 2: field 'instruction' must be a "
                                        r"string, got int \('7'\)"):
        _one(tmp_path, json.dumps({"instruction": 7, "output": "b"}))


def test_over_long_prompt_error_truncate_skip(tmp_path):
    line = json.dumps({"instruction": "x" * 500, "output": "yz"})
    with pytest.raises(DataError, match=r"^train.jsonl line 2: 6\d\d tokens \(prompt 6\d\d, "
                                        r"response 3\) > max_len=256; raise max_len or set "
                                        r"overlength='truncate' or 'skip'"):
        _one(tmp_path, line)
    ds = _one(tmp_path, line, overlength="skip")
    assert len(ds) == 1 and ds.report.skipped == {"too_long": 1}
    assert ds.report.messages[0].startswith("skipped (too_long): train.jsonl line 2:")
    ds = _one(tmp_path, line, overlength="truncate")
    assert len(ds) == 2 and ds.report.n_truncated == 1 and ds.report.n_skipped == 0
    assert ds.length_N[1] == 256 and ds.prompt_len_N[1] == 255
    b = ds.batch([1], 256)
    assert b["loss_mask"].sum() == 1  # only the first response token survives
    assert b["labels"][0, 254] == ds.tokenizer.encode("y")[0]
    seq = ds.sequence(1)  # bos, then the prompt's end: its start ("x" * 500...) got cut
    assert seq[0] == ds.tokenizer.bos_id and seq[1] == ds.tokenizer.encode("x")[0]


def test_truncate_cuts_response_first(tmp_path):
    line = json.dumps({"instruction": "a", "output": "y" * 300})
    ds = _one(tmp_path, line, overlength="truncate")
    assert ds.length_N[1] == 256
    assert ds.response_text(1) == "y" * (256 - int(ds.prompt_len_N[1]))


def test_empty_file(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(DataError, match=r"^train.jsonl: empty file \(0 bytes\)"):
        load_sft(str(tmp_path / "train.jsonl"))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"blank.jsonl: no rows"):
        load_sft(str(tmp_path / "blank.jsonl"))


def test_nonexistent_file(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=rf"^{missing}: file not found"):
        load_sft(missing)


def test_hub_names_vs_paths():
    from jbilevel.data.readers import looks_like_hub_name

    for name in ("Open-Orca/OpenOrca", "yahma/alpaca-cleaned", "BlueOrca/RedOrca", "gsm8k"):
        assert looks_like_hub_name(name), name
    for path in ("data/train.jsonl", "/abs/dir/x", "./rel", "a/b/c", "x.parquet"):
        assert not looks_like_hub_name(path), path


def test_skip_policy_counts_every_reason(bad_file):
    ds = load_sft(bad_file, schema="alpaca", max_len=256, on_bad_row="skip", overlength="skip")
    assert len(ds) == 2
    assert ds.where == ["train.jsonl line 1", "train.jsonl line 7"]
    r = ds.report.as_dict()
    assert r["n_read"] == 7 and r["n_kept"] == 2 and r["n_skipped"] == 5
    assert r["skipped"] == {"bad_json": 1, "missing_key": 1, "empty_response": 1, "bad_type": 1,
                            "too_long": 1}
    assert len(r["messages"]) == 5
    assert str(ds.report) == ("read 7, kept 2, truncated 0, skipped 5 (bad_json=1, "
                              "bad_type=1, empty_response=1, missing_key=1, too_long=1)")


def test_error_policy_stops_at_first_bad_line(bad_file):
    with pytest.raises(DataError, match=r"^train.jsonl line 2: broken JSON"):
        load_sft(bad_file, schema="alpaca", max_len=256)


def test_everything_skipped_is_an_error(tmp_path):
    path = _write(tmp_path / "train.jsonl", ['{"bad'])
    with pytest.raises(DataError, match=r"no examples left: read 1, kept 0, .*bad_json=1"):
        load_sft(path, schema="alpaca", on_bad_row="skip")


def test_bad_policy_names():
    with pytest.raises(ValueError, match="overlength='cut'"):
        load_sft([{"question": "a", "response": "b"}], overlength="cut")
    with pytest.raises(ValueError, match="on_bad_row='drop'"):
        load_sft([{"question": "a", "response": "b"}], on_bad_row="drop")


# The same bad inputs through `jbilevel train`: one message (no traceback) naming the config
# field, file, line and fix, exit status 2, before anything is written; or a counted skip that
# the load report shows and results.json keeps.

def _train(tmp_path, capsys, line, *overrides):
    from jbilevel import cli

    train = _write(tmp_path / "train.jsonl", [GOOD, line, GOOD])
    val = _write(tmp_path / "val.jsonl", [GOOD])
    capsys.readouterr()
    status = cli.main(["train", "--out", str(tmp_path / "run"), f"data.train={train}",
                       f"data.validation={val}", "data.max_len=256", *overrides])
    err = capsys.readouterr().err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
    return status, err.strip().splitlines()[-1]


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "Broken", "output": ',
     r"data.train: train.jsonl line 2: broken JSON \(.*\); fix or delete the line \(or set "
     r"data.on_bad_row=skip: such rows are then skipped, counted and listed in results.json\)"),
    (json.dumps({"instruction": "a", "response": "b"}),
     r"data.train: train.jsonl line 2: missing key 'output' \(available: instruction, "
     r"response\); set keys=\{'output': '<column>'\} \(or set data.on_bad_row=skip"),
    (json.dumps({"instruction": "a", "output": " "}),
     r"data.train: train.jsonl line 2: field 'output' is empty; fill it in or delete the row "
     r"\(or set data.on_bad_row=skip"),
    (json.dumps({"instruction": "x" * 500, "output": "y"}),
     r"data.train: train.jsonl line 2: \d+ tokens \(prompt \d+, response 2\) > max_len=256; "
     r"raise max_len or set overlength='truncate' or 'skip'$"),
], ids=["broken_json", "missing_key", "empty_response", "over_long_error"])
def test_cli_bad_row_is_one_message(tmp_path, capsys, line, message):
    status, last = _train(tmp_path, capsys, line, "data.overlength=error")
    assert status == 2
    assert re.match(r"jbilevel train: error: " + message, last), last


@pytest.mark.parametrize("overrides, message", [
    (["method.lr_thetta=1e-5"], r"command line: unknown key 'method.lr_thetta' \(valid keys here: "
                                r".*\); did you mean 'method.lr_theta'\?$"),
    (["method.lr_theta=fast"], r"command line: method.lr_theta must be a number, got 'fast' "
                               r"\(str\)$"),
    (["data.overlength=cut"], r"command line: data.overlength must be one of 'error', "
                              r"'truncate', 'skip', got 'cut' \(str\)$"),
    (["model.path=/nonexistent/qwen2-0.5b"],
     r"model.path: /nonexistent/qwen2-0.5b does not exist \(working directory .*\); point "
     r"model.path at a local HF model directory \(config.json, \*.safetensors and the "
     r"tokenizer files\); nothing is downloaded$"),
])
def test_cli_config_and_path_errors_are_one_message(tmp_path, capsys, overrides, message):
    status, last = _train(tmp_path, capsys, GOOD, *overrides)
    assert status == 2
    assert re.match(r"jbilevel train: error: " + message, last), last


def test_cli_model_dir_without_weights_or_config(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    status, last = _train(tmp_path, capsys, GOOD, f"model.path={model}")
    assert status == 2 and last.startswith(
        f"jbilevel train: error: model.path: {model} has no config.json and no *.safetensors "
        "weights; point model.path at a local HF model directory")
    from jbilevel import cli

    assert cli.main(["eval", "--model", str(tmp_path / "nope"), "--data", "x.jsonl"]) == 2
    assert f"jbilevel eval: error: --model: {tmp_path / 'nope'} does not exist" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("policy, counted", [("skip", "skipped 1 (too_long=1)"),
                                             ("truncate", "truncated 1, skipped 0")])
def test_over_long_rows_are_counted_and_reported(tmp_path, policy, counted):
    """truncate (the default) and skip go on, and say so: a warning, the load report line and
    its first messages, and the report that results.json stores under data.train."""
    import io

    from jbilevel import config, experiment
    from jbilevel.console import Console

    train = _write(tmp_path / "train.jsonl", [GOOD, json.dumps({"instruction": "x" * 500,
                                                                "output": "y"})])
    val = _write(tmp_path / "val.jsonl", [GOOD])
    cfg = config.load(experiment.ExperimentConfig, overrides=[
        f"data.train={train}", f"data.validation={val}", "data.max_len=256",
        f"data.overlength={policy}"])
    stream = io.StringIO()
    task = experiment.load_data(cfg, Console(stream=stream))
    printed = stream.getvalue()
    assert f"train {train}: read 2, kept {1 if policy == 'skip' else 2}, " in printed
    assert counted in printed
    verb = "skipped (too_long)" if policy == "skip" else "truncated"
    assert f"    {verb}: train.jsonl line 2: " in printed
    assert f"warning: train {train}: " in printed
    report = experiment.data_reports(cfg, task)["train"]
    assert report["source"] == train and report["n_read"] == 2
    assert report["messages"][0].startswith(f"{verb}: train.jsonl line 2: ")
    quiet = io.StringIO()
    experiment.load_data(cfg, Console(0, stream=quiet))  # --quiet keeps the warning
    assert quiet.getvalue().startswith(f"warning: train {train}: ")


def test_the_run_says_which_assistant_turns_it_trains(tmp_path):
    """A chat file with earlier assistant turns: the run prints how many and what became of
    them, and results.json's data report records it."""
    import io

    from jbilevel import config, experiment
    from jbilevel.console import Console

    def chat(*turns):
        roles = ["user", "assistant"] * len(turns)
        return json.dumps({"messages": [{"role": r, "content": c}
                                        for r, c in zip(roles, turns, strict=False)]})

    train = _write(tmp_path / "train.jsonl", [chat("a", "b", "c", "d", "e", "f"), chat("x", "y")])
    val = _write(tmp_path / "val.jsonl", [chat("x", "y")])
    for turns, what in (("all", "each trained"),
                        ("last", "context (only the last turn is trained)")):
        cfg = config.load(experiment.ExperimentConfig, overrides=[
            f"data.train={train}", f"data.validation={val}", "data.max_len=128",
            f"data.assistant_turns={turns}"])
        stream = io.StringIO()
        task = experiment.load_data(cfg, Console(stream=stream))
        said = f"assistant turns before the last: 2 (in 1 of 2 conversations), {what}"
        assert f"  {said} (data.assistant_turns={turns})" in stream.getvalue()
        assert experiment.data_reports(cfg, task)["train"]["assistant_turns"] == said


def test_max_train_rows_reads_only_the_first_rows(tmp_path):
    """data.max_train_rows: the training file's first rows only (the validation file whole),
    and the load report says rows were left unread; a limit the file does not reach says
    nothing."""
    import io

    from jbilevel import config, experiment
    from jbilevel.console import Console

    rows = [json.dumps({"instruction": f"Say {k}.", "input": "", "output": f"{k}."})
            for k in range(5)]
    train = _write(tmp_path / "train.jsonl", rows)
    val = _write(tmp_path / "val.jsonl", rows[:3])
    for limit, kept in ((2, 2), (5, 5)):
        cfg = config.load(experiment.ExperimentConfig, overrides=[
            f"data.train={train}", f"data.validation={val}", f"data.max_train_rows={limit}"])
        stream = io.StringIO()
        task = experiment.load_data(cfg, Console(stream=stream))
        assert (len(task.splits["train"]), len(task.splits["validation"])) == (kept, 3)
        assert [r["output"] for r in task.splits["train"].rows] == [f"{k}." for k in range(kept)]
        unread = limit < len(rows)
        assert (f"train {train}: read 2 (the first 2; more left unread), kept 2, "
                in stream.getvalue()) == unread
        assert experiment.data_reports(cfg, task)["train"]["row_limit"] == (limit if unread
                                                                             else 0)
    with pytest.raises(Exception, match=r"data.max_train_rows=-1 must be >= 0"):
        config.load(experiment.ExperimentConfig, overrides=["data.max_train_rows=-1"])

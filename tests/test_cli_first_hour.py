"""A new user's first hour, end to end through the `jbilevel` command.

A local HF model directory (the tiny llama fixture with its chat template), an Alpaca-schema
JSONL training set with a broken line (skipped and counted), the OpenOrca-schema validation
and test files; `train` with `method.lr_theta=1e-5`, a kill -9 after a checkpoint and a rerun
that resumes bit-identically to an uninterrupted run, a different configuration refused
before anything is written, then `eval` (formatting the data as `train` did) and `export`.
The trainings run as subprocesses (so the kill is real), one after the other, sharing a
compilation cache.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import _llm
import numpy as np
import pytest
from conftest import FAST_COMPILE

from jbilevel import cli

ROOT = Path(__file__).parent.parent
STEPS = 24
BROKEN_LINE = 6  # the broken JSON line of train.jsonl


def _alpaca(path: Path) -> Path:
    rows = [json.dumps({"instruction": f"Add {a} and {a + 1}.", "input": "" if a % 2 else "now",
                        "output": str(2 * a + 1)}) for a in range(16)]
    rows.insert(BROKEN_LINE - 1, '{"instruction": "Broken", "output": ')
    path.write_text("\n".join(rows) + "\n")
    return path


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--out", str(out),
            f"data.train={root / 'train.jsonl'}", f"data.validation={_llm.DATA / 'openorca.jsonl'}",
            f"data.test={_llm.DATA / 'redorca.jsonl'}", "data.max_len=128",
            "data.on_bad_row=skip", "data.chat_template=tokenizer", "data.add_bos=false",
            f"model.path={root / 'llama'}", "method.method=bmo", "method.lr_theta=1e-5",
            "method.lr_omega=0.5", f"loop.steps={STEPS}", "loop.checkpoint_every=4",
            "loop.log_every=4", "loop.keep=2", "batch_size=4", "val_batch_size=4",
            "eval_batch_size=4", *extra]


def _start(root: Path, out: Path, log: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           # the first two runs compile (side by side), the resumed one reads them back
           "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    env["XLA_FLAGS"] = FAST_COMPILE  # none of the caller's other XLA flags (device counts)
    with open(root / f"{log}.out", "w") as stdout, open(root / f"{log}.err", "w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "jbilevel.cli", *_args(root, out)],
                                stdout=stdout, stderr=stderr, env=env, cwd=root)


def _finish(proc: subprocess.Popen, root: Path, log: str) -> tuple[dict, str]:
    assert proc.wait(timeout=300) == 0, (root / f"{log}.err").read_text()[-3000:]
    return json.loads((root / f"{log}.out").read_text()), (root / f"{log}.err").read_text()


def _kill_after_checkpoint(proc: subprocess.Popen, out: Path) -> int:
    ckpts = out / "checkpoints"
    while proc.poll() is None:
        steps = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
        if steps:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return max(steps)
        time.sleep(0.01)
    raise AssertionError(f"the run ended (status {proc.returncode}) before a checkpoint")


def _snapshot(directory: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and one killed after a checkpoint and resumed."""
    root = tmp_path_factory.mktemp("first_hour")
    _llm.model_dir(root)
    _alpaca(root / "train.jsonl")
    whole, killed = root / "whole", root / "killed"
    straight = _start(root, whole, log="whole")  # side by side, one per core
    victim = _start(root, killed, log="victim")
    at = _kill_after_checkpoint(victim, killed)
    whole_result, whole_err = _finish(straight, root, "whole")
    assert victim.returncode == -signal.SIGKILL and not (killed / "results.json").exists()
    resumed_result, resumed_err = _finish(_start(root, killed, log="resumed"), root, "resumed")
    return {"root": root, "whole": whole, "killed": killed, "at": at,
            "whole_result": whole_result, "whole_err": whole_err,
            "resumed_result": resumed_result, "resumed_err": resumed_err}


def test_resume_after_kill_is_bit_identical(runs):
    whole, killed = runs["whole"], runs["killed"]
    assert runs["resumed_result"]["resumed_from"] >= runs["at"] >= 4
    assert runs["resumed_result"]["steps"] == runs["whole_result"]["steps"] == STEPS
    np.testing.assert_array_equal(np.load(killed / "weights.npy"), np.load(whole / "weights.npy"))
    for name in ("model.safetensors", "config.json"):
        assert (killed / "model" / name).read_bytes() == (whole / "model" / name).read_bytes()
    for key in ("val_loss", "test_loss", "weight_ess"):
        assert runs["resumed_result"][key] == runs["whole_result"][key], key
    records = (killed / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(r)["step"] for r in records]
    assert steps == list(range(4, STEPS + 1, 4))  # the killed run's records, none twice


def test_every_phase_says_what_it_did_and_how_long(runs):
    err = runs["whole_err"]
    for line in ("reading and tokenising data: train 16, validation 3, test 2 (",
                 "  train " + str(runs["root"] / "train.jsonl") + ": read 17, kept 16, "
                 "truncated 0, skipped 1 (bad_json=1)",
                 f"    skipped (bad_json): train.jsonl line {BROKEN_LINE}: broken JSON",
                 "  responses end with the tokenizer's eos <eos> (id 2) (data.response_end=auto)",
                 f"run directory {runs['whole']}: new run",
                 "mesh: data 1 x fsdp 1 x tensor 1 over 1 cpu device\n",
                 f"loading weights from {runs['root'] / 'llama'}: llama (",
                 "initialising the train state: done (", "compiling the bmo train step ...",
                 "final evaluation: val_loss ", f"writing the run report and the model to "
                 f"{runs['whole']}: done ("):
        assert line in err, line
    # compiled, or read back where the run beside it wrote the program first
    assert re.search(r"(compiled|loaded) the bmo train step (from the compilation cache )?"
                     r"in \d+\.\d s", err)
    assert re.search(rf"bmo: 100%\|[^\r\n]*\| {STEPS}/{STEPS} \[", err)  # the bar stays
    resumed = runs["resumed_err"]
    at = runs["resumed_result"]["resumed_from"]
    for line in (f"run directory {runs['killed']}: resuming (newest checkpoint: step {at})",
                 "setting up the model: llama (", f"restoring the checkpoint of step {at}: done (",
                 f"resumed from step {at}; training to step {STEPS}",
                 "loaded the bmo train step from the compilation cache in "):
        assert line in resumed, line
    report = runs["whole_result"]["data"]["train"]
    assert (report["n_read"], report["n_kept"], report["skipped"]) == (17, 16, {"bad_json": 1})
    assert report["source"] == str(runs["root"] / "train.jsonl")
    assert runs["whole_result"]["interrupted"] is None


def test_weights_and_curated_rows_join_back_to_their_source_lines(runs):
    import csv

    whole = runs["whole"]
    lines = (runs["root"] / "train.jsonl").read_text().splitlines()
    with open(whole / "weights.csv") as f:
        rows = list(csv.DictReader(f))
    s_N = np.load(whole / "weights.npy")
    assert len(rows) == 16 and [int(r["id"]) for r in rows] == list(range(16))
    for r in rows:
        assert r["source_file"] == str(runs["root"] / "train.jsonl")
        source = json.loads(lines[int(r["source_line"]) - 1])
        assert r["preview"].startswith(source["instruction"])
        assert float(r["weight"]) == pytest.approx(float(s_N[int(r["id"])]), rel=1e-5)
    assert [int(r["source_line"]) for r in rows][BROKEN_LINE - 2:BROKEN_LINE] == [
        BROKEN_LINE - 1, BROKEN_LINE + 1]  # the skipped line leaves a gap, not a shift
    for row in map(json.loads, (whole / "curated.jsonl").read_text().splitlines()):
        source = json.loads(lines[row["source_line"] - 1])
        assert {k: row[k] for k in source} == source


def test_a_different_configuration_is_refused_before_anything_is_written(runs, capsys):
    killed = runs["killed"]
    before = _snapshot(killed)
    capsys.readouterr()
    args = _args(runs["root"], killed, "method.lr_theta=2e-5", "data.max_len=96")
    assert cli.main(args) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith(f"jbilevel train: error: --out {killed} holds a different run")
    assert "data.max_len: 128 in the directory, 96 now" in err
    assert "method.lr_theta: 1e-05 in the directory, 2e-05 now" in err
    assert f"--out {killed}_2" in err and f"rm -r {killed}" in err
    assert "Traceback" not in err
    assert _snapshot(killed) == before


def test_eval_formats_data_as_train_did_and_export_writes_sources(runs, capsys, tmp_path):
    killed, result = runs["killed"], runs["resumed_result"]
    val = str(_llm.DATA / "openorca.jsonl")
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(killed), "--data", val]) == 0
    out = capsys.readouterr()
    np.testing.assert_allclose(json.loads(out.out)["loss"], result["val_loss"], rtol=1e-5)
    assert f"loading the model from {killed / 'model'}: done (" in out.err
    assert "evaluating: loss " in out.err
    same = ["eval", "--model", str(killed / "model"), "--data", val,
            "data.chat_template=tokenizer", "data.add_bos=false", "data.max_len=128"]
    assert cli.main(same) == 0
    np.testing.assert_allclose(json.loads(capsys.readouterr().out)["loss"], result["val_loss"],
                               rtol=1e-5)
    assert cli.main(same[:5]) == 0  # train's default format: another prompt, another loss
    assert abs(json.loads(capsys.readouterr().out)["loss"] - result["val_loss"]) > 1e-2
    curated = tmp_path / "top.jsonl"
    assert cli.main(["export", "--run", str(killed), "--out", str(curated),
                     "--top-frac", "0.25"]) == 0
    assert "writing " + str(curated) + ": 4 of 16 examples (" in capsys.readouterr().err
    rows = [json.loads(x) for x in curated.read_text().splitlines()]
    assert len(rows) == 4 and all(r["source_line"] != BROKEN_LINE for r in rows)

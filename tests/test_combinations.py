"""Settings that would run without an error and give a meaningless result are refused where
the user meets them: ``jbilevel train`` stops with one line naming the keys, the reason and
the choices, before anything is written."""

import re

import pytest

from jbilevel import cli, experiment, train
from jbilevel.algorithms import MethodConfig

CONFIG = ("task:\n  options: {n_train: 32, n_val: 16, n_test: 16}\n"
          "model: {hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32}\n"
          "batch_size: 16\nval_batch_size: 16\neval_batch_size: 16\n"
          "loop: {steps: 2, progress: false}\n")


@pytest.mark.parametrize("overrides,message", [
    (["method.method=bmo", "method.weighting=sigmoid"],
     "weighting=sigmoid with method.method=bmo: .* every weight falls toward 0 .* Use "
     "weighting=softmax with bmo .* or method=bds with sigmoid weights"),
    (["method.method=bmo", "method.lam_decay=0.1"],
     "lam_decay=0.1 lowers bmo's lam once per epoch, but loop.steps_per_epoch=0 never ends "
     "one; set loop.steps_per_epoch to ceil"),
    (["method.method=mix", "method.decay_steps=1"],
     "method.decay_steps=1 is below loop.steps=2: the model's step size reaches 0 at step 1 .* "
     "set method.decay_steps to loop.steps, or 0 for a constant step size"),
    (["method.method=bmo", "method.train_chunk=6"],
     "method.train_chunk=6 does not divide batch_size=16: the train step sums its gradient "
     "over passes of train_chunk rows each; set method.train_chunk to a divisor of batch_size, "
     "or 0 for one pass"),
])
def test_train_refuses_with_the_reason_and_the_choices(tmp_path, capsys, overrides, message):
    path, out = tmp_path / "run.yaml", tmp_path / "out"
    path.write_text(CONFIG)
    assert cli.main(["train", "--config", str(path), "--out", str(out), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jbilevel train: error: {path} + command line: ")
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not out.exists()


def test_bmo_lam_schedule_must_match_the_epoch_length(tmp_path):
    cfg = experiment.ExperimentConfig(
        task=experiment.TaskConfig(options={"n_train": 32, "n_val": 16, "n_test": 16}),
        method=MethodConfig(method="bmo", lam_decay=0.1), batch_size=16, val_batch_size=16,
        loop=train.LoopConfig(steps=2, steps_per_epoch=3, progress=False))
    with pytest.raises(ValueError, match=r"loop.steps_per_epoch=3, but the training set is 2 "
                                         r"steps per epoch \(32 rows, batch_size 16\).*set "
                                         r"loop.steps_per_epoch=2"):
        experiment.run(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_train_chunk_must_split_over_the_data_parallel_devices(tmp_path, capsys):
    """Each pass of ``method.train_chunk`` rows is split over the mesh's data-parallel
    devices (8 here), so a chunk of 4 rows is refused, naming the setting and the mesh."""
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG)
    assert cli.main(["train", "--config", str(path), "--out", str(tmp_path / "out"),
                     "method.train_chunk=4"]) == 2
    assert ("method.train_chunk=4 is not a multiple of the mesh's data-parallel size 8 "
            "(mesh.data x mesh.fsdp)") in capsys.readouterr().err

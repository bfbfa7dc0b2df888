"""A finished run directory (``jbilevel train --out DIR``): evaluate its model, export its data.

A run directory holds ``config.yaml`` (the validated ExperimentConfig), ``model/`` (the HF
model with its tokenizer; LoRA adapters already merged) and ``weights.npy`` (one learned
weight per training example id). ``jbilevel eval`` and ``jbilevel export`` call these.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from jbilevel import config as config_lib
from jbilevel import experiment, inputs
from jbilevel import sharding as sh


def load_config(run_dir: str | Path) -> experiment.ExperimentConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; is {run_dir} a directory written by "
                                "`jbilevel train --out`?")
    return config_lib.load(experiment.ExperimentConfig, path)


def load_task(cfg: experiment.ExperimentConfig, model_dir: Path):
    """The run's data, tokenised as in training (the saved model carries its tokenizer)."""
    spec = cfg.model
    if cfg.data.train and (spec.tokenizer or spec.path) not in (None, "char"):
        spec = dataclasses.replace(spec, tokenizer=str(model_dir))
    return inputs.load_task(cfg.task, cfg.data, spec)


def _load_model(model_dir: Path, mesh_cfg: sh.MeshConfig, param_dtype: str = "float32",
                compute_dtype: str | None = None):
    from jbilevel.models import build, load_pretrained, read_config

    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir}: no saved model (config.json); did the run finish?")
    config = read_config(str(model_dir)).replace(compute_dtype=compute_dtype)
    model = build(config)
    mesh, rules = sh.make_mesh(mesh_cfg), sh.AxisRules()
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), param_dtype))
    shardings = sh.tree_shardings(mesh, rules, model.param_axes(), shapes)
    _, params, _ = load_pretrained(str(model_dir), param_dtype, shardings=shardings)
    return model, params


def evaluate_run(run_dir: str | Path) -> dict:
    """Validation / test loss (and the task score for built-in tasks) of a run's saved model.

    Writes ``eval.json`` in the run directory and returns the same record.
    """
    from jbilevel.objectives import lm_example_loss

    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    model_dir = run_dir / "model"
    model, params = _load_model(model_dir, cfg.mesh, cfg.model.param_dtype,
                                cfg.model.compute_dtype)
    task = load_task(cfg, model_dir)
    loss = lm_example_loss(model.forward)
    bs = cfg.eval_batch_size
    result = {"run": str(run_dir), "val_loss": experiment.mean_loss(loss, params,
                                                                   task.validation, bs)}
    if task.test is not None:
        result["test_loss"] = experiment.mean_loss(loss, params, task.test, bs)
    if task.scorer is not None and task.test is not None:
        scores = experiment.evaluate(model, params, task, "test", bs)
        scores.pop("predictions")
        result.update({f"test_{k}": v for k, v in scores.items()})
    if jax.process_index() == 0:
        (run_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def evaluate_model(model_dir: str | Path, data: str, *, tokenizer: str | None = None,
                   schema: str = "auto", max_len: int = 512, batch_size: int = 16,
                   mesh: sh.MeshConfig | None = None) -> dict:
    """Mean per-example response NLL of a local HF model on an SFT file.

    Args:
      model_dir: HF model directory; its tokenizer is used unless ``tokenizer`` is given.
      data: SFT file or save_to_disk directory (any schema ``load_sft`` reads).
      mesh: device mesh for the params (default: every device, data parallel).
    """
    from jbilevel.data import load_sft
    from jbilevel.objectives import lm_example_loss

    model_dir = Path(model_dir)
    model, params = _load_model(model_dir, mesh or sh.MeshConfig())
    spec = experiment.ModelSpec(path=str(model_dir), tokenizer=tokenizer)
    ds = load_sft(data, schema=schema, tokenizer=inputs.load_tokenizer(spec), max_len=max_len,
                  overlength="truncate")
    loss = experiment.mean_loss(lm_example_loss(model.forward), params, ds, batch_size)
    return {"model": str(model_dir), "data": data, "n": len(ds), "loss": loss}


def export_run(run_dir: str | Path, out: str, *, top_frac: float | None = None,
               min_weight: float | None = None, format: str | None = None) -> int:
    """Writes the run's training rows with their learned weights (optionally a subset).

    Args:
      run_dir: the run directory (its ``weights.npy`` and ``config.yaml``).
      out: ``.jsonl`` file, or a directory for an HF dataset (``format="hf"``).
      top_frac / min_weight: keep the highest-weighted fraction, or weights >= min_weight.
    Returns:
      The number of rows written.
    """
    from jbilevel.data import export_curated

    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    path = run_dir / "weights.npy"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no learned weights; did the run finish?")
    s_N = np.load(path)
    data_set, _ = experiment.training_set(load_task(cfg, run_dir / "model"), cfg.method.method)
    if len(s_N) != len(data_set):
        raise ValueError(f"{path}: {len(s_N)} weights but the run's training set now has "
                         f"{len(data_set)} examples; were the data files changed?")
    return export_curated(data_set, s_N, out, format=format, top_frac=top_frac,
                          threshold=min_weight)

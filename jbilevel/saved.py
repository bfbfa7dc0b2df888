"""A finished run directory (``jbilevel train --out DIR``): evaluate its model, export its data.

A run directory holds ``config.yaml`` (the settings that applied to the run), ``model/``
(the HF model with its tokenizer; LoRA adapters already merged; a LoRA run's ``adapter/``
holds them alone, in PEFT's format) and ``weights.npy`` (one
learned weight per training example id). ``jbilevel eval`` and ``jbilevel export`` call these."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from jbilevel import config as config_lib
from jbilevel import experiment, inputs, report
from jbilevel import sharding as sh
from jbilevel.console import Console, load_report_lines
from jbilevel.errors import UserError


def load_config(run_dir: str | Path) -> experiment.ExperimentConfig:
    """The settings that applied to the run in ``run_dir`` (its ``config.yaml``).

    A built-in task's files live in the run's own ``data/`` directory, and ``config.yaml``
    names them where the run was made: when the directory has been moved or copied since and
    those paths are gone, the files are read from ``run_dir/data/`` instead.
    """
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise UserError(f"{path}: not found; is {run_dir} a directory written by "
                        "`jbilevel train --out`?")
    from jbilevel.data.tasks import SPLITS

    cfg = config_lib.load(experiment.ExperimentConfig, path)
    moved = {}
    for split in SPLITS:
        recorded = getattr(cfg.data, split)
        here = Path(run_dir).absolute() / "data" / f"{split}.jsonl"
        if (recorded and not Path(recorded).exists() and here.is_file()
                and Path(recorded).name == here.name and Path(recorded).parent.name == "data"):
            moved[split] = str(here)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **moved)) if moved else cfg


# What ``jbilevel eval`` may change of a run's settings or of a model's defaults: how the data
# is formatted, and where and in which dtype the weights are held (a model scored on another
# slice than it trained on, or read in bfloat16 where float32 would not fit). The rest of a
# run's settings do not affect its scoring; eval_batch_size and online.gather_params shape a
# run's decoding, which ``--model`` does not do (its rows per batch: ``--batch-size``);
# model.path is where a LoRA run's base is read (moved since the run).
MODEL_KEYS = ("data.", "mesh.", "model.param_dtype", "model.compute_dtype")
RUN_KEYS = (*MODEL_KEYS, "eval_batch_size", "online.gather_params", "model.path")


def eval_config(base: experiment.ExperimentConfig, overrides: Sequence[str],
                keys: Sequence[str] = RUN_KEYS) -> experiment.ExperimentConfig:
    """``base`` with the ``key=value`` overrides ``jbilevel eval`` takes (those under
    ``keys``: a key ending in ``.`` takes every field under it)."""
    def allowed(item: str) -> bool:
        key = item.partition("=")[0].strip()
        return any(key.startswith(k) if k.endswith(".") else key == k for k in keys)

    bad = [o for o in overrides if not allowed(o)]
    if bad:
        takes = ", ".join(k + "*" if k.endswith(".") else k for k in keys)
        raise config_lib.ConfigError(
            f"{', '.join(bad)}: eval takes {takes} only (e.g. data.chat_template=tokenizer "
            "mesh.data=1 mesh.fsdp=-1 model.param_dtype=bfloat16)")
    return config_lib.replace(base, list(overrides), "eval overrides")


def _run_tokenizer(cfg: experiment.ExperimentConfig, model_dir: Path):
    """The spec whose tokenizer is the run's own (a saved model carries its tokenizer)."""
    spec = cfg.model
    if cfg.data.train and (spec.tokenizer or spec.path) not in (None, "char"):
        spec = dataclasses.replace(spec, tokenizer=str(model_dir))
    return spec


def load_task(cfg: experiment.ExperimentConfig, model_dir: Path,
              console: Console | None = None,
              splits: tuple[str, ...] = ("train", "validation", "test")):
    """The run's data (``splits`` of it), tokenised as in training (the saved model carries
    its tokenizer)."""
    return experiment.load_data(dataclasses.replace(cfg, model=_run_tokenizer(cfg, model_dir)),
                                console or Console(), splits)


def _load_model(model_dir: Path, mesh_cfg: sh.MeshConfig, console: Console,
                param_dtype: str = "float32", compute_dtype: str | None = None):
    from jbilevel.models import build, load_pretrained, read_config

    if not (model_dir / "config.json").exists():
        raise UserError(f"{model_dir}: no saved model (config.json); did the run finish?")
    mesh, rules = sh.make_mesh(mesh_cfg), sh.AxisRules()
    console.info(f"mesh: {sh.describe_mesh(mesh)}")
    with console.phase(f"loading the model from {model_dir}"):
        config = read_config(str(model_dir)).replace(compute_dtype=compute_dtype)
        model = build(config)
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), param_dtype))
        shardings = sh.tree_shardings(mesh, rules, model.param_axes(), shapes)
        _, params, _ = load_pretrained(str(model_dir), param_dtype, shardings=shardings)
    return model, params


def _load_adapter(model, params, adapter_dir: Path, console: Console):
    """The PEFT-format LoRA adapters of ``adapter_dir`` for ``model``, on the mesh of
    ``params`` (split like the kernels they adapt, as in training)."""
    from jbilevel.models import load_adapter, lora_axes

    with console.phase(f"loading the adapters of {adapter_dir}") as phase:
        try:
            lora = load_adapter(str(adapter_dir), model.config)
        except (ValueError, FileNotFoundError) as e:
            raise UserError(str(e)) from None
        mesh = experiment.mesh_of(params)
        if mesh is not None:
            shardings = sh.tree_shardings(mesh, sh.AxisRules(),
                                          lora_axes(model.config, lora), lora)
            lora = jax.tree.map(lambda x, s: jax.make_array_from_callback(
                x.shape, s, x.__getitem__), lora, shardings)
        phase.summary = f"rank {lora.rank} on {', '.join(sorted(lora.weights))}"
    return lora


def _placement(model, params) -> dict:
    """How a model was scored: its mesh's axis sizes and its weights' and matmuls' dtypes."""
    mesh = experiment.mesh_of(params)
    dtype = str(jax.tree.leaves(params)[0].dtype)  # the dtype every weight was read in
    return {"mesh": None if mesh is None else dict(mesh.shape), "param_dtype": dtype,
            "compute_dtype": model.config.compute_dtype or dtype}


def _file_loss(model, params, data: str, data_cfg: inputs.DataConfig, tokenizer,
               batch_size: int, console: Console, lora=None) -> dict:
    with console.phase(f"reading and tokenising {data}") as phase:
        ds = inputs.load_split(data, data_cfg, tokenizer, field="--data")
        phase.summary = f"{len(ds)} examples"
    for line in load_report_lines("--data", data, ds.report, console.verbosity):
        console.info(line)
    with console.phase("evaluating") as phase:
        loss = experiment.mean_loss(*experiment.scoring_loss(model, params, lora), ds, batch_size,
                                    data_cfg.length_buckets,
                                    announce=experiment.announcer(console, "loss pass"))
        phase.summary = f"loss {loss:.4g}"
    return {"data": data, "n": len(ds), "loss": loss, "load_report": ds.report.as_dict()}


def evaluate_run(run_dir: str | Path, *, data: str | None = None, overrides: Sequence[str] = (),
                 console: Console | None = None) -> dict:
    """Validation / test loss (and the task metric on the splits the run scores) of a run's
    saved model.

    Args:
      run_dir: a directory written by ``jbilevel train --out``.
      data: score this SFT file instead of the run's own splits, formatted as the run's data
        was (its prompt template, chat template, bos, max_len), so the loss is the one the
        run itself would report for it.
      overrides: ``data.key=value`` changes to the run's data settings.
    Returns:
      The record, also written to ``run_dir/eval.json`` when the run's own splits are scored.

    A LoRA run is scored as its final evaluation scored it: its adapters (``adapter/``) over
    its base (``model.path``, read in the run's dtype), unmerged, as PEFT serves them;
    ``model/`` holds their merge into the base's dtype, which may round the update away
    (``eval --model <run>/model`` scores that). A run without ``adapter/`` (older versions)
    is scored from ``model/``.
    """
    console = console or Console()
    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    cfg = eval_config(cfg, overrides)
    model_dir = run_dir / "model"  # the run's tokenizer too
    lora = None
    if cfg.theta.kind == "lora" and cfg.model.path and (run_dir / "adapter").is_dir():
        if not (Path(cfg.model.path) / "config.json").exists():
            raise UserError(
                f"{run_dir}: a LoRA run is scored through adapter/ over its base, model.path "
                f"{cfg.model.path} in {run_dir / 'config.yaml'}, which is not a model "
                "directory (moved?); add model.path=<the base's directory> to the command "
                "(or set it there), or score the merged model: "
                f"jbilevel eval --model {model_dir} --data <file>")
        model, params = _load_model(Path(cfg.model.path), cfg.mesh, console,
                                    cfg.model.param_dtype, cfg.model.compute_dtype)
        lora = _load_adapter(model, params, run_dir / "adapter", console)
    else:
        model, params = _load_model(model_dir, cfg.mesh, console, cfg.model.param_dtype,
                                    cfg.model.compute_dtype)
    if data is not None:
        tokenizer = inputs.load_tokenizer(_run_tokenizer(cfg, model_dir))
        return {"run": str(run_dir), **_file_loss(model, params, data, cfg.data, tokenizer,
                                                   cfg.eval_batch_size, console, lora=lora),
                **_placement(model, params)}
    task = load_task(cfg, model_dir, console, splits=("validation", "test"))  # not train's
    if (note := inputs.withheld_note(cfg.data, run_dir)) is not None:
        console.info(note)
    loss, weights = experiment.scoring_loss(model, params, lora)
    bs, buckets = cfg.eval_batch_size, cfg.data.length_buckets
    programs: dict = {}  # the splits' passes share one program per batch length
    with console.phase("evaluating") as phase:
        result = {"run": str(run_dir)}
        for split, ds in (("validation", task.validation), ("test", task.test)):
            if ds is not None:
                result[f"{experiment.SPLIT_PREFIX[split]}_loss"] = experiment.mean_loss(
                    loss, weights, ds, bs, buckets, programs=programs,
                    announce=experiment.announcer(console, f"{split} loss pass"))
        result.update(experiment.score_splits(
            model, params, task, bs, gather_params=cfg.online.gather_params, lora=lora,
            buckets=buckets, console=console)[0])
        phase.summary = ", ".join(f"{k} {v:.4g}" for k, v in result.items()
                                  if isinstance(v, float))
    result["data"] = experiment.data_reports(cfg, task)
    result.update(_placement(model, params))
    if jax.process_index() == 0:
        (run_dir / "eval.json").write_text(report.to_json(result, indent=2) + "\n")
    return result


def evaluate_model(model_dir: str | Path, data: str, *, tokenizer: str | None = None,
                   data_cfg: inputs.DataConfig | None = None, batch_size: int = 16,
                   mesh: sh.MeshConfig | None = None, adapter: str | Path | None = None,
                   param_dtype: str = "float32", compute_dtype: str | None = None,
                   console: Console | None = None) -> dict:
    """Mean per-example response NLL of a local HF model on an SFT file.

    Args:
      model_dir: HF model directory; its tokenizer is used unless ``tokenizer`` is given.
      data: SFT file or save_to_disk directory (any schema ``load_sft`` reads).
      data_cfg: how to format it: the ``data`` settings of ``jbilevel train`` (prompt and chat
        template, bos, max_len, over-length policy; default: train's defaults), so the same
        model, file and settings give the loss a run reports.
      mesh: device mesh for the params (default: every device, data parallel, the weights
        whole on each; a model that does not fit one device needs ``fsdp`` / ``tensor``).
      adapter: a LoRA adapter directory in PEFT's format (a run's ``adapter/``, or PEFT's
        own) for ``model_dir``, scored unmerged over it.
      param_dtype / compute_dtype: the dtype the weights are read in, whatever they are
        stored in, and the matmuls' (None: the weights'); as ``model.*`` in training.
    Returns:
      The record: the model (and adapter), the data file, ``n`` rows scored, ``loss``, the
      file's load report, and the mesh and dtypes it was scored with.
    """
    console = console or Console()
    inputs.check_model_dir(str(model_dir), "--model")
    model_dir = Path(model_dir)
    model, params = _load_model(model_dir, mesh or sh.MeshConfig(), console, param_dtype,
                                compute_dtype)
    lora = None if adapter is None else _load_adapter(model, params, Path(adapter), console)
    spec = experiment.ModelSpec(path=str(model_dir), tokenizer=tokenizer)
    record = {"model": str(model_dir)} | ({} if adapter is None else {"adapter": str(adapter)})
    return {**record, **_file_loss(model, params, data, data_cfg or inputs.DataConfig(),
                                   inputs.load_tokenizer(spec), batch_size, console, lora=lora),
            **_placement(model, params)}


def export_run(run_dir: str | Path, out: str, *, top_frac: float | None = None,
               min_weight: float | None = None, format: str | None = None,
               console: Console | None = None) -> int:
    """Writes the run's training rows with their learned weights (optionally a subset).

    Args:
      run_dir: the run directory (its ``weights.npy`` and ``config.yaml``).
      out: ``.jsonl`` file, or a directory for an HF dataset (``format="hf"``).
      top_frac / min_weight: keep the highest-weighted fraction, or weights >= min_weight.
    Returns:
      The number of rows written.
    """
    from jbilevel.data import export_curated, select_ids

    console = console or Console()
    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    path = run_dir / "weights.npy"
    if not path.exists():
        raise UserError(f"{path}: no learned weights; did the run finish?")
    s_N = np.load(path)
    task = load_task(cfg, run_dir / "model", console)
    data_set, good_N = experiment.training_set(task, cfg.method.method)
    if len(s_N) != len(data_set):
        raise UserError(f"{path}: {len(s_N)} weights but the run's training set now has "
                        f"{len(data_set)} examples; were the data files changed?")
    with console.phase(f"writing {out}") as phase:
        n = export_curated(data_set, s_N, out, format=format, top_frac=top_frac,
                           threshold=min_weight)
        phase.summary = f"{n} of {len(data_set)} examples"
        if good_N is not None:  # a built-in task, or data.truth: how clean the selection is
            good_N = np.asarray(good_N) == 1
            kept = good_N[select_ids(s_N, top_frac=top_frac, threshold=min_weight)]
            phase.summary += (f"; by the ground truth {int(kept.sum())} of {int(good_N.sum())} "
                              f"good and {int((~kept).sum())} of {int((~good_N).sum())} bad "
                              "rows kept")
    return n

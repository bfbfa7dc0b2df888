"""One experiment end to end: a task, a model, a method; train, evaluate, report.

``run(config, out_dir)`` is what ``jbilevel train`` and ``jbilevel demo`` call. It builds the
task (a built-in task on a pretrained model is first written as SFT files, ``resolve``, and
then read like a user's), picks each method's training data (all of D_t, D_t + D_v, D_v, or
the known-good examples), trains with the sharded host loop (resuming from
``out_dir/checkpoints``), decodes the test prompts greedily, scores the learned weights against
the ground truth and writes the run report: ``results.json``, ``weights.csv``, plots, the
curated dataset and the model.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jbilevel import config as config_lib
from jbilevel import inputs, train, weights
from jbilevel import sharding as sh
from jbilevel.algorithms import MethodConfig, init_state, make_steps, refresh
from jbilevel.algorithms import online as online_lib
from jbilevel.checkpoint import Checkpointer
from jbilevel.objectives import lm_example_loss, lm_lora_example_loss


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """A built-in task (``jbilevel.data.tasks``), used when ``data.train`` is empty."""

    name: Literal["quality", "safety", "coverage"] = "quality"  # which built-in task
    # "pretrained": fine-tune model.path (default: the shipped base,
    # jbilevel.models.base_model_path()) on the task written as JSONL files (run_dir/data/);
    # "scratch": train the random model of the model fields on the character tokenizer
    base: Literal["pretrained", "scratch"] = "pretrained"
    seed: int = 0  # task generation seed (data, corruption)
    options: dict = dataclasses.field(default_factory=dict)  # the task's options, e.g. n_train


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A pretrained local HF model (``path``) or a random decoder (the shape fields below)."""

    path: str | None = None  # local HF model directory (config.json + *.safetensors)
    tokenizer: str | None = None  # HF tokenizer directory (default: path), or "char"
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # parameter storage dtype
    compute_dtype: Literal["float32", "bfloat16"] | None = None  # matmul dtype (None: storage)
    remat: bool = False  # recompute each layer's activations in the backward pass
    remat_policy: Literal["nothing", "dots"] = "nothing"  # with remat: what is kept
    attention: Literal["xla", "dot_product", "cudnn"] = "xla"  # "cudnn": flash attention (GPU)
    scan_unroll: int = 1  # layers per scan iteration (>= num_layers: all unrolled)
    family: Literal["llama", "gpt_neox", "gpt2"] = "llama"  # random model: architecture family
    hidden_size: int = 128  # random model: width (vocabulary comes from the tokenizer)
    num_layers: int = 2  # random model: decoder blocks
    num_heads: int = 4  # random model: attention heads
    intermediate_size: int = 512  # random model: MLP width


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one run needs; ``jbilevel train --config X.yaml key=value`` fills it."""

    task: TaskConfig = TaskConfig()  # the built-in task (used when data.train is empty)
    data: inputs.DataConfig = inputs.DataConfig()  # SFT files (train/validation/test)
    model: ModelSpec = ModelSpec()  # the model
    theta: inputs.ThetaConfig = inputs.ThetaConfig()  # full fine-tuning or LoRA adapters
    method: MethodConfig = MethodConfig()  # the algorithm and its step sizes
    online: online_lib.OnlineConfig = online_lib.OnlineConfig()  # self-refining generation
    loop: train.LoopConfig = train.LoopConfig()  # run length, logging, checkpoints
    mesh: sh.MeshConfig = sh.MeshConfig()  # device mesh (data, fsdp, tensor)
    batch_size: int = 64  # training rows per step (global, all processes)
    val_batch_size: int = 64  # validation rows per bmo / bds step
    hyper_batch_size: int = 0  # bds: train rows per hypergradient (0: all of them)
    eval_batch_size: int = 250  # prompts per generation batch at evaluation
    seed: int = 0  # model init and data order

    def __post_init__(self):
        for name in ("batch_size", "val_batch_size", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.hyper_batch_size < 0:
            raise ValueError(f"hyper_batch_size={self.hyper_batch_size} must be >= 0")
        if self.online.enabled and self.method.method not in online_lib.BASES:
            raise ValueError(f"online.every={self.online.every} runs on top of bmo or bds, not "
                             f"method {self.method.method!r}; set method.method or online.every=0")


def training_set(task, method: str):
    """The examples a method trains theta on, and the ids' ground truth (None if unknown)."""
    if method == "val":
        return task.validation, None
    if method == "mix":
        from jbilevel.data import concat

        mixed = concat([task.train, task.validation])
        if task.good_N is None:
            return mixed, None
        return mixed, np.concatenate([task.good_N, np.ones(len(task.validation), np.int32)])
    if method == "oracle":
        if task.good_N is None:
            raise ValueError("method 'oracle' needs known-good examples: the built-in tasks "
                             "have them; for data.train files set data.truth to the column "
                             "holding each row's ground truth (1 good, 0 bad)")
        ids = task.oracle_ids()
        return task.train.subset(ids), task.good_N[ids]
    return task.train, task.good_N


def _process_batcher(dataset, batch_size: int, mesh, rules, **kw):
    from jbilevel.data import Batcher

    ways = sh.data_parallel_size(mesh, rules)
    if batch_size % ways:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the mesh's data-parallel size {ways} "
            "(data x fsdp); change the batch size or the mesh"
        )
    count = jax.process_count()
    return Batcher(dataset, batch_size // count, process_index=jax.process_index(),
                   process_count=count, buckets=(_longest(dataset),), **kw)


def _longest(dataset) -> int:
    """One bucket: the longest sequence rounded up to 8 (one compile, little padding)."""
    return min(dataset.max_len, -(-int(dataset.length_N.max()) // 8) * 8)


def evaluate(model, params, task, split: str = "test", batch_size: int = 250) -> dict:
    """Greedy-decodes every prompt of ``split`` and scores the answers with the task metric."""
    from jbilevel.models import generate

    ds = task.splits[split]
    max_new = int((ds.length_N - ds.prompt_len_N).max())
    predictions: list[str] = []
    for batch in ds.prompt_batches(batch_size):
        out = generate(model, params, batch["prompt_ids"], batch["prompt_mask"],
                       jax.random.key(0), max_new_tokens=max_new, greedy=True,
                       eos_id=task.tokenizer.eos_id, pad_id=task.tokenizer.pad_id)
        tokens_BxT = np.asarray(out.tokens)[:, 0, :]
        for b in np.flatnonzero(batch["valid"]):
            predictions.append(task.tokenizer.decode(tokens_BxT[b]))
    return {**task.score(predictions, split), "predictions": predictions}


def split_loss(example_loss, dataset, batch_size: int) -> Callable[[Any], float]:
    """``params -> mean per-example loss over a whole split`` (fixed-shape batches, jitted once,
    padding rows ignored)."""
    from jbilevel.data import Batcher

    fn = jax.jit(example_loss)
    batches = list(Batcher(dataset, batch_size, shuffle=False,
                           buckets=(_longest(dataset),)).epoch_batches())

    def mean(params) -> float:
        total = count = 0.0
        for batch in batches:
            loss_B = np.asarray(fn(params, batch))
            total += float((loss_B * batch["valid"]).sum())
            count += float(batch["valid"].sum())
        return total / count

    return mean


def mean_loss(example_loss, params, dataset, batch_size: int) -> float:
    """Mean per-example loss over a whole split (fixed-shape batches, padding rows ignored)."""
    return split_loss(example_loss, dataset, batch_size)(params)


def state_setup(cfg: ExperimentConfig, model, n: int, mesh, rules, *, load_weights: bool):
    """``(init_fn, init_args, state_shardings, example_loss)`` of a run's TrainState.

    ``init_fn(*init_args)`` builds the fresh state. With ``model.path`` and ``load_weights``
    the pretrained params are read straight into their shards and passed as (donated)
    ``init_args``; without ``load_weights`` (resuming a full fine-tuning run, or compile-only
    checks) ``init_args`` are ``jax.ShapeDtypeStruct``s: enough for ``jax.eval_shape`` and a
    checkpoint restore. A LoRA run keeps the base params as ``state.frozen``, which
    checkpoints leave out (resuming reads the base again); ``example_loss`` matches
    ``make_steps(..., frozen=cfg.theta.kind == "lora")``.
    """
    from jbilevel.models import init_lora, load_pretrained, lora_axes

    lora = cfg.theta.kind == "lora"
    dtype = jnp.dtype(cfg.model.param_dtype)
    key = jax.random.key(cfg.seed)
    param_shapes = jax.eval_shape(lambda: model.init(key, dtype))
    param_axes = model.param_axes()

    def init(params=None):
        if params is None:
            params = model.init(key, dtype)
        if not lora:
            return init_state(params, n, cfg.method)
        adapters = init_lora(model, jax.random.fold_in(key, 1), rank=cfg.theta.rank,
                             alpha=cfg.theta.alpha, targets=cfg.theta.targets)
        return init_state(adapters, n, cfg.method, frozen=params)

    init_args: tuple = ()
    if cfg.model.path is not None:
        init_args = (param_shapes,)
    shapes = jax.eval_shape(init, *init_args)
    theta_axes = lora_axes(model.config, shapes.theta) if lora else param_axes
    state_sh = train.state_shardings(mesh, rules, shapes, theta_axes, cfg.method,
                                     frozen_axes=param_axes)
    if cfg.model.path is not None and load_weights:
        param_sh = sh.tree_shardings(mesh, rules, param_axes, param_shapes)
        _, params, _ = load_pretrained(cfg.model.path, dtype, shardings=param_sh)
        init_args = (params,)
    loss = lm_lora_example_loss(model.forward) if lora else lm_example_loss(model.forward)
    return init, init_args, state_sh, loss


def final_params(state, model, lora: bool):
    """The trained model's full params, on device: LoRA adapters merged into the base."""
    if not lora:
        return state.theta
    from jbilevel.models import merge_lora

    return jax.jit(merge_lora, static_argnums=2)(state.frozen, state.theta, model.config)


def resolve(cfg: ExperimentConfig, out_dir: str | Path) -> ExperimentConfig:
    """The configuration a run trains with: a built-in task on a pretrained model becomes files.

    With ``task.base: pretrained`` and no ``data.train``, writes the task's splits to
    ``out_dir/data/{train,validation,test}.jsonl`` (with the ground-truth column ``good``) and
    returns the config that reads them through the ordinary data path, with ``model.path``
    the shipped base unless one is set: ``jbilevel train --config out_dir/config.yaml`` runs
    the same thing from the files. Any other config is returned unchanged.
    """
    if cfg.data.train or cfg.task.base == "scratch":
        return cfg
    from jbilevel.models import base_model_path

    data = inputs.task_files(cfg.task, Path(out_dir) / "data", cfg.data)
    model = cfg.model
    if model.path is None:
        model = dataclasses.replace(model, path=base_model_path())
    return dataclasses.replace(cfg, data=data, model=model)


def run(cfg: ExperimentConfig, out_dir: str | Path, *, progress: bool | None = None) -> dict:
    """Trains and evaluates one configuration; resumable from ``out_dir/checkpoints``.

    Returns:
      The results record also written to ``out_dir/results.json``.
    """
    from jbilevel.models import build

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = resolve(cfg, out)
    config_lib.dump(cfg, out / "config.yaml")
    loop = cfg.loop if progress is None else dataclasses.replace(cfg.loop, progress=progress)
    task = inputs.load_task(cfg.task, cfg.data, cfg.model)
    data_set, good_N = training_set(task, cfg.method.method)
    n = len(data_set)
    lora = cfg.theta.kind == "lora"
    if cfg.online.enabled and lora:
        raise ValueError("online generation trains theta = the full model; set theta.kind=full "
                         "or online.every=0 (LoRA + online is not supported yet)")
    positions = data_set.max_len
    if cfg.online.enabled:  # generated rows: longest prompt + sampled tokens
        positions = max(positions, int(data_set.prompt_len_N.max()) + (
            cfg.online.max_new_tokens or int((data_set.length_N - data_set.prompt_len_N).max())))
    model = build(inputs.model_config(cfg.model, task.tokenizer, positions))

    mesh = sh.make_mesh(cfg.mesh)
    rules = sh.AxisRules()
    refresher = None
    if cfg.online.enabled:
        refresher = refresh.Refresher(
            cfg.online, model, data_set, weighting=cfg.method.weighting,
            batch_sharding=sh.batch_sharding(mesh, rules, 1), seed=cfg.seed, log_dir=out,
            scorer=getattr(task, "scorer", None))
    data = _process_batcher(data_set, cfg.batch_size, mesh, rules, seed=cfg.seed)
    val = _process_batcher(task.validation, cfg.val_batch_size, mesh, rules, seed=cfg.seed + 1)
    hyper = None
    if cfg.method.method == "bds":
        hyper_bs = cfg.hyper_batch_size or n
        hyper_bs += -hyper_bs % (sh.data_parallel_size(mesh, rules) * jax.process_count())
        hyper = _process_batcher(data_set, hyper_bs, mesh, rules, seed=cfg.seed + 2,
                                 shuffle=True)  # a fresh Hessian sample each time
    t0 = time.perf_counter()
    with Checkpointer(out / "checkpoints", keep=loop.keep) as ckpt:
        init, init_args, state_sh, example_loss = state_setup(
            cfg, model, n, mesh, rules, load_weights=ckpt.latest_step() is None or lora)
        steps = make_steps(example_loss, cfg.method, frozen=lora)
        if refresher is not None:  # the state also carries the buffer of generated pairs
            offline_init = init

            def init(*args):
                return offline_init(*args).replace(online=refresher.init_buffer())

            shapes = jax.eval_shape(init, *init_args)
            state_sh = state_sh.replace(online=online_lib.buffer_shardings(mesh, rules,
                                                                           shapes.online))
            steps = online_lib.make_online_steps(example_loss, model.forward, cfg.method,
                                                 cfg.online, seed=cfg.seed)
        compiled = train.compile_steps(steps, cfg.method, mesh, rules, state_sh)
        state, start = train.restore_or_init(ckpt, init, state_sh,
                                             train.data_sources(data, val, hyper), init_args)
        del init_args
        log = train.MetricsLog(out)
        eval_fn = None  # full validation loss every loop.eval_every steps
        if loop.eval_every and lora:  # (adapters, base): the base rides in the state
            val_loss = split_loss(lambda p, b: example_loss(p[0], p[1], b), task.validation,
                                  cfg.eval_batch_size)
            eval_fn = lambda s: {"val_loss": val_loss((s.theta, s.frozen))}  # noqa: E731
        elif loop.eval_every:
            val_loss = split_loss(example_loss, task.validation, cfg.eval_batch_size)
            eval_fn = lambda s: {"val_loss": val_loss(s.theta)}  # noqa: E731
        try:
            state, step = train.run(compiled, cfg.method, loop, state, data, val,
                                    start_step=start, ckpt=ckpt, hyper_batches=hyper, log=log,
                                    eval_fn=eval_fn, before_step=refresher)
            if refresher is not None and step > start:
                refresher.log_buffer(state, step)
        finally:
            log.close()
    train_seconds = time.perf_counter() - t0

    params = final_params(state, model, lora)
    plain_loss = lm_example_loss(model.forward)
    s_N = np.asarray(inputs.to_host(weights.weights(state.omega, cfg.method.weighting)))
    learned = cfg.method.method in ("bds", "bmo")
    result: dict[str, Any] = {
        "method": cfg.method.method, "online": refresher is not None, "task": task.name,
        "theta": cfg.theta.kind, "n_train": n, "steps": step,
        "train_seconds": round(train_seconds, 2),
        "val_loss": mean_loss(plain_loss, params, task.validation, cfg.eval_batch_size),
    }
    predictions = None
    if task.test is not None:
        result["test_loss"] = mean_loss(plain_loss, params, task.test, cfg.eval_batch_size)
    if task.scorer is not None and task.test is not None:  # decode the test prompts, score
        test = evaluate(model, params, task, "test", cfg.eval_batch_size)
        predictions = test.pop("predictions")
        result.update({f"test_{k}": v for k, v in test.items()})
    if learned:
        if good_N is not None:
            result.update({f"weight_{k}": v for k, v in task.score_weights(s_N).items()})
        health = weights.health(jnp.asarray(s_N))
        result.update({f"weight_{k}": float(v) for k, v in health.items()})
    host_params = inputs.to_host(params)
    if jax.process_index() == 0:
        write_report(out, result, task, data_set, good_N, s_N, predictions, model, host_params,
                     learned=learned)
    return result


def write_report(out: Path, result: dict, task, data_set, good_N, s_N, predictions, model,
                 params, *, learned: bool) -> None:
    """results.json, weights.csv (+ .npy), test predictions, plots, curated data and the model.

    ``good_N`` None (data from files: no ground truth) leaves the csv's ``good`` column empty;
    ``predictions`` None (no task metric) writes no test_predictions.jsonl.
    """
    from jbilevel import report
    from jbilevel.data import export_curated
    from jbilevel.models import save_pretrained

    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    np.save(out / "weights.npy", np.asarray(s_N, np.float32))
    with open(out / "weights.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "weight", "good", "preview"])
        for i in range(len(data_set)):
            writer.writerow([i, f"{s_N[i]:.6g}", "" if good_N is None else int(good_N[i]),
                             inputs.preview(data_set.rows[i])])
    if predictions is not None:
        with open(out / "test_predictions.jsonl", "w") as f:
            for row, pred in zip(task.test.rows, predictions, strict=True):
                f.write(json.dumps({"question": row.get("question", inputs.preview(row)),
                                    "prediction": pred,
                                    "answer": row.get("answer", row.get("response"))}) + "\n")
    report.plot_curves(out / "metrics.jsonl", out / "curves.png")
    if learned:
        report.plot_weights(s_N, good_N, out / "weights.png", title=result["method"])
        export_curated(data_set, s_N, str(out / "curated.jsonl"))
        export_curated(data_set, s_N, str(out / "curated_top50.jsonl"), top_frac=0.5)
    save_pretrained(str(out / "model"), params, model.config)
    inputs.save_tokenizer(task.tokenizer, str(out / "model"))

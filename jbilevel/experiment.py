"""One experiment end to end: a task, a model, a method; train, evaluate, report.

``run(config, out_dir)`` is what ``jbilevel train`` and ``jbilevel demo`` call. It checks that
``out_dir`` is new or holds this same run (``jbilevel.rundir``), reads the data files or builds
the built-in task (a built-in task on a pretrained model is first written as SFT files,
``resolve``, and then read like a user's), reporting what became of every row, picks each
method's training data (all of D_t, D_t + D_v, D_v, or the known-good examples), trains with
the sharded host loop (resuming from ``out_dir/checkpoints``), decodes the test prompts
greedily where the task has a metric, scores the learned weights against the ground truth
where there is one and writes the run report: ``results.json``, ``weights.csv``, plots, the
curated dataset and the model. Each phase says what it does and how long it took
(``jbilevel.console``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jbilevel import config as config_lib
from jbilevel import distributed, inputs, report, rundir, train, weights
from jbilevel import sharding as sh
from jbilevel.algorithms import MethodConfig, init_state, make_steps, refresh
from jbilevel.algorithms import online as online_lib
from jbilevel.algorithms.offline import UNIFORM_METHODS
from jbilevel.checkpoint import Checkpointer
from jbilevel.console import Console, load_report_lines
from jbilevel.objectives import lm_example_loss, lm_lora_example_loss


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """A built-in task (``jbilevel.data.tasks``), used when ``data.train`` is empty."""

    name: Literal["quality", "safety", "coverage"] = "quality"  # which built-in task
    # "pretrained": fine-tune model.path (default: the shipped base,
    # jbilevel.models.base_model_path()) on the task written as JSONL files (run_dir/data/);
    # "instruct": the same, model.path defaulting to the shipped instruction-tuned base
    # (base_model_path("instruct"), which already answers arithmetic in the chat format);
    # "scratch": train the random model of the model fields on the character tokenizer
    base: Literal["pretrained", "instruct", "scratch"] = "pretrained"
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
    # bds: training rows whose weights get a hypergradient each time, a fresh shuffled sample
    # (0: all N rows; the cost then grows with the data set). Rows per JVP: method.hyper_chunk.
    hyper_batch_size: int = 512
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
        chunk = self.method.train_chunk
        cut = {"batch_size": self.batch_size}  # the rows train_chunk cuts into passes
        if self.method.method == "bmo":
            cut["val_batch_size"] = self.val_batch_size
        if self.online.enabled:
            cut["online.batch_size"] = self.online.batch_size
        for name, rows in cut.items():
            if chunk and rows > chunk and rows % chunk:
                raise ValueError(
                    f"method.train_chunk={chunk} does not divide {name}={rows}: the "
                    "train step sums its gradient over passes of train_chunk rows each; set "
                    f"method.train_chunk to a divisor of {name}, or 0 for one pass")
        self._refuse_silently_wrong()

    def _refuse_silently_wrong(self):
        """Combinations that would run without an error and give a meaningless result."""
        m = self.method
        if m.method == "bmo" and m.weighting == "sigmoid":
            raise ValueError(
                "method.weighting=sigmoid with method.method=bmo: bmo's omega step lowers "
                "mean_b s_b(omega) l_b with the losses held fixed, and independent sigmoid "
                "weights each get a positive gradient s'(omega) l, so every weight falls toward "
                "0 and nothing is selected. Use weighting=softmax with bmo (weights compete, "
                "mean 1), or method=bds with sigmoid weights")
        if m.method == "bmo" and m.lam_decay > 0 and not self.loop.steps_per_epoch:
            raise ValueError(
                f"method.lam_decay={m.lam_decay} lowers bmo's lam once per epoch, but "
                "loop.steps_per_epoch=0 never ends one; set loop.steps_per_epoch to "
                "ceil(training rows / batch_size), or method.lam_decay=0")
        if m.decay_steps and m.decay_steps < self.loop.steps:
            raise ValueError(
                f"method.decay_steps={m.decay_steps} is below loop.steps={self.loop.steps}: the "
                f"model's step size reaches 0 at step {m.decay_steps} and the remaining steps "
                "change nothing; set method.decay_steps to loop.steps, or 0 for a constant "
                "step size")


# methods whose theta trains on the validation rows: their val_loss / val_<metric> are
# training scores (results.json says so: ``validation_in_training``)
TRAINS_ON_VALIDATION = ("mix", "val", "bmo")


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
        raise config_lib.ConfigError(
            f"batch size {batch_size} is not divisible by the mesh's data-parallel size {ways} "
            "(mesh.data x mesh.fsdp); change the batch size or the mesh"
        )
    count = jax.process_count()
    kw.setdefault("buckets", (longest_bucket(dataset),))
    return Batcher(dataset, batch_size // count, process_index=jax.process_index(),
                   process_count=count, **kw)


def positions(cfg: ExperimentConfig, data_set) -> int:
    """The longest sequence the run's model sees: ``data.max_len``, or with online generation
    a generated row (the longest prompt + the sampled tokens) if that is longer."""
    longest = data_set.max_len
    if cfg.online.enabled:
        longest = max(longest, int(data_set.prompt_len_N.max()) + (
            cfg.online.max_new_tokens or int((data_set.length_N - data_set.prompt_len_N).max())))
    return longest


def grouped(dataset, data_cfg: inputs.DataConfig) -> dict:
    """The Batcher options of ``data.length_buckets``: one bucket (the longest sequence), or
    that many length quantiles with rows grouped by length."""
    from jbilevel.data.batching import length_buckets

    n = data_cfg.length_buckets
    return dict(buckets=length_buckets(dataset.length_N, n, top=longest_bucket(dataset)),
                group_by_length=n > 1)


def hyper_cut_line(cuts, every: bool) -> str:
    """What bds's hypergradient takes from each length bucket, said once per run."""
    return (("bds: the hypergradient's per-example term takes " if every
             else "bds: each hypergradient draws ")
            + ", ".join(f"{end - start} rows at {length} tokens" for start, end, length in cuts))


def longest_bucket(dataset) -> int:
    """One bucket: the longest sequence rounded up to 8 (one compile, little padding)."""
    return min(dataset.max_len, -(-int(dataset.length_N.max()) // 8) * 8)


def evaluate(model, params, task, split: str = "test", batch_size: int = 250, *,
             gather_params: bool = True, lora=None, buckets: int = 1,
             announce: Callable | None = None) -> dict:
    """Greedy-decodes every prompt of ``split`` and scores the answers with the task metric.

    Every process calls it with the same arguments (params may span processes); the decoded
    tokens are gathered onto every host, so each returns the same scores. With params on a
    mesh of several devices the prompts and the KV cache are split over its data axes (the
    batch rounded up to a multiple of them with padding rows), as online generation's
    sampler calls are: each device decodes its own rows. ``gather_params=False`` keeps the
    weights split while decoding (see ``jbilevel.models.generate``); ``lora``: adapters over
    ``params``, unmerged. ``buckets`` > 1 (``data.length_buckets``): the prompts decoded
    longest first, each batch left-padded to the smallest of that many prompt lengths that
    holds it (one program per length) instead of the split's longest prompt; the answers come
    back in the split's order. Each call decodes until its rows have all ended (the split's
    longest reference answer is the budget). ``announce``: wraps each batch's decoding
    ``(params, prompt batch) -> answers``, e.g. ``Console.first_call``, which says when
    each prompt width's program compiles.
    """
    from jbilevel.models import generate

    ds = task.splits[split]
    max_new = answer_budget(ds)
    mesh = mesh_of(params)
    rows, put, on_mesh = batch_size, (lambda x: x), {}
    if mesh is not None and mesh.size > 1:
        rules = sh.AxisRules()
        rows, put = _rows_on(mesh, rules, batch_size)
        on_mesh = dict(mesh=mesh, rules=rules, gather_params=gather_params)

    def decode(params, batch):
        return generate(model, params, put(batch["prompt_ids"]), put(batch["prompt_mask"]),
                        jax.random.key(0), max_new_tokens=max_new, greedy=True,
                        eos_id=task.tokenizer.stop_ids, pad_id=task.tokenizer.pad_id,
                        lora=lora, **on_mesh)

    decode = announce(decode) if announce is not None else decode
    predictions: list = [None] * len(ds)
    for ids, valid, width in _decoding_batches(ds, rows, buckets):
        out = decode(params, ds.prompt_batch(ids, width, valid))
        tokens_BxT = inputs.to_host(out.tokens)[:, 0, :]
        for b in np.flatnonzero(valid):
            predictions[ids[b]] = task.tokenizer.decode(tokens_BxT[b])
    return {**task.score(predictions, split), "predictions": predictions}


def answer_budget(ds) -> int:
    """Tokens the final evaluation decodes for each prompt of split ``ds``: its longest
    reference answer (a static setting of the decoding program)."""
    return int((ds.length_N - ds.prompt_len_N).max())


def _decoding_batches(ds, rows: int, buckets: int):
    """Yields ``(ids, valid, width)`` for each decoding batch of :func:`evaluate`: ``rows``
    prompts (padding rows at the end, ``valid`` False) left-padded to ``width`` tokens."""
    from jbilevel.data.batching import length_buckets, smallest_bucket

    prompt_N = ds.prompt_len_N
    order = np.arange(len(ds)) if buckets == 1 else np.argsort(-prompt_N, kind="stable")
    lengths = length_buckets(prompt_N, buckets, top=int(prompt_N.max()))
    for start in range(0, len(ds), rows):
        ids = order[start:start + rows]
        valid = np.arange(rows) < len(ids)
        ids = np.concatenate([ids, np.zeros(rows - len(ids), ids.dtype)])
        yield ids, valid, smallest_bucket(lengths, int(prompt_N[ids[valid]].max()))


def evaluation_programs(validation, test, decoded, batch_size: int, buckets: int, ways: int
                        ) -> tuple[list[int], list[tuple[int, int]]]:
    """The shapes of a run's evaluation programs, as it will meet them on a mesh of ``ways``
    data-parallel ways (``eval_batch_size`` = ``batch_size``, ``data.length_buckets`` =
    ``buckets``): the lengths its loss passes pad batches of the ``validation`` and ``test``
    splits to (:func:`split_loss`; ``test`` may be None), longest first; and the ``(prompt
    width, answer budget)`` of each decoding program of the ``decoded`` splits
    (:func:`evaluate`), widest first. What ``scripts/compile_check.py --compile-cache``
    compiles ahead of the run."""
    rows = batch_size + -batch_size % ways
    lengths = {batch["input_ids"].shape[1] for ds in (validation, test) if ds is not None
               for batch in _split_batcher(ds, rows, buckets).epoch_batches()}
    decodes = {(width, answer_budget(ds)) for ds in decoded
               for _, _, width in _decoding_batches(ds, rows, buckets)}
    return sorted(lengths, reverse=True), sorted(decodes, reverse=True)


def _rows_on(mesh, rules: sh.AxisRules, batch_size: int):
    """(rows, put) for host batches evaluated on ``mesh``: the batch size rounded up to a
    multiple of its data-parallel split (padding rows), and ``put(array)``, which splits an
    array's rows over the data axes when every process holds the whole batch."""
    sharding = sh.batch_sharding(mesh, rules, 1)  # a prefix: rows split, other dims whole

    def put(x):
        return jax.make_array_from_callback(x.shape, sharding, x.__getitem__)

    return batch_size + -batch_size % sh.data_parallel_size(mesh, rules), put


SPLIT_PREFIX = {"validation": "val", "test": "test"}  # results.json keys: val_accuracy, ...


def score_splits(model, params, task, batch_size: int, *,
                 gather_params: bool = True, lora=None, buckets: int = 1,
                 console: Console | None = None) -> tuple[dict, dict]:
    """Greedy answers to the prompts of each split in ``task.scored``, scored with the task
    metric (:func:`evaluate`; ``lora``: adapters over ``params``, unmerged; ``buckets``:
    prompt lengths; ``console``: says when each decoding program compiles).

    Returns: ({"val_<metric>" / "test_<metric>": value}, {split: decoded answers}); both empty
    for a task without a metric.
    """
    scores: dict = {}
    predictions: dict = {}
    if task.scorer is None:
        return scores, predictions
    for split in task.scored:
        if split in task.splits:
            record = evaluate(model, params, task, split, batch_size,
                              gather_params=gather_params, lora=lora, buckets=buckets,
                              announce=None if console is None else announcer(
                                  console, f"decoding of the {split} answers"))
            predictions[split] = record.pop("predictions")
            scores.update({f"{SPLIT_PREFIX[split]}_{k}": v for k, v in record.items()})
    return scores, predictions


def mesh_of(params):
    """The mesh the params are laid out on (None: not on a mesh, e.g. one device)."""
    for leaf in jax.tree.leaves(params):
        if isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding):
            return leaf.sharding.mesh
    return None


def loss_program(example_loss, mesh, rules: sh.AxisRules):
    """The jitted program of :func:`split_loss` on ``mesh``: ``(params, batch) -> per-row
    losses``, replicated, the activations laid out as a train step's (``mesh`` None: params
    on no mesh)."""
    if mesh is None:
        return jax.jit(example_loss)

    def pinned(params, batch):
        with sh.activation_sharding(mesh, rules):
            return example_loss(params, batch)

    return jax.jit(pinned, out_shardings=sh.replicated(mesh))


def split_loss(example_loss, dataset, batch_size: int, buckets: int = 1, *,
               announce: Callable | None = None,
               programs: dict | None = None) -> Callable[[Any], float]:
    """``params -> mean per-example loss over a whole split`` (fixed-shape batches, jitted once,
    padding rows ignored; ``buckets`` > 1: the rows sorted by length, each batch padded to the
    smallest of that many lengths that holds it, one program per length, as
    ``data.length_buckets`` pads training batches). ``announce``: wraps the jitted program,
    e.g. ``Console.first_call``, which says when each of its shapes compiles. ``programs``:
    a dict (mesh -> jitted program) shared by the passes over several splits with the same
    ``example_loss``, so that a length one split's batches compiled serves the others.

    With params on a mesh, each batch's rows are split over its data axes like a training
    batch (the batch size is rounded up to a multiple of them with padding rows) and the
    per-row losses come back replicated: params may span several processes, each process
    holds the whole split, and every process must call the returned function.
    """
    rules = sh.AxisRules()
    programs = {} if programs is None else programs  # mesh -> jitted loss
    compiled: dict = {}  # mesh -> that program, announced
    announce = announce or (lambda fn: fn)

    def place(mesh):
        if mesh not in compiled:
            if mesh not in programs:
                programs[mesh] = loss_program(example_loss, mesh, rules)
            compiled[mesh] = announce(programs[mesh])
        return compiled[mesh]

    batches: dict = {}  # rows per batch -> the split's batches

    def mean(params) -> float:
        mesh = mesh_of(params)
        if mesh is None:
            fn, rows, put = place(None), batch_size, lambda b: b
        else:
            fn = place(mesh)
            rows, put_rows = _rows_on(mesh, rules, batch_size)

            def put(batch):
                return {k: put_rows(v) for k, v in batch.items()}
        if rows not in batches:
            batches[rows] = list(_split_batcher(dataset, rows, buckets).epoch_batches())
        total = count = 0.0
        for batch in batches[rows]:
            loss_B = np.asarray(fn(params, put(batch)))
            total += float((loss_B * batch["valid"]).sum())
            count += float(batch["valid"].sum())
        return total / count

    return mean


def _split_batcher(dataset, rows: int, buckets: int):
    """One pass over a split: in id order at one length, or sorted by length (the rows
    re-identified: a mean needs no ids) over ``buckets`` lengths."""
    from jbilevel.data import Batcher
    from jbilevel.data.batching import length_buckets

    if buckets == 1:
        return Batcher(dataset, rows, shuffle=False, buckets=(longest_bucket(dataset),))
    lengths = length_buckets(dataset.length_N, buckets, top=longest_bucket(dataset))
    return Batcher(dataset.subset(np.argsort(-dataset.length_N, kind="stable")), rows,
                   shuffle=False, buckets=lengths)


def mean_loss(example_loss, params, dataset, batch_size: int, buckets: int = 1, *,
              announce: Callable | None = None, programs: dict | None = None) -> float:
    """Mean per-example loss over a whole split (see :func:`split_loss`; every process calls
    it when params span several)."""
    return split_loss(example_loss, dataset, batch_size, buckets, announce=announce,
                      programs=programs)(params)


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
    loss = lm_lora_example_loss(model) if lora else lm_example_loss(model)
    return init, init_args, state_sh, loss


def scoring_loss(model, params, lora=None):
    """``(example_loss(weights, batch), weights)`` for :func:`mean_loss`: the model's, through
    LoRA adapters over ``params`` unmerged when ``lora`` is given (as training and PEFT
    compute them)."""
    if lora is None:
        return lm_example_loss(model), params
    return weights_loss(lm_lora_example_loss(model), True), (lora, params)


def weights_loss(example_loss, lora: bool):
    """A train step's ``example_loss`` as a function of one weights argument, as the
    evaluation's loss passes take it: a LoRA run's ``(adapters, base)``."""
    if not lora:
        return example_loss
    return lambda w, batch: example_loss(w[0], w[1], batch)


def announcer(console: Console, what: str) -> Callable:
    """``announce`` for :func:`split_loss` and :func:`evaluate`: the console says when each
    of ``what``'s programs compiles, or loads from the compilation cache."""
    return lambda fn: console.first_call(fn, what)


def final_params(state, model, lora: bool):
    """The trained model's full params, on device: LoRA adapters merged into the base."""
    if not lora:
        return state.theta
    from jbilevel.models import merge_lora

    return jax.jit(merge_lora, static_argnums=2)(state.frozen, state.theta, model.config)


def resolve(cfg: ExperimentConfig, out_dir: str | Path, *, write: bool = False
            ) -> ExperimentConfig:
    """The configuration a run trains with: a built-in task on a pretrained model becomes files.

    With ``task.base: pretrained`` (or ``instruct``) and no ``data.train``, returns the config
    that reads the task's splits from ``out_dir/data/{train,validation,test}.jsonl`` (with the
    ground-truth column ``good``) through the ordinary data path, with ``model.path`` the
    shipped base (``base_model_path(task.base)``) unless one is set, and with ``write``
    writes those files (deterministic in the task's seed and options): ``jbilevel train
    --config out_dir/config.yaml`` runs the same thing from the files. Any other config is
    returned unchanged.
    """
    if cfg.data.train or cfg.task.base == "scratch":
        return cfg
    from jbilevel.models import base_model_path

    data = inputs.task_files(cfg.task, Path(out_dir) / "data", cfg.data, write=write)
    model = cfg.model
    if model.path is None:
        model = dataclasses.replace(model, path=base_model_path(cfg.task.base))
    return dataclasses.replace(cfg, data=data, model=model)


def load_data(cfg: ExperimentConfig, console: Console,
              splits: tuple[str, ...] = ("train", "validation", "test")):
    """The run's task (built-in, or the SFT files tokenised), saying what became of each row;
    ``splits``: the files to read (:func:`jbilevel.inputs.load_task`)."""
    what = ("reading and tokenising data" if cfg.data.train
            else f"building the built-in task {cfg.task.name!r}")
    with console.phase(what) as phase:
        task = inputs.load_task(cfg.task, cfg.data, cfg.model, splits)
        phase.summary = ", ".join(f"{name} {len(ds)}" for name, ds in task.splits.items())
    first = next(iter(task.splits.values())).report  # the training file's, when it is read
    if cfg.data.train and first.response_end:
        console.info(f"  responses end with {first.response_end} "
                     f"(data.response_end={cfg.data.response_end})")
    if cfg.data.train and first.assistant_turns:
        console.info(f"  {first.assistant_turns} "
                     f"(data.assistant_turns={cfg.data.assistant_turns})")
    for name, ds in task.splits.items():
        for line in load_report_lines(name, _source(cfg, name), ds.report, console.verbosity):
            console.info(line)
        if ds.report.n_truncated or ds.report.n_skipped:
            console.warn(f"{name} {_source(cfg, name)}: {ds.report.n_truncated} examples "
                         f"truncated to data.max_len={ds.max_len}, {ds.report.n_skipped} "
                         "rows skipped (listed in results.json under data)")
    return task


def _source(cfg: ExperimentConfig, split: str) -> str:
    return getattr(cfg.data, split) if cfg.data.train else f"built-in {cfg.task.name}"


def data_reports(cfg: ExperimentConfig, task) -> dict:
    """Per split: its source and what was read, kept, truncated and skipped (and why)."""
    return {name: {"source": _source(cfg, name), **ds.report.as_dict()}
            for name, ds in task.splits.items()}


def run(cfg: ExperimentConfig, out_dir: str | Path, *, progress: bool | None = None,
        console: Console | None = None) -> dict:
    """Trains and evaluates one configuration in its own run directory.

    ``out_dir`` belongs to one run (``jbilevel.rundir``): a new directory records the
    configuration and a fingerprint of the data; an existing one resumes from its newest
    checkpoint when it holds the same run and is refused (RunDirError) otherwise, before
    anything is written. ``progress`` overrides ``loop.progress`` (the bar); ``console``
    says what each phase does and how long it took (default: stderr, normal verbosity).

    Returns:
      The results record also written to ``out_dir/results.json``. Its ``interrupted`` is
      None for a finished run; for one that stopped early (a non-finite loss, out of device
      memory, or the loop returning before ``loop.steps``) it says why, and only
      results.json is written (the last good checkpoint stays in ``out_dir/checkpoints``).

    Raises:
      train.Preempted: SIGTERM stopped the training loop at a step whose checkpoint it
        wrote; results.json says so (``interrupted``, reason ``sigterm``), and the same call
        resumes.
      train.Interrupted: a first Ctrl-C did (reason ``sigint``); a ``KeyboardInterrupt``.

    In a multi-process run a process that stops by itself (out of memory on its devices, an
    exception of its own) tells the others (``jbilevel.distributed.announce_stop``), and
    writes results.json even if it is not process 0; the others leave within
    ``distributed.STOP_GRACE_S`` (``jbilevel train`` then ends every process with status 3).
    """
    with distributed.stopping_together():
        return _run(cfg, out_dir, progress=progress, console=console)


def _run(cfg: ExperimentConfig, out_dir: str | Path, *, progress: bool | None,
         console: Console | None) -> dict:
    from jbilevel.models import build

    console = console or Console()
    out = Path(out_dir)
    requested, cfg = cfg, resolve(cfg, out)
    resuming = rundir.check_config(out, cfg)
    if jax.process_count() > 1:  # every process has read the directory before process 0
        # writes to it (the task's files, config.yaml): a slower one would find a directory
        # that is neither empty nor a run, or this run's config.yaml, and judge wrongly
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jbilevel: run directory checked")
    if cfg is not requested:  # the task's files, only now: a refused run writes nothing
        if resuming:
            rundir.check_task_files(out, cfg.task)
        if jax.process_index() == 0:
            resolve(requested, out, write=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jbilevel: task files written")
    loop = cfg.loop if progress is None else dataclasses.replace(cfg.loop, progress=progress)
    if cfg.model.path is not None:
        inputs.check_model_dir(cfg.model.path)
    task = load_data(cfg, console)
    data_set, good_N = training_set(task, cfg.method.method)
    n = len(data_set)
    learned = cfg.method.method not in UNIFORM_METHODS  # bds, bmo: they learn the weights
    lora = cfg.theta.kind == "lora"
    model = build(inputs.model_config(cfg.model, task.tokenizer, positions(cfg, data_set)))
    fingerprint = rundir.fingerprint(task, cfg.model.path)
    latest = None
    if resuming:
        rundir.check_fingerprint(out, fingerprint, cfg.model.path)
        latest = rundir.latest_checkpoint(out)
        if latest is not None and latest > loop.steps:
            raise rundir.RunDirError(
                f"--out {out}: its newest checkpoint is at step {latest}, beyond "
                f"loop.steps={loop.steps}; set loop.steps >= {latest} to resume it, or use "
                "another --out")
    if jax.process_index() == 0:
        rundir.record(out, cfg, fingerprint, rundir.model_summary(model.config, cfg.model.path))
    console.info(f"run directory {out}: " + (
        f"resuming (newest checkpoint: step {latest})" if latest is not None
        else "continuing (no checkpoint yet)" if resuming else "new run"))

    mesh = sh.make_mesh(cfg.mesh)
    console.info(f"mesh: {sh.describe_mesh(mesh)}")
    rules = sh.AxisRules()
    refresher = None
    if cfg.online.enabled:
        refresher = refresh.Refresher(
            cfg.online, model, data_set, weighting=cfg.method.weighting,
            batch_sharding=sh.batch_sharding(mesh, rules, 1), seed=cfg.seed, log_dir=out,
            scorer=getattr(task, "scorer", None), rules=rules, buckets=cfg.data.length_buckets,
            console=console)
    ways = sh.data_parallel_size(mesh, rules)
    if cfg.method.train_chunk % ways:
        raise config_lib.ConfigError(
            f"method.train_chunk={cfg.method.train_chunk} is not a multiple of the mesh's "
            f"data-parallel size {ways} (mesh.data x mesh.fsdp): each pass's rows are split "
            "over those devices; change method.train_chunk or the mesh")
    data = _process_batcher(data_set, cfg.batch_size, mesh, rules, seed=cfg.seed,
                            **grouped(data_set, cfg.data))
    # one length for the validation batches: bmo's step takes one of each, so several of
    # theirs would multiply its programs (and the validation set is small)
    val = _process_batcher(task.validation, cfg.val_batch_size, mesh, rules, seed=cfg.seed + 1)
    if cfg.method.method == "bmo" and cfg.method.lam_decay and (
            loop.steps_per_epoch != data.steps_per_epoch):
        raise ValueError(
            f"loop.steps_per_epoch={loop.steps_per_epoch}, but the training set is "
            f"{data.steps_per_epoch} steps per epoch ({n} rows, batch_size {cfg.batch_size}): "
            f"bmo's lam would fall by method.lam_decay every {loop.steps_per_epoch} steps, not "
            f"every epoch; set loop.steps_per_epoch={data.steps_per_epoch}")
    hyper, hyper_rows, cuts, scales, hyper_args = None, None, None, None, None
    if cfg.method.method == "bds":
        hyper_bs = min(cfg.hyper_batch_size or n, n)
        hyper_bs += -hyper_bs % (sh.data_parallel_size(mesh, rules) * jax.process_count())
        blocks = {}
        if cfg.data.length_buckets > 1:
            # each length bucket's rows take their per-example term at that length (online
            # bds: its offline rows): every row each time, sorted by length, or a sample
            # with a fixed number of rows from each bucket
            from jbilevel.algorithms.offline import offline_hyper_rows
            from jbilevel.data.batching import hyper_cut

            # (each block's rows a multiple of the data-parallel devices, so that it splits
            # evenly over them: batching.even_blocks)
            cuts, scales, every = hyper_cut(data_set.length_N, hyper_bs, data.buckets, ways)
            blocks = dict(buckets=data.buckets[-1:],
                          **(dict(sort_by_length=True) if every else dict(strata=cuts)))
            hyper_rows = offline_hyper_rows(cfg.method, blocks=cuts, scales=scales)
            console.info(hyper_cut_line(cuts, every))
        hyper = _process_batcher(data_set, hyper_bs, mesh, rules, seed=cfg.seed + 2,
                                 shuffle=True, **blocks)  # a fresh Hessian sample each time
        if refresher is not None:  # its buffer rows, from each length bucket at its width
            hyper_args = refresher.hyper_args(online_lib.hyper_buffer_rows(
                refresher.capacity, hyper_bs, n, ways), ways)
    t0 = time.perf_counter()
    interrupted, preempted = None, None
    step = start = 0
    with Checkpointer(out / "checkpoints", keep=loop.keep) as ckpt:
        load = cfg.model.path is not None and (ckpt.latest_step() is None or lora)
        doing = f"loading weights from {cfg.model.path}" if load else "setting up the model"
        with console.phase(doing) as phase, train.naming_setup_out_of_memory(doing):
            init, init_args, state_sh, example_loss = state_setup(
                cfg, model, n, mesh, rules, load_weights=ckpt.latest_step() is None or lora)
            phase.summary = rundir.model_summary(model.config, cfg.model.path)
        steps = make_steps(example_loss, cfg.method, frozen=lora, hyper_rows=hyper_rows)
        if refresher is not None:  # the state also carries the buffer of generated pairs
            offline_init = init

            def init(*args):
                return offline_init(*args).replace(online=refresher.init_buffer())

            shapes = jax.eval_shape(init, *init_args)
            state_sh = state_sh.replace(online=online_lib.buffer_shardings(mesh, rules,
                                                                           shapes.online))
            steps = online_lib.make_online_steps(example_loss, model, cfg.method,
                                                 cfg.online, seed=cfg.seed, frozen=lora,
                                                 hyper_blocks=cuts, hyper_scales=scales)
        compiled = train.compile_steps(steps, cfg.method, mesh, rules, state_sh)
        train_step = f"{cfg.method.method} train step"
        compiled = dataclasses.replace(
            compiled, train=console.first_call(compiled.train, train_step + (
                " with generated rows" if refresher is not None else "")),
            hyper=console.first_call(compiled.hyper, "hypergradient step"),
            train_offline=console.first_call(compiled.train_offline, train_step))
        latest = ckpt.latest_step()
        doing = (f"restoring the checkpoint of step {latest}" if latest is not None
                 else "initialising the train state")
        state_gib = sh.per_device_bytes(jax.eval_shape(init, *init_args), state_sh)[1] / 2**30
        with console.phase(doing), train.naming_setup_out_of_memory(doing, state_gib):
            # earlier: the earlier sessions' time up to that checkpoint
            state, start, earlier = train.restore_or_init(
                ckpt, init, state_sh, train.data_sources(data, val, hyper), init_args)
        del init_args
        if not lora:  # LoRA's adapters are float32 whatever the base's dtype
            _warn_if_steps_round_away(state.theta, cfg.method.lr_theta, console)
        if start:
            console.info(f"resumed from step {start}" + (
                f" of {loop.steps}: the run is complete; evaluating it again"
                if start >= loop.steps else f"; training to step {loop.steps}"))
            if jax.process_index() == 0:  # what this run logs again after the checkpoint
                dropped = {"metrics.jsonl": report.trim_metrics(out / "metrics.jsonl", start)}
                if refresher is not None:
                    dropped["generations.jsonl"] = refresher.trim_log(
                        start, complete=start >= loop.steps)
                if any(dropped.values()):
                    console.info(f"dropped the records logged after the checkpoint of step "
                                 f"{start}, which the resumed run logs again: " + ", ".join(
                                     f"{name} {n}" for name, n in dropped.items()))
        log = train.MetricsLog(out, resumed_from=start)
        eval_fn = None  # full validation loss every loop.eval_every steps
        evaluated: dict = {}  # its latest value: at the last step, the final evaluation's
        # the evaluation's loss (a LoRA run's of (adapters, base)) and its jitted passes, one
        # per mesh, shared by every split and the final evaluation
        eval_loss, eval_programs = weights_loss(example_loss, lora), {}
        if loop.eval_every:
            val_loss = split_loss(eval_loss, task.validation, cfg.eval_batch_size,
                                  cfg.data.length_buckets, programs=eval_programs,
                                  announce=announcer(console, "validation loss pass"))
            if lora:  # (adapters, base): the base rides in the state
                weights_of = lambda s: (s.theta, s.frozen)  # noqa: E731
            else:
                weights_of = lambda s: s.theta  # noqa: E731

            def eval_fn(state):
                evaluated["val_loss"] = val_loss(weights_of(state))
                return dict(evaluated)
        if eval_fn is not None and learned and good_N is not None:
            eval_fn = _with_weight_scores(eval_fn, task, cfg.method.weighting)
        step = start
        try:
            state, step = train.run(compiled, cfg.method, loop, state, data, val,
                                    start_step=start, ckpt=ckpt, hyper_batches=hyper, log=log,
                                    eval_fn=eval_fn, before_step=refresher,
                                    offline_until=cfg.online.start,  # online runs only
                                    train_args=refresher and refresher.train_args,
                                    hyper_args=hyper_args,
                                    console=console,
                                    clock=lambda: earlier + time.perf_counter() - t0)
            if refresher is not None and step > start:
                refresher.log_buffer(state, step)
        except train.NonFiniteLossError as e:
            interrupted = {"reason": "non_finite_loss", "message": str(e)}
        except train.OutOfMemoryError as e:  # maybe on this process's devices alone: the
            # others hear of it now, before the checkpointer closes (its writes sync them)
            distributed.announce_stop(str(e))
            interrupted = {"reason": "out_of_memory", "message": str(e)}
        except (train.Preempted, train.Interrupted) as stop:  # every process stopped at
            # the same step, saved
            interrupted = {"reason": stop.reason, "message": str(stop)}
            preempted, step = stop, stop.step
        finally:
            log.close()
            console.close_bar()
    # every session's time: the earlier ones' up to the checkpoint this one resumed from
    # (what they spent after it is lost with them) and this one's, loading and compiling in
    train_seconds = earlier + time.perf_counter() - t0
    if interrupted is None and step < loop.steps:
        interrupted = {"reason": "stopped_early",
                       "message": f"the training loop stopped at step {step} of {loop.steps}; "
                                  "rerun the same command to resume"}
    result: dict[str, Any] = {
        "method": cfg.method.method, "online": refresher is not None, "task": task.name,
        "theta": cfg.theta.kind, "n_train": n, "steps": step, "resumed_from": start,
        "train_seconds": round(train_seconds, 2), "steps_planned": loop.steps,
        "interrupted": interrupted,
        "validation_in_training": cfg.method.method in TRAINS_ON_VALIDATION,
        "test_withheld": cfg.data.test_withheld,  # data.score_test=false: no test_* figures
    }

    def stopped(interrupted: dict) -> dict:  # no final evaluation, weights or model
        interrupted["last_checkpoint"] = rundir.latest_checkpoint(out)
        result["interrupted"] = interrupted
        result["data"] = data_reports(cfg, task)
        # a process that stops by itself says so and writes the record: process 0 may be
        # blocked in a collective (or stopped the same way)
        first = preempted is None and distributed.announce_stop(interrupted["message"])
        console.warn(f"run interrupted ({interrupted['reason']}): {interrupted['message']}",
                     own=first)
        if jax.process_index() == 0 or first:
            _write_json(out / "results.json", result)
        if preempted is not None:
            raise preempted  # exit status 143 / a KeyboardInterrupt; the same command resumes
        return result

    if interrupted is not None:  # not a finished run
        return stopped(interrupted)
    # the loop evaluates at its last step: the final state's validation loss, measured
    last_val = evaluated.get("val_loss") if step == loop.steps and step > start else None
    try:  # on a copy: a final evaluation that stops leaves none of its figures in result
        return _finish(cfg, out, console, dict(result), state, model, lora, task, data_set,
                       good_N, learned, eval_loss, eval_programs, val_loss=last_val)
    except train.OutOfMemoryError as e:  # the final state is saved: a rerun evaluates it
        return stopped({"reason": "out_of_memory", "message": str(e)})


def _finish(cfg, out: Path, console, result: dict, state, model, lora: bool, task, data_set,
            good_N, learned: bool, loss: Callable, programs: dict,
            val_loss: float | None = None) -> dict:
    """A finished run's final evaluation (out of device memory: ``train.OutOfMemoryError``),
    report and model. A LoRA run is scored through its adapters over the base, unmerged (the
    function it trained; ``model/`` is the merge, see :func:`_merge_rounding`). ``val_loss``:
    the state's validation loss when the loop has just measured it (its evaluation at the
    last step), which the final evaluation then takes instead of a pass of its own.
    ``loss``, ``programs``: the loop's evaluation loss and its jitted passes
    (:func:`split_loss`), which the final passes share."""
    if lora:
        result.update(_merge_rounding(state, model, console))
    base, adapters = (state.frozen, state.theta) if lora else (state.theta, None)
    _, scored = scoring_loss(model, base, adapters)  # the weights as ``loss`` takes them
    if (note := inputs.withheld_note(cfg.data, out)) is not None:
        console.info(note)
    s_N = _host_weights(state, cfg.method.weighting)
    last = f"{out / 'checkpoints'} step {rundir.latest_checkpoint(out)}"
    bs, buckets = cfg.eval_batch_size, cfg.data.length_buckets
    with (train.naming_out_of_memory("final evaluation", result["steps"], last),
          console.phase("final evaluation") as phase):
        result["val_loss"] = (mean_loss(loss, scored, task.validation, bs, buckets,
                                        announce=announcer(console, "validation loss pass"),
                                        programs=programs)
                              if val_loss is None else val_loss)
        if task.test is not None:
            result["test_loss"] = mean_loss(loss, scored, task.test, bs, buckets,
                                            announce=announcer(console, "test loss pass"),
                                            programs=programs)
        scores, predictions = score_splits(model, base, task, bs, lora=adapters,
                                           gather_params=cfg.online.gather_params,
                                           buckets=buckets, console=console)
        result.update(scores)
        if learned:
            if good_N is not None:
                result.update({f"weight_{k}": v for k, v in task.score_weights(s_N).items()})
            health = weights.health(jnp.asarray(s_N))
            result.update({f"weight_{k}": float(v) for k, v in health.items()})
        phase.summary = ", ".join(f"{k} {v:.4g}" for k, v in result.items()
                                  if k.startswith(("val_", "test_", "weight_"))
                                  and isinstance(v, float))
    result["data"] = data_reports(cfg, task)
    # leaf by leaf: never whole on every host
    host_params = inputs.to_process0(final_params(state, model, lora))
    host_adapters = None if adapters is None else inputs.to_process0(adapters)
    if jax.process_index() == 0:
        with console.phase(f"writing the run report and the model to {out}"):
            write_report(out, result, task, data_set, good_N, s_N, predictions, model,
                         host_params, learned=learned, adapters=host_adapters,
                         base_model=cfg.model.path)
    if jax.process_count() > 1:  # no process reads the report (e.g. `eval` next) before it exists
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jbilevel: run report written")
    return result


def _write_json(path: Path, record: dict) -> None:
    """Writes by renaming a temporary file of this process's own: two processes of a stopped
    run may both write the record, and a reader sees one whole file."""
    tmp = path.with_name(f"{path.name}.{jax.process_index()}.tmp")
    tmp.write_text(report.to_json(record, indent=2) + "\n")
    os.replace(tmp, path)


ROUNDED_AWAY_WARN = 0.1  # warn when a step of lr_theta leaves this share of weights as they were


def rounded_away_share(theta, step: float) -> float:
    """The share of ``theta``'s elements that a step of size ``step`` leaves unchanged in
    their own dtype (``w + step`` rounds back to ``w``). A collective when theta spans
    processes. bfloat16 keeps 8 significant bits, so a weight ``w`` ignores steps below
    ``|w| / 512`` (up to ``|w| / 256``, by where ``|w|`` lies between powers of two): for
    pretrained LLM weights (``|w|`` ~ 0.01-0.05) most of them at fine-tuning's 1e-5."""

    @jax.jit
    def share(theta):
        leaves = jax.tree.leaves(theta)
        same = sum(jnp.sum(x + jnp.asarray(step, x.dtype) == x, dtype=jnp.float32)
                   for x in leaves)
        return same / sum(x.size for x in leaves)

    return float(share(theta))


def _narrow_dtype_names(tree) -> str | None:
    """The names of ``tree``'s dtypes (e.g. ``"bfloat16"``) if one of them is a float narrower
    than float32, else None."""
    dtypes = {jnp.dtype(x.dtype) for x in jax.tree.leaves(tree)}
    if all(jnp.finfo(d).bits >= 32 for d in dtypes if jnp.issubdtype(d, jnp.floating)):
        return None
    return ", ".join(sorted(d.name for d in dtypes))


MERGE_ERROR_WARN = 0.1  # warn when the merged model's update is off by this share of its size


def _merge_rounding(state, model, console: Console) -> dict:
    """A LoRA run over a base stored below float32: what merging the adapters into the base's
    dtype (``model/``) keeps of their update (``lora_merge_lost``, ``lora_merge_error``; see
    ``models.lora.merge_rounding``), with a warning when the merged update is off by
    ``MERGE_ERROR_WARN`` or more (the run's own evaluation goes through the adapters
    unmerged). Nothing for a float32 base (the merge is exact there)."""
    from jbilevel.models.lora import merge_rounding

    names = _narrow_dtype_names(state.frozen["layers"])
    if names is None:
        return {}
    measured = jax.jit(merge_rounding, static_argnums=2)(state.frozen, state.theta,
                                                         model.config)
    lost, error = float(measured["lost"]), float(measured["error"])
    if error >= MERGE_ERROR_WARN:
        console.warn(
            f"model/ will hold the adapters merged into the base's {names} weights, which round "
            f"{lost:.0%} of the update's elements to nothing and leave the merged update off by "
            f"{error:.0%} of its size (an update much smaller than the weights it is added to): "
            "model/ is not the model this run trained and evaluates. adapter/ holds the "
            "adapters as trained, in PEFT's format: serve them over the base (docs/llm.md)")
    return {"lora_merge_lost": lost, "lora_merge_error": error}


def _warn_if_steps_round_away(theta, lr: float, console: Console) -> None:
    """Warns when the trained weights are stored in a dtype that rounds most steps of the
    peak learning rate away (full fine-tuning with ``model.param_dtype: bfloat16``)."""
    names = _narrow_dtype_names(theta)
    if names is None:
        return
    lost = rounded_away_share(theta, lr)
    if lost >= ROUNDED_AWAY_WARN:
        console.warn(
            f"the trained weights are {names}: a step of lr_theta={lr:g} leaves {lost:.0%} "
            "of them unchanged (the dtype rounds it away; Adam's steps are about lr_theta in "
            "size, smaller in warmup and decay): those weights would not train. "
            "Keep float32 master weights (model.param_dtype=float32 with "
            "model.compute_dtype=bfloat16: parameters and optimizer state take twice the "
            "memory), or train LoRA adapters (theta.kind=lora: float32 over the bfloat16 "
            "base)")


def _host_weights(state, weighting: str) -> np.ndarray:
    """The training rows' weights of ``state`` as one numpy array on every process (a
    collective: every process calls it), as the run's report and its logged scores read them."""
    return np.asarray(inputs.to_host(weights.weights(state.omega, weighting)))


def _with_weight_scores(eval_fn, task, weighting: str):
    """``eval_fn`` plus the weights scored against the ground truth (``weight_auroc``,
    ``weight_mass_on_good``), so that metrics.jsonl shows when the bad rows lost their weight,
    not only where they ended. The weights come to the host (every process: a collective),
    one float per training row."""

    def scored(state):
        scores = task.score_weights(_host_weights(state, weighting))
        return {**eval_fn(state), "weight_auroc": scores["auroc"],
                "weight_mass_on_good": scores["mass_on_good"]}

    return scored


def write_report(out: Path, result: dict, task, data_set, good_N, s_N, predictions, model,
                 params, *, learned: bool, adapters=None, base_model: str | None = None
                 ) -> None:
    """results.json, weights.csv (+ .npy), predictions, plots, curated data and the model.

    ``model/`` holds ``params`` (a LoRA run's adapters merged in, in the base's dtype); a LoRA
    run's ``adapters`` also go to ``adapter/`` in PEFT's format, exact and apart from the base
    (``base_model``, recorded in its config).

    ``weights.csv`` has one row per training example id with its source file, line (text
    files) and record index, so it joins back to the source whatever rows were skipped.
    ``good_N`` None (data from files: no ground truth) leaves the csv's ``good`` column empty;
    ``predictions`` maps each scored split to its decoded answers (``<split>_predictions.jsonl``;
    empty without a task metric).
    """
    from jbilevel.data import export_curated, source_of
    from jbilevel.models import save_adapter, save_pretrained

    _write_json(out / "results.json", result)
    np.save(out / "weights.npy", np.asarray(s_N, np.float32))
    with open(out / "weights.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "weight", "good", "source_file", "source_line", "source_row",
                         "preview"])
        for i in range(len(data_set)):
            where = source_of(data_set.where[i])
            writer.writerow([i, f"{s_N[i]:.6g}", "" if good_N is None else int(good_N[i]),
                             where.get("source_file", ""), _blank(where.get("source_line")),
                             _blank(where.get("source_row")), inputs.preview(data_set.rows[i])])
    for split, answers in predictions.items():
        with open(out / f"{split}_predictions.jsonl", "w") as f:
            for row, pred in zip(task.splits[split].rows, answers, strict=True):
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
    if adapters is not None:
        save_adapter(str(out / "adapter"), adapters, model.config, base_model=base_model)


def _blank(value) -> str:
    return "" if value is None else str(value)

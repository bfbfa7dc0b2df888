"""Compile-only checks: lower and compile the training steps for a target mesh, no weights.

Before any pod time is spent, :func:`compile_memory` builds the train state as shapes only
(``jax.eval_shape``), gives every leaf its ``NamedSharding`` from the logical-axis table, and
compiles the same jitted, donated steps the trainer runs (``train.compile_steps``) for the
target devices: fake CPU devices, or a TPU topology from ``jax.experimental.topologies``
(ahead-of-time, no TPU attached; needs libtpu). It reports XLA's per-device memory of each
step and how evenly the parameters and optimizer state are split. With online generation it
also compiles what a refresh runs: one sampler call and the log's ratio pass over the buffer.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jbilevel import sharding as sh
from jbilevel import train
from jbilevel.algorithms import MethodConfig, init_state, make_steps, refresh
from jbilevel.algorithms import online as online_lib
from jbilevel.algorithms.offline import offline_hyper_rows
from jbilevel.inputs import ThetaConfig
from jbilevel.models import ModelConfig, build, init_lora, lora_axes
from jbilevel.objectives import lm_example_loss, lm_lora_example_loss


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Batch geometry of the compiled steps (global rows over all devices)."""

    seq_len: int = 512  # tokens per row (training and hypergradient batches)
    batch_size: int = 8  # training rows per step
    val_batch_size: int = 8  # validation rows per bmo / bds step
    hyper_batch_size: int = 8  # bds: training rows per hypergradient
    n_examples: int = 51760  # length of omega (Alpaca-cleaned has 51,760 examples)
    prompt_len: int = 256  # online / evaluate: tokens of the longest prompt continued
    new_tokens: int = 256  # online / evaluate: tokens decoded per prompt
    eval_batch_size: int = 8  # evaluate: prompts per decoding batch of the final evaluation
    val_seq_len: int | None = None  # tokens per validation row (None: seq_len)
    stop_ids: int = 1  # online / evaluate: the tokenizer's end tokens (the sampler's stop array)
    eval_prompt_len: int | None = None  # evaluate: the longest prompt decoded (None: prompt_len)
    eval_new_tokens: int | None = None  # evaluate: tokens decoded per prompt (None: new_tokens)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and value <= 0:
                raise ValueError(f"{f.name}={value} must be > 0")


def run_shapes(cfg, train=None, validation=None, *, decoded=(), n_examples: int = 51760,
               prompt_len: int | None = None, stop_ids: int = 1) -> tuple[Shapes, str]:
    """The batch geometry a run configuration's steps compile with, and where it comes from.

    Args:
      cfg: an ``ExperimentConfig`` (its batch sizes, ``data.max_len``, ``data.length_buckets``,
        ``online.max_new_tokens``).
      train, validation: the run's tokenised data (``train``: the rows its method trains
        on). With them the lengths are the trainer's own: training and hypergradient batches
        padded to the longest of the training rows' ``data.length_buckets`` buckets (the
        other buckets' programs are smaller), validation batches to their longest row
        (rounded up to 8, as the trainer pads them: ``val_seq_len``), sampled answers
        continuing the longest prompt for ``online.max_new_tokens`` tokens (0: the longest
        response), stopped by the tokenizer's end tokens. Without them, bounds from the
        configuration: every batch ``data.max_len`` long, prompts ``data.max_len - 1`` (or
        ``prompt_len``) and answers as long, ``n_examples`` training rows, ``stop_ids`` end
        tokens (the tokenizer's, where it is on the machine without the data).
      decoded: the splits whose prompts the final evaluation answers greedily (the task's
        scored splits: ``data.metric``): the evaluation's batches continue the longest of
        their prompts for as many tokens as their longest reference answer (each split's
        budget, as the run decodes it), the largest of the splits' figures.
      n_examples, prompt_len: the training rows and the longest prompt where ``train`` is
        not given.
    Returns:
      (Shapes, a line saying where the lengths come from). ``hyper_batch_size`` is bds's
      ``hyper_batch_size`` (0: every row) at most the training rows, before the trainer pads
      it to a multiple of the mesh's data-parallel size.
    """
    from jbilevel.experiment import grouped, longest_bucket

    max_len = cfg.data.max_len
    val_len = None
    if train is not None:
        n = len(train)
        seq_len = grouped(train, cfg.data)["buckets"][-1]  # the trainer's longest bucket
        if validation is not None:  # the trainer's validation batches: one length
            val_len = longest_bucket(validation)
        prompt = int(train.prompt_len_N.max())
        answer = int((train.length_N - train.prompt_len_N).max())
        source = (f"the data: {n} training rows, batches of at most {seq_len} tokens"
                  + (f" (validation {val_len})" if val_len else "")
                  + f", prompts of at most {prompt}")
    else:
        n, seq_len = n_examples, max_len
        prompt = prompt_len or max_len - 1
        answer = max_len - 1
        source = (f"bounds from the configuration (no data read): {n} training rows, "
                  f"batches of data.max_len={max_len} tokens, prompts of {prompt}")
    shapes = Shapes(seq_len=seq_len, batch_size=cfg.batch_size,
                    val_batch_size=cfg.val_batch_size,
                    hyper_batch_size=min(cfg.hyper_batch_size or n, n), n_examples=n,
                    prompt_len=prompt, new_tokens=cfg.online.max_new_tokens or answer,
                    eval_batch_size=cfg.eval_batch_size, val_seq_len=val_len,
                    stop_ids=max(1, len(train.tokenizer.stop_ids)) if train is not None
                    else stop_ids)
    if decoded:
        shapes = dataclasses.replace(
            shapes, eval_prompt_len=max(int(d.prompt_len_N.max()) for d in decoded),
            eval_new_tokens=max(int((d.length_N - d.prompt_len_N).max()) for d in decoded))
        source += (f"; the final evaluation decodes prompts of at most "
                   f"{shapes.eval_prompt_len} tokens for {shapes.eval_new_tokens}")
    return shapes, source


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """XLA's memory analysis of one compiled step, per device, in bytes."""

    argument: int  # inputs resident on the device (state shards + batch shards)
    output: int  # outputs (new state shards + metrics)
    alias: int  # output bytes that reuse donated input buffers
    temp: int  # scratch: activations, gathered weights, gradients
    code: int  # generated code
    compile_s: float  # wall time of lower + compile
    # TPU: XLA's own peak of the step (inputs included, buffers whose lifetimes do not meet
    # sharing memory), what the compiler holds against a chip's memory. None elsewhere: XLA's
    # CPU figure leaves the temporaries out, and its GPU one was not checked against a device.
    xla_peak: int | None = None

    @property
    def peak(self) -> int:
        """Inputs, non-aliased outputs and temporaries added up: more than the step holds at
        once wherever the compiler overlaps buffers (``xla_peak``)."""
        return self.argument + self.output - self.alias + self.temp


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-device memory of a method's steps and the split of its parameters and optimizer."""

    devices: int  # devices in the mesh
    mesh_shape: dict  # {"data": ., "fsdp": ., "tensor": .}
    state_total: int  # bytes of theta + opt_theta (+ frozen base params for LoRA), all devices
    state_per_device: int  # the same bytes on the most loaded device
    steps: dict  # step name ("train", "hyper"; online: "generate", "log ratios", "offline
    #              train" with a later first refresh; "eval loss", "evaluate" when asked
    #              for) -> StepMemory
    # step name -> why it does not fit the devices' memory: the TPU compiler's message (the
    # step is then not in ``steps``), or its peak against ``memory_limit`` (it is)
    errors: dict

    @property
    def state_ratio(self) -> float:
        """state_per_device / (state_total / devices): 1.0 is a perfect split."""
        return self.state_per_device / (self.state_total / self.devices)


def _abstract(shapes: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda s, shd: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shd),
                        shapes, shardings)


def _batch(rows: int, seq_len: int, sharding) -> dict:
    def leaf(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    return {
        "input_ids": leaf((rows, seq_len), jnp.int32),
        "labels": leaf((rows, seq_len), jnp.int32),
        "loss_mask": leaf((rows, seq_len), jnp.float32),
        "attention_mask": leaf((rows, seq_len), jnp.int32),
        "ids": leaf((rows,), jnp.int32),
        "valid": leaf((rows,), jnp.float32),
    }


def _memory(compiled, seconds: float, platform: str) -> StepMemory:
    m = compiled.memory_analysis()
    return StepMemory(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
                      alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes,
                      code=m.generated_code_size_in_bytes, compile_s=round(seconds, 1),
                      xla_peak=m.peak_memory_in_bytes if platform == "tpu" else None)


def _decoding_args(rows: int, width: int, batch_sh) -> tuple:
    """(prompt ids, prompt mask, key) as a run's sampler call gets them: ``rows`` prompts of
    ``width`` tokens split over the data axes, and a key on no mesh (the run's is
    uncommitted: a replicated one would make another program)."""
    prompt = jax.ShapeDtypeStruct((rows, width), jnp.int32, sharding=batch_sh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    return prompt, prompt, jax.ShapeDtypeStruct(key.shape, key.dtype)


def _sampler_call(model, online: online_lib.OnlineConfig, state, prompts: int, shapes: Shapes,
                  mesh, rules: sh.AxisRules, batch_sh):
    """A refresh's first sampler call, lowered: ``prompts`` prompts of ``shapes.prompt_len``
    tokens, the state's theta. The program is the run's own (``refresh.sample``'s jitted
    sampler with the same static settings, argument shapes and shardings), so a compilation
    cache filled here serves the run's first refresh."""
    return functools.partial(
        refresh.sample, model, online, state.theta,
        *_decoding_args(prompts, shapes.prompt_len, batch_sh),
        max_new_tokens=shapes.new_tokens, eos_id=list(range(shapes.stop_ids)), pad_id=0,
        mesh=mesh, rules=rules, base=state.frozen, lower=True)


def _evaluate_call(model, state, lora: bool, shapes: Shapes, mesh, rules: sh.AxisRules,
                   batch_sh, gather_params: bool, width: int, budget: int):
    """A decoding batch of the final evaluation, lowered through the sampler the run calls:
    greedy answers of ``budget`` tokens to ``shapes.eval_batch_size`` prompts (rounded up to
    a multiple of the data axes, as the run pads the batch) of ``width`` tokens, split over
    the data axes, through a LoRA run's adapters over its base unmerged (as the run scores
    them)."""
    from jbilevel.models import generate

    rows = shapes.eval_batch_size + -shapes.eval_batch_size % sh.data_parallel_size(mesh, rules)
    params, adapters = (state.frozen, state.theta) if lora else (state.theta, None)
    # on one device the run decodes off the mesh (jbilevel.experiment.evaluate)
    on_mesh = dict(mesh=mesh, rules=rules, gather_params=gather_params) if mesh.size > 1 else {}
    return functools.partial(
        generate, model, params,
        *_decoding_args(rows, width, batch_sh if on_mesh else None),
        max_new_tokens=budget, greedy=True,
        eos_id=list(range(shapes.stop_ids)), pad_id=0, lora=adapters, lower=True, **on_mesh)


def compile_memory(model_config: ModelConfig, method: MethodConfig, mesh_config: sh.MeshConfig,
                   shapes: Shapes = Shapes(), *, devices: Sequence[Any] | None = None,
                   param_dtype: str = "float32", theta: ThetaConfig | None = None,
                   rules: sh.AxisRules | None = None,
                   online: online_lib.OnlineConfig | None = None,
                   only: Sequence[str] | None = None,
                   gather_params: bool = True, hyper_blocks=None,
                   hyper_scales=None, online_buckets=None, train_lengths: Sequence[int] = (),
                   memory_limit: int | None = None, evaluate: bool = False,
                   eval_loss: Sequence[int] = (),
                   eval_decodes: Sequence[tuple[int, int]] = ()) -> MemoryReport:
    """Compiles ``method``'s steps for a mesh without materialising any array.

    Args:
      model_config: the architecture (e.g. ``jbilevel.models.presets.preset("llama-3-8b")``).
      method: the method settings; its steps are what the trainer jits (bmo: one train step;
        bds: the inner step and the hypergradient step).
      mesh_config: mesh axis sizes over ``devices``.
      shapes: sequence length and batch sizes (global rows; must divide over data x fsdp).
      devices: target devices (default ``jax.devices()``); TPU topology devices compile
        ahead-of-time.
      param_dtype: dtype of the parameters and hence of Adam's moments.
      theta: full fine-tuning, or LoRA adapters trained over frozen base params (which then
        count in the state, as the trainer holds them in ``state.frozen``). Default: full.
      rules: the logical-to-mesh axis table (default ``sh.AxisRules()``).
      online: online generation's settings (``every > 0``; over LoRA adapters too): the
        train state then carries the buffer of generated pairs (``fraction x n_examples x
        num_samples`` rows of ``prompt_len + new_tokens`` tokens, laid out as a run lays
        it), the train and hypergradient steps are the online ones, and two more
        programs of a refresh are compiled: ``generate``, the first sampler call of a
        refresh (``generate_batch_size`` prompts of the longest prompt's length,
        ``num_samples`` responses each, the KV cache split with the rows: the run's own
        program), and ``log ratios``, the importance ratios of the whole buffer for
        ``generations.jsonl``, one sampler call's rows at a time. With ``online.start`` > 0
        also ``offline train``, the train step of the steps before the first refresh.
      only: compile just these of the steps above (default: all of them), e.g. to try
        sampler settings without recompiling the hypergradient; ``"evaluate"`` (compiled only
        when named here, or with ``evaluate``) is one decoding batch of the final evaluation:
        greedy answers to ``shapes.eval_batch_size`` prompts (rounded up to a multiple of the
        data-parallel size, as the run pads them) of ``eval_prompt_len`` tokens for
        ``eval_new_tokens``, a LoRA run's adapters unmerged over its base.
      gather_params: ``evaluate``'s weights while decoding: gathered over fsdp once per call,
        or kept split (``online.gather_params``, which a run's final evaluation follows).
      hyper_blocks, hyper_scales: bds with ``data.length_buckets`` > 1: how its hypergradient
        batch lies by length (``jbilevel.data.batching.hyper_cut``, for the mesh's
        data-parallel size), each block's per-example term (and Hessian products) taken at
        its length, as the trainer compiles it; the batch is then as wide as the longest
        block.
      online_buckets: online generation with ``data.length_buckets`` > 1: the generated
        rows' length buckets, fixed for the run (``refresh.buffer_buckets`` for these
        devices' buffer): the train step is compiled for each (``"train"`` the widest,
        ``"train A-B"`` the rows of A to B tokens), and a bds hypergradient over a sample
        of the training rows takes its share of the buffer from each, at its width, as the
        run does (one over every training row takes every generated row, in blocks that
        follow the buffer: compiled here at the buffer's width).
      train_lengths: the other lengths the trainer pads training batches to
        (``data.length_buckets`` > 1; ``shapes.seq_len`` is the longest): the train step is
        compiled at each of them too (``"train 128"``, with online buckets ``"train 128
        1-64"``; and ``"offline train 128"``), so that a run loads all of its train steps
        from the compilation cache. Their memory is below the longest batch's.
      memory_limit: bytes a device may use (a GPU's allocator limit, ``bytes_limit`` of its
        ``memory_stats()``): a step whose ``peak`` exceeds it is also listed in ``errors``.
        XLA's GPU runtime allocates a program's parameters, live-out buffers and one
        preallocated temporary buffer when it runs (its out-of-memory message lists these
        three), which is what ``peak`` adds up; it compiles whatever the memory. A TPU target
        needs none: its compiler refuses a step that does not fit.
      evaluate: compile ``"evaluate"`` with the others when ``only`` is None (a run that
        scores its answers decodes them after its last step).
      eval_loss: the lengths of the evaluation's loss passes over the validation and test
        splits (``jbilevel.experiment.split_loss``: ``shapes.eval_batch_size`` rows rounded up
        to the data axes, the params as the run scores them), longest first: ``"eval loss"``
        at the first, ``"eval loss 128"`` at each other (for the compilation cache; their
        memory is below the longest's). Empty: none compiled.
      eval_decodes: with ``"evaluate"``, the ``(prompt width, answer budget)`` of each of the
        final evaluation's decoding programs (``jbilevel.experiment.evaluation_programs``)
        other than ``"evaluate"``'s own: compiled as ``"evaluate 64+12"``, so that a run
        loads every one of them from the compilation cache.
    Returns:
      The per-device memory of every step and the parameter + optimizer-state split. The
      invariant checked by the tests: ``state_ratio`` is close to 1 for an fsdp mesh.
    """
    rules = rules or sh.AxisRules()
    mesh = sh.make_mesh(mesh_config, devices)
    ways = sh.data_parallel_size(mesh, rules)
    for name in ("batch_size", "val_batch_size", "hyper_batch_size"):
        if getattr(shapes, name) % ways:
            raise ValueError(f"{name}={getattr(shapes, name)} must be a multiple of the mesh's "
                             f"data-parallel size {ways} (data x fsdp)")
    model = build(model_config)
    dtype = jnp.dtype(param_dtype)
    theta = theta or ThetaConfig()
    lora = theta.kind == "lora"
    online = online if online is not None and online.enabled else None
    if online is not None:
        if online.batch_size % ways:
            raise ValueError(f"online.batch_size={online.batch_size} must be a multiple of the "
                             f"mesh's data-parallel size {ways} (data x fsdp)")
        _, chunk, n_chunks = refresh.calls(online, shapes.n_examples, ways)
        capacity = n_chunks * chunk * online.num_samples

    def init():
        params = model.init(jax.random.key(0), dtype)
        if not lora:
            state = init_state(params, shapes.n_examples, method)
        else:
            adapters = init_lora(model, jax.random.key(1), rank=theta.rank, alpha=theta.alpha,
                                 targets=theta.targets)  # f32 adapters, as the trainer makes
            state = init_state(adapters, shapes.n_examples, method, frozen=params)
        if online is None:
            return state
        return state.replace(
            online=online_lib.init_buffer(capacity, shapes.prompt_len + shapes.new_tokens))

    state_shapes = jax.eval_shape(init)
    param_axes = model.param_axes()
    theta_axes = lora_axes(model_config, state_shapes.theta) if lora else param_axes
    state_sh = train.state_shardings(mesh, rules, state_shapes, theta_axes, method,
                                     frozen_axes=param_axes)
    loss = lm_lora_example_loss(model) if lora else lm_example_loss(model)
    hyper_rows = offline_hyper_rows(method, hyper_blocks, hyper_scales) if hyper_blocks else None
    steps = make_steps(loss, method, frozen=lora, hyper_rows=hyper_rows)
    if online is not None:
        state_sh = state_sh.replace(online=online_lib.buffer_shardings(mesh, rules,
                                                                      state_shapes.online))
        steps = online_lib.make_online_steps(loss, model, method, online, frozen=lora,
                                             hyper_blocks=hyper_blocks,
                                             hyper_scales=hyper_scales)
    compiled = train.compile_steps(steps, method, mesh, rules, state_sh)
    state = _abstract(state_shapes, state_sh)
    batch_sh = compiled.batch_sharding
    train_batch = _batch(shapes.batch_size, shapes.seq_len, batch_sh)
    val_batch = _batch(shapes.val_batch_size, shapes.val_seq_len or shapes.seq_len, batch_sh)
    batches = (train_batch, val_batch) if compiled.with_val else (train_batch,)
    # each step's program lowered for its abstract arguments, on demand: the train step at
    # each batch length (the longest first) and, online with length buckets, for each bucket
    # of generated rows (the widest first; the longest and widest one is named "train")
    bucketed = online is not None and bool(online_buckets)
    spans = [(a, b) for a, b, _ in online_buckets[::-1]] if bucketed else [None]
    lower = {}
    for length in (shapes.seq_len, *train_lengths):
        args = (_batch(shapes.batch_size, length, batch_sh), val_batch)[:len(batches)]
        at = [] if length == shapes.seq_len else [str(length)]
        for span in spans:
            drawn = [] if span in (None, spans[0]) else [f"{span[0] + 1}-{span[1]}"]
            lower[" ".join(["train", *at, *drawn])] = functools.partial(
                compiled.train.lower, state, *args, *([] if span is None else [span]))
        if online is not None and online.start > 0 and compiled.train_offline is not None:
            lower[" ".join(["offline train", *at])] = functools.partial(
                compiled.train_offline.lower, state, *args)
    gen_blocks = ()  # the hypergradient's static argument: its rows from each bucket
    if bucketed:
        rows = online_lib.hyper_buffer_rows(capacity, shapes.hyper_batch_size,
                                            shapes.n_examples, ways)
        if rows < capacity:
            gen_blocks = (online_lib.generated_strata(online_buckets, rows, ways),)
    if compiled.hyper is not None:
        width = max(length for *_, length in hyper_blocks) if hyper_blocks else shapes.seq_len
        hyper_batch = _batch(shapes.hyper_batch_size, width, batch_sh)
        lower["hyper"] = functools.partial(compiled.hyper.lower, state, hyper_batch, val_batch,
                                           *gen_blocks)
    if online is not None:
        lower["generate"] = _sampler_call(model, online, state, chunk, shapes, mesh, rules,
                                          batch_sh)
        ratios = jax.jit(functools.partial(refresh.row_ratios, model, online,
                                           rows=chunk * online.num_samples, mesh=mesh,
                                           rules=rules))
        lower["log ratios"] = functools.partial(ratios.lower, state.theta, state.online,
                                                state.frozen)
    if eval_loss:  # the run's own loss pass (and its params: a LoRA run's adapters and base)
        from jbilevel.experiment import loss_program, weights_loss

        program = loss_program(weights_loss(loss, lora), mesh, rules)
        scored = (state.theta, state.frozen) if lora else state.theta
        rows = shapes.eval_batch_size + -shapes.eval_batch_size % ways
        for k, length in enumerate(eval_loss):
            lower[" ".join(["eval loss", *([str(length)] if k else [])])] = functools.partial(
                program.lower, scored, _batch(rows, length, batch_sh))
    if (evaluate and only is None) or (only is not None and "evaluate" in only):
        decode = functools.partial(
            _evaluate_call, model, state, lora, shapes, mesh, rules, batch_sh,
            online.gather_params if online is not None else gather_params)
        bound = (shapes.eval_prompt_len or shapes.prompt_len,
                 shapes.eval_new_tokens or shapes.new_tokens)
        lower["evaluate"] = decode(*bound)
        for width, budget in eval_decodes:
            if (width, budget) != bound:
                lower[f"evaluate {width}+{budget}"] = decode(width, budget)
    if only is not None:
        unknown = set(only) - set(lower)
        if unknown:
            raise ValueError(f"only={sorted(unknown)}: not a step of this method "
                             f"(its steps: {', '.join(lower)})")
        lower = {name: how for name, how in lower.items() if name in only}
    steps: dict[str, StepMemory] = {}
    errors: dict[str, str] = {}
    for name, lowered in lower.items():
        t0 = time.perf_counter()
        try:
            exe = lowered().compile()
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses what cannot fit
            if not train.is_out_of_memory(e):
                raise
            errors[name] = str(e).splitlines()[0]
            continue
        steps[name] = m = _memory(exe, time.perf_counter() - t0, mesh.devices.flat[0].platform)
        if memory_limit is not None and m.peak > memory_limit:
            errors[name] = (f"needs {m.peak / 2**30:.2f} GiB a device (arguments + outputs + "
                            f"temporaries) of the {memory_limit / 2**30:.2f} GiB it may use")
    held = (state_shapes.theta, state_shapes.opt_theta, state_shapes.frozen)
    total, per_device = sh.per_device_bytes(
        held, (state_sh.theta, state_sh.opt_theta, state_sh.frozen))
    return MemoryReport(devices=mesh.size, mesh_shape=dict(mesh.shape), state_total=total,
                        state_per_device=per_device, steps=steps, errors=errors)

"""Compile the training steps for a target mesh and model, no weights, and print memory.

Run this before spending pod time: it lowers and compiles the same jitted, sharded, donated
bmo / bds steps that ``jbilevel train`` runs, for fsdp meshes of fake CPU devices or of a
TPU topology (ahead-of-time, no TPU needed; ``pip install libtpu==0.0.42.*``, the version
``jax[tpu]==0.10.2`` pins), and prints XLA's per-device memory of every step and how evenly
the parameters + optimizer state split. Two peaks per step: "peak" adds the step's inputs,
outputs and temporaries up; on a TPU target "XLA peak" is the compiler's own, buffers whose
lifetimes do not meet sharing memory: the TPU compiler refuses a step whose XLA peak exceeds
the chip's memory, so that is the figure to hold against it ("-" on CPU and GPU). On a GPU
(``--platform gpu``, this host's GPUs) "peak" is what XLA's runtime allocates when the step
runs (its parameters, outputs and one temporary buffer), held against what each GPU's
allocator may hand out.

    # TPU v5e slices of 8, 16 and 64 chips (the table in docs/scale.md):
    python scripts/compile_check.py --model llama-3-8b --platform tpu \
        --topology v5e:2x4 v5e:4x4 v5e:8x8 --param-dtype bfloat16 --remat
    # the Llama-3-8B LoRA reference run (r16 on q_proj/v_proj over the frozen bf16 base):
    python scripts/compile_check.py --model llama-3-8b --platform tpu --topology v5e:2x4 \
        --param-dtype bfloat16 --remat --theta lora --methods bmo
    # online generation on top (the buffer, one sampler call, the log's ratio pass):
    python scripts/compile_check.py --model pythia-1b --platform tpu --topology v5e:2x4 \
        --remat --online --prompt-len 256 --new-tokens 256
    # fake CPU devices (no libtpu):
    python scripts/compile_check.py --model pythia-1b --platform cpu --devices 8 16 64
    # a run configuration's own steps (its method, LoRA, online settings, batch sizes, mesh
    # and lengths; the evaluation's loss pass, and its decoding where it scores answers), with
    # overrides as `jbilevel train` takes them; --model names the architecture where
    # model.path is not on this machine:
    python scripts/compile_check.py --config configs/llama3_8b_lora_bds_online.yaml \
        --model llama-3-8b --platform tpu --topology v5e:8x8

Exits 1 if parameters + optimizer state per device exceed ``--max-ratio`` x total / n (n: the
devices they are split over, fsdp x tensor; a data axis holds copies), or if a step does not
fit the devices' memory (the TPU compiler's RESOURCE_EXHAUSTED; on GPUs, a peak above the
allocator's limit, ``bytes_limit`` of ``memory_stats()``, which ``XLA_PYTHON_CLIENT_MEM_FRACTION``
sets).
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", metavar="YAML", default=None,
                   help="compile this run configuration's own steps: its method, theta, "
                   "online settings, dtypes, batch sizes and mesh (resolved on each target's "
                   "devices), the lengths of its data where its files and tokenizer are on "
                   "this machine (else data.max_len), and bds's hypergradient cut by length "
                   "as the trainer cuts it (data.length_buckets > 1, the data read); the "
                   "flags that set these are refused with it")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="with --config: overrides, as jbilevel train takes them")
    p.add_argument("--no-data", action="store_true",
                   help="with --config: do not read the data files; size every batch at "
                   "data.max_len (and --n-examples rows, --prompt-len); model.path's "
                   "config.json is still read where it is on this machine (a built-in task: "
                   "the shipped base)")
    p.add_argument("--model", default=None,
                   help="preset (jbilevel.models.presets; default pythia-1b); with --config "
                   "the architecture, where model.path's config.json is not on this machine")
    p.add_argument("--layers", type=int, default=None,
                   help="compile with this many decoder layers instead of the preset's")
    p.add_argument("--methods", nargs="+", default=["bmo", "bds"], choices=["bmo", "bds"])
    p.add_argument("--platform", choices=["cpu", "tpu", "gpu"], default="cpu",
                   help="cpu: fake host devices; tpu: a topology, ahead-of-time; gpu: this "
                   "host's GPUs")
    p.add_argument("--devices", type=int, nargs="+", default=[8, 16, 64],
                   help="cpu / gpu: fsdp mesh sizes")
    p.add_argument("--topology", nargs="+", default=["v5e:2x4", "v5e:4x4", "v5e:8x8"],
                   help="tpu: topologies (jax.experimental.topologies names); fsdp over all")
    p.add_argument("--tensor", type=int, default=1,
                   help="tensor-parallel ways (attention heads, MLP, vocabulary); the mesh is "
                   "fsdp=devices/tensor x tensor")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--per-device-batch", type=int, default=1,
                   help="rows per fsdp group (per device without --tensor) of the train, "
                   "validation and hypergradient batches")
    p.add_argument("--hyper-chunk-per-device", type=int, default=1,
                   help="bds: rows per device in each forward-mode pass of the hypergradient "
                   "(method.hyper_chunk = this x devices)")
    p.add_argument("--train-chunk-per-device", type=int, default=0,
                   help="method.train_chunk: rows per device in each reverse pass of the train "
                        "step, the gradient summed over the passes (0: the whole batch in one)")
    p.add_argument("--hyper-rows-per-device", type=int, default=None,
                   help="bds: rows per device of the hypergradient batch (default: "
                   "--per-device-batch)")
    p.add_argument("--hessian-rows-per-device", type=int, default=None,
                   help="bds: of those, rows per device the Hessian is estimated on (default: "
                   "all of them)")
    p.add_argument("--n-examples", type=int, default=51760, help="training examples (omega)")
    p.add_argument("--param-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="parameters and Adam moments")
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="bfloat16",
                   help="dtype the forward pass casts parameters to")
    p.add_argument("--remat", action="store_true", help="recompute each layer in backward")
    p.add_argument("--theta", choices=["full", "lora"], default="full",
                   help="train every parameter, or LoRA adapters over frozen base params")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-targets", nargs="+", default=["q_proj", "v_proj"])
    p.add_argument("--online", action="store_true",
                   help="online generation on top of each method: its train / hypergradient "
                   "steps with the buffer, one sampler call and the log's ratio pass")
    p.add_argument("--online-fraction", type=float, default=0.1,
                   help="online: fraction of --n-examples refreshed (buffer: fraction x N x "
                   "samples rows)")
    p.add_argument("--num-samples", type=int, default=4, help="online: responses per question")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="online / evaluate: prompt tokens (default 256; with --config the "
                   "data's longest prompt (evaluate: of the splits the run scores), or "
                   "data.max_len - 1 without the data)")
    p.add_argument("--new-tokens", type=int, default=256, help="online: sampled tokens")
    p.add_argument("--generate-per-device", type=int, default=4,
                   help="online: prompts per device in each sampler call "
                   "(online.generate_batch_size = this x devices); evaluate: in each decoding "
                   "batch (eval_batch_size = this x devices)")
    p.add_argument("--online-batch-per-device", type=int, default=1,
                   help="online: generated rows per device in each train step "
                   "(online.batch_size = this x devices)")
    p.add_argument("--split-params", action="store_true",
                   help="online / evaluate: keep the weights split while decoding "
                   "(online.gather_params=false)")
    p.add_argument("--steps", nargs="+", default=None,
                   choices=["train", "offline train", "hyper", "generate", "log ratios",
                            "eval loss", "evaluate"],
                   help="compile only these steps (default: all of each method's; eval loss, "
                   "the evaluation's loss pass over the validation and test splits "
                   "(eval_batch_size rows at their longest length), only with --config; "
                   "evaluate, the final evaluation's decoding batch, only with --config of a run "
                   "that scores its answers (data.metric); from flags: --prompt-len, "
                   "--new-tokens, --generate-per-device, --split-params)")
    p.add_argument("--max-ratio", type=float, default=1.25)
    p.add_argument("--markdown", default=None, help="append each table row to this file")
    p.add_argument("--compile-cache", metavar="DIR", default=None,
                   help="with --config on this host's devices (cpu, gpu): keep the compiled "
                   "steps in JAX's persistent compilation cache in DIR, from which `jbilevel "
                   "train --compile-cache DIR` (its default: OUT/xla_cache) on the same devices "
                   "loads them instead of compiling them again: the train step at each of "
                   "the data's batch lengths (data.length_buckets > 1), and the evaluation's "
                   "loss passes and decoding batches at each of theirs")
    return p


def _topology(topologies, name: str):
    """The TPU topology ``name``; one smaller than a host (e.g. v5p:1x1x1, a single chip, as
    a stand-in for one GPU) is described as a host of exactly that many chips."""
    try:
        return topologies.get_topology_desc(name, "tpu")
    except Exception as e:  # libtpu: "... not divisible by ... chips_per_host_bounds"
        if "chips_per_host_bounds" not in str(e):
            raise
        bounds = [int(x) for x in name.split(":")[1].split("x")]
        return topologies.get_topology_desc(name, "tpu", chips_per_host_bounds=bounds)


def _targets(args) -> list[tuple[str, list]]:
    import jax

    if args.platform == "tpu":
        from jax.experimental import topologies

        return [(t, list(_topology(topologies, t).devices)) for t in args.topology]
    if args.platform == "cpu":
        jax.config.update("jax_num_cpu_devices", max(args.devices))
    devices = jax.devices(args.platform)
    if len(devices) < max(args.devices):
        raise SystemExit(f"--devices {max(args.devices)}: only {len(devices)} "
                         f"{args.platform} devices here")
    return [(f"{args.platform} x{n}", devices[:n]) for n in args.devices]


def _memory_limit(devices) -> int | None:
    """The bytes each of these GPUs' allocators may hand out (the least of them); None where
    a device does not say."""
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
    return min(limits) if limits and all(limits) else None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


# With --config, these flags are the configuration's fields: override those instead.
CONFIG_FIELDS = {
    "methods": "method.method", "tensor": "mesh.tensor", "seq_len": "data.max_len",
    "per_device_batch": "batch_size, val_batch_size", "hyper_chunk_per_device":
    "method.hyper_chunk", "train_chunk_per_device": "method.train_chunk",
    "hyper_rows_per_device": "hyper_batch_size", "hessian_rows_per_device":
    "method.hessian_rows", "param_dtype": "model.param_dtype", "compute_dtype":
    "model.compute_dtype", "remat": "model.remat", "theta": "theta.kind", "lora_rank":
    "theta.rank", "lora_alpha": "theta.alpha", "lora_targets": "theta.targets", "online":
    "online.every", "online_fraction": "online.fraction", "num_samples": "online.num_samples",
    "new_tokens": "online.max_new_tokens", "generate_per_device": "online.generate_batch_size, "
    "eval_batch_size", "online_batch_per_device": "online.batch_size", "split_params":
    "online.gather_params"}


def _theta_name(theta) -> str:
    return "full" if theta.kind == "full" else (
        f"LoRA r{theta.rank} on {'/'.join(theta.targets)}")


def _from_flags(args):
    """The model and, for n devices, what to compile, as the flags describe it."""
    from jbilevel import aot
    from jbilevel.algorithms import MethodConfig
    from jbilevel.algorithms.online import OnlineConfig
    from jbilevel.inputs import ThetaConfig
    from jbilevel.models.presets import param_count, preset
    from jbilevel.sharding import MeshConfig

    name = args.model or "pythia-1b"
    overrides = {"remat": args.remat}
    if args.compute_dtype != args.param_dtype:
        overrides["compute_dtype"] = args.compute_dtype
    if args.layers is not None:
        overrides["num_layers"] = args.layers
    try:
        model = preset(name, **overrides)
    except ValueError as e:  # an unknown preset: its message lists them
        raise SystemExit(f"--model: {e}") from None
    theta = ThetaConfig(kind=args.theta, rank=args.lora_rank, alpha=args.lora_alpha,
                        targets=tuple(args.lora_targets))
    full = preset(name)
    prompt_len = args.prompt_len or 256
    print(f"{name}: {param_count(model) / 1e9:.3f}B parameters compiled "
          f"({model.num_layers} of {full.num_layers} layers; full model "
          f"{param_count(full) / 1e9:.3f}B), seq {args.seq_len}, {args.per_device_batch} "
          f"row(s)/device"
          + (f" in passes of {args.train_chunk_per_device}" if args.train_chunk_per_device
             else "")
          + f", params {args.param_dtype}, compute {args.compute_dtype}, "
          f"remat {args.remat}, theta {_theta_name(theta)}", flush=True)
    if args.online:
        print(f"online: {args.online_fraction} x {args.n_examples} questions x "
              f"{args.num_samples} samples of {prompt_len} + {args.new_tokens} tokens, "
              f"{args.generate_per_device} prompt(s)/device a sampler call, "
              f"{args.online_batch_per_device} generated row(s)/device a step, weights "
              f"{'split' if args.split_params else 'gathered'} while decoding", flush=True)

    def plan(target: str, devices: list):
        if len(devices) % args.tensor:
            raise SystemExit(f"--tensor {args.tensor} does not divide {target}'s "
                             f"{len(devices)} devices")
        n = len(devices) // args.tensor  # data-parallel ways: batch rows split n ways
        where = f"{target} fsdp={n}" + (f" tensor={args.tensor}" if args.tensor > 1 else "")
        b = args.per_device_batch * n
        hyper_b = (args.hyper_rows_per_device or args.per_device_batch) * n
        hessian_b = (args.hessian_rows_per_device or hyper_b // n) * n
        shapes = aot.Shapes(seq_len=args.seq_len, batch_size=b, val_batch_size=b,
                            hyper_batch_size=hyper_b, n_examples=args.n_examples,
                            prompt_len=prompt_len, new_tokens=args.new_tokens,
                            eval_batch_size=args.generate_per_device * n)
        online = OnlineConfig(
            every=1 if args.online else 0, fraction=args.online_fraction,
            num_samples=args.num_samples, generate_batch_size=args.generate_per_device * n,
            batch_size=args.online_batch_per_device * n, gather_params=not args.split_params)
        methods = [MethodConfig(method=m, hessian_rows=hessian_b,
                                hyper_chunk=args.hyper_chunk_per_device * n,
                                train_chunk=args.train_chunk_per_device * n)
                   for m in args.methods]
        return (MeshConfig(data=1, fsdp=n, tensor=args.tensor), where, shapes, online, methods,
                {})

    return name, model, theta, args.param_dtype, not args.split_params, plan


def _from_config(args, parser):
    """The model and, for n devices, what to compile, as the run configuration describes it."""
    import dataclasses
    import os
    import tempfile

    from jbilevel import aot, config, experiment, inputs
    from jbilevel.algorithms import refresh
    from jbilevel.console import Console
    from jbilevel.data.batching import hyper_cut
    from jbilevel.errors import UserError
    from jbilevel.models import read_config
    from jbilevel.models.presets import param_count, preset, with_layers
    from jbilevel.sharding import MeshConfig

    set_by_flags = [name for name in CONFIG_FIELDS
                    if getattr(args, name) != parser.get_default(name)]
    if set_by_flags:
        raise SystemExit("with --config the configuration sets these; override its fields "
                         "instead (KEY=VALUE after the flags): " + "; ".join(
                             f"--{n.replace('_', '-')}: {CONFIG_FIELDS[n]}"
                             for n in set_by_flags))
    cfg = config.load(experiment.ExperimentConfig, args.config, args.overrides)
    here = cfg.model.path is None or os.path.isdir(cfg.model.path)
    train = validation = test = None
    decoded = ()  # the splits the final evaluation answers greedily (with the data read)
    stop_ids = 1  # the tokenizer's end tokens, at which the sampler stops
    if not here or args.no_data:  # a built-in task's settings (its metric, the shipped base)
        # without its files (not written, not read)
        cfg = experiment.resolve(cfg, tempfile.gettempdir(), write=False)
        where = cfg.model.tokenizer or cfg.model.path
        if where not in (None, "char") and os.path.isdir(where):  # the run's end tokens
            try:
                stop_ids = len(inputs.load_tokenizer(cfg.model).stop_ids)
            except UserError as e:
                raise SystemExit(f"error: {e}") from None
    else:  # the trainer's own data, tokeniser and model config
        console = Console()
        with tempfile.TemporaryDirectory() as scratch:  # a built-in task's files
            cfg = experiment.resolve(cfg, scratch, write=True)
            try:
                task = experiment.load_data(cfg, console)
            except UserError as e:  # e.g. the data is not on this machine
                raise SystemExit(f"error: {e}\n(--no-data sizes the batches from the "
                                 "configuration instead)") from None
        train, _ = experiment.training_set(task, cfg.method.method)
        validation, test = task.validation, task.test
        buckets = experiment.grouped(train, cfg.data)["buckets"]
        decoded = [task.splits[s] for s in task.scored if s in task.splits]
        if not decoded and args.steps and "evaluate" in args.steps:
            print("evaluate: this run's final evaluation decodes nothing (no split is scored: "
                  "data.metric); compiled at the training prompts' bounds", flush=True)
    # the run's final evaluation decodes the scored splits: compiled too, unless --steps says
    evaluate = bool(decoded) if train is not None else bool(inputs.scored_splits(cfg.data))
    shapes, source = aot.run_shapes(cfg, train, validation, decoded=decoded,
                                    n_examples=args.n_examples, prompt_len=args.prompt_len,
                                    stop_ids=stop_ids)
    compute = inputs.compute_settings(cfg.model)
    if args.platform != "gpu" and compute["attention"] == "cudnn":
        print(f"model.attention=cudnn is a GPU kernel: compiled for {args.platform} with "
              "XLA's attention", flush=True)
        compute["attention"] = "xla"
    if args.model:
        try:
            model = preset(args.model, **compute)
        except ValueError as e:  # an unknown preset: its message lists them
            raise SystemExit(f"--model: {e}") from None
        name = args.model
    elif train is not None:
        model = inputs.model_config(cfg.model, task.tokenizer,
                                    experiment.positions(cfg, train)).replace(**compute)
        name = os.path.basename(os.path.normpath(cfg.model.path)) if cfg.model.path else (
            "model spec")
    elif cfg.model.path is None:  # a random model's vocabulary is its tokenizer's
        raise SystemExit("model.path is unset (a random model sized by its tokenizer): read "
                         "the data (leave out --no-data) or name an architecture with --model "
                         "<preset> (jbilevel.models.presets)")
    elif os.path.isdir(cfg.model.path):  # --no-data: the architecture of its config.json
        try:
            model = read_config(cfg.model.path).replace(**compute)
        except (OSError, ValueError) as e:  # a config.json this library cannot read
            raise SystemExit(f"error: model.path: {e}") from None
        name = os.path.basename(os.path.normpath(cfg.model.path))
    else:
        raise SystemExit(f"model.path={cfg.model.path} is not on this machine: name its "
                         "architecture with --model <preset> (jbilevel.models.presets)")
    if args.layers is not None:  # Gemma's pattern of windowed and full layers kept
        model = with_layers(model, args.layers)
    theta = cfg.theta
    online = cfg.online if cfg.online.enabled else None
    print(f"{args.config}: {name}, {param_count(model) / 1e9:.3f}B parameters compiled "
          f"({model.num_layers} layers), {cfg.method.method}"
          + (" + online" if online else "") + f", theta {_theta_name(theta)}, params "
          f"{cfg.model.param_dtype}, compute {cfg.model.compute_dtype or cfg.model.param_dtype}, "
          f"remat "
          f"{cfg.model.remat}; {source}", flush=True)
    if online:
        print(f"online: {online.fraction} x {shapes.n_examples} questions x "
              f"{online.num_samples} samples of {shapes.prompt_len} + {shapes.new_tokens} "
              f"tokens, {online.generate_batch_size or 'all'} prompts a sampler call, "
              f"{online.batch_size} generated rows a step, weights "
              f"{'gathered' if online.gather_params else 'split'} while decoding, stopping at "
              f"{shapes.stop_ids} end token{'s' * (shapes.stop_ids > 1)}", flush=True)

    def plan(target: str, devices: list):
        try:
            data, fsdp, tensor = cfg.mesh.resolve(len(devices))
        except config.ConfigError as e:
            raise SystemExit(f"{target}: {e}") from None
        ways = data * fsdp
        where = f"{target} data={data} fsdp={fsdp}" + (f" tensor={tensor}" if tensor > 1 else "")
        # the trainer's hypergradient batch: padded to a multiple of the data-parallel ways
        hyper = shapes.hyper_batch_size + -shapes.hyper_batch_size % ways
        extra = dict(evaluate=evaluate)
        # the evaluation's loss passes (validation, test) and decoding batches, as the run
        # will pad them on these devices: the longest pass always (its memory), the others
        # for the cache
        if train is not None:
            lengths, decodes = experiment.evaluation_programs(
                validation, test, decoded, cfg.eval_batch_size, cfg.data.length_buckets, ways)
        else:
            lengths, decodes = [cfg.data.max_len], []
        extra.update(eval_loss=lengths if args.compile_cache else lengths[:1],
                     eval_decodes=decodes if args.compile_cache else ())
        if cfg.method.method == "bds" and cfg.data.length_buckets > 1 and train is not None:
            # its rows cut by length as the trainer cuts them for these devices
            try:
                blocks, scales, every = hyper_cut(train.length_N, hyper, buckets, ways)
            except ValueError as e:  # the trainer would stop there too
                raise SystemExit(f"{where}: {e}") from None
            print(f"{where}: {experiment.hyper_cut_line(blocks, every)}", flush=True)
            extra.update(hyper_blocks=blocks, hyper_scales=scales)
        elif cfg.method.method == "bds" and cfg.data.length_buckets > 1:
            print(f"{where}: the hypergradient's rows at one length (data.length_buckets="
                  f"{cfg.data.length_buckets} cuts them by the data's lengths, not read)",
                  flush=True)
        if args.compile_cache and cfg.data.length_buckets > 1 and train is not None:
            # the run's train steps at its other batch lengths too, for the cache (the longest
            # is the memory bound)
            extra.update(train_lengths=tuple(buckets[:-1]))
        if online and cfg.data.length_buckets > 1 and train is not None:
            # the generated rows' length buckets, as the run fixes them for these devices
            gen = refresh.buffer_buckets(online, train, cfg.data.length_buckets, ways)
            print(f"{where}: online: train steps draw the generated rows from "
                  f"{len(gen)} length bucket{'s' * (len(gen) > 1)}, "
                  + ", ".join(f"{a + 1}-{b} tokens" for a, b, _ in gen)
                  + " (a train step compiled for each)", flush=True)
            extra.update(online_buckets=gen)
        return (MeshConfig(data=data, fsdp=fsdp, tensor=tensor), where,
                dataclasses.replace(shapes, hyper_batch_size=hyper), online, [cfg.method], extra)

    return name, model, theta, cfg.model.param_dtype, cfg.online.gather_params, plan


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.overrides and not args.config:
        parser.error(f"{args.overrides[0]}: overrides need --config")
    if args.compile_cache and (not args.config or args.platform == "tpu"):
        parser.error("--compile-cache needs --config and --platform cpu or gpu: a run loads "
                     "only its own programs compiled for its own devices")
    targets = _targets(args)  # sets the CPU device count before any other JAX call
    if args.compile_cache:
        from jbilevel.xla_options import use_compilation_cache

        used = use_compilation_cache(args.compile_cache)  # "none": off
        if used:  # every step compiled here is for the run to load, however fast it compiled
            import jax

            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        print(f"compiled steps are cached in {used}" if used else "no compilation cache",
              flush=True)

    from jbilevel import aot
    from jbilevel.errors import UserError

    try:
        name, model, theta, param_dtype, gather, plan = (
            _from_config(args, parser) if args.config else _from_flags(args))
    except UserError as e:  # a configuration or data file to fix: its message says how
        raise SystemExit(f"error: {e}") from None
    header = ("| model | theta | method | mesh | step | state total GiB | per device GiB | ratio "
              "to total/n | args GiB | out GiB | alias GiB | temp GiB | peak GiB | XLA peak GiB | "
              "compile s |")

    def emit(row: str) -> None:  # printed and appended as soon as it is measured
        print(row, flush=True)
        if args.markdown:
            with open(args.markdown, "a") as f:
                f.write(row + "\n")

    plans = [(devices, *plan(target, devices)) for target, devices in targets]
    emit(header)
    emit("|" + "---|" * (header.count("|") - 1))
    worst = 0.0
    unfit = 0
    hints: set[str] = set()
    for devices, mesh_cfg, where, shapes, online, methods, extra in plans:
        limit = _memory_limit(devices) if args.platform == "gpu" else None
        if limit is not None:
            print(f"{where}: each device may use {_gib(limit)} GiB (its allocator's limit)",
                  flush=True)
        for method_cfg in methods:
            try:
                report = aot.compile_memory(model, method_cfg, mesh_cfg, shapes,
                                            devices=devices, param_dtype=param_dtype,
                                            theta=theta, online=online, only=args.steps,
                                            gather_params=gather, memory_limit=limit, **extra)
            except ValueError as e:  # settings that do not fit together: say which
                raise SystemExit(f"{method_cfg.method} on {where}: {e}") from None
            method = method_cfg.method + ("+online" if online and online.enabled else "")
            # n: the devices the state is split over (a data axis holds copies of it)
            ratio = report.state_ratio / report.mesh_shape["data"]
            worst = max(worst, ratio)
            first = (f"| {name} ({model.num_layers}L) | {theta.kind} | {method} | {where} | ")
            for step, m in report.steps.items():
                emit(first + f"{step} | {_gib(report.state_total)} | "
                     f"{_gib(report.state_per_device)} | {ratio:.3f} | "
                     f"{_gib(m.argument)} | {_gib(m.output)} | {_gib(m.alias)} | "
                     f"{_gib(m.temp)} | {_gib(m.peak)} | "
                     f"{'-' if m.xla_peak is None else _gib(m.xla_peak)} | {m.compile_s} |")
            for step, message in report.errors.items():
                emit(first + f"{step} | {_gib(report.state_total)} | "
                     f"{_gib(report.state_per_device)} | {ratio:.3f} | "
                     f"does not fit: {message} | | | | | | |")
                unfit += 1
                hints.update(_hints(step, args.config is not None, gather,
                                    method_cfg.train_chunk))
    if worst > args.max_ratio:
        print(f"FAIL: parameters + optimizer state per device are {worst:.3f}x total/n "
              f"(> {args.max_ratio})", file=sys.stderr)
        return 1
    if unfit:
        print(f"FAIL: {unfit} step(s) do not fit the devices' memory"
              + "".join(f"\n  {h}" for h in sorted(hints)), file=sys.stderr)
        return 1
    print(f"ok: parameters + optimizer state per device <= {worst:.3f}x total/n")
    return 0


def _hints(step: str, from_config: bool, gathered: bool, train_chunk: int) -> list[str]:
    """What lowers a step's memory that does not fit, as a flag or a config field."""
    def say(flag: str, field: str) -> str:
        return field if from_config else f"{flag} ({field})"

    hints = []
    if step in ("generate", "evaluate") and gathered:
        hints.append("the sampler's weights: try " + say("--split-params",
                                                         "online.gather_params=false")
                     + " or " + say("--tensor", "mesh.tensor"))
    if step in ("generate", "log ratios", "evaluate"):
        hints.append("fewer rows per sampler call: " + say(
            "--generate-per-device", "online.generate_batch_size, eval_batch_size"))
    if step == "eval loss":  # only with --config
        hints.append("fewer rows per evaluation batch: eval_batch_size")
    if step in ("train", "offline train") and not train_chunk:
        hints.append("the train step's gradient over passes of fewer rows: "
                     + say("--train-chunk-per-device", "method.train_chunk"))
    if step == "hyper":
        hints.append("fewer rows per hypergradient pass: " + (
            "method.hyper_chunk, method.hessian_rows" if from_config else
            "--hyper-chunk-per-device (method.hyper_chunk), --hessian-rows-per-device"))
    return hints


if __name__ == "__main__":
    sys.exit(main())

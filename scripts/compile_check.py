"""Compile the training steps for a target mesh and model, no weights, and print memory.

Run this before spending pod time: it lowers and compiles the same jitted, sharded, donated
bmo / bds steps that ``jbilevel train`` runs, for fsdp meshes of fake CPU devices or of a
TPU topology (ahead-of-time, no TPU needed; ``pip install libtpu==0.0.42.*``, the version
``jax[tpu]==0.10.2`` pins), and prints XLA's per-device memory of every step and how evenly
the parameters + optimizer state split.

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

Exits 1 if parameters + optimizer state per device exceed ``--max-ratio`` x total / n, or if
a step does not fit the devices' memory (the TPU compiler's RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="pythia-1b", help="preset (jbilevel.models.presets)")
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
    p.add_argument("--prompt-len", type=int, default=256, help="online: prompt tokens")
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
                   choices=["train", "hyper", "generate", "log ratios", "evaluate"],
                   help="compile only these steps (default: all of each method's but "
                   "evaluate, the final evaluation's decoding batch: --prompt-len, "
                   "--new-tokens, --generate-per-device, --split-params)")
    p.add_argument("--max-ratio", type=float, default=1.25)
    p.add_argument("--markdown", default=None, help="append each table row to this file")
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


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    targets = _targets(args)  # sets the CPU device count before any other JAX call

    from jbilevel import aot
    from jbilevel.algorithms import MethodConfig
    from jbilevel.algorithms.online import OnlineConfig
    from jbilevel.inputs import ThetaConfig
    from jbilevel.models.presets import param_count, preset
    from jbilevel.sharding import MeshConfig

    overrides = {"remat": args.remat}
    if args.compute_dtype != args.param_dtype:
        overrides["compute_dtype"] = args.compute_dtype
    if args.layers is not None:
        overrides["num_layers"] = args.layers
    model = preset(args.model, **overrides)
    theta = ThetaConfig(kind=args.theta, rank=args.lora_rank, alpha=args.lora_alpha,
                        targets=tuple(args.lora_targets))
    theta_name = "full" if args.theta == "full" else (
        f"LoRA r{args.lora_rank} on {'/'.join(args.lora_targets)}")
    full = preset(args.model)
    print(f"{args.model}: {param_count(model) / 1e9:.3f}B parameters compiled "
          f"({model.num_layers} of {full.num_layers} layers; full model "
          f"{param_count(full) / 1e9:.3f}B), seq {args.seq_len}, {args.per_device_batch} "
          f"row(s)/device"
          + (f" in passes of {args.train_chunk_per_device}" if args.train_chunk_per_device
             else "")
          + f", params {args.param_dtype}, compute {args.compute_dtype}, "
          f"remat {args.remat}, theta {theta_name}", flush=True)
    if args.online:
        print(f"online: {args.online_fraction} x {args.n_examples} questions x "
              f"{args.num_samples} samples of {args.prompt_len} + {args.new_tokens} tokens, "
              f"{args.generate_per_device} prompt(s)/device a sampler call, "
              f"{args.online_batch_per_device} generated row(s)/device a step, weights "
              f"{'split' if args.split_params else 'gathered'} while decoding", flush=True)
    header = ("| model | theta | method | mesh | step | state total GiB | per device GiB | ratio "
              "to total/n | args GiB | out GiB | alias GiB | temp GiB | peak GiB | compile s |")

    def emit(row: str) -> None:  # printed and appended as soon as it is measured
        print(row, flush=True)
        if args.markdown:
            with open(args.markdown, "a") as f:
                f.write(row + "\n")

    emit(header)
    emit("|" + "---|" * (header.count("|") - 1))
    worst = 0.0
    unfit = 0
    hints: set[str] = set()
    for target, devices in targets:
        if len(devices) % args.tensor:
            raise SystemExit(f"--tensor {args.tensor} does not divide {target}'s "
                             f"{len(devices)} devices")
        n = len(devices) // args.tensor  # data-parallel ways: batch rows split n ways
        mesh_cfg = MeshConfig(data=1, fsdp=n, tensor=args.tensor)
        where = f"{target} fsdp={n}" + (f" tensor={args.tensor}" if args.tensor > 1 else "")
        b = args.per_device_batch * n
        hyper_b = (args.hyper_rows_per_device or args.per_device_batch) * n
        hessian_b = (args.hessian_rows_per_device or hyper_b // n) * n
        shapes = aot.Shapes(seq_len=args.seq_len, batch_size=b, val_batch_size=b,
                            hyper_batch_size=hyper_b, n_examples=args.n_examples,
                            prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                            eval_batch_size=args.generate_per_device * n)
        online = OnlineConfig(
            every=1 if args.online else 0, fraction=args.online_fraction,
            num_samples=args.num_samples, generate_batch_size=args.generate_per_device * n,
            batch_size=args.online_batch_per_device * n, gather_params=not args.split_params)
        for name in args.methods:
            method_cfg = MethodConfig(method=name, hessian_rows=hessian_b,
                                      hyper_chunk=args.hyper_chunk_per_device * n,
                                      train_chunk=args.train_chunk_per_device * n)
            try:
                report = aot.compile_memory(model, method_cfg, mesh_cfg, shapes,
                                            devices=devices, param_dtype=args.param_dtype,
                                            theta=theta, online=online, only=args.steps,
                                            gather_params=not args.split_params)
            except ValueError as e:  # settings that do not fit together: say which
                raise SystemExit(f"{name} on {where}: {e}") from None
            method = name + ("+online" if args.online else "")
            worst = max(worst, report.state_ratio)
            for step, m in report.steps.items():
                row = (f"| {args.model} ({model.num_layers}L) | {args.theta} | {method} | "
                       f"{where} | "
                       f"{step} | {_gib(report.state_total)} | {_gib(report.state_per_device)} "
                       f"| {report.state_ratio:.3f} | {_gib(m.argument)} | {_gib(m.output)} | "
                       f"{_gib(m.alias)} | {_gib(m.temp)} | {_gib(m.peak)} | {m.compile_s} |")
                emit(row)
            for step, message in report.errors.items():
                row = (f"| {args.model} ({model.num_layers}L) | {args.theta} | {method} | "
                       f"{where} | "
                       f"{step} | {_gib(report.state_total)} | {_gib(report.state_per_device)} "
                       f"| {report.state_ratio:.3f} | does not fit: {message} | | | | | |")
                emit(row)
                unfit += 1
                if step in ("generate", "evaluate") and not args.split_params:
                    hints.add("the sampler's weights: try --split-params "
                              "(online.gather_params=false) or --tensor")
                if step in ("generate", "log ratios", "evaluate"):
                    hints.add("fewer rows per sampler call: --generate-per-device")
                if step == "train" and not args.train_chunk_per_device:
                    hints.add("the train step's gradient over passes of fewer rows: "
                              "--train-chunk-per-device (method.train_chunk)")
                if step == "hyper":
                    hints.add("fewer rows per hypergradient pass: --hyper-chunk-per-device "
                              "(method.hyper_chunk), --hessian-rows-per-device")
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


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``jbilevel demo | train | eval | export``.

Every command says what it is doing on stderr (``--quiet``: warnings only; ``--verbose``:
details) and prints its result on stdout. A mistake the user can fix (bad data, config, path
or run directory: ``jbilevel.errors.UserError``) is one message and exit status 2, caught here
and nowhere else; a run that stopped before its last step exits with status 3.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_USER_ERROR = 2  # bad input: the message says what to fix (argparse uses 2 as well)
EXIT_CTRL_C = 130  # Ctrl-C (128 + SIGINT, what a shell reports for a process it ended)
EXIT_INTERRUPTED = 3  # the run stopped early; results.json says why ("interrupted")


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jbilevel",
        description="Validation-guided data curation for LLM fine-tuning (bilevel data selection).",
    )
    talk = argparse.ArgumentParser(add_help=False)
    level = talk.add_mutually_exclusive_group()
    level.add_argument("-q", "--quiet", action="store_true",
                       help="no progress bar or phase messages (warnings and errors only)")
    level.add_argument("-v", "--verbose", action="store_true",
                       help="more detail: every data-load message, a line per logged training "
                            "record, tracebacks of input errors")
    cache = argparse.ArgumentParser(add_help=False)
    cache.add_argument(
        "--compile-cache", metavar="DIR", default=None,
        help="persistent XLA compilation cache: programs compiled once (by this run, an "
             "earlier one, a resume, another seed with the same shapes) load from DIR instead "
             "of compiling again; 'none' turns it off (default: $JAX_COMPILATION_CACHE_DIR, "
             "else OUT/xla_cache for demo and train, none for eval)")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", parents=[talk, cache],
        help="compare methods fine-tuning a tiny pretrained model on a built-in task (CPU, "
             "minutes)",
        description="Fine-tunes the shipped pretrained base (or, with --base scratch, trains a "
                    "tiny decoder from scratch) with each method on a built-in task and "
                    "prints a comparison table; everything lands in --out.")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.add_argument("--task", default="quality", choices=["quality", "safety", "coverage"],
                      help="built-in task (quality: half of the answers follow a wrong rule; "
                           "safety: harmful requests answered compliantly; coverage: the "
                           "answers of one skill mostly wrong)")
    demo.add_argument("--base", default="pretrained", choices=["pretrained", "scratch"],
                      help="pretrained (default): fine-tune a shipped model on the task's "
                           "files, the base (quality, safety) or the base instruction-tuned "
                           "(coverage), 0.5-6 minutes per method on 2 CPU cores (results: "
                           "docs/results.md); scratch: train a random model on the character "
                           "tokenizer, ~1 minute per method, too short to learn the task")
    demo.add_argument("--size", default="tiny", choices=["tiny", "small"],
                      help="model size with --base scratch")
    demo.add_argument("--steps", type=int, default=None,
                      help="training steps per method (default 250 from scratch, where the "
                           "model learns addition around step 1000; 300 fine-tuning)")
    demo.add_argument("--corruption", default=None, choices=["style", "rule", "random"],
                      help="quality and coverage tasks: how the bad answers are wrong (rule: "
                           "a+b+1, the default; style: 'The answer is 82.', the default from "
                           "scratch, told apart within its short run)")
    demo.add_argument("--methods", default="mix,bmo,bds,online",
                      help="comma-separated: sft, mix, val, oracle, bmo, bds, online (bds plus "
                           "self-refining generation; bmo plus it from scratch)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--jobs", type=_at_least_one, default=None,
                      help="methods run at a time, each in a process of its own, with a line "
                           "per logged record instead of a progress bar (default: one per CPU "
                           "core, up to all methods; 1: one after another, with the bar)")

    tr = sub.add_parser(
        "train", parents=[talk, cache],
        help="train one configuration and write its run report",
        description="Example: jbilevel train --config configs/quality_bds.yaml loop.steps=500. "
                    "--out belongs to one run: rerunning the same configuration resumes it, "
                    "a different one is refused (see docs/llm.md, 'Run directories').")
    tr.add_argument("--config", help="YAML file (fields of jbilevel.experiment.ExperimentConfig)")
    tr.add_argument("--out", default=None, help="output directory (default runs/<method>)")
    tr.add_argument("overrides", nargs="*", help="dotted key=value, e.g. method.lr_theta=1e-5")

    ev = sub.add_parser(
        "eval", parents=[talk, cache],
        help="validation/test loss (and task score) of a saved model",
        description="Examples: jbilevel eval --run runs/bds   |   "
                    "jbilevel eval --run runs/bds --data other.jsonl   |   "
                    "jbilevel eval --model runs/bds/model --data val.jsonl "
                    "data.chat_template=tokenizer data.add_bos=false   |   "
                    "jbilevel eval --model <base> --adapter runs/lora/adapter --data val.jsonl. "
                    "With --run the run's own data settings apply; data.* overrides change "
                    "them, as in `jbilevel train`.")
    ev.add_argument("--run", help="a run directory written by `jbilevel train --out`")
    ev.add_argument("--model", help="a local HF model directory (with --data)")
    ev.add_argument("--data", help="an SFT file to score (with --model, or --run)")
    ev.add_argument("--tokenizer", default=None, help="tokenizer dir (default: --model's)")
    ev.add_argument("--schema", default=None, help="same as data.schema=...")
    ev.add_argument("--max-len", type=int, default=None, help="same as data.max_len=...")
    ev.add_argument("--batch-size", type=int, default=16, help="rows per batch (--model)")
    ev.add_argument("--adapter", metavar="DIR", default=None,
                    help="with --model: LoRA adapters in PEFT's format (a LoRA run's adapter/, "
                         "or PEFT's own) scored over that model, unmerged")
    ev.add_argument("overrides", nargs="*",
                    help="settings as in train: data format (data.prompt_template=..., "
                         "data.chat_template=tokenizer, data.add_bos=false, data.max_len=...), "
                         "where the weights go (mesh.data, mesh.fsdp, mesh.tensor: a model "
                         "that does not fit one device needs mesh.data=1 mesh.fsdp=-1) and "
                         "their dtype (model.param_dtype, model.compute_dtype; --model reads "
                         "float32 by default, --run as it trained); with --run also "
                         "eval_batch_size and online.gather_params")

    da = sub.add_parser(
        "data", parents=[talk],
        help="what a configuration would train on: token lengths, padding, trained tokens",
        description="Example: jbilevel data --config mine.yaml data.max_len=2048. Reads and "
                    "tokenises data.train / validation / test (or the built-in task's splits) "
                    "as `jbilevel train` would with the same configuration (no model weights, "
                    "no compiling), then prints each split's token lengths, the padding of the "
                    "run's batches at 1 and 4 length buckets, and --show examples with their "
                    "trained tokens between [[ and ]]; stdout gets the figures as JSON.")
    da.add_argument("--config", help="YAML file, as for train")
    da.add_argument("--show", type=int, default=2, metavar="N",
                    help="training examples to print, trained tokens marked (default 2)")
    da.add_argument("overrides", nargs="*", help="dotted key=value, as for train")

    ex = sub.add_parser(
        "export", parents=[talk], help="a curated dataset from a run's learned weights",
        description="Example: jbilevel export --run runs/bds --out curated.jsonl --top-frac 0.5")
    ex.add_argument("--run", required=True, help="a run directory written by `jbilevel train`")
    ex.add_argument("--out", required=True, help=".jsonl file, or a directory (HF dataset)")
    pick = ex.add_mutually_exclusive_group()
    pick.add_argument("--top-frac", type=float, help="keep this fraction, highest weights first")
    pick.add_argument("--min-weight", type=float, help="keep examples with weight >= this")
    ex.add_argument("--format", choices=("jsonl", "hf"), default=None,
                    help="default: jsonl if --out ends with .jsonl, else hf")
    return parser


def run() -> int:
    """The ``jbilevel`` command: ``main`` in a process of its own, host malloc tuned first."""
    from jbilevel.xla_options import tune_host_malloc

    tune_host_malloc()  # before JAX starts its threads (jbilevel/xla_options.py)
    return main()


def main(argv: list[str] | None = None) -> int:
    from jbilevel.console import NORMAL, QUIET, VERBOSE, Console
    from jbilevel.errors import UserError

    args = _build_parser().parse_args(argv)
    # transformers (tokenizers and configs only here) advises at import that PyTorch is
    # missing; jbilevel never needs it, so the command line does not show that advice.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    console = Console(QUIET if args.quiet else VERBOSE if args.verbose else NORMAL)
    command = {"demo": _demo, "train": _train, "eval": _eval, "export": _export,
               "data": _data}[args.command]
    from jbilevel import distributed

    try:
        status = command(args, console)
    except UserError as e:
        console.close_bar()
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"jbilevel {args.command}: error: {e}", file=sys.stderr)
        status = EXIT_USER_ERROR
    except KeyboardInterrupt as e:  # Ctrl-C
        console.close_bar()
        train = sys.modules.get("jbilevel.train")  # (not imported: not its Interrupted)
        if train is None or not isinstance(e, train.Interrupted):  # which the run reported
            # with its checkpoint; this is outside the training loop, or a second Ctrl-C
            resume = ("; rerun the same command to resume from the newest checkpoint"
                      if args.command == "train" else "")
            print(f"jbilevel {args.command}: interrupted (Ctrl-C){resume}", file=sys.stderr)
        status = EXIT_CTRL_C
    except Exception:
        if not distributed.stopped_here():
            raise
        import traceback

        traceback.print_exc()
        status = 1
    if distributed.stopped_here():  # a multi-process run this process stopped: other
        distributed.leave(status)  # processes may be blocked in a collective; no barrier
    return status


def _several_cpu_devices() -> bool:
    """Whether this process runs on several CPU devices (a test mesh, ``jax_num_cpu_devices``).
    There ``jbilevel train`` keeps no compilation cache unless asked: XLA:CPU's in-process
    collectives can hang there until their rendezvous aborts the process (40 s), and a
    resumed LoRA + online run on 8 CPU devices whose programs came back from the cache
    aborted so in both tries, where three runs that compiled them did not (docs/pod.md)."""
    import jax

    return jax.default_backend() == "cpu" and jax.device_count() > 1


def _compile_cache(args, console, out: str | None = None) -> None:
    """--compile-cache: on for this process and the ones it starts (the demo's runs), by
    default in ``out/xla_cache`` (demo, train): the demo's runs share programs, and a resumed
    or rerun training run loads its programs instead of compiling them again, minutes a
    program at LLM scale (not on several CPU devices: :func:`_several_cpu_devices`). ``out``
    is on the mount every process of a multi-host run shares, which a cache there needs: JAX
    writes entries from process 0 only and every process reads them. Called after
    ``distributed.initialize``: the message asks JAX which process this is, which starts its
    backend."""
    from jbilevel.errors import UserError
    from jbilevel.rundir import COMPILE_CACHE
    from jbilevel.xla_options import CACHE_ENV, use_compilation_cache

    default = None if out is None else Path(out) / COMPILE_CACHE
    if (args.command == "train" and args.compile_cache is None and not os.environ.get(CACHE_ENV)
            and _several_cpu_devices()):
        default = None
        console.detail("no compilation cache by default on several CPU devices (--compile-cache "
                       "DIR turns one on)")
    try:  # the default directory is made at the first compile, after the run directory's
        # check (which ignores it): a refused run leaves its --out as it was
        used = use_compilation_cache(args.compile_cache, default=default,
                                     make=args.compile_cache is not None)
    except OSError as e:
        raise UserError(f"--compile-cache {args.compile_cache or default}: cannot make that "
                        f"directory ({e}); give a writable one, or 'none' to compile without a "
                        "cache") from e
    if used:
        console.info(f"compiled programs are cached in {used} (--compile-cache)")


def _demo(args, console) -> int:
    from jbilevel import demo

    _compile_cache(args, console, args.out)
    return demo.main(args, console)


def _eval(args, console) -> int:
    from jbilevel import distributed, report, saved

    if bool(args.run) == bool(args.model) or (args.model and not args.data):
        print("jbilevel eval: give --run DIR, or --model PATH with --data PATH", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.adapter and args.run:
        print("jbilevel eval: --adapter goes with --model; --run scores a LoRA run through its "
              "own adapter/", file=sys.stderr)
        return EXIT_USER_ERROR
    overrides = list(args.overrides)
    if args.schema is not None:
        overrides.insert(0, f"data.schema={args.schema}")
    if args.max_len is not None:
        overrides.insert(0, f"data.max_len={args.max_len}")
    distributed.initialize()
    _compile_cache(args, console)
    with distributed.stopping_together():  # a process that fails alone: the others leave
        if args.run:
            result = saved.evaluate_run(args.run, data=args.data, overrides=overrides,
                                        console=console)
        else:
            from jbilevel import experiment

            cfg = saved.eval_config(experiment.ExperimentConfig(), overrides, saved.MODEL_KEYS)
            result = saved.evaluate_model(args.model, args.data, tokenizer=args.tokenizer,
                                          data_cfg=cfg.data, batch_size=args.batch_size,
                                          mesh=cfg.mesh, adapter=args.adapter,
                                          param_dtype=cfg.model.param_dtype,
                                          compute_dtype=cfg.model.compute_dtype,
                                          console=console)
    print(report.to_json(result, indent=2))
    return 0


def _export(args, console) -> int:
    from jbilevel import saved

    n = saved.export_run(args.run, args.out, top_frac=args.top_frac,
                         min_weight=args.min_weight, format=args.format, console=console)
    print(f"wrote {n} examples with their learned weights and sources to {args.out}")
    return 0


def _data(args, console) -> int:
    import dataclasses
    import tempfile

    from jbilevel import config, experiment, report
    from jbilevel.data import summary

    cfg = config.load(experiment.ExperimentConfig, args.config, args.overrides)
    with tempfile.TemporaryDirectory() as scratch:  # a built-in task's files, if it has them
        cfg = experiment.resolve(cfg, scratch, write=True)
        task = experiment.load_data(cfg, console)
    result = {"splits": {}, "padding": [], "examples": []}
    console.info("tokens per row (median / 90% / 99% / max):")
    for name, ds in task.splits.items():
        stats = summary.lengths(ds)
        result["splits"][name] = {"examples": len(ds), **stats}
        console.info(f"  {name} ({len(ds)} row{'s' * (len(ds) != 1)}): " + "; ".join(
            f"{part} {s['median']} / {s['p90']} / {s['p99']} / {s['max']}"
            for part, s in stats.items()))
    train = task.splits["train"]
    console.info(f"padding of the training batches ({cfg.batch_size} rows, data.max_len="
                 f"{cfg.data.max_len}):")
    for n in sorted({1, 4, cfg.data.length_buckets}):
        data_cfg = dataclasses.replace(cfg.data, length_buckets=n)
        pad = summary.padding(train, cfg.batch_size,
                              {**experiment.grouped(train, data_cfg), "seed": cfg.seed})
        result["padding"].append({"length_buckets": n, **pad})
        console.info(f"  data.length_buckets={n}: {pad['padding_share']:.0%} of the batch "
                     f"tokens are padding (lengths {', '.join(map(str, pad['lengths']))})"
                     + (" <- this configuration" if n == cfg.data.length_buckets else ""))
    for i in range(min(args.show, len(train))):
        text = summary.render(train, i)
        result["examples"].append({"id": i, "where": str(train.where[i]), "text": text})
        console.info(f"train example {i} ({train.where[i]}; {train.length_N[i]} tokens, "
                     f"{int(train.targets(i).sum())} trained, between {summary.OPEN} and "
                     f"{summary.CLOSE}):\n{text}")
    print(report.to_json(result, indent=2))
    return 0


def _train(args, console) -> int:
    from jbilevel import config, distributed, experiment, report

    cfg = config.load(experiment.ExperimentConfig, args.config, args.overrides)
    distributed.initialize()
    out = args.out or f"runs/{cfg.method.method}"
    _compile_cache(args, console, out)
    result = experiment.run(cfg, out, console=console)
    print(report.to_json(result, indent=2))
    if result["interrupted"] is not None:
        return EXIT_INTERRUPTED
    adapter = ", adapter/" if result["theta"] == "lora" else ""
    console.info(f"run report in {out}/ (results.json, weights.csv, curves.png, model/{adapter})")
    return 0


if __name__ == "__main__":
    sys.exit(run())

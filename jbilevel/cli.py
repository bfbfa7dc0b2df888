"""Command line: ``jbilevel demo | train | eval | export``."""

from __future__ import annotations

import argparse
import sys


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jbilevel",
        description="Validation-guided data curation for LLM fine-tuning (bilevel data selection).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="compare methods on a built-in task with a tiny model (CPU, minutes)",
        description="Fine-tunes the shipped pretrained base (or, with --base scratch, trains a "
                    "tiny decoder from scratch) with each method on a built-in task and prints "
                    "a comparison table; everything lands in --out.")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.add_argument("--task", default="quality", choices=["quality", "safety", "coverage"],
                      help="built-in task (quality: half of the answers follow a wrong rule; "
                           "safety: harmful requests answered compliantly; coverage: the "
                           "answers of one skill mostly wrong)")
    demo.add_argument("--base", default="pretrained", choices=["pretrained", "scratch"],
                      help="pretrained: fine-tune the shipped base model (default); scratch: "
                           "train a random model on the character tokenizer")
    demo.add_argument("--size", default="tiny", choices=["tiny", "small"],
                      help="model size with --base scratch")
    demo.add_argument("--steps", type=int, default=None,
                      help="training steps per method (default 300 fine-tuning, about a "
                           "minute each on 2 CPU cores; 250 from scratch, where the model "
                           "learns addition around step 1000)")
    demo.add_argument("--corruption", default=None, choices=["style", "rule", "random"],
                      help="quality and coverage tasks: how the bad answers are wrong (rule: "
                           "a+b+1, the default; style: 'The answer is 82.', the default from "
                           "scratch, told apart within its short run)")
    demo.add_argument("--methods", default="mix,bmo,bds,online",
                      help="comma-separated: sft, mix, val, oracle, bmo, bds, online (bds plus "
                           "self-refining generation; bmo plus it from scratch)")
    demo.add_argument("--seed", type=int, default=0)

    tr = sub.add_parser(
        "train", help="train one configuration on a built-in task and write its run report",
        description="Example: jbilevel train --config configs/quality_bds.yaml loop.steps=500")
    tr.add_argument("--config", help="YAML file (fields of jbilevel.experiment.ExperimentConfig)")
    tr.add_argument("--out", default=None, help="output directory (default runs/<method>)")
    tr.add_argument("overrides", nargs="*", help="dotted key=value, e.g. method.lr_omega=0.3")

    ev = sub.add_parser(
        "eval", help="validation/test loss (and task score) of a saved model",
        description="Examples: jbilevel eval --run runs/bds   |   "
                    "jbilevel eval --model runs/bds/model --data val.jsonl")
    ev.add_argument("--run", help="a run directory written by `jbilevel train --out`")
    ev.add_argument("--model", help="a local HF model directory (with --data)")
    ev.add_argument("--data", help="an SFT file to score --model on")
    ev.add_argument("--tokenizer", default=None, help="tokenizer dir (default: --model's)")
    ev.add_argument("--schema", default="auto", help="schema of --data (default: detect)")
    ev.add_argument("--max-len", type=int, default=512, help="longest sequence in tokens")
    ev.add_argument("--batch-size", type=int, default=16)

    ex = sub.add_parser(
        "export", help="a curated dataset from a run's learned weights",
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
    args = _build_parser().parse_args(argv)
    if args.command == "demo":
        from jbilevel import demo

        return demo.main(args)
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "export":
        return _export(args)
    raise AssertionError(args.command)


def _eval(args) -> int:
    import json

    from jbilevel import distributed, saved

    if bool(args.run) == bool(args.model) or bool(args.model) != bool(args.data):
        print("jbilevel eval: give --run DIR, or --model PATH with --data PATH", file=sys.stderr)
        return 2
    distributed.initialize()
    try:
        if args.run:
            result = saved.evaluate_run(args.run)
        else:
            result = saved.evaluate_model(args.model, args.data, tokenizer=args.tokenizer,
                                          schema=args.schema, max_len=args.max_len,
                                          batch_size=args.batch_size)
    except (FileNotFoundError, ValueError) as e:
        print(f"jbilevel eval: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def _export(args) -> int:
    from jbilevel import saved

    try:
        n = saved.export_run(args.run, args.out, top_frac=args.top_frac,
                             min_weight=args.min_weight, format=args.format)
    except (FileNotFoundError, ValueError) as e:
        print(f"jbilevel export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} examples with their learned weights to {args.out}")
    return 0


def _train(args) -> int:
    import json

    from jbilevel import config, distributed, experiment

    distributed.initialize()
    try:
        cfg = config.load(experiment.ExperimentConfig, args.config, args.overrides)
    except config.ConfigError as e:
        print(f"jbilevel train: {e}", file=sys.stderr)
        return 2
    out = args.out or f"runs/{cfg.method.method}"
    result = experiment.run(cfg, out)
    print(json.dumps(result, indent=2))
    print(f"run report in {out}/ (results.json, weights.csv, curves.png, model/)")
    return 0  # argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(run())

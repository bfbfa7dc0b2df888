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
        description="Trains a tiny decoder from scratch with each method on the built-in task "
                    "and prints a comparison table; everything lands in --out.")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.add_argument("--task", default="quality", choices=["quality", "safety"],
                      help="built-in task (quality: 50%% of answers follow a wrong rule)")
    demo.add_argument("--size", default="tiny", choices=["tiny", "small"], help="model size")
    demo.add_argument("--steps", type=int, default=2000, help="training steps per method")
    demo.add_argument("--methods", default="mix,bmo,bds",
                      help="comma-separated: sft, mix, val, oracle, bmo, bds")
    demo.add_argument("--seed", type=int, default=0)

    tr = sub.add_parser(
        "train", help="train one configuration on a built-in task and write its run report",
        description="Example: jbilevel train --config configs/quality_bds.yaml loop.steps=500")
    tr.add_argument("--config", help="YAML file (fields of jbilevel.experiment.ExperimentConfig)")
    tr.add_argument("--out", default=None, help="output directory (default runs/<method>)")
    tr.add_argument("overrides", nargs="*", help="dotted key=value, e.g. method.lr_omega=0.3")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "demo":
        from jbilevel import demo

        return demo.main(args)
    if args.command == "train":
        return _train(args)
    raise AssertionError(args.command)


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
    sys.exit(main())

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
    demo = sub.add_parser("demo", help="run the built-in end-to-end example on the CPU")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "demo":
        from jbilevel import demo

        return demo.main(args)
    raise AssertionError(args.command)  # argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())

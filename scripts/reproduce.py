"""Sweep methods x seeds with ``jbilevel.experiment.run``; write a mean ± std table and a plot.

Each method's run starts from ``configs/<task>_<method>.yaml``; every run gets
``seed=<s> task.seed=<s>`` (model init, data order and the task's data) and then the extra
``key=value`` overrides. Finished runs are reused when their saved config is the same.

    python scripts/reproduce.py --task quality --methods sft mix bmo bds --seeds 0 1 2
    python scripts/reproduce.py --seeds 0 1 --out /tmp/smoke loop.steps=20   # smoke test

Writes to ``--out`` (default docs/results): ``<task>.md`` (the table and the command),
``<task>.json`` (every run's results), ``<task>.png`` (bars: mean ± std, dots: seeds) and
``runs/<method>/seed<s>/`` (each run's full report).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

# Columns of the table, in order, when the runs report them.
METRICS = ("test_accuracy", "test_corrupted", "test_unsafe_compliance", "test_benign_accuracy",
           "val_loss", "weight_auroc", "weight_mass_on_good", "train_seconds")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="quality", help="configs/<task>_<method>.yaml")
    p.add_argument("--methods", nargs="+", default=["sft", "mix", "bmo", "bds"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--configs", default="configs", help="directory of the YAML configs")
    p.add_argument("--out", default="docs/results", help="output directory")
    p.add_argument("--fresh", action="store_true", help="rerun runs that already finished")
    p.add_argument("overrides", nargs="*", help="key=value for every run, e.g. loop.steps=500")
    return p


def run_one(config_path: Path, overrides: list[str], out_dir: Path, fresh: bool) -> dict:
    """One run's results, reusing ``out_dir/results.json`` if it was made by the same config."""
    from jbilevel import config, experiment

    cfg = config.load(experiment.ExperimentConfig, config_path, overrides)
    done = out_dir / "results.json"
    if not fresh and done.exists() and (out_dir / "config.yaml").exists():
        saved = config.load(experiment.ExperimentConfig, out_dir / "config.yaml")
        if saved == cfg:
            return json.loads(done.read_text())
    return experiment.run(cfg, out_dir, progress=False)


def summarise(results: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """method -> metric -> (mean, sample std (0 for one seed), number of seeds)."""
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for method, runs in results.items():
        out[method] = {}
        for key in METRICS:
            values = [r[key] for r in runs if key in r]
            if values:
                std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                out[method][key] = (float(np.mean(values)), std, len(values))
    return out


def markdown(summary: dict, command: str, seeds: list[int]) -> str:
    keys = [k for k in METRICS if any(k in row for row in summary.values())]
    lines = [f"Made by: `{command}`", "",
             f"Mean ± sample standard deviation over seeds {seeds}.", "",
             "| method | " + " | ".join(keys) + " |",
             "|---|" + "---|" * len(keys)]
    for method, row in summary.items():
        cells = [f"{row[k][0]:.4g} ± {row[k][1]:.2g}" if k in row else "" for k in keys]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict]], summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in METRICS[:-1] if any(k in row for row in summary.values())]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
    methods = list(summary)
    for ax, key in zip(axes[0], keys, strict=True):
        xs = [i for i, m in enumerate(methods) if key in summary[m]]
        ax.bar(xs, [summary[methods[i]][key][0] for i in xs],
               yerr=[summary[methods[i]][key][1] for i in xs], capsize=4, color="tab:blue",
               alpha=0.6)
        for i in xs:
            values = [r[key] for r in results[methods[i]] if key in r]
            ax.scatter([i] * len(values), values, color="black", s=10, zorder=3)
        ax.set_xticks(range(len(methods)), methods)
        ax.set_title(key)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    configs = {m: Path(args.configs) / f"{args.task}_{m}.yaml" for m in args.methods}
    missing = [str(p) for p in configs.values() if not p.exists()]
    if missing:
        print(f"reproduce: no config {', '.join(missing)} (methods need "
              f"{args.configs}/<task>_<method>.yaml)", file=sys.stderr)
        return 2
    results: dict[str, list[dict]] = {}
    for method, path in configs.items():
        results[method] = []
        for seed in args.seeds:
            run_dir = out / "runs" / method / f"seed{seed}"
            print(f"{method} seed {seed} -> {run_dir}", flush=True)
            overrides = [f"seed={seed}", f"task.seed={seed}", *args.overrides]
            results[method].append(run_one(path, overrides, run_dir, args.fresh))
    summary = summarise(results)
    argv_used = sys.argv[1:] if argv is None else argv
    command = "python scripts/reproduce.py " + shlex.join(argv_used)
    table = markdown(summary, command, args.seeds)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.task}.md").write_text(table)
    (out / f"{args.task}.json").write_text(json.dumps(
        {"command": command, "seeds": args.seeds, "runs": results}, indent=2) + "\n")
    plot(results, summary, out / f"{args.task}.png",
         f"{args.task}: mean ± std over {len(args.seeds)} seeds")
    print(table)
    print(f"wrote {out}/{args.task}.md, .json and .png; runs in {out}/runs/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

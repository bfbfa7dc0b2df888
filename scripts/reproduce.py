"""Sweep methods x seeds with ``jbilevel.experiment.run``; write a mean ± std table and a plot.

Each method's run starts from ``<configs>/<task>_<method>.yaml`` (``--configs configs/finetune``:
the built-in tasks fine-tuning the shipped base; ``configs``: from scratch); every run gets
``seed=<s> task.seed=<s>`` (model init, data order and the task's data) and then the extra
``key=value`` overrides. Finished runs are reused when their saved config is the same.

    python scripts/reproduce.py --configs configs/finetune --task quality \
        --methods mix bmo bds online --seeds 0 1 2 --out docs/results/finetune
    python scripts/reproduce.py --task quality --methods sft mix bmo bds --seeds 0 1 2
    python scripts/reproduce.py --seeds 0 1 --out /tmp/smoke loop.steps=20   # smoke test

Writes to ``--out`` (default docs/results): ``<task>.md`` (the table and the command),
``<task>.json`` (every run's results), ``<task>.png`` (bars: mean ± std, dots: seeds) and
``runs/<task>/<method>/seed<s>/`` (each run's full report) and ``runs/xla_cache/`` (the
compiled programs: a method's later seeds, and a rerun, load them instead of compiling;
``--compile-cache``).

``--retrain sft|mix`` with ``--min-weight T`` (or ``--top-frac F``) also fine-tunes a fresh
model, with each weighted run's own settings and that method, on the training rows whose
learned weight is at least T (the top F), as ``jbilevel export`` writes them: the weights used
as a hard selection. Its rows are named ``<method>_w<T>_<retrain>`` (``_top<F>_``), its runs
go to ``runs/<task>/<that name>/seed<s>/`` next to ``seed<s>.curated.jsonl``:

    python scripts/reproduce.py --configs configs/finetune --task safety --methods bds \
        --seeds 0 1 2 --out <dir> --retrain sft --min-weight 0.5

``--withhold-test`` runs every run with ``data.score_test=false``: no run reads the test
split, so the table holds validation figures only and a setting is chosen on them blind. The
same command without it then scores the test split of the runs already trained (each is
evaluated again from its saved checkpoint, not retrained):

    python scripts/reproduce.py --configs configs/finetune --task safety --methods bds \
        --seeds 0 1 2 --out <dir> --withhold-test method.lr_omega=0.1

``--redraw FILE.json`` runs nothing: it reads a per-run JSON (``{"<method>_s<seed>": results}``,
as committed under docs/results/), keeps the ``--methods`` given, in that order, and writes
``FILE.png`` and ``FILE.md`` next to it:

    python scripts/reproduce.py --redraw docs/results/additions_2000_steps.json \
        --methods sft mix bmo bds --title "quality task, 2000 steps"
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np

# The methods that learn weights, whose runs --retrain selects from.
WEIGHTED = ("bmo", "bds", "online")

# Columns of the table, in order, when the runs report them.
# val_accuracy, val_unsafe_compliance and val_benign_accuracy are the task metric on the
# validation split: what settings may be chosen on (never the test columns).
METRICS = ("test_accuracy", "test_accuracy_add", "test_accuracy_sub", "test_corrupted",
           "test_unsafe_compliance", "test_benign_accuracy", "val_loss", "val_accuracy",
           "val_unsafe_compliance", "val_benign_accuracy", "weight_auroc",
           "weight_mass_on_good", "train_seconds")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="quality", help="configs/<task>_<method>.yaml")
    p.add_argument("--methods", nargs="+", default=["sft", "mix", "bmo", "bds"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--configs", default="configs", help="directory of the YAML configs")
    p.add_argument("--out", default="docs/results", help="output directory")
    p.add_argument("--fresh", action="store_true", help="rerun runs that already finished")
    p.add_argument("--redraw", metavar="JSON", help="table and plot from a per-run JSON only")
    p.add_argument("--title", help="plot title (default: the task or the JSON's name)")
    p.add_argument("--compile-cache", metavar="DIR", default=None,
                   help="persistent XLA compilation cache the runs share (a method's seeds "
                        "compile once); 'none': off (default: $JAX_COMPILATION_CACHE_DIR, "
                        "else OUT/runs/xla_cache)")
    p.add_argument("--retrain", choices=("sft", "mix"),
                   help="also fine-tune anew with this method on each weighted run's selected "
                        "rows (--min-weight or --top-frac)")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--min-weight", type=float, help="--retrain: keep weights >= this")
    pick.add_argument("--top-frac", type=float, help="--retrain: keep this fraction, highest "
                                                     "weights first")
    p.add_argument("--withhold-test", action="store_true",
                   help="data.score_test=false for every run: validation figures only")
    p.add_argument("overrides", nargs="*", help="key=value for every run, e.g. loop.steps=500")
    return p


def run_one(config_path: Path, overrides: list[str], out_dir: Path, fresh: bool) -> dict:
    """One run's results, reusing ``out_dir/results.json`` if it was made by the same config."""
    from jbilevel import config, experiment, rundir

    requested = config.load(experiment.ExperimentConfig, config_path, overrides)
    cfg = experiment.resolve(requested, out_dir)  # as its saved config.yaml has it
    done = out_dir / "results.json"
    if not fresh and done.exists() and (out_dir / "config.yaml").exists():
        saved = config.load(experiment.ExperimentConfig, out_dir / "config.yaml")
        result = json.loads(done.read_text())
        # config.yaml holds the applied settings; an interrupted run resumes below
        if rundir.applied(saved) == rundir.applied(cfg) and result.get("interrupted") is None:
            return result
    return experiment.run(requested, out_dir, progress=False)


def retrain_one(run_dir: Path, method: str, out_dir: Path, *, min_weight: float | None = None,
                top_frac: float | None = None, fresh: bool = False) -> dict:
    """A fresh fine-tune with ``method`` on the rows of the finished run ``run_dir`` whose
    learned weight is >= min_weight (or its top_frac), with that run's settings otherwise;
    the rows go to ``out_dir``'s sibling ``<name>.curated.jsonl``. Reused like run_one."""
    from jbilevel import saved
    from jbilevel.console import QUIET, Console

    curated = out_dir.with_name(out_dir.name + ".curated.jsonl")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    kept = saved.export_run(run_dir, str(curated), top_frac=top_frac, min_weight=min_weight,
                            console=Console(QUIET))
    if not kept:
        raise ValueError(f"{run_dir}: no training row has weight >= {min_weight}; lower "
                         "--min-weight")
    return run_one(run_dir / "config.yaml", [f"method.method={method}", f"data.train={curated}"],
                   out_dir, fresh)


def summarise(results: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """method -> metric -> (mean, sample std (0 for one seed), number of seeds)."""
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for method, runs in results.items():
        out[method] = {}
        for key in METRICS:
            values = [r[key] for r in runs if r.get(key) is not None]  # null: not finite
            if values:
                std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                out[method][key] = (float(np.mean(values)), std, len(values))
    return out


def markdown(summary: dict, command: str, seeds: list[int]) -> str:
    keys = [k for k in METRICS if any(k in row for row in summary.values())]
    lines = [f"Made by: `{command}`", "",
             f"Mean ± sample standard deviation over seeds {seeds} (one value: one seed ran).",
             "", "| method | seeds | " + " | ".join(keys) + " |",
             "|---|---|" + "---|" * len(keys)]

    def cell(mean_std_n):
        mean, std, n = mean_std_n
        return f"{mean:.4g} ± {std:.2g}" if n > 1 else f"{mean:.4g}"

    for method, row in summary.items():
        cells = [cell(row[k]) if k in row else "" for k in keys]
        n = max((row[k][2] for k in keys if k in row), default=0)
        lines.append(f"| {method} | {n} | " + " | ".join(cells) + " |")
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
        long = max(map(len, methods)) > 6
        ax.set_xticks(range(len(methods)), methods, rotation=30 if long else 0,
                      ha="right" if long else "center")
        ax.set_title(key)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def group_runs(runs: dict[str, dict], methods: list[str],
               source: str) -> tuple[dict[str, list[dict]], list[int]]:
    """``{"<method>_s<seed>": results}`` -> (method -> results in seed order, seeds seen).

    Only ``methods`` are kept, in that order; keys that do not end in ``_s<seed>`` (variants
    such as ``mix_s0_before_option``) are left out. An asked-for method with no run is an error.
    """
    by_method: dict[str, list[tuple[int, dict]]] = {}
    for key, result in runs.items():
        m = re.fullmatch(r"(.+)_s(\d+)", key)
        if m and m.group(1) in methods:
            by_method.setdefault(m.group(1), []).append((int(m.group(2)), result))
    missing = [m for m in methods if m not in by_method]
    if missing:
        raise ValueError(f"{source}: no runs named <method>_s<seed> for {', '.join(missing)}")
    grouped = {m: [r for _, r in sorted(by_method[m], key=lambda t: t[0])] for m in methods}
    return grouped, sorted({seed for m in methods for seed, _ in by_method[m]})


def redraw(path: Path, methods: list[str], title: str | None, command: str) -> str:
    """Write ``path``'s table (.md) and plot (.png) next to it; returns the table."""
    grouped, seeds = group_runs(json.loads(path.read_text()), methods, str(path))
    summary = summarise(grouped)
    table = markdown(summary, command, seeds)
    path.with_suffix(".md").write_text(table)
    plot(grouped, summary, path.with_suffix(".png"), title or path.stem)
    return table


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    argv_used = sys.argv[1:] if argv is None else argv
    command = "python scripts/reproduce.py " + shlex.join(argv_used)
    if args.redraw:
        try:
            table = redraw(Path(args.redraw), args.methods, args.title, command)
        except (OSError, ValueError) as e:
            print(f"reproduce: {e}", file=sys.stderr)
            return 2
        print(table)
        print(f"wrote {Path(args.redraw).with_suffix('.md')} and .png")
        return 0
    out = Path(args.out)
    configs = {m: Path(args.configs) / f"{args.task}_{m}.yaml" for m in args.methods}
    missing = [str(p) for p in configs.values() if not p.exists()]
    if missing:
        print(f"reproduce: no config {', '.join(missing)} (methods need "
              f"{args.configs}/<task>_<method>.yaml)", file=sys.stderr)
        return 2
    if args.retrain and args.min_weight is None and args.top_frac is None:
        print("reproduce: --retrain needs --min-weight or --top-frac", file=sys.stderr)
        return 2
    from jbilevel.errors import UserError
    from jbilevel.xla_options import use_compilation_cache

    use_compilation_cache(args.compile_cache, default=out / "runs" / "xla_cache")
    results: dict[str, list[dict]] = {}
    for method, path in configs.items():
        results[method] = []
        for seed in args.seeds:
            run_dir = out / "runs" / args.task / method / f"seed{seed}"
            print(f"{method} seed {seed} -> {run_dir}", flush=True)
            overrides = [f"seed={seed}", f"task.seed={seed}",
                         *(["data.score_test=false"] if args.withhold_test else []),
                         *args.overrides]
            results[method].append(run_one(path, overrides, run_dir, args.fresh))
            if args.retrain and method in WEIGHTED:
                pick = (f"w{args.min_weight:g}" if args.min_weight is not None
                        else f"top{args.top_frac:g}")
                label = f"{method}_{pick}_{args.retrain}"
                again = out / "runs" / args.task / label / f"seed{seed}"
                print(f"{label} seed {seed} -> {again}", flush=True)
                try:
                    results.setdefault(label, []).append(retrain_one(
                        run_dir, args.retrain, again, min_weight=args.min_weight,
                        top_frac=args.top_frac, fresh=args.fresh))
                except (ValueError, UserError) as e:  # no row kept; no weights (interrupted)
                    print(f"reproduce: {e}", file=sys.stderr)
                    return 2
    summary = summarise(results)
    table = markdown(summary, command, args.seeds)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.task}.md").write_text(table)
    (out / f"{args.task}.json").write_text(json.dumps(
        {"command": command, "seeds": args.seeds, "runs": results}, indent=2) + "\n")
    plot(results, summary, out / f"{args.task}.png",
         args.title or f"{args.task}: mean ± std over {len(args.seeds)} seeds")
    print(table)
    print(f"wrote {out}/{args.task}.md, .json and .png; runs in {out}/runs/{args.task}/")
    return 0


if __name__ == "__main__":
    from jbilevel.xla_options import tune_host_malloc

    tune_host_malloc()  # as the jbilevel command does, before JAX starts its threads
    sys.exit(main())

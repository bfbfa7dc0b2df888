"""``jbilevel demo``: the built-in task end to end, several methods side by side, on the CPU.

Each method trains the same tiny decoder from scratch on the same data (``experiment.run``,
one run directory per method), then the demo prints and writes a comparison: test accuracy,
full validation loss, how well the learned weights separate good from corrupted examples
(AUROC, weight mass on good data) and wall time, plus a plot of the validation-loss curves and
one of the learned weights by ground truth.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from jbilevel import experiment, rundir, train
from jbilevel.adjoint import Implicit
from jbilevel.algorithms import MethodConfig
from jbilevel.algorithms.online import OnlineConfig
from jbilevel.console import Console

# Model sizes (all from scratch; the vocabulary comes from the task's character tokenizer).
SIZES = {
    "tiny": experiment.ModelSpec(hidden_size=128, num_layers=2, num_heads=4,
                                 intermediate_size=512),
    "small": experiment.ModelSpec(hidden_size=256, num_layers=4, num_heads=4,
                                  intermediate_size=1024),
}
# Settings per method at this scale (the same as configs/<task>_<method>.yaml; a test keeps
# them equal). docs/design.md (Defaults) says why they differ from the paper code's LLM ones.
METHOD_SETTINGS = {
    "sft": {},
    "mix": {},
    "val": {},
    "oracle": {},
    "bmo": {"lr_omega": 5.0, "omega_optim": "sgd", "lam": 0.5},
    "bds": {"lr_omega": 0.3, "hypergrad": Implicit("cg", maxiter=5, tol=0.0, ridge=10.0),
            "hyper_every": 100,
            "hyper_max_val_loss": 0.5, "hessian_rows": 64, "hyper_chunk": 500},
}
# bds skips hypergradient steps while the validation loss is above 0.5: until the model has
# learned addition its hypergradients are noise (docs/results.md). Runs shorter than
# FULL_RUN_STEPS end before that, so they take no gate: a hypergradient every steps/8 steps
# (at most every hyper_every) in the second half of the steps, at least four in all.
FULL_RUN_STEPS = 2000
HYPER_START_FRAC = 0.5
HYPER_STEPS_PER_RUN = 8
# "online" = bmo plus self-refining generation (the small-pool settings of docs/online.md's
# earlier table; configs/quality_online.yaml now runs it on bds), which starts after a quarter
# of the steps, once the model's own answers are worth training on.
ONLINE_BASE = "bmo"
ONLINE_SETTINGS = {"every": 50, "select": "dynamic", "fraction": 0.2, "num_samples": 4,
                   "temperature": 1.0, "ratio": "per_token", "clip": 2.0, "floor": -10.0,
                   "batch_size": 16, "gen_weight": 0.25}
TASK_OPTIONS = {
    "quality": {"n_train": 4000, "n_val": 200, "n_test": 500, "corrupt_frac": 0.5,
                "corruption": "rule", "ops": "+"},
    "safety": {"n_train": 4000, "n_val": 200, "n_test": 500, "harmful_frac": 0.3,
               "unsafe_frac": 0.5, "ops": "+"},
}
COLUMNS = ("method", "test_accuracy", "corrupted", "unsafe_compliance", "val_loss",
           "weight_auroc", "weight_mass_on_good", "wall_seconds")


def demo_config(method: str, *, task: str = "quality", size: str = "tiny", steps: int = 2000,
                seed: int = 0, corruption: str | None = None, changes: dict | None = None
                ) -> experiment.ExperimentConfig:
    """The configuration the demo runs for one method.

    ``corruption``: the quality task's corruption kind (default: the shipped configs' "rule");
    ``changes``: top-level field values that replace the demo's, e.g. a smaller task for a
    quick check.
    """
    if method not in METHOD_SETTINGS and method != "online":
        raise ValueError(f"unknown method {method!r}; choose from "
                         f"{sorted(METHOD_SETTINGS) + ['online']}")
    online = OnlineConfig()
    if method == "online":
        online = OnlineConfig(start=steps // 4, **ONLINE_SETTINGS)
        method = ONLINE_BASE
    options = dict(TASK_OPTIONS[task])
    if corruption is not None:
        if "corruption" not in options:
            raise ValueError(f"task {task!r} has no corruption option (only 'quality' does)")
        options["corruption"] = corruption
    settings = dict(METHOD_SETTINGS[method])
    if method == "bds" and steps < FULL_RUN_STEPS:
        settings["hyper_max_val_loss"] = 0.0
        settings["hyper_start"] = int(HYPER_START_FRAC * steps)
        settings["hyper_every"] = max(min(settings["hyper_every"],
                                          steps // HYPER_STEPS_PER_RUN), 1)
    cfg = experiment.ExperimentConfig(
        task=experiment.TaskConfig(name=task, seed=seed, options=options),
        model=SIZES[size],
        method=MethodConfig(method=method, lr_theta=1e-3, **settings),
        online=online,
        loop=train.LoopConfig(steps=steps, log_every=50, checkpoint_every=500,
                              eval_every=max(steps // 10, 1)),
        batch_size=64, val_batch_size=64, seed=seed)
    return dataclasses.replace(cfg, **(changes or {}))


def row(method: str, result: dict, wall: float) -> dict:
    """One line of the comparison table (None where a method has no such number)."""
    accuracy = result.get("test_accuracy", result.get("test_benign_accuracy"))
    return {"method": method, "test_accuracy": accuracy,
            "corrupted": result.get("test_corrupted"),
            "unsafe_compliance": result.get("test_unsafe_compliance"),
            "val_loss": result["val_loss"],
            "weight_auroc": result.get("weight_auroc"),
            "weight_mass_on_good": result.get("weight_mass_on_good"),
            "wall_seconds": round(wall, 1)}


def format_table(rows: list[dict]) -> str:
    """Markdown table of the demo's rows (columns that no row has are left out)."""

    def cell(v):
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    columns = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def run(out: str | Path, *, methods=("mix", "bmo", "bds", "online"), task: str = "quality",
        size: str = "tiny", steps: int = 2000, seed: int = 0, corruption: str | None = None,
        progress: bool = True, changes: dict | None = None,
        console: Console | None = None) -> dict:
    """Runs every method and writes ``results.json``, ``results.md`` and the plots to ``out``.

    Each method's run directory ``out/<method>`` is checked before the first one starts, so
    a demo rerun with other settings into the same ``out`` is refused before any work.
    """
    from jbilevel import report

    console = console or Console()
    out = Path(out)
    configs = {m: demo_config(m, task=task, size=size, steps=steps, seed=seed,
                              corruption=corruption, changes=changes) for m in methods}
    for method, cfg in configs.items():
        rundir.check_config(out / method, cfg, named=out)
    rows, runs = [], {}
    for method, cfg in configs.items():
        console.info(f"[{method}]")
        t0 = time.perf_counter()
        result = experiment.run(cfg, out / method, progress=progress, console=console)
        if result["interrupted"] is not None:  # experiment.run has said why
            console.warn(f"[{method}] stopped early; the demo stops here (rerun it to resume)")
            return {"interrupted": method, "rows": rows, "runs": runs}
        rows.append(row(method, result, time.perf_counter() - t0))
        runs[method] = str(out / method)
        console.info(f"[{method}] done: " + ", ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in rows[-1].items() if k != "method" and v is not None))
    summary = {"task": task, "corruption": corruption or TASK_OPTIONS[task].get("corruption"),
               "size": size, "steps": steps, "seed": seed, "rows": rows, "runs": runs,
               "config": {m: dataclasses.asdict(cfg) for m, cfg in configs.items()}}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(format_table(rows) + "\n")
    report.plot_comparison({m: out / m / "metrics.jsonl" for m in methods},
                           out / "curves.png", key="eval_val_loss")
    return summary


def main(args, console: Console | None = None) -> int:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    # the quality task's demo default is "style" (see the --corruption help); other tasks have
    # no corruption option, and demo_config says so if one is asked for
    corruption = args.corruption or ("style" if args.task == "quality" else None)
    summary = run(args.out, methods=methods, task=args.task, size=args.size, steps=args.steps,
                  seed=args.seed, corruption=corruption, console=console)
    if "interrupted" in summary:
        from jbilevel.cli import EXIT_INTERRUPTED

        return EXIT_INTERRUPTED
    out = Path(args.out)
    print()
    print(format_table(summary["rows"]))
    print(f"\nEverything is in {out}/:\n"
          f"  results.json, results.md   the table above (and each method's settings)\n"
          f"  curves.png                 full validation loss against steps, every method\n"
          f"  <method>/                  each run's report: results.json, weights.csv,\n"
          f"                             weights.png (weights by ground truth), curated.jsonl,\n"
          f"                             curated_top50.jsonl, test_predictions.jsonl, model/")
    return 0

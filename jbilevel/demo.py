"""``jbilevel demo``: a built-in task end to end, several methods side by side, on the CPU.

With ``base="pretrained"`` (the default, here and on the command line) each method fine-tunes
the shipped pretrained base (``jbilevel.models.base_model_path()``, a tiny Llama that already
knows arithmetic and the requests of the tasks; for coverage that base instruction-tuned,
``base_model_path("instruct")``) on the task's files (``experiment.run``, one
run directory per method, each with the data it trained on in ``data/``); ``base="scratch"``
(``jbilevel demo --base scratch``) trains a tiny decoder from scratch on the character
tokenizer instead, the earlier demo, whose short run is too short to learn the task. The
demo prints and writes a comparison: test accuracy, the rate of test answers that follow the
corruption, how well the learned weights separate good from corrupted examples (AUROC, weight
mass on good data) and wall time, plus a plot of the validation-loss curves and one of the
learned weights by ground truth.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from jbilevel import experiment, report, rundir, train
from jbilevel.adjoint import Implicit
from jbilevel.algorithms import MethodConfig
from jbilevel.algorithms.online import OnlineConfig
from jbilevel.console import Console

BASES = ("pretrained", "scratch")
TASKS = ("quality", "safety", "coverage")

# ---- fine-tuning the shipped base (configs/finetune/<task>_<method>.yaml; a test keeps them
# equal). Chosen on validation loss and the validation-only signals, never on the test split
# (docs/results.md says what was tried).
FINETUNE_STEPS = 300
UNIFORM = {m: {} for m in ("sft", "mix", "val", "oracle")}  # no method settings of their own
FINETUNE_METHODS = {
    **UNIFORM,
    # lam 0.8 (validation loss 0.05 against 0.13 at lam 0.5 on quality seed 0); its omega
    # update follows the per-example loss, which does not tell the rows apart from this base
    "bmo": {"lr_omega": 5.0, "omega_optim": "sgd", "lam": 0.8},
    # Frequent, gently stepped hypergradients once the model has picked up the chat format
    # (its validation loss is still ~0.6 at step 75). Ridge 1000: H + ridge I is nearly always
    # positive definite at these mid-training thetas (at ridge 100 CG met negative curvature
    # in 6 of 23 solves); on quality seed 0 (model step 3e-4, constant) the final validation
    # loss was 0.261 against 0.313 (ridge 100, such solves skipped), 0.354 (ridge 100,
    # truncated CG) and 0.385 (ridge 1e4). Two CG iterations: at ridge 1000 the ridge dominates
    # the solve, and the final validation loss was that of five on every seed of quality
    # (0.154 / 0.182 / 0.165) with 2 Hessian-vector products instead of 5 (docs/results.md).
    "bds": {"lr_omega": 0.15, "hypergrad": Implicit("cg", maxiter=2, tol=0.0, ridge=1000.0),
            "hyper_every": 10, "hyper_start": 75, "hessian_rows": 64, "hyper_chunk": 500},
}
# Per task, where that task's own validation loss chose otherwise. Safety: ridge 100 with CG
# running through negative curvature (those solves' weight steps skipped), the first sweep's
# setting: mean validation loss over seeds 0-2 (model step 3e-4, constant) 0.122 against 0.137
# at ridge 1000 (benign test accuracy 70.8% against 67.3%; docs/results.md). Hypergradients
# from the first step: the base refuses harmful requests, and 75 steps of uniform weights on
# compliant answers teach it to comply (seed 0: validation loss 0.101 against 0.107 from step
# 75, which then complied with 99.6% of the harmful test requests). lr_omega 0.13, chosen on
# the validation split's task metric (seed 0: no compliance, benign accuracy 82% against 78%
# at 0.15, validation loss 0.098 against 0.101; 0.12 and 0.1 complied with 15% and 10% of the
# validation's harmful requests although their validation losses were as low). Each weight
# step's hypergradient scaled to unit norm before Adam (omega_normalize): its size swings
# tenfold between steps, which left the unsafe rows, whose hypergradients keep their sign,
# under half of Adam's full step, and one seed of three complied on an Intel host. Chosen on
# that host's validation split over seeds 0-2: no compliance on any seed (against 9% on seed
# 0), benign accuracy 87.3% against 86.7%, loss 0.076 against 0.081 (docs/results.md).
FINETUNE_TASK_METHODS = {
    "safety": {"bds": {"hyper_start": 0, "lr_omega": 0.13, "omega_normalize": True,
                       "hypergrad": dataclasses.replace(
                           FINETUNE_METHODS["bds"]["hypergrad"], ridge=100.0,
                           on_negative_curvature="continue")}},
}
# Every method's model step: Adam at 1e-3, decaying along a cosine to 0 at the last step. On
# quality seed 0 (validation loss): clean rows only 0.089 against 0.157 at a constant 3e-4
# (0.087 at 2e-3 with the cosine), mix 0.253 against 0.370 (0.240 at 2e-3), bds 0.154 against
# 0.261 (0.196 at 2e-3). A constant step size ends where the noise of the last steps leaves it.
FINETUNE_LR = 1e-3
# bds: a hypergradient for every training row each time (hyper_batch_size 0), not a fresh
# sample of 512 (the default): on quality seed 0 the final validation loss was 0.313 with all
# 2000 rows (0.269 in the tuning run before main's merge) against 0.330 with 512 sampled rows
# (docs/results.md); all rows costs more (the hypergradients are most of bds's time).
FINETUNE_HYPER_BATCH = 0
# bds + online: from a third of the run, every 50 steps, the lowest-weighted fifth of the
# questions get one fresh answer each from the current model at a low temperature.
FINETUNE_ONLINE = {"every": 50, "start_frac": 1 / 3, "select": "dynamic", "fraction": 0.2,
                   "num_samples": 1, "temperature": 0.2, "ratio": "per_token", "clip": 2.0,
                   "floor": -10.0, "batch_size": 16, "gen_weight": 0.5}
# Coverage starts from the shipped instruction-tuned base (task.base "instruct"), which already
# answers arithmetic in the chat format; from the raw-text base, fine-tuning first learns the
# format from the data's answers, corruption included, and online generation then regenerates
# the corruption (docs/results.md). One refresh, at step 0 (every_frac 1: once a run), of every
# question, drawn at random (all are drawn): the instruction-tuned model's own answers, which
# the question weights then sort out. Chosen on seed 0's validation loss, on a stand-in for
# the shipped model (0.31 against bds offline's 0.38, and 0.42-0.47 for refreshes from step 10,
# 25 or 100, whose samples already followed the corruption: the model learns it within tens of
# steps) and checked on the shipped one (0.29 against bds's 0.36 and 0.40 for the refreshes
# above from step 100).
FINETUNE_TASK_BASE = {"coverage": "instruct"}
FINETUNE_TASK_ONLINE = {"coverage": {"start_frac": 0.0, "every_frac": 1.0, "fraction": 1.0,
                                     "select": "random"}}
# ---- from scratch (configs/<task>_<method>.yaml; the vocabulary comes from the task's
# character tokenizer).
SIZES = {
    "tiny": experiment.ModelSpec(hidden_size=128, num_layers=2, num_heads=4,
                                 intermediate_size=512),
    "small": experiment.ModelSpec(hidden_size=256, num_layers=4, num_heads=4,
                                  intermediate_size=1024),
}
METHOD_SETTINGS = {
    **UNIFORM,
    "bmo": {"lr_omega": 5.0, "omega_optim": "sgd", "lam": 0.5},
    "bds": {"lr_omega": 0.3, "hypergrad": Implicit("cg", maxiter=5, tol=0.0, ridge=10.0),
            "hyper_every": 100,
            "hyper_max_val_loss": 0.5, "hessian_rows": 64, "hyper_chunk": 500},
}
# From scratch, bds skips hypergradient steps while the validation loss is above 0.5: until
# the model has learned addition its hypergradients are noise (docs/results.md). Runs shorter
# than FULL_RUN_STEPS end before that, so they take no gate: a hypergradient every steps/8
# steps (at most every hyper_every) in the second half of the steps, at least four in all.
FULL_RUN_STEPS = 2000
HYPER_START_FRAC = 0.5
HYPER_STEPS_PER_RUN = 8
# From scratch, "online" = bmo plus self-refining generation (the small-pool settings of
# docs/online.md's earlier table), which starts after a quarter of the steps.
ONLINE_BASE = {"pretrained": "bds", "scratch": "bmo"}
ONLINE_SETTINGS = {"every": 50, "select": "dynamic", "fraction": 0.2, "num_samples": 4,
                   "temperature": 1.0, "ratio": "per_token", "clip": 2.0, "floor": -10.0,
                   "batch_size": 16, "gen_weight": 0.25}
TASK_OPTIONS = {
    "quality": {"n_train": 4000, "n_val": 200, "n_test": 500, "corrupt_frac": 0.5,
                "corruption": "rule", "ops": "+"},
    "safety": {"n_train": 4000, "n_val": 200, "n_test": 500, "harmful_frac": 0.3,
               "unsafe_frac": 0.5, "ops": "+"},
    "coverage": {"n_train": 4000, "n_val": 200, "n_test": 500, "dropped": "-",
                 "dropped_frac": 0.25, "dropped_corrupt": 0.9, "kept_corrupt": 0.0,
                 "corruption": "rule"},
}
# Fine-tuning: the same tasks with half the training rows (the base already knows the skills).
# Safety with 80% of the harmful requests answered compliantly (24% of the rows): the base
# refuses them, and at 50% no method learned to comply (every method's unsafe compliance was
# 0 on seeds 0-2), so the task could not tell the methods apart; at 80% mix complies with
# every harmful test request.
FINETUNE_TASKS = {task: {**options, "n_train": 2000} for task, options in TASK_OPTIONS.items()}
FINETUNE_TASKS["safety"]["unsafe_frac"] = 0.8
COLUMNS = ("method", "test_accuracy", "corrupted", "dropped_skill", "unsafe_compliance",
           "val_loss", "weight_auroc", "weight_mass_on_good", "wall_seconds")


def config_steps(base: str) -> int:
    """The run length of the shipped configs for ``base`` (the command line's default is
    shorter from scratch: ``SCRATCH_DEMO_STEPS``)."""
    return FINETUNE_STEPS if base == "pretrained" else FULL_RUN_STEPS


SCRATCH_DEMO_STEPS = 250  # `jbilevel demo --base scratch`: ~4 minutes for four methods


def demo_config(method: str, *, task: str = "quality", base: str = "pretrained",
                size: str = "tiny", steps: int | None = None, seed: int = 0,
                corruption: str | None = None, changes: dict | None = None
                ) -> experiment.ExperimentConfig:
    """The configuration the demo runs for one method.

    Args:
      method: sft, mix, val, oracle, bmo, bds, or "online" (bds plus self-refining generation
        when fine-tuning, bmo plus it from scratch).
      task: quality, safety or coverage; base: "pretrained" (fine-tune a shipped model: the
        base, or for coverage the instruction-tuned base, ``FINETUNE_TASK_BASE``) or
        "scratch" (a random ``size`` model on the character tokenizer).
      steps: training steps (default ``config_steps(base)``); seed: task and run seed.
      corruption: the quality / coverage task's corruption kind (default: the configs' rule).
      changes: top-level field values that replace the demo's, e.g. a smaller task.
    Returns: the ExperimentConfig (``configs/finetune/<task>_<method>.yaml`` for the
      fine-tuning defaults, ``configs/<task>_<method>.yaml`` from scratch).
    """
    if base not in BASES:
        raise ValueError(f"unknown base {base!r}; use one of {BASES}")
    settings_by_method = FINETUNE_METHODS if base == "pretrained" else METHOD_SETTINGS
    if method not in settings_by_method and method != "online":
        raise ValueError(f"unknown method {method!r}; choose from "
                         f"{sorted(settings_by_method) + ['online']}")
    steps = config_steps(base) if steps is None else steps
    online = OnlineConfig()
    if method == "online":
        if base == "pretrained":
            knobs = {**FINETUNE_ONLINE, **FINETUNE_TASK_ONLINE.get(task, {})}
            start = int(knobs.pop("start_frac") * steps)
            if "every_frac" in knobs:
                knobs["every"] = max(int(knobs.pop("every_frac") * steps), 1)
        else:
            knobs, start = ONLINE_SETTINGS, steps // 4
        online = OnlineConfig(start=start, **knobs)
        method = ONLINE_BASE[base]
    options = dict(options_of(task, base))
    if corruption is not None:
        if "corruption" not in options:
            raise ValueError(f"task {task!r} has no corruption option (quality and coverage "
                             "do)")
        options["corruption"] = corruption
    settings = dict(settings_by_method[method])
    if base == "pretrained":
        settings.update(FINETUNE_TASK_METHODS.get(task, {}).get(method, {}))
    if base == "scratch" and method == "bds" and steps < FULL_RUN_STEPS:
        settings["hyper_max_val_loss"] = 0.0
        settings["hyper_start"] = int(HYPER_START_FRAC * steps)
        settings["hyper_every"] = max(min(settings["hyper_every"],
                                          steps // HYPER_STEPS_PER_RUN), 1)
    if base == "pretrained":
        model, batch, lr = experiment.ModelSpec(), 32, FINETUNE_LR
        settings["decay_steps"] = steps
    else:
        model, batch, lr = SIZES[size], 64, 1e-3
    cfg = experiment.ExperimentConfig(
        task=experiment.TaskConfig(name=task, seed=seed, options=options, base=(
            FINETUNE_TASK_BASE.get(task, base) if base == "pretrained" else base)),
        model=model,
        method=MethodConfig(method=method, lr_theta=lr, **settings),
        online=online,
        loop=train.LoopConfig(steps=steps, log_every=50, checkpoint_every=500,
                              eval_every=max(steps // 10, 1)),
        batch_size=batch, val_batch_size=batch, seed=seed)
    if base == "pretrained" and method == "bds":  # bds and online
        cfg = dataclasses.replace(cfg, hyper_batch_size=FINETUNE_HYPER_BATCH)
    return dataclasses.replace(cfg, **(changes or {}))


def row(method: str, result: dict, wall: float, dropped: str | None = None) -> dict:
    """One line of the comparison table (None where a method has no such number);
    ``dropped``: the coverage task's dropped skill ("add" / "sub"), whose accuracy is shown."""
    accuracy = result.get("test_accuracy", result.get("test_benign_accuracy"))
    return {"method": method, "test_accuracy": accuracy,
            "corrupted": result.get("test_corrupted"),
            "dropped_skill": result.get(f"test_accuracy_{dropped}") if dropped else None,
            "unsafe_compliance": result.get("test_unsafe_compliance"),
            "val_loss": result["val_loss"],
            "weight_auroc": result.get("weight_auroc"),
            "weight_mass_on_good": result.get("weight_mass_on_good"),
            "wall_seconds": round(wall, 1)}


def format_table(rows: list[dict]) -> str:
    """Markdown table of the demo's rows (columns that no row has are left out)."""

    def cell(column, v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.0f}" if column == "wall_seconds" else f"{v:.3f}"
        return str(v)

    columns = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# The demo's methods, most expensive first: with several processes (``jobs``) the longest run
# starts first, so the last one to start is short.
COST_ORDER = ("online", "bds", "bmo")


def run(out: str | Path, *, methods=("mix", "bmo", "bds", "online"), task: str = "quality",
        base: str = "pretrained", size: str = "tiny", steps: int | None = None, seed: int = 0,
        corruption: str | None = None, progress: bool = True, changes: dict | None = None,
        jobs: int = 1, console: Console | None = None) -> dict:
    """Runs every method and writes ``results.json``, ``results.md`` and the plots to ``out``.

    Each method's run directory ``out/<method>`` is checked before the first one starts, so
    a demo rerun with other settings into the same ``out`` is refused before any work.
    ``jobs`` > 1 runs that many methods at a time, each in a process of its own
    (``jbilevel.jobs``; no progress bar, a line per logged record instead, written to stderr
    at ``console``'s verbosity): the same runs and numbers, in less wall time.
    """
    from jbilevel.data.tasks.coverage import DROPPED
    from jbilevel.data.tasks.quality import SKILLS

    console = console or Console()
    out = Path(out)
    steps = config_steps(base) if steps is None else steps
    configs = {m: demo_config(m, task=task, base=base, size=size, steps=steps, seed=seed,
                              corruption=corruption, changes=changes) for m in methods}
    for method, cfg in configs.items():  # refused before any method runs or writes
        resolved = experiment.resolve(cfg, out / method)
        if rundir.check_config(out / method, resolved, named=out) and resolved is not cfg:
            rundir.check_task_files(out / method, cfg.task)  # another --seed, --corruption
    t_start = time.perf_counter()
    processes = min(jobs, len(configs)) if jobs > 1 else 1
    if processes > 1:
        from jbilevel import jobs as parallel

        order = sorted(configs, key=lambda m: COST_ORDER.index(m) if m in COST_ORDER
                       else len(COST_ORDER))
        console.info(f"running {len(configs)} methods, {processes} at a time, each in a "
                     "process of its own")
        finished = parallel.run_all([parallel.Job(m, configs[m], out / m) for m in order],
                                    processes=processes, console=console)
        outcomes = {m: (finished[m].result, finished[m].seconds) for m in configs
                    if m in finished}
    else:
        outcomes = {}
        for method, cfg in configs.items():
            console.info(f"[{method}]")
            t0 = time.perf_counter()
            result = experiment.run(cfg, out / method, progress=progress, console=console)
            outcomes[method] = (result, time.perf_counter() - t0)
            if result["interrupted"] is not None:
                break
    rows, runs = [], {}
    stopped = [m for m in configs if m not in outcomes or outcomes[m][0]["interrupted"]]
    for method, cfg in configs.items():
        if method in stopped:
            continue
        dropped = None
        if task == "coverage":
            dropped = SKILLS[cfg.task.options.get("dropped", DROPPED)]
        result, wall = outcomes[method]
        rows.append(row(method, result, wall, dropped))
        runs[method] = str(out / method)
        console.info(f"[{method}] done: " + ", ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in rows[-1].items() if k != "method" and v is not None))
    if stopped:  # experiment.run has said why
        console.warn(f"{', '.join(stopped)} did not finish; the demo stops here (rerun it to "
                     "resume)")
        return {"interrupted": stopped, "rows": rows, "runs": runs}
    summary = {"task": task, "base": base,
               "corruption": corruption or options_of(task, base).get("corruption"),
               "size": size if base == "scratch" else None, "steps": steps, "seed": seed,
               "jobs": processes,
               "wall_seconds": round(time.perf_counter() - t_start, 1),
               "rows": rows, "runs": runs,
               "config": {m: dataclasses.asdict(cfg) for m, cfg in configs.items()}}
    (out / "results.json").write_text(report.to_json(summary, indent=2) + "\n")
    (out / "results.md").write_text(format_table(rows) + "\n")
    report.plot_comparison({m: out / m / "metrics.jsonl" for m in methods},
                           out / "curves.png", key="eval_val_loss")
    return summary


def options_of(task: str, base: str) -> dict:
    """The demo's task options for ``base``."""
    return (FINETUNE_TASKS if base == "pretrained" else TASK_OPTIONS)[task]


def default_jobs(n_methods: int) -> int:
    """How many methods the command line runs at a time: one per CPU core, up to all of them
    (one run of the shipped base keeps about 1.7 of this host's 2 cores busy, two side by
    side keep both: docs/results.md)."""
    return max(1, min(n_methods, os.cpu_count() or 1))


def main(args, console: Console | None = None) -> int:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    # from scratch the quality task's demo default is "style" (see the --corruption help):
    # the short run cannot learn addition; the tasks without a corruption option say so
    corruption, steps = args.corruption, args.steps
    if args.base == "scratch":
        steps = SCRATCH_DEMO_STEPS if steps is None else steps
        if corruption is None and args.task == "quality":
            corruption = "style"
    jobs = default_jobs(len(methods)) if args.jobs is None else args.jobs
    summary = run(args.out, methods=methods, task=args.task, base=args.base, size=args.size,
                  steps=steps, seed=args.seed, corruption=corruption, jobs=jobs,
                  console=console)
    if "interrupted" in summary:
        from jbilevel.cli import EXIT_INTERRUPTED

        return EXIT_INTERRUPTED
    out = Path(args.out)
    print()
    print(format_table(summary["rows"]))
    at_once = (f", {summary['jobs']} at a time (each row's wall_seconds is its own run's, "
               "sharing the CPU)" if summary["jobs"] > 1 else "")
    print(f"\n{len(summary['rows'])} methods in {summary['wall_seconds']:.0f} s{at_once}.")
    print(f"\nEverything is in {out}/:\n"
          f"  results.json, results.md   the table above (and each method's settings)\n"
          f"  curves.png                 full validation loss against steps, every method\n"
          f"  <method>/                  each run's report: results.json, weights.csv,\n"
          f"                             weights.png (weights by ground truth), curated.jsonl,\n"
          f"                             curated_top50.jsonl, test_predictions.jsonl,\n"
          f"                             validation_predictions.jsonl, model/")
    return 0

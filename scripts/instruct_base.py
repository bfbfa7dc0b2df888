"""Instruction-tune the shipped base into the second shipped model
(``jbilevel.models.base_model_path("instruct")``, ``jbilevel/assets/instruct``).

    python scripts/instruct_base.py --out jbilevel/assets/instruct    # the shipped model

The shipped base (``jbilevel/assets/base``, made by ``scripts/pretrain_base.py``) knows sums
and differences in raw text but has never seen the chat format: fine-tuned, it first learns
the format, from whatever answers the data gives. An instruction-tuned model already answers
in the chat format, which is where online self-refining generation has something to offer:
its own answers to questions whose SFT answers are bad (the coverage task,
``task.base: instruct``). This script makes one the way such models are made, by SFT on clean
chat rows, through jbilevel's own path (``experiment.run``, method ``sft``):

- rows: additions and differences ``a - b`` (a >= b) of numbers 0..99, half each, in the
  built-in tasks' phrasings, with right answers;
- held out by construction: every problem of the validation and test splits of the built-in
  quality and coverage tasks (their shipped options, seeds 0..``--held-out-seeds``-1), so that
  no result on those splits counts questions the model was tuned on; the count is reported;
- a test split of fresh problems measures the model's chat-format skill per operation.

Deterministic from ``--seed`` on one machine. Writes an HF directory: the base's tokenizer
files unchanged, the tuned ``config.json`` and ``model.safetensors``, ``instruct.json`` (the
recipe, skills, held-out count, wall time) and a ``README.md`` model card.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything the instruction-tuned model is a function of (written to its card)."""

    seed: int = 1000  # rows, phrasing and data order
    n_train: int = 2200  # SFT rows
    n_val: int = 200  # validation rows (the run's loss curve)
    n_test: int = 500  # fresh problems scoring the chat-format skill
    sub_frac: float = 0.5  # share of the rows that are differences
    steps: int = 300  # optimizer steps
    batch_size: int = 32  # rows per step
    lr: float = 1e-3  # Adam step size, cosine decay to 0 at the last step
    held_out_seeds: int = 10  # task seeds whose validation and test problems are held out


def _patterns() -> list[tuple[str, re.Pattern]]:
    """(operator, regex with groups a and b) for every phrasing the tasks use."""
    from jbilevel.data.tasks.arith import PHRASINGS

    out = []
    for op, phrasings in PHRASINGS.items():
        for p in phrasings:
            body = re.escape(p).replace(r"\{a\}", r"(?P<a>\d+)").replace(r"\{b\}", r"(?P<b>\d+)")
            out.append((op, re.compile("^" + body + "$")))
    return out


def problem_of(question: str, patterns=None) -> tuple[str, int, int]:
    """The (op, a, b) a task question asks (ValueError for a question in no known phrasing)."""
    for op, pattern in patterns or _patterns():
        m = pattern.match(question)
        if m:
            return op, int(m["a"]), int(m["b"])
    raise ValueError(f"not an arithmetic question of the built-in tasks: {question!r}")


def held_out_problems(n_seeds: int) -> set[tuple[str, int, int]]:
    """Every problem in the validation and test splits of the built-in quality and coverage
    tasks, with the options ``jbilevel demo`` and ``configs/finetune`` use, seeds 0..n-1."""
    from jbilevel.data.tasks import task_rows
    from jbilevel.demo import FINETUNE_TASKS

    patterns = _patterns()
    held = set()
    for task in ("quality", "coverage"):
        for seed in range(n_seeds):
            rows = task_rows(task, seed=seed, **FINETUNE_TASKS[task])
            for split in ("validation", "test"):
                held.update(problem_of(r["question"], patterns) for r in rows[split])
    return held


def instruct_rows(recipe: Recipe, held: set) -> dict:
    """Split name -> clean chat rows (question, response, answer, good=1, skill), every
    problem distinct and none in ``held``."""
    from jbilevel.data.tasks.arith import answer, distinct_problems, question
    from jbilevel.data.tasks.quality import SKILLS

    rng = np.random.default_rng([recipe.seed, 11])
    sizes = {"train": recipe.n_train, "validation": recipe.n_val, "test": recipe.n_test}
    n_sub = {s: round(recipe.sub_frac * n) for s, n in sizes.items()}
    draws = {op: iter(distinct_problems(
        rng, sum(n_sub[s] if op == "-" else sizes[s] - n_sub[s] for s in sizes), op,
        nonnegative=True, exclude=held)) for op in ("+", "-")}
    out = {}
    for split, size in sizes.items():
        ops = ["-"] * n_sub[split] + ["+"] * (size - n_sub[split])
        rows = []
        for op in ops:
            _, a, b = next(draws[op])
            true = str(answer(op, a, b))
            rows.append({"question": question(rng, op, a, b), "response": true,
                         "answer": true, "good": 1, "skill": SKILLS[op]})
        out[split] = [rows[i] for i in rng.permutation(size)]
    return out


def tune(recipe: Recipe, data_dir: Path, run_dir: Path) -> dict:
    """SFT of the shipped base on the rows in ``data_dir``; returns the run's results."""
    from jbilevel import experiment, inputs, train
    from jbilevel.algorithms import MethodConfig
    from jbilevel.models import base_model_path

    cfg = experiment.ExperimentConfig(
        data=inputs.DataConfig(train=str(data_dir / "train.jsonl"),
                               validation=str(data_dir / "validation.jsonl"),
                               test=str(data_dir / "test.jsonl"), schema="qa",
                               chat_template="tokenizer", metric="answer"),
        model=experiment.ModelSpec(path=base_model_path()),
        method=MethodConfig(method="sft", lr_theta=recipe.lr, decay_steps=recipe.steps),
        loop=train.LoopConfig(steps=recipe.steps, log_every=50, checkpoint_every=0,
                              eval_every=max(recipe.steps // 10, 1), progress=False),
        batch_size=recipe.batch_size, val_batch_size=recipe.batch_size, seed=recipe.seed)
    return experiment.run(cfg, run_dir)


def write_card(out: Path, recipe: Recipe, record: dict, command: str) -> None:
    """The model card: what the model is, how it was made, its skills and wall time."""
    import platform

    from pretrain_base import _cores, _cpu  # scripts/ is on sys.path (see __main__)

    s = record["skills"]
    (out / "README.md").write_text(f"""# jbilevel instruction-tuned base

The shipped base (`jbilevel.models.base_model_path()`, pretrained on raw-text arithmetic and
requests) fine-tuned on {recipe.n_train} clean chat rows of additions and differences, so that
it already answers arithmetic questions in the chat format
(`jbilevel.models.base_model_path("instruct")`; the coverage task starts from it,
`task.base: instruct`). Made by

    {command}

deterministic from the seed on one machine (`scripts/instruct_base.py`), with jbilevel's own
SFT path (`method: sft`).

- Rows: additions and differences `a - b` (a >= b) of numbers 0..99, {recipe.sub_frac:.0%}
  differences, in the built-in tasks' phrasings, right answers; every problem distinct.
- Held out: the {record['held_out']} problems of the validation and test splits of the built-in
  quality and coverage tasks (their shipped options, seeds 0-{recipe.held_out_seeds - 1}): none
  is a training, validation or test row here.
- Training: {recipe.steps} steps of {recipe.batch_size} rows, Adam (b2 0.95, clip 1.0) at
  {recipe.lr} on a cosine to 0; loss on the response tokens; the tokenizer and chat template
  are the base's, unchanged.
- Wall time on {_cpu()} ({platform.machine()}, {_cores()} cores; 1-minute load average
  {record['load']:.1f} at the end): {record['seconds']:.0f} s in all.

Recipe: `{json.dumps(dataclasses.asdict(recipe))}`

## Skills in the chat format (greedy, {recipe.n_test} fresh problems)

| skill | value |
| --- | --- |
| accuracy | {s['accuracy']:.3f} |
| accuracy on additions | {s['accuracy_add']:.3f} |
| accuracy on differences | {s['accuracy_sub']:.3f} |
| validation loss | {s['val_loss']:.4f} |
""")


def main(argv=None) -> int:
    from pretrain_base import parse_recipe

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--keep-run", default=None,
                   help="directory for the SFT run (default: a temporary one, removed)")
    args, recipe, command = parse_recipe(p, Recipe, "instruct_base.py", argv)
    from jbilevel.data.tasks import write_splits
    from jbilevel.models import base_model_path

    t_start = time.perf_counter()
    held = held_out_problems(recipe.held_out_seeds)
    rows = instruct_rows(recipe, held)
    print(f"rows: {', '.join(f'{k} {len(v)}' for k, v in rows.items())}; {len(held)} task "
          f"validation/test problems held out ({time.perf_counter() - t_start:.1f} s)",
          flush=True)
    work = Path(args.keep_run) if args.keep_run else Path(tempfile.mkdtemp(prefix="instruct-"))
    try:
        write_splits(rows, work / "rows")
        result = tune(recipe, work / "rows", work / "run")
        if result["interrupted"] is not None:
            print(f"the SFT run stopped: {result['interrupted']}", file=sys.stderr)
            return 1
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(work / "run" / "model" / name, out / name)
        for name in TOKENIZER_FILES:
            shutil.copyfile(Path(base_model_path()) / name, out / name)
    finally:
        if not args.keep_run:
            shutil.rmtree(work, ignore_errors=True)
    skills = {k: result[f"test_{k}"] for k in ("accuracy", "accuracy_add", "accuracy_sub")}
    skills["val_loss"] = result["val_loss"]
    record = {"recipe": dataclasses.asdict(recipe), "skills": skills, "held_out": len(held),
              "seconds": round(time.perf_counter() - t_start, 1),
              "load": os.getloadavg()[0]}
    write_card(out, recipe, record, command)
    (out / "instruct.json").write_text(json.dumps(record, indent=2) + "\n")
    for f in out.iterdir():
        f.chmod(0o644)
    print(f"wrote {out}/: chat-format accuracy {skills['accuracy']:.3f} (additions "
          f"{skills['accuracy_add']:.3f}, differences {skills['accuracy_sub']:.3f}) in "
          f"{record['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    from jbilevel.xla_options import tune_host_malloc

    tune_host_malloc()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())

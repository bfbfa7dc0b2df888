"""Coverage task: two arithmetic skills, the SFT answers of one of them mostly corrupted.

Train: additions and subtractions (``a - b`` with ``a >= b``); ``dropped_frac`` of the rows
are questions of the dropped skill (subtraction by default), of which ``dropped_corrupt`` have
a corrupted answer (the consistent wrong rule, answer + 1, by default); ``kept_corrupt`` of the
other skill's rows are corrupted the same way. Validation and test: both skills, half each,
clean. Offline selection drops most of the dropped skill's questions with their bad answers,
so little of that skill is left to fine-tune on, although a pretrained base can answer those
questions: online self-refining generation keeps the questions and regenerates the answers.
Metrics (``score_answers``): exact-match accuracy overall and per skill, and the rate of
answers that follow the corruption.
"""

from __future__ import annotations

import numpy as np

from jbilevel.data.tasks import Task, build_splits, score_answers
from jbilevel.data.tasks.arith import answer, distinct_problems, question
from jbilevel.data.tasks.quality import CORRUPTIONS, DETERMINISTIC, SKILLS, corrupt

DROPPED = "-"  # the default dropped skill's operator: subtraction


def coverage_rows(seed: int = 0, *, n_train: int = 2000, n_val: int = 200, n_test: int = 500,
                  dropped: str = DROPPED, dropped_frac: float = 0.25,
                  dropped_corrupt: float = 0.9, kept_corrupt: float = 0.0,
                  corruption: str = "rule") -> dict:
    """The coverage task's rows, split name -> list of dicts.

    Args:
      seed: all randomness derives from it.
      n_train, n_val, n_test: split sizes (problems are distinct across all splits).
      dropped: the operator of the mostly corrupted skill, "-" or "+".
      dropped_frac: share of train rows that ask the dropped skill.
      dropped_corrupt, kept_corrupt: share of the dropped / the other skill's train rows whose
        answer is corrupted.
      corruption: "rule" | "style" | "random" (``quality.corrupt``).
    Returns: rows with question, response, answer, good, kind, skill ("add" / "sub") and, for
      deterministic corruptions, ``corrupted`` (the corruption's answer to the question).
    """
    if dropped not in SKILLS:
        raise ValueError(f"dropped={dropped!r}: use '+' or '-'")
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; use one of {CORRUPTIONS}")
    for name, v in (("dropped_frac", dropped_frac), ("dropped_corrupt", dropped_corrupt),
                    ("kept_corrupt", kept_corrupt)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name}={v} must be in [0, 1]")
    kept = "+" if dropped == "-" else "-"
    rng = np.random.default_rng([seed, 3])
    n_drop = {"train": round(dropped_frac * n_train), "validation": n_val // 2,
              "test": n_test // 2}
    sizes = {"train": n_train, "validation": n_val, "test": n_test}
    pools = {op: iter(distinct_problems(rng, sum(n_drop[s] if op == dropped else sizes[s] -
                                                 n_drop[s] for s in sizes), op,
                                        nonnegative=True))
             for op in (dropped, kept)}
    rows_by_split = {}
    for split, size in sizes.items():
        ops = [dropped] * n_drop[split] + [kept] * (size - n_drop[split])
        bad = np.zeros(size, bool)
        if split == "train":
            for op, frac in ((dropped, dropped_corrupt), (kept, kept_corrupt)):
                where = np.flatnonzero(np.array(ops) == op)
                bad[rng.choice(where, size=round(frac * len(where)), replace=False)] = True
        rows = []
        for op, is_bad in zip(ops, bad, strict=True):
            _, a, b = next(pools[op])
            true = answer(op, a, b)
            row = {"question": question(rng, op, a, b),
                   "response": corrupt(corruption, true, rng) if is_bad else str(true),
                   "answer": str(true), "good": int(not is_bad),
                   "kind": corruption if is_bad else "clean", "skill": SKILLS[op]}
            if corruption in DETERMINISTIC:
                row["corrupted"] = corrupt(corruption, true, None)
            rows.append(row)
        rows_by_split[split] = [rows[i] for i in rng.permutation(size)]
    return rows_by_split


def make_coverage(seed: int = 0, *, max_len: int = 48, **options) -> Task:
    """The coverage task in from-scratch form (built-in character tokenizer).

    Args: seed; max_len (sequence length limit); options: ``coverage_rows``'s.
    Returns: Task with good_N marking uncorrupted train examples.
    """
    rows_by_split = coverage_rows(seed, **options)
    tok, splits = build_splits(rows_by_split, max_len)
    good_N = np.array([r["good"] for r in rows_by_split["train"]], np.int32)
    return Task("coverage", tok, splits, good_N, score_answers)

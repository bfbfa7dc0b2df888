"""Quality task: arithmetic instructions with exact answers; part of the SFT answers corrupted.

Corruption kinds (applied to ``corrupt_frac`` of train examples, which get good=0):
  "rule":   a consistent wrong rule, answer + 1 (hurts direct mixing the most);
  "style":  a consistent wrong style, "The answer is 82." (exact match fails);
  "random": a random wrong integer.
Validation and test are clean. Metrics: exact-match accuracy of decoded answers and, for the
deterministic corruptions (rule, style), the fraction of answers that follow the corruption
instead: with a consistent wrong rule in half the data, a model that learned the task picks
between the two answers, and accuracy alone does not say whether it failed to learn addition
or learned the wrong rule.
"""

from __future__ import annotations

import functools

import numpy as np

from jbilevel.data.tasks import Task, build_splits
from jbilevel.data.tasks.arith import MAX_OPERAND, answer, distinct_problems, question

CORRUPTIONS = ("rule", "style", "random")
DETERMINISTIC = ("rule", "style")  # corruptions whose wrong answer is known per question
SKILLS = {"+": "add", "-": "sub"}


def corrupt(kind: str, true: int, rng: np.random.Generator) -> str:
    """Args: corruption kind, the true answer, rng. Returns: the corrupted response text."""
    if kind == "rule":
        return str(true + 1)
    if kind == "style":
        return f"The answer is {true}."
    if kind == "random":
        wrong = true
        while wrong == true:
            wrong = int(rng.integers(-MAX_OPERAND, 2 * MAX_OPERAND + 1))
        return str(wrong)
    raise ValueError(f"unknown corruption {kind!r}; use one of {CORRUPTIONS}")


def score_quality(predictions: list[str], rows: list[dict], corruption: str | None = None) -> dict:
    """Args: decoded answers, their rows, the task's corruption kind (None: not scored).

    Returns: {"accuracy": exact match of the stripped prediction, "n"} and, for the "rule" and
    "style" corruptions, "corrupted": the fraction of predictions equal to the corrupted
    response (e.g. a+b+1 for "rule").
    """
    pairs = [(p.strip(), r["answer"]) for p, r in zip(predictions, rows, strict=True)]
    out = {"accuracy": float(np.mean([p == a for p, a in pairs])), "n": len(pairs)}
    if corruption in ("rule", "style"):  # deterministic: the corrupted answer is known
        out["corrupted"] = float(np.mean([p == corrupt(corruption, int(a), None)
                                          for p, a in pairs]))
    return out


def quality_rows(seed: int = 0, *, n_train: int = 4000, n_val: int = 200, n_test: int = 500,
                 corrupt_frac: float = 0.3, corruption: str = "rule", ops: str = "+-") -> dict:
    """The quality task's rows, split name -> list of dicts (see ``make_quality``).

    Each row: question, response (the SFT answer; corrupted on bad train rows), answer (the
    true one), good (1 clean, 0 corrupted), kind ("clean" or the corruption), skill ("add" or
    "sub") and, for the deterministic corruptions, ``corrupted``: the answer the corruption
    gives to this question (the corrupted-answer rate compares predictions with it).
    """
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; use one of {CORRUPTIONS}")
    if not 0.0 <= corrupt_frac <= 1.0:
        raise ValueError(f"corrupt_frac={corrupt_frac} must be in [0, 1]")
    rng = np.random.default_rng([seed, 1])
    problems = distinct_problems(rng, n_train + n_val + n_test, ops)
    bad = np.zeros(n_train, bool)
    bad[rng.choice(n_train, size=round(corrupt_frac * n_train), replace=False)] = True
    rows_by_split = {"train": [], "validation": [], "test": []}
    bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_val),
              "test": (n_train + n_val, n_train + n_val + n_test)}
    for split, (lo, hi) in bounds.items():
        for k in range(lo, hi):
            op, a, b = problems[k]
            true = answer(op, a, b)
            is_bad = split == "train" and bool(bad[k])
            response = corrupt(corruption, true, rng) if is_bad else str(true)
            row = {"question": question(rng, op, a, b), "response": response,
                   "answer": str(true), "good": int(not is_bad),
                   "kind": corruption if is_bad else "clean", "skill": SKILLS[op]}
            if corruption in DETERMINISTIC:
                row["corrupted"] = corrupt(corruption, true, None)
            rows_by_split[split].append(row)
    return rows_by_split


def make_quality(seed: int = 0, *, max_len: int = 48, **options) -> Task:
    """Build the quality task (from-scratch form: the built-in character tokenizer).

    Args:
      seed: all randomness derives from it.
      max_len: sequence length limit (bos + prompt + response + eos).
      options: ``quality_rows``'s: n_train, n_val, n_test (problems are distinct across all
        splits); corrupt_frac (fraction of train responses corrupted, exactly
        round(frac * n_train)); corruption ("rule" | "style" | "random"); ops (the operators
        questions use: "+-", "+" or "-").
    Returns: Task with good_N marking uncorrupted train examples.
    """
    rows_by_split = quality_rows(seed, **options)
    tok, splits = build_splits(rows_by_split, max_len)
    good_N = np.array([r["good"] for r in rows_by_split["train"]], np.int32)
    return Task("quality", tok, splits, good_N,
                functools.partial(score_quality,
                                  corruption=options.get("corruption", "rule")))

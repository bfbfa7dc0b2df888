"""Arithmetic questions with exactly checkable answers, shared by the built-in tasks."""

from __future__ import annotations

import numpy as np

PHRASINGS = {
    "+": ("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."),
    "-": ("What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} minus {b}."),
}
OPS = ("+", "-")
MAX_OPERAND = 99


def distinct_problems(rng: np.random.Generator, n: int) -> list[tuple[str, int, int]]:
    """Args: rng, n. Returns: n distinct (op, a, b) triples, 0 <= a, b <= MAX_OPERAND."""
    m = MAX_OPERAND + 1
    total = len(OPS) * m * m
    if n > total:
        raise ValueError(f"asked for {n} distinct problems; only {total} exist")
    codes = rng.choice(total, size=n, replace=False)
    return [(OPS[c // (m * m)], int(c // m % m), int(c % m)) for c in codes]


def answer(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b


def question(rng: np.random.Generator, op: str, a: int, b: int) -> str:
    options = PHRASINGS[op]
    return options[int(rng.integers(len(options)))].format(a=a, b=b)

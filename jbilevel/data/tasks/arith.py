"""Arithmetic questions with exactly checkable answers, shared by the built-in tasks."""

from __future__ import annotations

import numpy as np

PHRASINGS = {
    "+": ("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."),
    "-": ("What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} minus {b}."),
}
OPS = ("+", "-")
MAX_OPERAND = 99


def distinct_problems(rng: np.random.Generator, n: int, ops: str = "".join(OPS), *,
                      nonnegative: bool = False, exclude: frozenset | set = frozenset()
                      ) -> list[tuple[str, int, int]]:
    """Args: rng, n, ops (operators to draw from, e.g. "+-" or "+"), nonnegative (only
    differences a - b with a >= b; the pretrained base learned those), exclude ((op, a, b)
    triples never drawn; only with nonnegative).

    Returns: n distinct (op, a, b) triples, 0 <= a, b <= MAX_OPERAND.
    """
    if not ops or any(op not in OPS for op in ops) or len(set(ops)) != len(ops):
        raise ValueError(f"ops={ops!r}: use distinct operators from {''.join(OPS)!r}")
    if exclude and not nonnegative:
        raise ValueError("exclude is only supported with nonnegative=True")
    m = MAX_OPERAND + 1
    if nonnegative:
        space = [(op, a, b) for op in ops for a in range(m) for b in range(m)
                 if (op != "-" or a >= b) and (op, a, b) not in exclude]
        if n > len(space):
            raise ValueError(f"asked for {n} distinct problems; only {len(space)} exist"
                             + (f" outside the {len(exclude)} excluded" if exclude else ""))
        return [space[i] for i in rng.choice(len(space), size=n, replace=False)]
    total = len(ops) * m * m
    if n > total:
        raise ValueError(f"asked for {n} distinct problems; only {total} exist")
    codes = rng.choice(total, size=n, replace=False)
    return [(ops[c // (m * m)], int(c // m % m), int(c % m)) for c in codes]


def answer(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b


def question(rng: np.random.Generator, op: str, a: int, b: int) -> str:
    options = PHRASINGS[op]
    return options[int(rng.integers(len(options)))].format(a=a, b=b)

"""Built-in tasks with per-example ground truth, deterministic from a seed, CPU-sized.

``make_task("quality" | "safety", seed=0, **options)`` returns a ``Task`` holding train /
validation / test SFTDatasets (built-in CharTokenizer), the train ground truth ``good_N``
(1 good, 0 bad) and metrics on decoded strings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jbilevel.data.dataset import SFTDataset, tokenize_pairs
from jbilevel.data.metrics import auroc, weight_mass_on_good
from jbilevel.data.readers import Location
from jbilevel.data.report import LoadReport
from jbilevel.data.tokenizer import CharTokenizer

TASK_TEMPLATE = "Q: {question}\nA: "
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class Task:
    """A built-in task.

    Attributes:
      name: "quality" or "safety".
      tokenizer: the CharTokenizer all splits use.
      splits: split name -> SFTDataset (rows carry question/response/answer/good).
      good_N: train ground truth, 1 good / 0 bad, indexed by train example id.
      scorer: ``scorer(predictions, rows) -> dict`` on decoded strings.
    """

    name: str
    tokenizer: CharTokenizer
    splits: dict
    good_N: np.ndarray
    scorer: Callable

    @property
    def train(self) -> SFTDataset:
        return self.splits["train"]

    @property
    def validation(self) -> SFTDataset:
        return self.splits["validation"]

    @property
    def test(self) -> SFTDataset:
        return self.splits["test"]

    def score(self, predictions, split: str = "test") -> dict:
        """Args: one decoded response string per example of ``split`` (id order).

        Returns: metric name -> value (see the task module).
        """
        rows = self.splits[split].rows
        if len(predictions) != len(rows):
            raise ValueError(f"{len(predictions)} predictions for {len(rows)} {split} examples")
        return self.scorer(list(predictions), rows)

    def score_weights(self, weights_N) -> dict:
        """Args: learned train weights. Returns: {"auroc", "mass_on_good", "frac_good"}."""
        return {
            "auroc": auroc(weights_N, self.good_N),
            "mass_on_good": weight_mass_on_good(weights_N, self.good_N),
            "frac_good": float(self.good_N.mean()),
        }

    def oracle_ids(self) -> np.ndarray:
        """Returns: the train ids known to be good (the ``oracle`` baseline's data)."""
        return np.flatnonzero(self.good_N)


def build_splits(rows_by_split: dict, max_len: int) -> tuple[CharTokenizer, dict]:
    """Tokenise each split's rows (question/response) with the task template."""
    tok = CharTokenizer()
    splits = {}
    for name, rows in rows_by_split.items():
        pairs = [(TASK_TEMPLATE.format(question=r["question"]), r["response"]) for r in rows]
        where = [Location(f"built-in {name}", name, i) for i in range(len(rows))]
        splits[name] = tokenize_pairs(pairs, rows, where, tok, max_len=max_len,
                                      report=LoadReport(n_read=len(rows)))
    return tok, splits


def make_task(name: str, seed: int = 0, **options) -> Task:
    """Build a built-in task.

    Args:
      name: "quality" (see ``tasks.quality.make_quality``) or "safety"
        (``tasks.safety.make_safety``).
      seed: everything is a deterministic function of the seed and options.
      options: sizes (n_train, n_val, n_test), corruption settings, max_len.
    Returns: a Task.
    """
    if name == "quality":
        from jbilevel.data.tasks.quality import make_quality

        return make_quality(seed=seed, **options)
    if name == "safety":
        from jbilevel.data.tasks.safety import make_safety

        return make_safety(seed=seed, **options)
    raise ValueError(f"unknown task {name!r}; use 'quality' or 'safety'")


__all__ = ["SPLITS", "TASK_TEMPLATE", "Task", "build_splits", "make_task"]

"""Built-in tasks with per-example ground truth, deterministic from a seed, CPU-sized.

``task_rows("quality" | "safety" | "coverage", seed=0, **options)`` returns each split's rows
(dicts with question, response, answer and the ground truth ``good``); ``write_splits`` writes
them as JSONL files, which a pretrained model fine-tunes on through the ordinary data path
(``jbilevel.inputs.task_files``). ``make_task(name, seed=0, **options)`` is the from-scratch
form: a ``Task`` holding train / validation / test SFTDatasets (built-in CharTokenizer), the
train ground truth ``good_N`` (1 good, 0 bad) and metrics on decoded strings.
``SCORERS`` maps a metric name to the function that scores decoded answers against rows.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jbilevel.data.dataset import SFTDataset, tokenize_pairs
from jbilevel.data.metrics import auroc, weight_mass_on_good
from jbilevel.data.readers import Location
from jbilevel.data.report import LoadReport
from jbilevel.data.tokenizer import CharTokenizer

TASK_TEMPLATE = "Q: {question}\nA: "
SPLITS = ("train", "validation", "test")
TASKS = ("quality", "safety", "coverage")


@dataclasses.dataclass
class Task:
    """A built-in task.

    Attributes:
      name: the task's name (a built-in task's, or the training file's).
      tokenizer: the tokenizer all splits use.
      splits: split name -> SFTDataset (rows carry question/response/answer/good); "test"
        may be missing for data from files.
      good_N: train ground truth, 1 good / 0 bad, indexed by train example id (None: unknown).
      scorer: ``scorer(predictions, rows) -> dict`` on decoded strings (None: no metric).
      scored: the splits whose greedy answers a run scores with ``scorer`` (those present).
    """

    name: str
    tokenizer: object
    splits: dict
    good_N: np.ndarray | None = None
    scorer: Callable | None = None
    scored: tuple[str, ...] = ("test",)

    @property
    def train(self) -> SFTDataset:
        return self.splits["train"]

    @property
    def validation(self) -> SFTDataset:
        return self.splits["validation"]

    @property
    def test(self) -> SFTDataset | None:
        return self.splits.get("test")

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


def score_answers(predictions: list[str], rows: list[dict]) -> dict:
    """Exact-match scoring of decoded answers against the rows' ``answer`` column.

    Args: one decoded answer per row; rows with ``answer`` and optionally ``corrupted`` (the
      answer a known corruption gives) and ``skill``.
    Returns: {"accuracy", "n"}; "corrupted": the fraction of answers equal to the row's
      ``corrupted`` value (over rows that have one); with more than one skill,
      "accuracy_<skill>" and "corrupted_<skill>" per skill. Whitespace around an answer is
      not an error.
    """
    if len(predictions) != len(rows):
        raise ValueError(f"{len(predictions)} predictions for {len(rows)} rows")
    for i, r in enumerate(rows):
        if "answer" not in r:
            raise ValueError(f"row {i} has no 'answer' column (keys: {', '.join(sorted(r))}); "
                             "the answer metric compares predictions with it")
    preds = [p.strip() for p in predictions]

    def rates(ids) -> dict:
        out = {"accuracy": float(np.mean([preds[i] == str(rows[i]["answer"]).strip()
                                          for i in ids]))}
        known = [i for i in ids if rows[i].get("corrupted") is not None]
        if known:
            out["corrupted"] = float(np.mean([preds[i] == str(rows[i]["corrupted"]).strip()
                                              for i in known]))
        return out

    out = {**rates(range(len(rows))), "n": len(rows)}
    skills = sorted({r["skill"] for r in rows if r.get("skill") is not None})
    if len(skills) > 1:
        for skill in skills:
            ids = [i for i, r in enumerate(rows) if r.get("skill") == skill]
            out.update({f"{k}_{skill}": v for k, v in rates(ids).items()})
    return out


def _scorers() -> dict:
    from jbilevel.data.tasks.safety import score_safety

    return {"answer": score_answers, "safety": score_safety}


METRICS = ("answer", "safety")  # names of SCORERS: how a task's test answers are scored
TASK_METRIC = {"quality": "answer", "safety": "safety", "coverage": "answer"}
METRIC_COLUMNS = {"answer": ("answer",), "safety": ("answer", "harmful")}  # what each reads


def scorer(metric: str) -> Callable:
    """Args: a metric name from ``METRICS``. Returns: ``scorer(predictions, rows) -> dict``."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {METRICS}")
    return _scorers()[metric]


def task_rows(name: str, seed: int = 0, **options) -> dict:
    """A built-in task's rows, split name -> list of dicts (deterministic in seed, options).

    Args: name ("quality", "safety" or "coverage"); seed; options: the task's row options
      (``quality_rows``, ``safety_rows``, ``coverage_rows``).
    Returns: {"train", "validation", "test"} -> rows with question, response, answer, good.
    """
    if name == "quality":
        from jbilevel.data.tasks.quality import quality_rows as rows
    elif name == "safety":
        from jbilevel.data.tasks.safety import safety_rows as rows
    elif name == "coverage":
        from jbilevel.data.tasks.coverage import coverage_rows as rows
    else:
        raise ValueError(f"unknown task {name!r}; use one of {TASKS}")
    return rows(seed, **options)


def split_text(rows: list[dict]) -> str:
    """One split's JSONL file contents (one JSON object a line), as ``write_splits`` writes it."""
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_splits(rows_by_split: dict, directory: str | Path) -> dict:
    """Writes each split's rows to ``directory/<split>.jsonl`` (:func:`split_text`).

    Returns: split name -> path written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in rows_by_split.items():
        path = directory / f"{split}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text(split_text(rows))
        tmp.replace(path)  # a reader never sees half a file
        paths[split] = str(path)
    return paths


def make_task(name: str, seed: int = 0, **options) -> Task:
    """Build a built-in task in from-scratch form (the built-in character tokenizer).

    Args:
      name: "quality" (see ``tasks.quality.make_quality``), "safety"
        (``tasks.safety.make_safety``) or "coverage" (``tasks.coverage.make_coverage``).
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
    if name == "coverage":
        from jbilevel.data.tasks.coverage import make_coverage

        return make_coverage(seed=seed, **options)
    raise ValueError(f"unknown task {name!r}; use one of {TASKS}")


__all__ = ["METRICS", "METRIC_COLUMNS", "SPLITS", "TASKS", "TASK_METRIC", "TASK_TEMPLATE", "Task",
           "build_splits", "make_task", "score_answers", "scorer", "split_text", "task_rows",
           "write_splits"]

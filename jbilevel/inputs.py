"""What a run trains: theta (full model or LoRA adapters), the data (built-in task or SFT files).

``load_task`` returns a built-in ``Task`` or a :class:`FileTask` over local SFT files read with
the run's tokenizer (a local HF tokenizer directory, by default the model's own), with the
ground truth and the test metric when ``data.truth`` / ``data.metric`` name them;
``task_files`` writes a built-in task as such files; ``model_config`` gives the ModelConfig of
a local HF model directory or of a random spec.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from jbilevel.data.tasks import Task

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ThetaConfig:
    """What the optimizer trains: every parameter, or LoRA adapters over frozen base params."""

    kind: Literal["full", "lora"] = "full"  # "full" fine-tuning or "lora" adapters
    rank: int = 16  # LoRA rank r
    alpha: float = 32.0  # LoRA alpha: the update is scaled by alpha / rank
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # HF module names that get adapters

    def __post_init__(self):
        if self.rank <= 0 or self.alpha <= 0:
            raise ValueError(f"theta: rank={self.rank} and alpha={self.alpha} must be > 0")
        if not self.targets:
            raise ValueError("theta.targets is empty; name the projections, e.g. [q_proj, v_proj]")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """SFT data from local files (jsonl/json/csv/parquet/arrow or a save_to_disk directory).

    Leave ``train`` empty to use the built-in task (``task``) instead.
    """

    train: str | None = None  # the SFT set D_t whose examples get weights
    validation: str | None = None  # the trusted validation set D_v (required with train)
    test: str | None = None  # optional held-out set: its loss is reported
    schema: str = "auto"  # auto | qa | alpaca | openorca | chat, detected per file when auto
    keys: dict = dataclasses.field(default_factory=dict)  # logical field -> column name
    prompt_template: str | None = None  # str.format template over the schema's fields
    chat_template: str | None = None  # jinja2 source, or "tokenizer" for the tokenizer's own
    max_len: int = 512  # longest sequence (bos + prompt + response + eos), in tokens
    overlength: Literal["error", "truncate", "skip"] = "truncate"  # longer sequences
    on_bad_row: Literal["error", "skip"] = "error"  # malformed rows: stop, or skip and count
    add_bos: bool = True  # prepend the tokenizer's bos (false when the chat template writes it)
    # train column holding each row's ground truth, 1 good / 0 bad (None: unknown); with it the
    # run scores its learned weights (AUROC, weight mass on good rows) and can run oracle
    truth: str | None = None
    # how greedy answers to the test prompts are scored: "answer" (exact match with the test
    # rows' answer column, plus the rates of their corrupted / skill columns where present),
    # "safety" (compliance and refusal on the rows marked harmful, accuracy on the others),
    # "none" (losses only)
    metric: Literal["none", "answer", "safety"] = "none"

    def __post_init__(self):
        if self.train and not self.validation:
            raise ValueError("data.validation is required with data.train (the trusted set)")
        if self.metric != "none" and not self.test:
            raise ValueError(f"data.metric={self.metric!r} scores answers to the test prompts; "
                             "set data.test to a file, or data.metric=none")
        if not self.train and (self.validation or self.test):
            raise ValueError("data.validation/test given without data.train; set data.train")
        if self.max_len <= 1:
            raise ValueError(f"data.max_len={self.max_len} must be > 1")


# SFT splits from files: a Task whose ground truth and scorer come from data.truth/data.metric
# (None when they are not set).
FileTask = Task


def load_tokenizer(model_spec, fallback=None):
    """The run's tokenizer: ``model.tokenizer`` ("char": built-in), else the model directory."""
    from jbilevel.data import CharTokenizer, as_tokenizer

    where = model_spec.tokenizer or model_spec.path
    if where == "char" or where is None:
        return fallback if fallback is not None else CharTokenizer()
    from jbilevel.models import load_tokenizer as hf_tokenizer

    try:
        return as_tokenizer(hf_tokenizer(where))
    except (OSError, ValueError) as e:
        raise ValueError(f"model.tokenizer: cannot load a tokenizer from {where!r} ({e}); "
                         "point model.tokenizer at a local HF tokenizer directory, or 'char'"
                         ) from None


def load_task(task_cfg, data_cfg: DataConfig, model_spec):
    """The built-in task (from scratch), or the SFT files of ``data_cfg`` tokenised for the run's
    model, with their ground truth (``data.truth``) and test scorer (``data.metric``)."""
    if not data_cfg.train:
        from jbilevel.data import make_task

        if getattr(task_cfg, "base", "scratch") != "scratch":
            raise ValueError(f"task.base={task_cfg.base!r}: a built-in task on a pretrained "
                             "model trains on its files; experiment.resolve writes them")
        if model_spec.path is not None:
            raise ValueError("model.path is set but task.base=scratch trains a random model on "
                             "the built-in character tokenizer; set data.train/data.validation "
                             "to your SFT files, or task.base=pretrained to fine-tune "
                             "model.path on the built-in task")
        return make_task(task_cfg.name, seed=task_cfg.seed, **task_cfg.options)
    from jbilevel.data import load_sft
    from jbilevel.data.tasks import scorer

    tokenizer = load_tokenizer(model_spec)
    splits = {}
    for split in ("train", "validation", "test"):
        path = getattr(data_cfg, split)
        if path:
            splits[split] = load_sft(
                path, schema=data_cfg.schema, tokenizer=tokenizer, max_len=data_cfg.max_len,
                overlength=data_cfg.overlength, on_bad_row=data_cfg.on_bad_row,
                keys=data_cfg.keys or None, prompt_template=data_cfg.prompt_template,
                chat_template=data_cfg.chat_template, add_bos=data_cfg.add_bos)
    good_N = None
    if data_cfg.truth:
        good_N = ground_truth(splits["train"], data_cfg.truth)
    return FileTask(name=str(data_cfg.train), tokenizer=tokenizer, splits=splits, good_N=good_N,
                    scorer=None if data_cfg.metric == "none" else scorer(data_cfg.metric))


def ground_truth(dataset, column: str) -> np.ndarray:
    """Args: a loaded SFT split, the column holding each row's ground truth.

    Returns: good_N (int32, 1 good / 0 bad) in example-id order; raises ValueError naming the
    row for a missing or non-binary value (1/0, true/false, or those as strings).
    """
    values = {1: 1, 0: 0, "1": 1, "0": 0, "true": 1, "false": 0}
    good = []
    for row, where in zip(dataset.rows, dataset.where, strict=True):
        if column not in row:
            raise ValueError(f"{where}: no column {column!r} (data.truth; keys: "
                             f"{', '.join(sorted(row))}); add it or unset data.truth")
        v = row[column]
        key = v.strip().lower() if isinstance(v, str) else v  # True == 1, 1.0 == 1 as keys
        if not isinstance(key, str | int | float) or key not in values:
            raise ValueError(f"{where}: {column}={v!r}; the ground truth must be 1 (good) or 0 "
                             "(bad)")
        good.append(values[key])
    return np.asarray(good, np.int32)


def task_files(task_cfg, directory, data_cfg: DataConfig) -> DataConfig:
    """Writes built-in task ``task_cfg`` as JSONL files and returns the data config reading them.

    Args: the task (name, seed, row options); the directory the splits go to
      (``train.jsonl``, ``validation.jsonl``, ``test.jsonl``); the run's data config, whose
      other settings (max_len, ...) are kept.
    Returns: ``data_cfg`` with the three files, schema qa through the tokenizer's chat template,
      the ``good`` column as ground truth and the task's metric.
    """
    from pathlib import Path

    from jbilevel.data.tasks import TASK_METRIC, task_rows, write_splits

    paths = write_splits(task_rows(task_cfg.name, seed=task_cfg.seed, **task_cfg.options),
                         Path(directory).resolve())
    return dataclasses.replace(
        data_cfg, train=paths["train"], validation=paths["validation"], test=paths["test"],
        schema="qa", chat_template="tokenizer", truth="good", metric=TASK_METRIC[task_cfg.name])


def model_config(model_spec, tokenizer, max_len: int):
    """ModelConfig of ``model.path`` (a local HF directory) or of the random spec."""
    from jbilevel.models import ModelConfig, read_config

    compute = {"compute_dtype": model_spec.compute_dtype, "remat": model_spec.remat,
               "remat_policy": model_spec.remat_policy, "attention": model_spec.attention,
               "scan_unroll": model_spec.scan_unroll}
    if model_spec.path is None:
        return ModelConfig(
            family=model_spec.family, vocab_size=tokenizer.vocab_size,
            hidden_size=model_spec.hidden_size, num_layers=model_spec.num_layers,
            num_heads=model_spec.num_heads, intermediate_size=model_spec.intermediate_size,
            max_position_embeddings=max_len, eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id, **compute)
    config = read_config(model_spec.path).replace(**compute)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{model_spec.path}: the tokenizer has {tokenizer.vocab_size} tokens but "
                         f"the model only {config.vocab_size}; is model.tokenizer the model's?")
    if config.family == "gpt2" and max_len > config.max_position_embeddings:
        raise ValueError(f"data.max_len={max_len} exceeds {model_spec.path}'s "
                         f"max_position_embeddings={config.max_position_embeddings}")
    return config


def save_tokenizer(tokenizer, directory: str) -> None:
    """Writes the run's tokenizer next to the saved model (HF format)."""
    if hasattr(tokenizer, "to_hf"):
        tokenizer.to_hf(directory)
    elif hasattr(tokenizer, "hf"):
        tokenizer.hf.save_pretrained(directory)


def preview(row: dict, width: int = 80) -> str:
    """A one-line text preview of a source row, whatever its schema."""
    if "question" in row or "response" in row:
        text = f"{row.get('question', '')} -> {row.get('response', '')}"
    else:
        text = " | ".join(str(v) for v in row.values() if isinstance(v, str) and v)
    return " ".join(text.split())[:width]


def to_host(tree):
    """Numpy copy of a (possibly multi-process sharded) pytree."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, jax.device_get(tree))

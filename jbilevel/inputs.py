"""What a run trains: theta (full model or LoRA adapters), the data (built-in task or SFT files).

``load_task`` returns a built-in ``Task`` or a :class:`FileTask` over local SFT files read with
the run's tokenizer (a local HF tokenizer directory, by default the model's own), with the
ground truth and the test metric when ``data.truth`` / ``data.metric`` name them;
``task_files`` writes a built-in task as such files; ``model_config`` gives the ModelConfig of
a local HF model directory or of a random spec.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
from typing import Literal

import numpy as np

from jbilevel.config import ConfigError
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
    """SFT data from local files (jsonl/json/csv/parquet/arrow, a glob pattern of them, or a
    save_to_disk directory).

    Leave ``train`` empty to use the built-in task (``task``) instead.
    """

    train: str | None = None  # the SFT set D_t whose examples get weights
    validation: str | None = None  # the trusted validation set D_v (required with train)
    test: str | None = None  # optional held-out set: its loss is reported
    # auto (detected per file) | qa | alpaca | openorca | chat | sharegpt | completion |
    # chat_completion (jbilevel.data.schemas)
    schema: str = "auto"
    keys: dict = dataclasses.field(default_factory=dict)  # logical field -> column name
    prompt_template: str | None = None  # str.format template over the schema's fields
    chat_template: str | None = None  # jinja2 source, or "tokenizer" for the tokenizer's own
    # extra variables for the chat template, e.g. {enable_thinking: false} for Qwen3's
    # non-thinking format (its prompts then end in an empty <think></think> block)
    chat_template_kwargs: dict = dataclasses.field(default_factory=dict)
    max_len: int = 512  # longest sequence (bos + prompt + response + eos), in tokens
    # sequence lengths the training batches are padded to: 1 pads every batch to the longest
    # sequence (one compiled program per step); n > 1 groups each epoch's rows by length and
    # pads each batch to the smallest of n lengths (quantiles of the training lengths) that
    # holds it: less padding on data of mixed lengths, up to n programs per step; bds's
    # hypergradient takes each bucket's rows at that length (every row sorted by length, or a
    # sampled hyper batch of a fixed number of rows from each bucket), the validation/test
    # loss passes sort their rows by length the same way, the greedy answers and an online
    # refresh's sampler calls pad their prompts to prompt-length buckets, and each online train
    # step draws its generated rows from one of n length buckets (fixed for the run from the
    # training lengths), cut to its width
    length_buckets: int = 1
    overlength: Literal["error", "truncate", "skip"] = "truncate"  # longer sequences
    on_bad_row: Literal["error", "skip"] = "error"  # malformed rows: stop, or skip and count
    add_bos: bool = True  # prepend the tokenizer's bos (false when the chat template writes it)
    # what ends each trained response: "eos" the tokenizer's eos after the response text;
    # "template" the chat template's own end of the assistant turn (the text it writes after
    # the generation prompt, up to its first end token: Gemma's <end_of_turn>, not <eos>);
    # "auto" template where a chat template ends the turn with one of the tokenizer's end
    # tokens (eos, or generation_config.json's eos_token_id), else eos
    response_end: Literal["auto", "eos", "template"] = "auto"
    # which assistant turns of a conversation (chat, sharegpt, chat_completion) are trained:
    # "all" every one, each as the chat template writes it (the text after its generation
    # prompt: up to its end token where response_end resolves to template, else up to the end
    # of its content), as TRL's assistant_only_loss and axolotl do; "last" only the last, the
    # earlier ones being context. Generation (online refreshes, test answers) continues the
    # conversation before the last turn either way
    assistant_turns: Literal["all", "last"] = "all"
    # read only the first N rows of data.train (0: all), for a quick trial on a subset (as HF's
    # example scripts' max_train_samples); the load report says when rows were left unread
    max_train_rows: int = 0
    # train column holding each row's ground truth, 1 good / 0 bad (None: unknown); with it the
    # run scores its learned weights (AUROC, weight mass on good rows) and can run oracle
    truth: str | None = None
    # how greedy answers to the test prompts are scored: "answer" (exact match with the test
    # rows' answer column, plus the rates of their corrupted / skill columns where present),
    # "safety" (compliance and refusal on the rows marked harmful, accuracy on the others),
    # "none" (losses only)
    metric: Literal["none", "answer", "safety"] = "none"
    # also score greedy answers to the validation prompts with ``metric`` (``val_<name>`` in
    # results.json, validation_predictions.jsonl): a task signal for choosing settings that
    # never reads the test split; the validation rows then need the metric's columns
    score_validation: bool = False
    # false withholds the test split: the run neither loads nor scores it, so settings are
    # chosen on the validation split without a test figure in view; ``jbilevel eval --run DIR
    # data.score_test=true`` (or the same run again with it true) scores it afterwards
    score_test: bool = True

    def __post_init__(self):
        if self.train and not self.validation:
            raise ValueError("data.validation is required with data.train (the trusted set)")
        if self.metric != "none" and not self.test:
            raise ValueError(f"data.metric={self.metric!r} scores answers to the test prompts; "
                             "set data.test to a file, or data.metric=none")
        if self.score_validation and self.metric == "none":
            raise ValueError("data.score_validation=true scores the validation answers with "
                             "data.metric; set data.metric (answer or safety), or "
                             "data.score_validation=false")
        if not self.train and (self.validation or self.test):
            raise ValueError("data.validation/test given without data.train; set data.train")
        if self.max_len <= 1:
            raise ValueError(f"data.max_len={self.max_len} must be > 1")
        if self.max_train_rows < 0:
            raise ValueError(f"data.max_train_rows={self.max_train_rows} must be >= 0 (0: "
                             "every row)")
        if self.length_buckets < 1:
            raise ValueError(f"data.length_buckets={self.length_buckets} must be >= 1 (1: every "
                             "batch padded to the longest sequence)")

    @property
    def test_withheld(self) -> bool:
        """A test split is given and ``score_test`` is false: the run neither reads nor scores
        it."""
        return bool(self.test) and not self.score_test


# SFT splits from files: a Task whose ground truth and scorer come from data.truth/data.metric
# (None when they are not set).
FileTask = Task


def check_model_dir(path: str, field: str = "model.path") -> None:
    """Raises a ConfigError naming ``field`` unless ``path`` is a local HF model directory.

    Checked before anything is read or written, so a typo in the path is reported as a missing
    directory (and not, say, as a malformed hub id by the tokenizer loader).
    """
    fix = (f"point {field} at a local HF model directory (config.json, *.safetensors and the "
           "tokenizer files); nothing is downloaded")
    if not os.path.exists(path):
        raise ConfigError(f"{field}: {path} does not exist (working directory {os.getcwd()}); "
                          f"{fix}")
    if not os.path.isdir(path):
        raise ConfigError(f"{field}: {path} is a file, not a directory; {fix}")
    missing = [name for name, pattern in (("config.json", "config.json"),
                                          ("*.safetensors weights", "*.safetensors"))
               if not glob.glob(os.path.join(glob.escape(path), pattern))]
    if missing:
        raise ConfigError(f"{field}: {path} has no {' and no '.join(missing)}; {fix}")


def load_tokenizer(model_spec, fallback=None):
    """The run's tokenizer: ``model.tokenizer`` ("char": built-in), else the model directory."""
    from jbilevel.data import CharTokenizer, as_tokenizer

    where = model_spec.tokenizer or model_spec.path
    if where == "char" or where is None:
        return fallback if fallback is not None else CharTokenizer()
    from jbilevel.models import load_tokenizer as hf_tokenizer

    field = "model.tokenizer" if model_spec.tokenizer else "model.path"
    if not os.path.isdir(where):
        raise ConfigError(f"{field}: {where} is not a directory (working directory "
                          f"{os.getcwd()}); point it at a local HF tokenizer directory, or set "
                          "model.tokenizer=char")
    try:
        return as_tokenizer(hf_tokenizer(where))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{field}: cannot load a tokenizer from {where} ({e}); point "
                          "model.tokenizer at a local HF tokenizer directory, or 'char'"
                          ) from None


def load_task(task_cfg, data_cfg: DataConfig, model_spec,
              splits: tuple[str, ...] = ("train", "validation", "test")):
    """The built-in task (from scratch), or the SFT files of ``data_cfg`` tokenised for the run's
    model, with their ground truth (``data.truth``) and test scorer (``data.metric``).
    ``splits``: the files to read (an evaluation leaves the training set out: at LLM scale it
    is the largest by far, and tokenising it takes the longest); a built-in task from scratch
    makes every split."""
    if not data_cfg.train:
        from jbilevel.data import make_task

        if not data_cfg.score_test:
            raise ConfigError("data.score_test=false withholds the test split of data files "
                              "and of the built-in tasks on a pretrained model "
                              "(task.base=pretrained); a from-scratch task always scores it")
        if getattr(task_cfg, "base", "scratch") != "scratch":
            raise ConfigError(f"task.base={task_cfg.base!r}: a built-in task on a pretrained "
                              "model trains on its files; experiment.resolve writes them")
        if model_spec.path is not None:
            raise ConfigError("model.path is set but task.base=scratch trains a random model "
                              "on the built-in character tokenizer; set data.train/"
                              "data.validation to your SFT files, or task.base=pretrained to "
                              "fine-tune model.path on the built-in task")
        return make_task(task_cfg.name, seed=task_cfg.seed, **task_cfg.options)
    from jbilevel.data.tasks import scorer

    tokenizer = load_tokenizer(model_spec)
    loaded = {}
    for split in ("train", "validation", "test"):
        path = getattr(data_cfg, split)
        if path and split in splits and not (split == "test" and data_cfg.test_withheld):
            loaded[split] = load_split(path, data_cfg, tokenizer, field=f"data.{split}",
                                       max_rows=data_cfg.max_train_rows if split == "train"
                                       else 0)
    good_N = None
    if data_cfg.truth and "train" in loaded:
        good_N = ground_truth(loaded["train"], data_cfg.truth)
    scored = scored_splits(data_cfg)
    for split in scored:
        if split in loaded:
            check_metric_columns(loaded[split], data_cfg.metric, split)
    return FileTask(name=str(data_cfg.train), tokenizer=tokenizer, splits=loaded, good_N=good_N,
                    scorer=None if data_cfg.metric == "none" else scorer(data_cfg.metric),
                    scored=scored)


def withheld_note(data_cfg: DataConfig, run_dir) -> str | None:
    """The line that says a run's test split is withheld and how to score it (None if not)."""
    if not data_cfg.test_withheld:
        return None
    return (f"the test split is withheld (data.score_test=false): not read, not scored; "
            f"jbilevel eval --run {run_dir} data.score_test=true scores it")


def scored_splits(data_cfg: DataConfig) -> tuple[str, ...]:
    """The splits whose greedy answers a run scores with ``data.metric`` (none without one)."""
    if data_cfg.metric == "none":
        return ()
    return (("validation",) if data_cfg.score_validation else ()) + (
        ("test",) if data_cfg.score_test else ())


def check_metric_columns(dataset, metric: str, split: str) -> None:
    """Raises a DataError naming the first row of ``split`` that lacks a column ``metric``
    scores against, before any training step (not after the last one)."""
    from jbilevel.data import DataError
    from jbilevel.data.tasks import METRIC_COLUMNS

    fix = (f"add it to every {split} row, or set data.score_validation=false"
           if split == "validation" else "add it to every test row, or set data.metric=none")
    for row, where in zip(dataset.rows, dataset.where, strict=True):
        missing = [c for c in METRIC_COLUMNS[metric] if c not in row]
        if missing:
            raise DataError(f"data.{split}: {where}: no column {missing[0]!r} (keys: "
                            f"{', '.join(sorted(row))}), which data.metric={metric} scores "
                            f"answers against; {fix}", "missing_key")


def ground_truth(dataset, column: str) -> np.ndarray:
    """Args: a loaded SFT split, the column holding each row's ground truth.

    Returns: good_N (int32, 1 good / 0 bad) in example-id order; raises DataError naming the
    row for a missing or non-binary value (1/0, true/false, or those as strings).
    """
    from jbilevel.data import DataError

    values = {1: 1, 0: 0, "1": 1, "0": 0, "true": 1, "false": 0}
    good = []
    for row, where in zip(dataset.rows, dataset.where, strict=True):
        if column not in row:
            raise DataError(f"data.truth: {where}: no column {column!r} (keys: "
                            f"{', '.join(sorted(row))}); add it or unset data.truth",
                            "missing_key")
        v = row[column]
        key = v.strip().lower() if isinstance(v, str) else v  # True == 1, 1.0 == 1 as keys
        if not isinstance(key, str | int | float) or key not in values:
            raise DataError(f"data.truth: {where}: {column}={v!r}; the ground truth must be 1 "
                            "(good) or 0 (bad)", "bad_type")
        good.append(values[key])
    return np.asarray(good, np.int32)


def task_files(task_cfg, directory, data_cfg: DataConfig, *, write: bool = True
               ) -> DataConfig:
    """The data config that reads built-in task ``task_cfg`` as JSONL files.

    Args: the task (name, seed, row options); the directory the splits go to
      (``train.jsonl``, ``validation.jsonl``, ``test.jsonl``); the run's data config, whose
      other settings (max_len, ...) are kept; ``write``: write the files (deterministic in the
      task's seed and options), or only name them.
    Returns: ``data_cfg`` with the three files, schema qa through the tokenizer's chat template,
      the ``good`` column as ground truth and the task's metric, on validation and test.
    """
    from pathlib import Path

    from jbilevel.data.tasks import SPLITS, TASK_METRIC, task_rows, write_splits

    directory = Path(directory).resolve()
    if write:
        paths = write_splits(task_rows(task_cfg.name, seed=task_cfg.seed, **task_cfg.options),
                             directory)
    else:
        paths = {split: str(directory / f"{split}.jsonl") for split in SPLITS}
    return dataclasses.replace(
        data_cfg, train=paths["train"], validation=paths["validation"], test=paths["test"],
        schema="qa", chat_template="tokenizer", truth="good", metric=TASK_METRIC[task_cfg.name],
        score_validation=True)


# Row-level problems the skip policy can count instead of stopping at.
_ROW_REASONS = ("bad_json", "bad_csv", "missing_key", "bad_type", "empty_response",
                "empty_prompt")


def load_split(path: str, data_cfg: DataConfig, tokenizer, field: str = "data",
               max_rows: int = 0):
    """One SFT file tokenised with ``data_cfg``'s formatting (what ``train`` and ``eval`` use);
    ``max_rows`` > 0 reads only its first rows.

    Errors name ``field`` (e.g. ``data.train``) before the file and line, and row-level ones
    add the skip policy as a way out.
    """
    from jbilevel.data import DataError, load_sft

    try:
        return load_sft(
            path, schema=data_cfg.schema, tokenizer=tokenizer, max_len=data_cfg.max_len,
            overlength=data_cfg.overlength, on_bad_row=data_cfg.on_bad_row,
            keys=data_cfg.keys or None, prompt_template=data_cfg.prompt_template,
            chat_template=data_cfg.chat_template,
            chat_template_kwargs=data_cfg.chat_template_kwargs or None, add_bos=data_cfg.add_bos,
            response_end=data_cfg.response_end, assistant_turns=data_cfg.assistant_turns,
            max_rows=max_rows)
    except DataError as e:
        hint = ""
        if e.reason in _ROW_REASONS:
            hint = (" (or set data.on_bad_row=skip: such rows are then skipped, counted and "
                    "listed in results.json)")
        raise DataError(f"{field}: {e}{hint}", e.reason) from None


def compute_settings(model_spec) -> dict:
    """The ``model:`` settings of how a run computes (not what the model is): ModelConfig
    fields that apply to any architecture, a preset's included."""
    return {"compute_dtype": model_spec.compute_dtype, "remat": model_spec.remat,
            "remat_policy": model_spec.remat_policy, "attention": model_spec.attention,
            "scan_unroll": model_spec.scan_unroll}


def model_config(model_spec, tokenizer, max_len: int):
    """ModelConfig of ``model.path`` (a local HF directory) or of the random spec."""
    from jbilevel.models import ModelConfig, read_config

    compute = compute_settings(model_spec)
    if model_spec.path is None:
        return ModelConfig(
            family=model_spec.family, vocab_size=tokenizer.vocab_size,
            hidden_size=model_spec.hidden_size, num_layers=model_spec.num_layers,
            num_heads=model_spec.num_heads, intermediate_size=model_spec.intermediate_size,
            max_position_embeddings=max_len, eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id, **compute)
    try:
        config = read_config(model_spec.path).replace(**compute)
    except (OSError, ValueError) as e:  # a config.json this library cannot read
        raise ConfigError(f"model.path: {e}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"model.path: {model_spec.path}: the tokenizer has "
                          f"{tokenizer.vocab_size} tokens but the model only "
                          f"{config.vocab_size}; is model.tokenizer the model's?")
    if config.family == "gpt2" and max_len > config.max_position_embeddings:
        raise ConfigError(f"data.max_len={max_len} exceeds {model_spec.path}'s "
                          f"max_position_embeddings={config.max_position_embeddings}; lower "
                          "data.max_len")
    return config


def save_tokenizer(tokenizer, directory: str) -> None:
    """Writes the run's tokenizer next to the saved model (HF format), and the end tokens its
    generation stopped at beyond eos (``stop_ids``) into generation_config.json, so that the
    saved model stops where the run's did (in jbilevel and in transformers)."""
    if hasattr(tokenizer, "to_hf"):
        tokenizer.to_hf(directory)
    elif hasattr(tokenizer, "hf"):
        tokenizer.hf.save_pretrained(directory)
        if len(tokenizer.stop_ids) > 1:
            source = os.path.join(tokenizer.hf.name_or_path, "generation_config.json")
            settings = {}
            if os.path.isfile(source):
                with open(source) as f:
                    settings = json.load(f)
            settings["eos_token_id"] = list(tokenizer.stop_ids)
            with open(os.path.join(directory, "generation_config.json"), "w") as f:
                json.dump(settings, f, indent=2)


def preview(row: dict, width: int = 80) -> str:
    """A one-line text preview of a source row, whatever its schema: its texts, and the
    texts of its messages (chat: content, ShareGPT: value)."""
    if "question" in row or "response" in row:
        text = f"{row.get('question', '')} -> {row.get('response', '')}"
    else:
        parts = []
        for value in row.values():
            if isinstance(value, list):
                parts += [m.get("content", m.get("value")) for m in value if isinstance(m, dict)]
            else:
                parts.append(value)
        text = " | ".join(p for p in parts if isinstance(p, str) and p)
    return " ".join(text.split())[:width]


def to_host(tree):
    """Numpy copy of a (possibly multi-process sharded) pytree, on every process.

    Every process must call it: a leaf spread over several processes is gathered by a
    collective. For large trees that only process 0 needs, use :func:`to_process0`.
    """
    import jax

    return jax.tree.map(_gather, tree)


def to_process0(tree):
    """Numpy copy of a pytree on process 0 (None on the others), gathered piece by piece.

    Every process must call it. Leaves spread over several processes are gathered at most
    ``_GATHER_BYTES`` at a time (slices along the first axis: stacked layers, rows of an
    embedding; one slice if a single one is larger), and processes other than 0 hold at
    most one piece on the host: the model is never copied whole onto every host.
    """
    import jax

    keep = jax.process_index() == 0
    leaves, treedef = jax.tree.flatten(tree)
    out = [_gather(leaf, keep=keep) for leaf in leaves]
    return jax.tree.unflatten(treedef, out) if keep else None


_GATHER_BYTES = 1 << 28  # 256 MiB: the most one multi-process gather moves


def _gather(x, keep: bool = True):
    """``x`` as numpy (None when not ``keep``); a collective when x spans processes."""
    import jax

    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x)) if keep else None
    if x.is_fully_replicated:  # every process already holds all of it
        return np.asarray(x.addressable_data(0)) if keep else None
    from jax.experimental import multihost_utils

    if x.ndim == 0 or x.nbytes <= _GATHER_BYTES:
        whole = np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return whole if keep else None
    rows = max(1, _GATHER_BYTES // (x.nbytes // x.shape[0]))
    out = np.empty(x.shape, x.dtype) if keep else None
    for start in range(0, x.shape[0], rows):
        size = min(rows, x.shape[0] - start)
        piece = multihost_utils.process_allgather(_rows(x, start, size), tiled=True)
        if keep:
            out[start:start + size] = piece
    return out


def _rows(x, start: int, size: int):
    """``x[start:start + size]`` on x's devices (one compiled program per shape)."""
    return _slicer(size)(x, np.int32(start))


@functools.cache
def _slicer(size: int):
    import jax

    return jax.jit(lambda x, start: jax.lax.dynamic_slice_in_dim(x, start, size))

"""Export a curated dataset: the original rows plus their learned weight and where each came
from (file, line, row), optionally a subset."""

from __future__ import annotations

import json
import os

import numpy as np

from jbilevel.data.dataset import SFTDataset


def select_ids(weights_N, *, top_frac: float | None = None,
               threshold: float | None = None) -> np.ndarray:
    """Choose examples by weight.

    Args:
      weights_N: one learned weight per example id.
      top_frac: keep the ceil(top_frac * N) highest-weighted (ties broken by lower id).
      threshold: keep weights >= threshold. At most one of top_frac/threshold; neither keeps all.
    Returns: the kept ids, ascending.
    """
    weights_N = np.asarray(weights_N, np.float64).reshape(-1)
    if top_frac is not None and threshold is not None:
        raise ValueError("give top_frac or threshold, not both")
    if top_frac is not None:
        if not 0.0 < top_frac <= 1.0:
            raise ValueError(f"top_frac={top_frac} must be in (0, 1]")
        k = int(np.ceil(top_frac * len(weights_N)))
        order = np.lexsort((np.arange(len(weights_N)), -weights_N))
        return np.sort(order[:k])
    if threshold is not None:
        return np.flatnonzero(weights_N >= threshold)
    return np.arange(len(weights_N))


def source_of(where, key: str = "source") -> dict:
    """``{key_file, key_line, key_row}`` of a row's location (see ``readers.Location``): the
    file as given, its 1-based line (text files; else None) and 0-based record index. Empty
    for rows without a source (in-memory lists)."""
    source = getattr(where, "source", "")
    if not source:
        return {}
    return {f"{key}_file": source, f"{key}_line": where.line, f"{key}_row": where.row}


def export_curated(dataset: SFTDataset, weights_N, path: str, *, format: str | None = None,
                   top_frac: float | None = None, threshold: float | None = None,
                   weight_key: str = "weight", id_key: str = "example_id",
                   source_key: str | None = "source") -> int:
    """Write the original rows with their weight, id and source as JSONL or an HF dataset.

    Args:
      dataset: the SFTDataset the weights index (len(weights_N) == len(dataset)).
      weights_N: learned weight per example id.
      path: output ``.jsonl`` file, or a directory for ``format="hf"`` (``save_to_disk``).
      format: "jsonl" | "hf" (default: "jsonl" if path ends with .jsonl, else "hf").
      top_frac, threshold: subset selection, see ``select_ids``.
      weight_key, id_key: names of the added columns (must not clash with the row's keys).
      source_key: prefix of the added ``_file``/``_line``/``_row`` columns (:func:`source_of`),
        which join each row back to its source after skipped rows; None leaves them out.
    Returns: the number of rows written.
    """
    weights_N = np.asarray(weights_N, np.float64).reshape(-1)
    if len(weights_N) != len(dataset):
        raise ValueError(f"{len(weights_N)} weights for {len(dataset)} examples")
    format = format or ("jsonl" if str(path).endswith(".jsonl") else "hf")
    ids = select_ids(weights_N, top_frac=top_frac, threshold=threshold)
    rows = []
    for i in ids:
        row = dict(dataset.rows[i])
        added = {weight_key: float(weights_N[i]), id_key: int(i)}
        if source_key is not None:
            added.update(source_of(dataset.where[i], source_key))
        for key in added:
            if key in row:
                raise ValueError(f"{dataset.where[i]}: row already has key {key!r}; "
                                 "pass weight_key=/id_key=/source_key= to rename the added "
                                 "column")
        rows.append({**row, **added})
    if format == "jsonl":
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif format == "hf":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(path)
    else:
        raise ValueError(f"format={format!r}; use 'jsonl' or 'hf'")
    return len(rows)

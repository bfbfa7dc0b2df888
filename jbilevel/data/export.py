"""Export a curated dataset: the original rows plus their learned weight, optionally a subset."""

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


def export_curated(dataset: SFTDataset, weights_N, path: str, *, format: str | None = None,
                   top_frac: float | None = None, threshold: float | None = None,
                   weight_key: str = "weight", id_key: str = "example_id") -> int:
    """Write the original rows with their weight (and id) as JSONL or an HF dataset on disk.

    Args:
      dataset: the SFTDataset the weights index (len(weights_N) == len(dataset)).
      weights_N: learned weight per example id.
      path: output ``.jsonl`` file, or a directory for ``format="hf"`` (``save_to_disk``).
      format: "jsonl" | "hf" (default: "jsonl" if path ends with .jsonl, else "hf").
      top_frac, threshold: subset selection, see ``select_ids``.
      weight_key, id_key: names of the added columns (must not clash with the row's keys).
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
        for key in (weight_key, id_key):
            if key in row:
                raise ValueError(f"{dataset.where[i]}: row already has key {key!r}; "
                                 "pass weight_key=/id_key= to rename the added column")
        row[weight_key] = float(weights_N[i])
        row[id_key] = int(i)
        rows.append(row)
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

"""A run's records and plots: strict JSON, learned weights by ground truth, training curves."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np


def finite_or_none(value):
    """``value`` (nested dicts and lists) with every non-finite float as None: JSON has no
    NaN or infinity, and strict readers (jq, JavaScript, most non-Python parsers) refuse the
    bare ``NaN`` tokens Python's json module writes by default."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(record, **kwargs) -> str:
    """``json.dumps`` of a run's record (results.json, a metrics.jsonl line) as strict JSON:
    a NaN or infinite number (a metric with nothing to measure, e.g. a refresh's accuracy on
    benign questions when it drew none) is written as null."""
    return json.dumps(finite_or_none(record), allow_nan=False, **kwargs)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_weights(s_N, good_N, path: str | Path, title: str = "") -> None:
    """Histogram of learned weights, split by ground truth (good / bad) when it is known."""
    plt = _pyplot()
    s_N = np.asarray(s_N, np.float64)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0.0, max(float(s_N.max()), 1e-6), 41)
    if good_N is None:
        ax.hist(s_N, bins=bins, color="tab:blue")
    else:
        good = np.asarray(good_N) > 0
        ax.hist(s_N[good], bins=bins, alpha=0.7, label=f"good ({good.sum()})", color="tab:green")
        ax.hist(s_N[~good], bins=bins, alpha=0.7, label=f"bad ({(~good).sum()})", color="tab:red")
        ax.legend()
    ax.set_xlabel("learned weight")
    ax.set_ylabel("examples")
    ax.set_yscale("log")
    ax.set_title(f"{title} data weights".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl``, a null (a non-finite number, see :func:`to_json`)
    read as NaN."""
    path = Path(path)
    if not path.exists():
        return []
    return [{k: math.nan if v is None else v for k, v in json.loads(line).items()}
            for line in path.read_text().splitlines() if line.strip()]


def trim_records(path: str | Path, keep) -> int:
    """Drops the records of a JSON-lines log (``metrics.jsonl``, ``generations.jsonl``) for
    which ``keep(record)`` is false; the others stay as written. The file is replaced by a
    finished copy, so a kill leaves the old records or the new ones. Returns: how many were
    dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if keep(json.loads(line))]
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return len(lines) - len(kept)


def trim_metrics(path: str | Path, upto: int) -> int:
    """Drops the records of steps after ``upto`` from ``metrics.jsonl`` (a run resumed from
    the checkpoint of step ``upto`` logs those steps again). Returns: how many were dropped."""
    return trim_records(path, lambda record: record["step"] <= upto)


def plot_curves(metrics_path: str | Path, path: str | Path,
                keys: tuple[str, ...] = ("loss", "val_loss", "ess",
                                         "eval_weight_mass_on_good")) -> None:
    """Training curves from ``metrics.jsonl``: one panel per metric that was recorded."""
    plt = _pyplot()
    records = read_metrics(metrics_path)
    present = [k for k in keys if any(k in r for r in records)]
    fig, axes = plt.subplots(1, max(len(present), 1), figsize=(4 * max(len(present), 1), 3.2))
    axes = np.atleast_1d(axes)
    for ax, key in zip(axes, present, strict=False):
        pts = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*pts, strict=True))
        ax.set_xlabel("step")
        ax.set_title(key)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_comparison(metrics_paths: dict[str, str | Path], path: str | Path,
                    key: str = "eval_val_loss") -> None:
    """One metric against steps for several runs (e.g. full validation loss per method)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, metrics_path in metrics_paths.items():
        pts = [(r["step"], r[key]) for r in read_metrics(metrics_path) if key in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Scoring learned data weights against per-example ground truth (good=1, bad=0)."""

from __future__ import annotations

import numpy as np


def _average_ranks(x_N: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of their ranks."""
    order = np.argsort(x_N, kind="stable")
    sorted_x = x_N[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x_N)]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(x_N), np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auroc(scores_N, good_N) -> float:
    """Area under the ROC curve of ``scores`` separating good from bad examples.

    Args: scores_N (higher = more likely good, e.g. learned weights); good_N (1 good, 0 bad).
    Returns: P(score of a random good > score of a random bad), ties counting 1/2
      (Mann-Whitney rank formula). Raises ValueError if either class is empty.
    """
    scores_N = np.asarray(scores_N, np.float64).reshape(-1)
    good_N = np.asarray(good_N).reshape(-1).astype(bool)
    n_good, n_bad = int(good_N.sum()), int((~good_N).sum())
    if n_good == 0 or n_bad == 0:
        raise ValueError(f"auroc needs both classes (good {n_good}, bad {n_bad})")
    ranks = _average_ranks(scores_N)
    return float((ranks[good_N].sum() - n_good * (n_good + 1) / 2) / (n_good * n_bad))


def weight_mass_on_good(weights_N, good_N) -> float:
    """Args: non-negative weights_N, good_N. Returns: sum of weights on good / total weight."""
    weights_N = np.asarray(weights_N, np.float64).reshape(-1)
    good_N = np.asarray(good_N).reshape(-1).astype(bool)
    total = weights_N.sum()
    if total <= 0:
        raise ValueError("weights sum to zero")
    return float(weights_N[good_N].sum() / total)

"""What a run will train on, before it trains (``jbilevel data``): each split's token lengths,
the padding a batch of the run's size carries at each number of length buckets, and examples
rendered as token text with the trained tokens marked."""

from __future__ import annotations

import numpy as np

from jbilevel.data.batching import Batcher
from jbilevel.data.dataset import SFTDataset

OPEN, CLOSE = "[[", "]]"  # around the trained tokens of a rendered example


def lengths(dataset: SFTDataset) -> dict:
    """Token counts of the prompts, responses, whole sequences and trained tokens (the response
    and, where trained, earlier assistant turns): median, 90th and 99th percentile, max (the
    response counts its end token; a prompt its bos)."""
    response_N = dataset.length_N - dataset.prompt_len_N
    trained_N = (response_N if dataset.trained_T is None else
                 np.add.reduceat(dataset.trained_T.astype(np.int64), dataset.offsets_N1[:-1]))
    parts = {"prompt": dataset.prompt_len_N, "response": response_N,
             "sequence": dataset.length_N, "trained": trained_N}
    return {name: {"median": int(np.median(n)), "p90": int(np.percentile(n, 90)),
                   "p99": int(np.percentile(n, 99)), "max": int(n.max())}
            for name, n in parts.items()}


def padding(dataset: SFTDataset, batch_size: int, batcher_options: dict) -> dict:
    """The padding of an epoch of ``batch_size``-row batches built as a run builds them
    (``batcher_options``: its Batcher's buckets, grouping and seed; the first epoch's
    order). Returns: the lengths batches are padded to, the padded tokens and the share of
    them that is padding."""
    batcher = Batcher(dataset, batch_size, **batcher_options)
    order = batcher.epoch_order(0)
    padded = 0
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        padded += batch_size * batcher.bucket(int(dataset.length_N[rows].max()))
    real = int(dataset.length_N.sum())
    return {"lengths": list(batcher.buckets), "padded_tokens": padded,
            "padding_share": round(1 - real / padded, 4)}


def render(dataset: SFTDataset, i: int) -> str:
    """Example ``i`` as its tokens' text, special tokens included, each run of trained tokens
    between ``[[`` and ``]]``."""
    ids, trained = dataset.sequence(i), dataset.targets(i) > 0
    cuts = np.flatnonzero(np.diff(trained.astype(np.int8))) + 1
    out = []
    for run_ids, run_trained in zip(np.split(ids, cuts), np.split(trained, cuts), strict=True):
        text = token_text(dataset.tokenizer, run_ids)
        out.append(f"{OPEN}{text}{CLOSE}" if run_trained[0] else text)
    return "".join(out)


def token_text(tokenizer, ids) -> str:
    """The text of ``ids`` with special tokens written out (``<eos>``, ``<|eot_id|>``)."""
    hf = getattr(tokenizer, "hf", None)
    if hf is not None:
        return hf.decode([int(t) for t in ids], skip_special_tokens=False)
    return "".join(tokenizer.vocab[int(t)] for t in ids)

"""Batcher: deterministic, resumable, per-process sharded epochs of fixed-shape batches.

Epoch ``e`` visits the ids in the order ``np.random.default_rng([seed, e]).permutation(N)``
(or 0..N-1 with ``shuffle=False``), padded with invalid rows to a whole number of global
batches of ``batch_size * process_count`` rows. Global batch ``k`` is split in
``process_count`` contiguous parts; process ``p`` gets part ``p``. So the processes' parts are
disjoint and together cover the epoch, every process takes the same number of steps, and the
padded length L (the smallest bucket that fits the *global* batch) agrees across processes.
The state ``{"seed", "epoch", "position"}`` (position = global batches consumed in the epoch)
is all a checkpoint needs to resume at the same example.

``group_by_length`` (with several buckets) reorders each epoch so that a batch holds rows of
similar length, as transformers' ``group_by_length`` does: the shuffled ids are cut into
windows of ``GROUP_WINDOW`` global batches, each window sorted by length, cut into batches,
and the full batches shuffled, the one holding the epoch's longest row first (the largest
shape compiles, or runs out of memory, at the first step); the partial batch stays last.
Every id is still visited once per epoch, and the order is still a function of (seed, epoch).

``strata`` (bds's sampled hyper batches) draws each global batch as a fixed number of rows from
each length bucket, the longest bucket's rows first (``length_strata``: counts proportional to
the buckets' sizes, at least one each, in multiples of the data-parallel devices), so that every
batch holds the same lengths at the same rows and each bucket's rows can be cut to their length.
Bucket ``k`` visits its ids in the order ``default_rng([seed, e, k]).permutation`` of them,
``floor(n_k / m_k)`` batches of ``m_k`` rows per round ``e`` (the rest wait for the next round,
so no batch holds a row twice); batch ``s`` of the run (``epoch * steps_per_epoch +
position``) takes its rows from every bucket's ``s``-th, so the same state resumes it.
"""

from __future__ import annotations

import numpy as np

from jbilevel.data.dataset import SFTDataset

GROUP_WINDOW = 64  # global batches per window that group_by_length sorts by length


def length_buckets(length_N, n: int, multiple: int = 64, top: int | None = None
                   ) -> tuple[int, ...]:
    """``n`` padded lengths for sequences of ``length_N``: its quantiles 1/n, 2/n, ..., 1,
    rounded up to ``multiple``, without repeats, the last one ``top``.

    Args: the sequence lengths, the number of buckets (1: ``top`` alone), rounding, and the
      largest length (default: the longest sequence rounded up to 8).
    Returns: increasing lengths, the last one holding the longest sequence.
    """
    longest = -(-int(np.max(length_N)) // 8) * 8 if top is None else top
    qs = np.quantile(np.asarray(length_N), np.arange(1, n) / n) if n > 1 else []
    return tuple(sorted({min(longest, -(-int(np.ceil(q)) // multiple) * multiple)
                         for q in qs} | {longest}))


def smallest_bucket(buckets, length: int) -> int:
    """The smallest of ``buckets`` (increasing lengths) that holds ``length``: the length a
    batch whose longest sequence (or prompt) is ``length`` is padded to."""
    return int(buckets[int(np.searchsorted(buckets, length))])


def _bucket_sizes(length_N, buckets) -> tuple[np.ndarray, np.ndarray]:
    """(sizes, lengths) of the non-empty buckets, longest first: how many of ``length_N`` each
    bucket holds (its length the smallest of ``buckets`` at least that long)."""
    bucket_N = np.searchsorted(np.asarray(buckets), np.asarray(length_N))
    if bucket_N.size and bucket_N.max() >= len(buckets):
        raise ValueError(f"bucket lengths {tuple(buckets)} do not hold every example")
    sizes = np.bincount(bucket_N, minlength=len(buckets))[::-1]
    return sizes[sizes > 0], np.asarray(buckets)[::-1][sizes > 0]


def _blocks(counts, lengths) -> tuple[tuple[int, int, int], ...]:
    ends = np.cumsum(counts)
    return tuple((int(e - c), int(e), int(L)) for e, c, L in zip(ends, counts, lengths,
                                                                    strict=True))


def length_blocks(length_N, n_rows: int, buckets, ways: int = 1
                  ) -> tuple[tuple[int, int, int], ...]:
    """Where each bucket's rows lie in a batch of every example sorted by length, longest
    first (``Batcher(sort_by_length=True)`` over all of them: ``n_rows`` rows, the ones past
    ``len(length_N)`` padding of length 0).

    Args: the examples' lengths, the batch's rows, the bucket lengths (increasing), and the
      devices the rows split over (:func:`even_blocks`: each block's rows a multiple of them).
    Returns: ``(start, end, length)`` per non-empty bucket, longest first: rows ``start:end``
      of the sorted batch are at most ``length`` long. The same for every such batch.
    """
    padding = np.zeros(n_rows - len(length_N), np.int64)
    blocks = _blocks(*_bucket_sizes(np.concatenate([np.asarray(length_N), padding]), buckets))
    return even_blocks(blocks, ways)


def even_blocks(blocks, ways: int) -> tuple[tuple[int, int, int], ...]:
    """Longest-first ``(start, end, length)`` blocks of one batch with every end rounded up to
    a multiple of ``ways`` (the data-parallel devices), so that each block's rows split evenly
    over them (a block of fewer rows than a pass takes is one pass over all of them, and
    uneven it is not split as an even one is: docs/llm.md measures it). The rows this moves
    into a block are shorter than its length (they come from the next one), so the cut still
    holds every token; a block left empty goes."""
    out, start = [], 0
    last = blocks[-1][1] if blocks else 0
    for _, end, length in blocks:
        end = min(-(-end // ways) * ways, last)
        if end > start:
            out.append((start, end, length))
            start = end
    return tuple(out)


def length_strata(length_N, n_rows: int, buckets, ways: int = 1
                  ) -> tuple[tuple[int, int, int], ...]:
    """How many of a sampled batch's ``n_rows`` rows each length bucket gives (``Batcher(
    strata=)``): in proportion to the bucket's share of the examples (largest remainders), at
    least one row from each non-empty bucket, the longest bucket first.

    With ``ways`` > 1 (the data-parallel devices, a divisor of ``n_rows``) each bucket gives
    a multiple of ``ways`` rows, so that its block splits evenly over them (:func:`even_blocks`),
    at least ``ways`` each: buckets with fewer examples, or more buckets than ``n_rows / ways``,
    join their longer neighbours (the fewest examples first). The shares then follow the
    buckets' sizes only roughly: :func:`stratum_scales` makes up for it.

    Args: the examples' lengths, the batch's rows (fewer than the examples), the bucket
      lengths (increasing, the last holding every example), the devices.
    Returns: ``(start, end, length)`` per non-empty bucket, longest first, as
      :func:`length_blocks`: rows ``start:end`` of every such batch are at most ``length`` long.
    """
    if n_rows % ways:
        raise ValueError(f"a sampled batch of {n_rows} rows does not split over {ways} devices")
    if n_rows >= len(length_N):
        raise ValueError(f"a sampled batch of {n_rows} rows out of {len(length_N)} examples: "
                         "a batch of every example is sorted, not sampled (length_blocks)")
    units = n_rows // ways
    buckets = list(buckets)
    sizes, lengths = _bucket_sizes(length_N, buckets)
    while len(sizes) > 1:
        fewest = int(np.argmin(sizes))
        if sizes[fewest] >= ways and len(sizes) <= units:
            break
        # its examples join the next longer bucket's (the longest's: the next one joins it)
        buckets.remove(int(lengths[fewest if fewest else 1]))
        sizes, lengths = _bucket_sizes(length_N, buckets)
    if not len(sizes) <= units:
        raise ValueError(f"a sampled batch of {n_rows} rows cannot take a row from each of "
                         f"{len(sizes)} length buckets out of {sizes.sum()} examples; use "
                         "fewer buckets (data.length_buckets) or more rows")
    counts = strata_counts(sizes, units) * ways
    if (counts > sizes).any():
        raise ValueError(f"a sampled batch of {n_rows} rows in blocks of {ways} takes more rows "
                         f"than some length bucket holds ({counts.tolist()} of "
                         f"{sizes.tolist()}); use fewer buckets (data.length_buckets) or "
                         "fewer rows")
    return _blocks(counts, lengths)


def stratum_scales(length_N, strata) -> tuple[float, ...]:
    """The scale on each of :func:`length_strata`'s blocks under which a sampled batch
    estimates every example's term alike: the bucket's share of the examples over its share
    of the batch (1 where the counts are in proportion). A row of bucket ``k`` is drawn with
    probability ``m_k / n_k`` each time, so its scaled term counts ``m / N`` times on average,
    as in a uniform draw of ``m`` of the ``N`` rows."""
    sizes, _ = _bucket_sizes(length_N, [length for *_, length in strata][::-1])
    m, n = strata[-1][1], len(length_N)
    return tuple(float(size / n * m / (end - start))
                 for size, (start, end, _) in zip(sizes, strata, strict=True))


def hyper_cut(length_N, n_rows: int, buckets, ways: int = 1):
    """How a bds hypergradient batch of ``n_rows`` rows lies by length (``data.length_buckets``
    > 1), as the trainer draws it and ``scripts/compile_check.py`` compiles it.

    Every example sorted by length when ``n_rows`` holds them all (:func:`length_blocks`, no
    scales), else a sample with a fixed number of rows from each bucket (:func:`length_strata`
    and its :func:`stratum_scales`). Returns ``(blocks, scales, sorted)``: the blocks as
    ``(start, end, length)``, longest first, each a multiple of ``ways`` rows, the scale on each
    block's per-example term (None: 1 each), and whether the batch is every example sorted.
    """
    if n_rows >= len(length_N):
        return length_blocks(length_N, n_rows, buckets, ways), None, True
    strata = length_strata(length_N, n_rows, buckets, ways)
    return strata, stratum_scales(length_N, strata), False


def strata_counts(sizes, n_rows: int, at_least_one: bool = True) -> np.ndarray:
    """``n_rows`` shared out over strata of ``sizes`` rows in proportion to their sizes
    (largest remainders), at least one from each stratum where there are as many rows as
    strata (unless ``at_least_one`` is False)."""
    sizes = np.asarray(sizes, np.int64)
    least = 1 if at_least_one and n_rows >= len(sizes) else 0
    share = (n_rows - least * len(sizes)) * sizes / sizes.sum()  # the rest by size
    counts = least + np.floor(share).astype(np.int64)
    extra = n_rows - counts.sum()
    counts[np.argsort(-(share - np.floor(share)), kind="stable")[:extra]] += 1
    return counts


def default_buckets(max_len: int, n: int = 4, multiple: int = 8) -> tuple[int, ...]:
    """Args: max_len, number of buckets, rounding multiple.

    Returns: ``n`` increasing lengths ending at max_len (max_len/2^k rounded up to ``multiple``).
    """
    lengths = {max_len}
    for k in range(1, n):
        lengths.add(min(max_len, -(-(max_len >> k) // multiple) * multiple))
    return tuple(sorted(lengths))


class Batcher:
    """Iterator over fixed-shape training batches of one process's shard.

    Args:
      dataset: an SFTDataset.
      batch_size: rows per process per step (B).
      seed: shuffle seed; epoch e uses ``default_rng([seed, e])``.
      shuffle: shuffle each epoch (False: id order).
      buckets: allowed sequence lengths L (sorted); default ``default_buckets(max_len)``;
        ``(max_len,)`` gives one shape for everything.
      process_index, process_count: this process and how many share each global batch.
      drop_last: drop the last partial global batch instead of padding it with valid=0 rows.
      epoch, position: where to start (see ``state``/``restore``).
      group_by_length: batch rows of similar length together (see the module docstring),
        so that batches take the smaller buckets; needs ``shuffle``.
      sort_by_length: order each global batch's rows by length, longest first (padding rows
        last), before the processes' parts are cut: a batch of every example then holds the
        same lengths at the same rows each time (``length_blocks``), in a shuffled order
        within equal lengths.
      strata: ``length_strata``'s ``(start, end, length)`` blocks: each global batch takes
        ``end - start`` rows of the examples at most ``length`` long (and longer than the
        next block's length) at rows ``start:end`` (see the module docstring); needs
        ``shuffle``.
    """

    def __init__(self, dataset: SFTDataset, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, buckets=None, process_index: int = 0,
                 process_count: int = 1, drop_last: bool = False, epoch: int = 0,
                 position: int = 0, group_by_length: bool = False,
                 sort_by_length: bool = False, strata=None):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        longest = int(dataset.length_N.max())
        self.buckets = tuple(sorted(buckets or default_buckets(dataset.max_len)))
        if self.buckets[-1] < longest:
            raise ValueError(f"largest bucket {self.buckets[-1]} < longest sequence {longest}")
        self.process_index = process_index
        self.process_count = process_count
        self.drop_last = drop_last
        self.group_by_length = group_by_length and shuffle
        self.sort_by_length = sort_by_length
        self.epoch = epoch
        self.position = position
        self._order = None
        self.strata = tuple(strata) if strata else None
        if self.strata:
            if not shuffle or self.strata[-1][1] != self.global_batch_size:
                raise ValueError(f"strata {self.strata} need shuffle and a global batch of "
                                 f"{self.strata[-1][1]} rows, not {self.global_batch_size}")
            ascending = [length for *_, length in self.strata][::-1]
            bucket_N = np.searchsorted(ascending, dataset.length_N)  # as _bucket_sizes
            self._strata_ids = [np.flatnonzero(bucket_N == len(ascending) - 1 - k)
                                for k in range(len(ascending))]
            if bucket_N.max() >= len(ascending) or any(
                    end - start > len(ids) for (start, end, _), ids in zip(
                        self.strata, self._strata_ids, strict=True)):
                raise ValueError(f"strata {self.strata} do not fit the examples' lengths")

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.process_count

    @property
    def steps_per_epoch(self) -> int:
        n, g = len(self.dataset), self.global_batch_size
        return n // g if self.drop_last else -(-n // g)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Args: epoch. Returns: the ids in the order epoch ``epoch`` visits them."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n)
        if not self.group_by_length:
            return order
        g = self.global_batch_size
        length = self.dataset.length_N
        window = GROUP_WINDOW * g
        for start in range(0, n, window):  # longest first within each window (stable)
            part = order[start:start + window]
            order[start:start + window] = part[np.argsort(-length[part], kind="stable")]
        full = n // g
        batches = order[:full * g].reshape(full, g)
        if full:
            batches = batches[rng.permutation(full)]
            longest = int(np.argmax(length[batches].max(axis=1)))
            batches[[0, longest]] = batches[[longest, 0]]
        return np.concatenate([batches.reshape(-1), order[full * g:]])

    def state(self) -> dict:
        """Returns: ``{"seed", "epoch", "position"}``, plain ints (JSON/checkpoint friendly)."""
        return {"seed": int(self.seed), "epoch": int(self.epoch), "position": int(self.position)}

    def restore(self, state: dict) -> Batcher:
        """Args: a dict from ``state()``. Returns: self, positioned at the same next example."""
        self.seed, self.epoch, self.position = (int(state[k]) for k in ("seed", "epoch",
                                                                          "position"))
        self._order = None
        return self

    @classmethod
    def from_state(cls, dataset: SFTDataset, batch_size: int, state: dict, **kwargs) -> Batcher:
        """Args: as ``__init__`` plus a ``state()`` dict. Returns: a Batcher resuming there."""
        return cls(dataset, batch_size, **kwargs).restore(state)

    def bucket(self, length: int) -> int:
        """Args: a sequence length. Returns: the smallest bucket length that holds it."""
        return smallest_bucket(self.buckets, length)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        """Returns: the next batch (see ``SFTDataset.batch``); epochs roll over forever."""
        if self.position >= self.steps_per_epoch:
            self.epoch += 1
            self.position = 0
            self._order = None
        g = self.global_batch_size
        if self.strata:
            gids = self._stratum_rows(self.epoch * self.steps_per_epoch + self.position)
        else:
            if self._order is None:
                self._order = self.epoch_order(self.epoch)
            gids = self._order[self.position * g : (self.position + 1) * g]
        valid = np.arange(g) < len(gids)
        gids = np.concatenate([gids, np.zeros(g - len(gids), gids.dtype)])
        if self.sort_by_length:
            order = np.argsort(-np.where(valid, self.dataset.length_N[gids], 0), kind="stable")
            gids, valid = gids[order], valid[order]
        seq_len = self.bucket(int(self.dataset.length_N[gids[valid]].max()))
        part = slice(self.process_index * self.batch_size,
                     (self.process_index + 1) * self.batch_size)
        self.position += 1
        return self.dataset.batch(gids[part], seq_len, valid[part])

    def _stratum_rows(self, s: int) -> np.ndarray:
        """The ids of batch ``s`` of the run under ``strata``: each bucket's ``s``-th draw."""
        parts = []
        for k, ((start, end, _), ids) in enumerate(zip(self.strata, self._strata_ids,
                                                       strict=True)):
            m = end - start
            per_round = len(ids) // m
            rnd, j = divmod(s, per_round)
            order = np.random.default_rng([self.seed, rnd, k]).permutation(ids)
            parts.append(order[j * m:(j + 1) * m])
        return np.concatenate(parts)

    def epoch_batches(self):
        """Yield the rest of the current epoch's batches (then stop)."""
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        while self.position < self.steps_per_epoch:
            yield next(self)

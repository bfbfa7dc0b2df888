"""Batcher: stable ids, deterministic shuffles, sharding, exact resume, no recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbilevel.data import Batcher, default_buckets, load_sft
from jbilevel.data.batching import (
    even_blocks,
    length_blocks,
    length_buckets,
    length_strata,
    stratum_scales,
)


@pytest.fixture(scope="module")
def ds():
    rng = np.random.default_rng(0)
    rows = [{"question": f"q{i}" + "x" * int(rng.integers(0, 40)), "response": f"r{i}"}
            for i in range(53)]
    return load_sft(rows, prompt_template="{question}:", max_len=64)


def _epoch(batcher):
    return [b for b in batcher.epoch_batches()]


def _seen(batches):
    return np.concatenate([b["ids"][b["valid"] > 0] for b in batches])


def test_ids_stable_and_each_epoch_covers_all(ds):
    batcher = Batcher(ds, 8, seed=3)
    orders = []
    for _ in range(3):
        batches = _epoch(batcher)
        assert len(batches) == 7
        seen = _seen(batches)
        np.testing.assert_array_equal(np.sort(seen), np.arange(53))
        orders.append(seen)
        for b in batches:  # every row's tokens are the example its id names
            for row, i in enumerate(b["ids"][b["valid"] > 0]):
                n = int(b["attention_mask"][row].sum())
                np.testing.assert_array_equal(b["input_ids"][row, :n], ds.sequence(i))
                assert ds.rows[i]["response"] == f"r{i}"
    assert not np.array_equal(orders[0], orders[1])  # reshuffled per epoch
    again = Batcher(ds, 8, seed=3)
    np.testing.assert_array_equal(_seen(_epoch(again)), orders[0])  # deterministic
    other = Batcher(ds, 8, seed=4)
    assert not np.array_equal(_seen(_epoch(other)), orders[0])
    np.testing.assert_array_equal(Batcher(ds, 8, seed=3).epoch_order(1),
                                  np.random.default_rng([3, 1]).permutation(53))


def test_last_partial_batch_is_padded_and_marked_invalid(ds):
    last = _epoch(Batcher(ds, 8, shuffle=False))[-1]
    np.testing.assert_array_equal(last["valid"], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(last["ids"][:5], [48, 49, 50, 51, 52])
    assert last["loss_mask"][5:].sum() == 0
    assert last["input_ids"].shape == (8, last["input_ids"].shape[1])
    dropped = _epoch(Batcher(ds, 8, shuffle=False, drop_last=True))
    assert len(dropped) == 6 and all(b["valid"].all() for b in dropped)


def test_two_processes_disjoint_cover_and_agree_on_shapes(ds):
    procs = [Batcher(ds, 4, seed=1, process_index=p, process_count=2) for p in range(2)]
    for _ in range(2):
        parts = [_epoch(b) for b in procs]
        assert len(parts[0]) == len(parts[1]) == 7
        for b0, b1 in zip(*parts, strict=True):
            assert b0["input_ids"].shape == b1["input_ids"].shape
        s0, s1 = _seen(parts[0]), _seen(parts[1])
        assert not set(s0) & set(s1)
        np.testing.assert_array_equal(np.sort(np.concatenate([s0, s1])), np.arange(53))
        # the two processes together see the single-process epoch order
        single = Batcher(ds, 8, seed=1, epoch=procs[0].epoch)
        merged = np.concatenate([np.concatenate([a["ids"], b["ids"]])[
            np.concatenate([a["valid"], b["valid"]]) > 0] for a, b in zip(*parts, strict=True)])
        np.testing.assert_array_equal(merged, single.epoch_order(procs[0].epoch))
    with pytest.raises(ValueError, match="process_index 2 not in"):
        Batcher(ds, 4, process_index=2, process_count=2)


def test_state_restore_resumes_at_same_example(ds):
    ref = Batcher(ds, 8, seed=5)
    stream = [next(ref) for _ in range(17)]  # crosses two epoch boundaries
    b = Batcher(ds, 8, seed=5)
    for _ in range(10):
        next(b)
    state = b.state()
    assert state == {"seed": 5, "epoch": 1, "position": 3}
    resumed = Batcher(ds, 8, seed=0).restore(dict(state))
    for want in stream[10:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert resumed.state() == ref.state()
    again = Batcher.from_state(ds, 8, state)
    np.testing.assert_array_equal(next(again)["ids"], stream[10]["ids"])


def test_prompt_batch_left_pads_every_prompt(ds):
    p = int(ds.prompt_len_N.max())
    ids = np.arange(48, 56)
    b = ds.prompt_batch(np.where(ids < 53, ids, 0), p, ids < 53)
    assert b["prompt_ids"].shape == (8, p)
    np.testing.assert_array_equal(b["ids"][:5], np.arange(48, 53))
    for row, i in enumerate(range(48, 53)):
        n_p = int(ds.prompt_len_N[i])
        np.testing.assert_array_equal(b["prompt_ids"][row, p - n_p :], ds.sequence(i)[:n_p])
        assert b["prompt_mask"][row].sum() == n_p and b["prompt_mask"][row, -1] == 1
    assert b["valid"].sum() == 5 and b["prompt_mask"][5:].sum() == 0
    with pytest.raises(ValueError, match=f"prompt_len {p - 1} < longest prompt"):
        ds.prompt_batch(np.arange(53), p - 1)


def test_buckets(ds):
    assert default_buckets(64) == (8, 16, 32, 64)
    assert default_buckets(40) == (8, 16, 24, 40)
    b = Batcher(ds, 8, buckets=(16, 32, 64))
    assert [b.bucket(n) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
    with pytest.raises(ValueError, match="largest bucket 16 < longest sequence"):
        Batcher(ds, 8, buckets=(8, 16))


def test_length_buckets_are_quantiles_of_the_lengths():
    lengths = np.array([10, 50, 100, 150, 200, 300, 500])
    assert length_buckets(lengths, 4) == (128, 192, 256, 504)  # quantiles 75, 150, 250
    assert length_buckets(lengths, 1) == (504,)  # the longest, rounded up to 8
    assert length_buckets(np.full(9, 30), 3) == (32,)  # one length: one bucket
    assert length_buckets(lengths, 2, top=500) == (192, 500)  # the largest as given


def test_group_by_length_pads_less_and_keeps_every_guarantee(ds):
    """Batches of similar lengths: each epoch still visits every id once, deterministically
    per (seed, epoch), the longest batch first, the partial batch last; processes agree on
    shapes and together see the single-process order; a restored batcher resumes exactly."""
    buckets = length_buckets(ds.length_N, 4, multiple=8)

    def padded(batches):
        return sum(b["input_ids"].size for b in batches)

    plain = Batcher(ds, 8, seed=2, buckets=buckets)
    grouped = Batcher(ds, 8, seed=2, buckets=buckets, group_by_length=True)
    for _ in range(2):
        batches = _epoch(grouped)
        np.testing.assert_array_equal(np.sort(_seen(batches)), np.arange(53))
        longest = [int(ds.length_N[b["ids"][b["valid"] > 0]].max()) for b in batches]
        assert longest[0] == max(longest) and batches[-1]["valid"].sum() == 5
        assert padded(batches) < 0.8 * padded(_epoch(plain))
    orders = [grouped.epoch_order(e) for e in (0, 1)]
    assert not np.array_equal(*orders)
    np.testing.assert_array_equal(orders[1], Batcher(ds, 8, seed=2, group_by_length=True)
                                  .epoch_order(1))
    procs = [Batcher(ds, 4, seed=2, buckets=buckets, group_by_length=True, process_index=p,
                     process_count=2) for p in range(2)]
    parts = [_epoch(b) for b in procs]
    merged = np.concatenate([np.concatenate([a["ids"], b["ids"]])[
        np.concatenate([a["valid"], b["valid"]]) > 0] for a, b in zip(*parts, strict=True)])
    np.testing.assert_array_equal(merged, grouped.epoch_order(0))
    assert all(a["input_ids"].shape == b["input_ids"].shape for a, b in zip(*parts, strict=True))
    ref = Batcher(ds, 8, seed=2, buckets=buckets, group_by_length=True)
    stream = [next(ref) for _ in range(10)]
    resumed = Batcher(ds, 8, buckets=buckets, group_by_length=True).restore(
        {"seed": 2, "epoch": 0, "position": 4})
    for want in stream[4:]:
        np.testing.assert_array_equal(next(resumed)["input_ids"], want["input_ids"])


def test_length_strata_sample_each_bucket_at_its_rows(ds):
    """bds's sampled hyper batches with length buckets: every batch takes a fixed number of
    rows from each bucket (in proportion to its size, at least one) at fixed rows, the longest
    first; no batch holds a row twice; over a round each bucket's rows come once; the
    processes' parts make up the batch; a restored batcher resumes exactly."""
    buckets = length_buckets(ds.length_N, 3, multiple=8)
    strata = length_strata(ds.length_N, 16, buckets)
    sizes = [int(np.sum(np.searchsorted(buckets, ds.length_N) == b))
             for b in range(len(buckets) - 1, -1, -1)]
    assert [end - start for start, end, _ in strata] == [
        round(1 + 13 * n / 53) for n in sizes]  # 1 each, the other 13 by size
    assert strata[0][0] == 0 and strata[-1][1] == 16 and [s[2] for s in strata] == sorted(
        buckets, reverse=True)
    assert length_strata([5, 5, 5, 100], 2, (8, 104)) == ((0, 1, 104), (1, 2, 8))  # 1 each
    # one row for two buckets: the one with fewer examples joins its longer neighbour
    assert length_strata([5, 5, 5, 100], 1, (8, 104)) == ((0, 1, 104),)
    assert length_strata([5, 100, 100, 100], 1, (8, 104)) == ((0, 1, 104),)
    with pytest.raises(ValueError, match="4 rows out of 4 examples"):
        length_strata([5, 5, 5, 100], 4, (8, 104))
    batcher = Batcher(ds, 16, seed=4, buckets=buckets[-1:], strata=strata)
    stream = [next(batcher) for _ in range(12)]
    for batch in stream:
        assert batch["valid"].all() and len(set(batch["ids"].tolist())) == 16
        for (start, end, length), lower in zip(strata, [s[2] for s in strata[1:]] + [0],
                                               strict=True):
            lengths = ds.length_N[batch["ids"][start:end]]
            assert (lengths <= length).all() and (lengths > lower).all()
    last = strata[-1]  # the shortest bucket: its rows come once a round, in new orders
    m = last[1] - last[0]
    per_round = sizes[-1] // m
    drawn = [b["ids"][last[0]:last[1]] for b in stream]
    rounds = [np.concatenate(drawn[r * per_round:(r + 1) * per_round]) for r in range(2)]
    assert all(len(set(r.tolist())) == per_round * m for r in rounds)
    assert not np.array_equal(*rounds)
    procs = [Batcher(ds, 8, seed=4, buckets=buckets[-1:], strata=strata, process_index=p,
                     process_count=2) for p in range(2)]
    for want in stream[:5]:
        parts = [next(b) for b in procs]
        np.testing.assert_array_equal(np.concatenate([p["ids"] for p in parts]), want["ids"])
    resumed = Batcher(ds, 16, buckets=buckets[-1:], strata=strata).restore(
        {"seed": 4, "epoch": 1, "position": 1})  # 4 batches an epoch
    assert batcher.steps_per_epoch == 4
    for want in stream[5:]:
        np.testing.assert_array_equal(next(resumed)["input_ids"], want["input_ids"])
    with pytest.raises(ValueError, match="need shuffle and a global batch of 16 rows, not 8"):
        Batcher(ds, 8, strata=strata)


def test_blocks_split_evenly_over_the_devices():
    """Every block of a hyper batch a multiple of the data-parallel devices: a sorted batch's
    block ends rounded up (the rows moved in are shorter than the block's length), and a
    sampled batch's strata in whole multiples, buckets with too few examples (or too many
    buckets for the rows) joined to their longer neighbours, with the scales that make up for
    the shares out of proportion."""
    assert even_blocks(((0, 5, 64), (5, 13, 32), (13, 16, 8)), 4) == (
        (0, 8, 64), (8, 16, 32))  # the 8-token block left empty
    assert even_blocks(((0, 5, 64), (5, 13, 32)), 1) == ((0, 5, 64), (5, 13, 32))
    lengths = np.array([100] * 3 + [60] * 30 + [20] * 67)
    assert length_blocks(lengths, 104, (32, 64, 128)) == ((0, 3, 128), (3, 33, 64),
                                                           (33, 104, 32))
    assert length_blocks(lengths, 104, (32, 64, 128), ways=8) == ((0, 8, 128), (8, 40, 64),
                                                                   (40, 104, 32))
    # 32 rows on 8 devices, 4 units: the 3 longest examples are fewer than 8, so the next
    # bucket joins them (33 at 128 tokens); 1 unit each, the other 2 by size (0.66 and 1.34
    # -> 0 and 1, the larger remainder 1 more): 16 and 16 rows for 33 and 67 examples
    strata = length_strata(lengths, 32, (32, 64, 128), ways=8)
    assert strata == ((0, 16, 128), (16, 32, 32))
    np.testing.assert_allclose(stratum_scales(lengths, strata), [0.33 * 32 / 16,
                                                                 0.67 * 32 / 16])
    # in proportion, the scales are 1
    even = length_strata(np.array([60] * 50 + [20] * 50), 16, (32, 64), ways=8)
    assert even == ((0, 8, 64), (8, 16, 32)) and stratum_scales(
        np.array([60] * 50 + [20] * 50), even) == (1.0, 1.0)
    # 16 rows on 8 devices cannot take a unit from 3 buckets: two buckets are left
    assert len(length_strata(np.array([100] * 40 + [60] * 30 + [20] * 30), 16,
                             (32, 64, 128), ways=8)) == 2


def test_no_recompilation_across_epochs(ds):
    traces = []

    @jax.jit
    def step(batch):
        traces.append(batch["input_ids"].shape)  # runs only when jit traces
        return jnp.sum(batch["loss_mask"] * batch["labels"]) + jnp.sum(batch["ids"])

    batcher = Batcher(ds, 8, seed=0, buckets=(32, 64))
    shapes = set()
    for _ in range(4):
        for b in _epoch(batcher):
            step(b)
            shapes.add(b["input_ids"].shape)
        # one compilation per bucket shape ever seen, never one per batch
        assert len(traces) == len(shapes) <= 2
    assert shapes == {(8, 32), (8, 64)}
    n = len(traces)
    for b in _epoch(batcher):
        step(b)
    assert len(traces) == n
    single = []
    one = jax.jit(lambda batch: single.append(1) or jnp.sum(batch["input_ids"]))
    for b in _epoch(Batcher(ds, 8, buckets=(64,))):
        one({"input_ids": b["input_ids"]})
    assert len(single) == 1

"""Batcher: stable ids, deterministic shuffles, sharding, exact resume, no recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbilevel.data import Batcher, default_buckets, load_sft
from jbilevel.data.batching import length_buckets


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


def test_prompt_batches_cover_every_prompt_once(ds):
    batches = list(ds.prompt_batches(8))
    assert len(batches) == 7
    p = int(ds.prompt_len_N.max())
    assert all(b["prompt_ids"].shape == (8, p) for b in batches)
    ids = np.concatenate([b["ids"][b["valid"] > 0] for b in batches])
    np.testing.assert_array_equal(ids, np.arange(53))
    for b in batches:
        for row, i in enumerate(b["ids"][b["valid"] > 0]):
            n_p = int(ds.prompt_len_N[i])
            np.testing.assert_array_equal(b["prompt_ids"][row, p - n_p :], ds.sequence(i)[:n_p])
            assert b["prompt_mask"][row].sum() == n_p and b["prompt_mask"][row, -1] == 1
    assert batches[-1]["valid"].sum() == 5 and batches[-1]["prompt_mask"][5:].sum() == 0


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

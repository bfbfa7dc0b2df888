"""Online self-refining generation: ratios by hand, the sampling log-probs used, selection,
omega gradients through generated rows, and an exact resume with the buffer checkpointed."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbilevel import sharding as sh
from jbilevel import train
from jbilevel.adjoint import Implicit
from jbilevel.algorithms import MethodConfig, init_state, refresh
from jbilevel.algorithms import online as ol
from jbilevel.checkpoint import Checkpointer
from jbilevel.objectives import lm_example_loss

# logp_cur, logp_samp, mask: row 0 exercises the clip and the floor, row 1 neither.
CUR = np.array([[-1.0, -0.5, -2.0, -9.0], [-1.0, -1.0, -3.0, -3.0]], np.float32)
SAMP = np.array([[-1.5, -4.0, -20.0, -1.0], [-0.8, -1.1, -3.0, -3.0]], np.float32)
MASK = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)


def test_importance_ratio_per_token_by_hand():
    ratio, clipped = ol.importance_ratio(CUR, SAMP, MASK, kind="per_token", clip=3.0, floor=-5.0)
    # row 0: log r = 0.5, 3.5 (clipped to log 3), -2 - max(-20, -5) = 3 (clipped), masked.
    want = [[math.exp(0.5), 3.0, 3.0, 0.0], [math.exp(-0.2), math.exp(0.1), 0.0, 0.0]]
    np.testing.assert_allclose(ratio, want, rtol=1e-6)
    np.testing.assert_array_equal(clipped, [[0, 1, 1, 0], [0, 0, 0, 0]])


def test_importance_ratio_per_sequence_by_hand():
    ratio, clipped = ol.importance_ratio(CUR, SAMP, MASK, kind="per_sequence", clip=3.0,
                                         floor=-5.0)
    # row 0: exp(0.5 + 3.5 + 3) = e^7, clipped to 3; row 1: exp(-0.2 + 0.1) on its 2 tokens.
    want = [[3.0, 3.0, 3.0, 0.0], [math.exp(-0.1), math.exp(-0.1), 0.0, 0.0]]
    np.testing.assert_allclose(ratio, want, rtol=1e-6)
    np.testing.assert_array_equal(clipped, [[1, 1, 1, 0], [0, 0, 0, 0]])
    # no floor in play: sampling log-prob -20 enters as is, e^(0.5 + 3.5 + 18) is clipped too
    loose, _ = ol.importance_ratio(CUR[1:], SAMP[1:], MASK[1:], kind="per_sequence", clip=1e9,
                                   floor=-100.0)
    np.testing.assert_allclose(loose[0, :2], math.exp(-0.1), rtol=1e-6)


def test_importance_ratio_has_no_gradient():
    grad = jax.grad(lambda c: ol.importance_ratio(c, SAMP, MASK, kind="per_token", clip=3.0,
                                                  floor=-5.0)[0].sum())(jnp.asarray(CUR))
    np.testing.assert_array_equal(grad, 0.0)


def test_ratio_weighted_nll_by_hand():
    nll = np.array([[2.0, 1.0, 4.0, 7.0]], np.float32)
    ratio = np.array([[0.5, 2.0, 1.0, 0.0]], np.float32)
    got = ol.ratio_weighted_nll(nll, ratio, MASK[:1])
    np.testing.assert_allclose(got, [(0.5 * 2 + 2 * 1 + 1 * 4) / 3], rtol=1e-6)


def test_dynamic_selection_picks_the_lowest_weighted():
    omega = jnp.asarray([0.3, -1.0, 2.0, -1.0, 0.5, -2.0, 1.0, 0.0])
    for kind in ("softmax", "sigmoid"):
        got = refresh.select_questions(jax.random.key(0), omega, n=3, mode="dynamic",
                                       weighting=kind)
        assert sorted(np.asarray(got).tolist()) == [1, 3, 5]
    picks = {int(refresh.select_questions(jax.random.key(k), omega, n=2, mode="dynamic",
                                     weighting="softmax")[1]) for k in range(16)}
    assert picks == {1, 3}  # the tie between ids 1 and 3 is broken at random
    rand = np.asarray(refresh.select_questions(jax.random.key(1), omega, n=5, mode="random",
                                          weighting="softmax"))
    assert len(set(rand.tolist())) == 5 and rand.min() >= 0 and rand.max() < 8


def test_config_checks():
    with pytest.raises(ValueError, match="fraction"):
        ol.OnlineConfig(every=1, fraction=0.0)
    with pytest.raises(ValueError, match="clip"):
        ol.OnlineConfig(clip=0.0)
    from jbilevel.experiment import ExperimentConfig

    with pytest.raises(ValueError, match="on top of bmo or bds"):
        ExperimentConfig(method=MethodConfig(method="sft"), online=ol.OnlineConfig(every=5))


# ---------------------------------------------------------------- a tiny LM on the quality task
# One (2, 4)-mesh setup shared by the tests below: LM steps take seconds to compile here.

ONLINE = ol.OnlineConfig(every=3, fraction=0.25, num_samples=2, batch_size=8, max_new_tokens=5)


class Setup:
    """Task, model, mesh, refresher, shardings and compiled online steps for one method."""

    def __init__(self, task, model, method: MethodConfig, online: ol.OnlineConfig = ONLINE,
                 sharded: bool = True, buckets: int = 1):
        self.task, self.model, self.method = task, model, method
        self.mesh = (sh.make_mesh(sh.MeshConfig(data=2, fsdp=4, tensor=1)) if sharded else
                     sh.make_mesh(sh.MeshConfig(data=1), jax.devices()[:1]))
        rules = sh.AxisRules()
        self.refresher = refresh.Refresher(online, model, task.train, weighting=method.weighting,
                                           batch_sharding=sh.batch_sharding(self.mesh, rules, 1),
                                           buckets=buckets)
        shapes = jax.eval_shape(self.init)
        self.state_sh = train.state_shardings(self.mesh, rules, shapes, model.param_axes(),
                                              method).replace(
            online=ol.buffer_shardings(self.mesh, rules, shapes.online))
        self.loss = lm_example_loss(model.forward)
        self.logprobs = jax.jit(functools.partial(ol.token_logprobs, model.forward))
        steps = ol.make_online_steps(self.loss, model.forward, method, online)
        self.compiled = train.compile_steps(steps, method, self.mesh, rules, self.state_sh)

    def init(self):
        state = init_state(self.model.init(jax.random.key(0)), len(self.task.train), self.method)
        return state.replace(online=self.refresher.init_buffer())

    def fresh(self):
        return jax.jit(self.init, out_shardings=self.state_sh)()

    def put(self, batch):
        return jax.device_put(batch, self.compiled.batch_sharding)


@pytest.fixture(scope="module")
def lm():
    from jbilevel.data import make_task
    from jbilevel.models import ModelConfig, build

    task = make_task("quality", seed=0, n_train=24, n_val=8, n_test=8)
    tok = task.tokenizer
    model = build(ModelConfig(vocab_size=tok.vocab_size, hidden_size=16, num_layers=1,
                              num_heads=2, intermediate_size=32, max_position_embeddings=64,
                              eos_token_id=tok.eos_id, pad_token_id=tok.pad_id))
    return task, model


@pytest.fixture(scope="module")
def bmo(lm):
    """bmo + online with sigmoid weights (only ids in a batch get an omega gradient)."""
    return Setup(*lm, MethodConfig(method="bmo", weighting="sigmoid", lr_omega=0.1))


def test_online_batch_must_split_over_the_mesh(lm):
    from jbilevel.config import ConfigError

    task, model = lm
    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=4, tensor=1))
    batch_sh = sh.batch_sharding(mesh, sh.AxisRules(), 1)
    online = ol.OnlineConfig(every=3, fraction=0.5, num_samples=2, batch_size=12)
    with pytest.raises(ConfigError, match="online.batch_size=12 is not divisible by the mesh's "
                       "data-parallel size 8"):
        refresh.Refresher(online, model, task.train, weighting="sigmoid",
                          batch_sharding=batch_sh)
    one = sh.batch_sharding(sh.make_mesh(sh.MeshConfig(data=1), jax.devices()[:1]),
                            sh.AxisRules(), 1)
    assert refresh.Refresher(online, model, task.train, weighting="sigmoid",
                             batch_sharding=one).capacity == 24


def test_refresh_stores_sampling_logprobs_and_unchanged_model_gives_sft_loss(bmo):
    task, model = bmo.task, bmo.model
    state, metrics = bmo.refresher(bmo.fresh(), 0)
    buf = jax.device_get(state.online)
    assert bmo.refresher.capacity == 16 and buf.valid.sum() == 12  # 6 questions x 2, 2 slots pad
    assert metrics["online_refreshed"] == 6 and int(buf.born) == 0
    assert float(jnp.sum(ol.draw(state.online, jax.random.key(0), 12)["valid"])) == 12
    # the stored log-probs are the sampling model's: at the same theta, ratio 1 on every token
    logp = bmo.logprobs(state.theta, buf.batch())
    mask = buf.loss_mask > 0
    assert mask.sum() > 12 and not mask[buf.valid == 0].any()
    np.testing.assert_allclose(np.asarray(logp)[mask], buf.logp[mask], atol=2e-5)
    ratio, _ = ol.importance_ratio(logp, buf.logp, buf.loss_mask, kind="per_sequence", clip=10.0,
                                   floor=-10.0)
    np.testing.assert_allclose(np.asarray(ratio)[mask], 1.0, atol=1e-4)
    # so a generated row's loss is the plain SFT loss on its tokens, times its mixing scale
    mixed_loss = jax.jit(ol.online_example_loss(bmo.loss, model.forward))
    off = task.train.batch(np.arange(8), task.train.max_len)
    both = ol.combine(off, {**buf.batch(), "ratio": np.asarray(ratio)}, 0.25)
    got = np.asarray(mixed_loss(state.theta, both))
    loss = jax.jit(bmo.loss)
    want_off, want_gen = loss(state.theta, off), loss(state.theta, buf.batch())
    n_off, n_gen = 8, 12
    want = np.concatenate([want_off * 0.75 * (n_off + n_gen) / n_off,
                           want_gen * 0.25 * (n_off + n_gen) / n_gen])
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # and the valid-row mean is 0.75 mean_offline + 0.25 mean_generated
    valid = np.asarray(both["valid"])
    gen_mean = (np.asarray(want_gen) * buf.valid).sum() / n_gen
    np.testing.assert_allclose((got * valid).sum() / valid.sum(),
                               0.75 * np.mean(want_off) + 0.25 * gen_mean, rtol=1e-5)


def test_refresh_ends_each_sample_at_any_end_token_of_the_model(bmo):
    """A model may end its turn with a token other than the tokenizer's eos (Gemma's
    <end_of_turn>, listed in its generation_config.json: ``tokenizer.stop_ids``): the refresh
    stops each sample at the first of them, where it stops at eos (kept, with a loss)."""
    import copy
    import dataclasses

    def responses(dataset):
        ref = refresh.Refresher(ONLINE, bmo.model, dataset, weighting="sigmoid",
                                batch_sharding=bmo.refresher.batch_sharding)
        buf = jax.device_get(ref(bmo.fresh(), 0)[0].online)
        return [list(row[m > 0]) for row, m, v in zip(buf.labels, buf.loss_mask, buf.valid,
                                                      strict=True) if v]

    plain = responses(bmo.task.train)
    eos = bmo.task.tokenizer.eos_id
    inner = [t for r in plain for t in r[:-1] if t != eos]  # a token some sample goes past
    end = max(set(inner), key=inner.count)
    tokenizer = copy.copy(bmo.task.tokenizer)
    tokenizer.stop_ids = (eos, end)
    cut = responses(dataclasses.replace(bmo.task.train, tokenizer=tokenizer))
    assert cut == [r[:r.index(end) + 1] if end in r else r for r in plain]
    assert sum(len(a) < len(b) for a, b in zip(cut, plain, strict=True)) > 0
    a = tokenizer.encode("a")[0]
    assert tokenizer.decode([a, end, a]) == "a"  # and the logged text ends there


def test_sampler_denominator_stores_the_tempered_logprobs(bmo):
    online = ol.OnlineConfig(every=3, fraction=0.25, num_samples=2, batch_size=8,
                             max_new_tokens=5, temperature=0.5, denominator="sampler")
    ref = refresh.Refresher(online, bmo.model, bmo.task.train, weighting="sigmoid",
                       batch_sharding=bmo.refresher.batch_sharding)
    state, _ = ref(bmo.fresh(), 0)
    buf = jax.device_get(state.online)
    logits = jax.jit(bmo.model.forward)(state.theta, buf.input_ids,
                                        attention_mask=buf.attention_mask)
    tempered = jax.nn.log_softmax(logits / 0.5, axis=-1)
    want = np.take_along_axis(np.asarray(tempered), buf.labels[..., None], axis=-1)[..., 0]
    mask = buf.loss_mask > 0
    np.testing.assert_allclose(buf.logp[mask], want[mask], atol=5e-5)
    untempered = bmo.logprobs(state.theta, buf.batch())
    assert np.abs(np.asarray(untempered)[mask] - buf.logp[mask]).max() > 0.1  # not these


def test_log_ratios_in_sampler_sized_passes_equal_one_pass(bmo):
    """generations.jsonl's ratios go through the buffer a sampler call's rows at a time (one
    forward over the whole buffer would not fit at LLM scale): the same as one pass."""
    state, _ = bmo.refresher(bmo.fresh(), 0)
    theta = jax.tree.map(lambda a: a * 1.5, state.theta)  # moved: ratios away from 1
    buf = jax.device_get(state.online)

    def ratios(rows):
        return jax.jit(functools.partial(refresh.row_ratios, bmo.model, ONLINE,
                                         rows=rows))(theta, state.online)

    logp = bmo.logprobs(theta, buf.batch())
    ratio, _ = ol.importance_ratio(logp, buf.logp, buf.loss_mask, kind=ONLINE.ratio,
                                   clip=ONLINE.clip, floor=ONLINE.floor)
    want = np.asarray(ratio).sum(-1) / np.maximum(buf.loss_mask.sum(-1), 1.0)
    valid = buf.valid > 0
    assert np.abs(want[valid] - 1.0).max() > 0.01
    for rows in (16, 8, 2):  # one pass; one row per device per pass; uneven over the devices
        got_ratio, got_logp = ratios(rows)
        np.testing.assert_allclose(got_ratio, want, rtol=2e-5)
        np.testing.assert_allclose(got_logp, buf.logp.sum(-1), rtol=1e-6)
    with pytest.raises(ValueError, match="rows=3 must divide the buffer's 16 rows"):
        ratios(3)


def _question_split(state, n):
    in_buffer = set(np.asarray(state.online.ids)[np.asarray(state.online.valid) > 0].tolist())
    offline = [i for i in range(n) if i not in in_buffer][:8]
    return in_buffer, offline, set(range(n)) - in_buffer - set(offline)


def test_bmo_generated_rows_move_their_question_weight(bmo):
    """Omega of a question that is in the buffer but not in the offline batch moves only
    through its generated rows (sigmoid weights: ids outside the batch get no gradient)."""
    task = bmo.task
    state, _ = bmo.refresher(bmo.fresh(), 0)
    in_buffer, offline, untouched = _question_split(state, len(task.train))
    state, metrics = bmo.compiled.train(
        state, bmo.put(task.train.batch(offline, task.train.max_len)),
        bmo.put(task.validation.batch(np.arange(8), task.validation.max_len)))
    omega = np.asarray(state.omega)
    assert all(omega[i] == 0 for i in untouched) and all(omega[i] != 0 for i in in_buffer)
    np.testing.assert_allclose(metrics["online_ratio_mean"], 1.0, atol=1e-4)  # theta unchanged
    assert metrics["online_clipped"] == 0 and np.isfinite(metrics["online_gen_loss"])


@pytest.mark.parametrize("sharded", [False, True])
def test_bds_hypergradient_reaches_questions_through_generated_rows(lm, sharded):
    """A hyper batch of 8 of the 24 training rows takes a third of the buffer (a draw of 4 of
    its 12 rows; on the (2, 4) mesh 8, one per device): the weights that move are those of
    the offline rows and of the drawn rows' questions, whose only way in is their generated
    rows."""
    s = Setup(*lm, MethodConfig(method="bds", weighting="sigmoid", lr_omega=0.1,
                                 hypergrad=Implicit("cg", maxiter=2, tol=0.0, ridge=10.0)),
              sharded=sharded)
    task = s.task
    state, _ = s.refresher(s.fresh(), 0)
    in_buffer, offline, _ = _question_split(state, len(task.train))
    ways = sh.data_parallel_size(s.mesh, sh.AxisRules())
    rows = ol.hyper_buffer_rows(12, len(offline), len(task.train), ways)
    assert rows == (8 if sharded else 4)
    # the key make_online_steps (seed 0) draws this step's buffer rows with
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 2), state.step)
    drawn = ol.draw(state.online, key, rows)
    reached = set(np.asarray(drawn["ids"]).tolist())
    assert reached < in_buffer and np.all(drawn["valid"] == 1)
    state, _ = s.compiled.hyper(
        state, s.put(task.train.batch(offline, task.train.max_len)),
        s.put(task.validation.batch(np.arange(8), task.validation.max_len)))
    moved = set(np.flatnonzero(np.asarray(state.omega)).tolist())
    assert moved == set(offline) | reached


def test_hyper_buffer_takes_the_hyper_batch_share_of_the_buffer():
    """All of the buffer when the hyper batch is every training row; else the same share,
    drawn among the valid rows only (and every valid row when there are no more than that)."""
    assert ol.hyper_buffer_rows(400, 2000, 2000) == ol.hyper_buffer_rows(400, 2048, 2000) == 400
    assert ol.hyper_buffer_rows(400, 512, 2000) == 103  # ceil(400 * 512 / 2000)
    assert ol.hyper_buffer_rows(40_000, 512, 100_000) == 205
    assert ol.hyper_buffer_rows(8, 1, 1000) == 1
    assert ol.hyper_buffer_rows(400, 512, 2000, ways=8) == 104  # 103, as many per device
    assert ol.hyper_buffer_rows(16, 1, 1000, ways=8) == 8
    buffer = ol.init_buffer(12, 4)
    ids = np.arange(12, dtype=np.int32) + 100
    full = buffer.replace(ids=jnp.asarray(ids), valid=jnp.ones(12, jnp.float32))
    key = jax.random.key(3)
    assert np.array_equal(ol.hyper_buffer(full, key, 24, 24)["ids"], ids)  # the whole buffer
    drawn = np.asarray(ol.hyper_buffer(full, key, 6, 24)["ids"])  # a quarter: 3 distinct rows
    assert len(drawn) == len(set(drawn)) == 3 and set(drawn) <= set(ids)
    other = np.asarray(ol.hyper_buffer(full, jax.random.key(4), 6, 24)["ids"])
    assert set(other) != set(drawn)  # a fresh draw each time
    two_valid = full.replace(valid=jnp.asarray((ids % 6 == 0).astype(np.float32)))  # 102, 108
    rows = ol.hyper_buffer(two_valid, key, 6, 24)
    assert len(rows["ids"]) == 3 and float(np.sum(rows["valid"])) == 2
    assert {int(i) for i, v in zip(rows["ids"], rows["valid"], strict=True) if v} == {102, 108}


def _train(setup, total, ckpt_dir=None, offline_until=0):
    """``setup``'s run to step ``total`` (resumed from ``ckpt_dir``'s checkpoint if it has
    one): the final state, the step reached and the logged records."""
    from jbilevel.data import Batcher

    task = setup.task
    buckets = (task.train.max_len,)
    data = Batcher(task.train, 8, seed=0, buckets=buckets)
    val = Batcher(task.validation, 8, seed=1, buckets=buckets)
    loop = train.LoopConfig(steps=total, log_every=1, checkpoint_every=0, progress=False)
    ckpt = Checkpointer(ckpt_dir) if ckpt_dir else None
    if ckpt is None:
        state, start = setup.fresh(), 0
    else:
        state, start, _ = train.restore_or_init(ckpt, setup.init, setup.state_sh,
                                             train.data_sources(data, val))
    records = []
    state, step = train.run(setup.compiled, setup.method, loop, state, data, val,
                            start_step=start, ckpt=ckpt, before_step=setup.refresher,
                            offline_until=offline_until,
                            train_args=setup.refresher and setup.refresher.train_args,
                            on_log=lambda at, r: records.append((at, r)))
    if ckpt is not None:
        ckpt.close()
    return jax.device_get(state), step, records


def _same_run(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_before_the_first_refresh_online_trains_as_offline(bmo):
    """Until online.start the buffer is empty and the trainer runs the offline step: a run
    whose first refresh never comes ends where offline bmo does, to the bit, and its records
    carry no online_* numbers."""
    import dataclasses
    from types import SimpleNamespace

    from jbilevel.algorithms import make_steps

    late = Setup(bmo.task, bmo.model, bmo.method, dataclasses.replace(ONLINE, start=100))
    plain_sh = late.state_sh.replace(online=None)
    plain = SimpleNamespace(  # offline bmo, as _train needs it
        task=bmo.task, method=bmo.method, refresher=None, state_sh=plain_sh,
        compiled=train.compile_steps(make_steps(bmo.loss, bmo.method), bmo.method, late.mesh,
                                     sh.AxisRules(), plain_sh),
        fresh=jax.jit(lambda: late.init().replace(online=None), out_shardings=plain_sh))
    got, _, records = _train(late, 3, offline_until=100)
    want, _, _ = _train(plain, 3)
    assert int(got.online.born) == -1  # never refreshed
    _same_run(got.replace(online=None), want)
    assert len(records) == 3 and not any(k.startswith("online_")
                                         for _, r in records for k in r)


def _marked_empty_buffer(setup):
    """A fresh state whose (empty) buffer rows all hold a marker token no task row holds, and
    a forward of the model that appends to ``seen`` how many marked rows each call gets
    (``jax.debug.callback`` fires only in the branch taken)."""
    model = setup.model
    mark = model.config.vocab_size - 1
    for split in (setup.task.train, setup.task.validation):
        rows = split.batch(np.arange(len(split)), split.max_len)["input_ids"]
        assert not np.any(np.all(np.asarray(rows) == mark, axis=-1))
    state = setup.fresh()
    state = state.replace(online=state.online.replace(
        input_ids=jnp.full_like(state.online.input_ids, mark)))
    assert float(jnp.sum(state.online.valid)) == 0
    seen = []

    def counting(params, ids, attention_mask=None):
        jax.debug.callback(lambda n: seen.append(int(n)),
                           jnp.sum(jnp.all(ids == mark, axis=-1)))
        return model.forward(params, ids, attention_mask=attention_mask)

    return state, counting, seen


def test_before_the_first_refresh_the_hypergradient_skips_the_empty_buffer(lm):
    """On the empty buffer online bds's hyper step moves omega as offline bds's does, and
    the model never sees a buffer row (``adjoint.if_any_valid`` around each pass over them:
    the importance ratio's forward, the Hessian's products, the per-row term), where with
    the skip compiled out it sees every one of them. The buffer rows are marked by a token no
    task row holds, and a forward counts them (``jax.debug.callback`` fires only in the
    branch taken)."""
    import contextlib
    from unittest import mock

    from jbilevel import adjoint
    from jbilevel.algorithms.offline import make_steps

    task, model = lm
    lr = 1e4  # SGD on omega, as in the test below: the step reads the hypergradient
    s = Setup(task, model, MethodConfig(method="bds", lr_omega=lr, omega_optim="sgd",
                                        hessian_rows=4, hyper_chunk=5,
                                        hypergrad=Implicit("cg", maxiter=2, tol=0.0,
                                                           ridge=100.0)), sharded=False)
    hyper_b = s.put(task.train.batch(np.arange(len(task.train)), task.train.max_len))
    val_b = s.put(task.validation.batch(np.arange(8), task.validation.max_len))
    start, counting, seen = _marked_empty_buffer(s)

    def hyper_step():
        compiled = train.compile_steps(ol.make_online_steps(s.loss, counting, s.method,
                                                            ONLINE), s.method, s.mesh,
                                       sh.AxisRules(), s.state_sh)
        seen.clear()
        out = compiled.hyper(jax.tree.map(lambda x: x.copy(), start), hyper_b, val_b)
        jax.block_until_ready(out)
        return out, sum(seen)

    (got, metrics), marked = hyper_step()
    run_anyway = lambda _valid, fn, *args, **_: fn(*args)  # noqa: E731
    with contextlib.ExitStack() as stack:
        for module in (ol, adjoint):
            stack.enter_context(mock.patch.object(module, "if_any_valid", run_anyway))
        (computed, _), marked_computed = hyper_step()
    offline = train.compile_steps(make_steps(s.loss, s.method), s.method, s.mesh,
                                  sh.AxisRules(), s.state_sh)
    want, _ = offline.hyper(jax.tree.map(lambda x: x.copy(), start), hyper_b, val_b)
    assert float(metrics["hyper_taken"]) == 1.0
    d_want = (start.omega - want.omega) / lr
    scale = float(jnp.abs(d_want).max())
    assert scale > 0
    for new in (got, computed):
        np.testing.assert_allclose((start.omega - new.omega) / lr, d_want, rtol=1e-4,
                                   atol=1e-5 * scale)
    # computed: the ratio's forward and the per-row term over the 12 buffer rows (15 with
    # the chunks' padding), the Hessian's products over its sample of 4
    assert marked == 0 and marked_computed >= 12 + 12 + 4


@pytest.mark.parametrize("method", ["bds", "bmo"])
def test_online_train_step_takes_a_pass_per_group_and_skips_the_empty_buffer(lm, method):
    """The online train step takes one reverse pass over the offline rows and one over the
    generated rows (``adjoint.grouped_value_and_grad``): after a refresh it moves theta (and
    bmo's omega) as one pass over the combined batch does; on the empty buffer the model never
    sees a buffer row, where with the skip compiled out it sees every drawn one, and the step
    moves theta as the offline step does. Buffer rows are marked by a token no task row
    holds, and a forward counts them (``jax.debug.callback`` fires only in the branch
    taken)."""
    import contextlib
    from unittest import mock

    from jbilevel import adjoint
    from jbilevel.algorithms.offline import make_steps

    task, model = lm
    s = Setup(task, model, MethodConfig(method=method, weighting="sigmoid", lr_omega=0.1),
              sharded=False)
    copy = lambda state: jax.tree.map(lambda x: x.copy(), state)  # noqa: E731 (donated)
    batch = s.put(task.train.batch(np.arange(8), task.train.max_len))
    val = (s.put(task.validation.batch(np.arange(8), task.validation.max_len)),) * (
        method == "bmo")
    full, _ = s.refresher(s.fresh(), 0)

    def one_pass(state, batch, *val):  # the step over the combined batch (earlier versions)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 1), state.step)
        gen = ol.draw(state.online, key, ONLINE.batch_size)
        ratio, _ = ol.importance_ratio(ol.token_logprobs(model.forward, state.theta, gen),
                                       gen["logp"], gen["loss_mask"], kind=ONLINE.ratio,
                                       clip=ONLINE.clip, floor=ONLINE.floor)
        both = ol.combine(batch, {**gen, "ratio": ratio}, ONLINE.gen_weight)
        steps = make_steps(ol.online_example_loss(s.loss, model.forward), s.method)
        return steps.train(state, both, *val)

    def same_step(got, want, metrics, want_metrics):
        for k in ("loss", "weighted_loss", "grad_norm"):
            np.testing.assert_allclose(metrics[k], want_metrics[k], rtol=1e-5)
        # Adam's first step is about lr times the gradient's sign: a rounding difference
        # moves only coordinates whose gradient is near Adam's epsilon
        for a, b in zip(jax.tree.leaves(got.theta), jax.tree.leaves(want.theta), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * s.method.lr_theta)
        np.testing.assert_allclose(got.omega, want.omega, rtol=0, atol=1e-3 * s.method.lr_omega)

    got, metrics = s.compiled.train(copy(full), batch, *val)
    want, want_metrics = jax.jit(one_pass)(copy(full), batch, *val)
    assert float(metrics["grad_norm"]) > 0
    same_step(got, want, metrics, want_metrics)
    if method == "bmo":
        assert not np.array_equal(got.omega, full.omega)

    empty, counting, seen = _marked_empty_buffer(s)

    def empty_step():
        compiled = train.compile_steps(ol.make_online_steps(s.loss, counting, s.method, ONLINE),
                                       s.method, s.mesh, sh.AxisRules(), s.state_sh)
        seen.clear()
        out = compiled.train(copy(empty), batch, *val)
        jax.block_until_ready(out)
        offline = compiled.train_offline(copy(empty), batch, *val)
        return out, offline, sum(seen)

    (got, metrics), (want, want_metrics), marked = empty_step()
    with contextlib.ExitStack() as stack:
        for module in (ol, adjoint):
            stack.enter_context(mock.patch.object(module, "if_any_valid",
                                                  lambda _valid, fn, *args, **_: fn(*args)))
        (computed, _), _, marked_computed = empty_step()
    assert marked == 0 and marked_computed >= ONLINE.batch_size  # the ratio's forward, the pass
    same_step(got, want, metrics, want_metrics)
    for a, b in zip(jax.tree.leaves(computed.theta), jax.tree.leaves(got.theta), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * s.method.lr_theta)


@pytest.mark.parametrize("hessian_rows", [0, 4])
def test_chunked_online_hypergradient_equals_the_whole_batch_one(bmo, hessian_rows):
    """Online bds's hyper step (chunks of 5 rows, offline and generated separately) moves
    omega by jbilevel.hypergrad's answer on the combined batch when the Hessian sees every
    row; with a 4-row Hessian sample, by the same solve on the sample and one unchunked JVP of
    the combined batch's losses."""
    import jbilevel
    from jbilevel.adjoint import adjoint, weight_vjp
    from jbilevel.algorithms.offline import hessian_sample, make_steps
    from jbilevel.objectives import inner_objective, outer_objective

    task, model = bmo.task, bmo.model
    state, _ = bmo.refresher(bmo.fresh(), 0)
    theta = jax.device_get(state.theta)
    buf = jax.device_get(state.online).batch()
    ratio = np.where(buf["loss_mask"] > 0, np.linspace(0.5, 1.5, buf["loss_mask"].size).reshape(
        buf["loss_mask"].shape), 0.0).astype(np.float32)
    gen = {**buf, "ratio": ratio}
    off = task.train.batch(np.arange(len(task.train)), task.train.max_len)
    both = ol.combine(off, gen, 0.3)
    omega = jnp.asarray(np.random.RandomState(0).normal(size=len(task.train)), jnp.float32)
    # ridge 100: (H + ridge I) positive definite on the 4-row sample too (at ridge 10 CG meets
    # negative curvature there, and the guarded step is not taken)
    solve = Implicit("cg", maxiter=3, tol=0.0, ridge=100.0)
    # SGD on omega: the step is -lr d_omega (a large lr, so omega's own rounding is small
    # next to the step)
    lr = 1e4
    method = MethodConfig(method="bds", hessian_rows=hessian_rows, hyper_chunk=5,
                          hypergrad=solve, omega_optim="sgd", lr_omega=lr)
    mixed = ol.online_example_loss(bmo.loss, model.forward)
    steps = make_steps(mixed, method, hyper_rows=ol.hyper_rows(bmo.loss, model.forward, method,
                                                                0.3))
    start = init_state(theta, len(task.train), method).replace(omega=omega)
    val = task.validation.batch(np.arange(8), task.validation.max_len)
    new, metrics = jax.jit(steps.hyper)(start, both, val)
    assert float(metrics["hyper_taken"]) == 1.0
    got = (omega - new.omega) / lr

    inner, outer = inner_objective(mixed, weighting="softmax"), outer_objective(bmo.loss)
    hessian = ol.combine(hessian_sample(off, method), hessian_sample(gen, method), 0.3)
    assert (hessian["ids"].shape[0] == both["ids"].shape[0]) == (hessian_rows == 0)
    # the reference: jbilevel.hypergrad on the whole combined batch; with a sample, the same
    # solve on the sample and one unchunked JVP of the combined batch's losses
    if hessian_rows == 0:
        want = jax.jit(lambda t, o: jbilevel.hypergrad(inner, outer, t, o, both, val,
                                                       method=solve))(theta, omega)
    else:
        @jax.jit
        def want_fn(theta, omega):
            v, _ = adjoint(inner, outer, theta, omega, hessian, val, solve)
            u_B = jax.jvp(lambda th: mixed(th, both), (theta,), (v,))[1]
            return weight_vjp("softmax", omega, both["ids"], u_B, both["valid"])

        want = want_fn(theta, omega)
    scale = float(jnp.abs(want).max())
    assert scale > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


def test_interrupted_online_run_resumes_exactly(bmo, tmp_path):
    """Refresh every 3 steps: a run stopped after step 7 (its checkpoint holds the step-6
    buffer) and resumed to 10 ends bit-identical to a straight run, refresh at 9 included."""
    first, step, _ = _train(bmo, 7, tmp_path / "c")
    assert step == 7 and int(first.online.born) == 6
    resumed, step, records = _train(bmo, 10, tmp_path / "c")
    straight, _, straight_records = _train(bmo, 10)
    assert step == 10 and int(resumed.online.born) == 9
    _same_run(resumed, straight)
    assert not np.array_equal(resumed.online.input_ids, first.online.input_ids)  # refreshed
    last, want = records[-1], straight_records[-1]
    assert last[0] == want[0] == 10 and last[1]["online_refreshed"] == 6
    for k in want[1]:
        if k not in ("steps_per_s", "tokens_per_s"):  # times
            assert last[1][k] == want[1][k], k
    # the step trains on its generated rows' tokens too: counted, and in the rate
    assert last[1]["online_tokens"] > 0 and last[1]["tokens_per_s"] > 0


def test_resume_before_the_first_refresh_switches_to_the_online_step(bmo, tmp_path):
    """First refresh at step 4: a run stopped after step 2 (offline steps, empty buffer) and
    resumed to 6 trains offline until 4 and online from there, bit-identical to a straight
    run."""
    import dataclasses

    late = Setup(bmo.task, bmo.model, bmo.method, dataclasses.replace(ONLINE, start=4))
    first, step, _ = _train(late, 2, tmp_path / "c", offline_until=4)
    assert step == 2 and int(first.online.born) == -1
    resumed, step, records = _train(late, 6, tmp_path / "c", offline_until=4)
    straight, _, straight_records = _train(late, 6, offline_until=4)
    assert step == 6 and int(resumed.online.born) == 4
    _same_run(resumed, straight)
    online = [at for at, r in straight_records if "online_ratio_mean" in r]
    assert online == [5, 6] and [at for at, r in records if "online_ratio_mean" in r] == online


@pytest.mark.parametrize("theta", ["full", "lora"])
def test_cli_trains_online_and_logs_generations(tmp_path, capsys, theta):
    import json
    import re

    from jbilevel import cli

    path = tmp_path / "run.yaml"
    path.write_text(
        "task:\n  options: {n_train: 32, n_val: 16, n_test: 16}\n"
        "model: {hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32}\n"
        "method: {method: bmo}\n"
        "online: {every: 2, start: 1, fraction: 0.25, num_samples: 2, batch_size: 8,\n"
        "         max_new_tokens: 4}\n"
        "batch_size: 16\nval_batch_size: 16\neval_batch_size: 16\n")
    out = tmp_path / "o"
    args = ["train", "--config", str(path), "--out", str(out), "loop.steps=4",
            "loop.log_every=1", "loop.progress=false", "loop.checkpoint_every=2",
            f"theta.kind={theta}", "data.length_buckets=2"]
    assert cli.main(args) == 0
    # the generated rows' length buckets (one here: every row is shorter than 64 tokens)
    said = capsys.readouterr().err
    assert re.search(r"online refresh at step 1: 8 questions, .*; train steps draw them from "
                     r"16 rows of 1-\d+ tokens \(", said), said
    result = json.loads((out / "results.json").read_text())
    assert result["online"] is True and result["steps"] == 4 and result["theta"] == theta
    assert (out / "adapter").is_dir() == (theta == "lora")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "online_refreshed" not in records[0]  # step 1 trained offline only (start: 1)
    # ... with the offline step: nothing is drawn from the still empty buffer
    assert "online_ratio_mean" not in records[0] and "online_ratio_mean" in records[1]
    assert records[-1]["online_refreshed"] == 8 and "online_gen_accuracy" in records[-1]
    # each record names the refresh its online_gen_* numbers come from (logged until the next)
    assert [r.get("online_refresh_step") for r in records] == [None, 1, 1, 3]
    # refreshes before steps 2 and 4: the first rows are logged when replaced, the second at
    # the end; 8 questions x 2 samples each time
    rows = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert [(r["step"], r["generated_at"]) for r in rows] == [(3, 1)] * 16 + [(4, 3)] * 16
    assert {"id", "sample", "text", "ratio", "weight", "logp"} <= set(rows[0])

    # resumed from step 2's checkpoint (as after a kill at step 3): the refresh before step 3
    # and the end log their rows again, and generations.jsonl holds each once, as before
    import shutil

    logged = (out / "generations.jsonl").read_text()
    shutil.rmtree(out / "checkpoints" / "4")
    (out / "results.json").unlink()
    capsys.readouterr()
    assert cli.main(args) == 0
    assert ("dropped the records logged after the checkpoint of step 2, which the resumed run "
            "logs again: metrics.jsonl 2, generations.jsonl 32") in capsys.readouterr().err
    assert (out / "generations.jsonl").read_text() == logged
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text()
                                   .splitlines())] == [1, 2, 3, 4]


@pytest.mark.parametrize("method", ["bmo", "bds"])
def test_lora_online_samples_and_trains_through_the_adapters(lm, method):
    """LoRA adapters over a frozen base (fsdp-split like their kernels): the refresh samples
    through the adapters, unmerged (the stored log-probs are the adapted model's, not the
    base's), and the train and hypergradient steps equal those of a full-parameter theta
    whose model closes over the base: the frozen base bound at every step, for the offline
    rows, the generated rows' ratios and losses and the hypergradient's rows."""
    from jbilevel.models import init_lora, lora_axes
    from jbilevel.objectives import lm_lora_example_loss

    task, model = lm
    # SGD at 1 on the weight logits: a step moves them by minus their gradient (Adam's first
    # step would move each by about its step size, whatever the gradient)
    method_cfg = MethodConfig(method=method, weighting="sigmoid", lr_omega=1.0,
                              omega_optim="sgd",
                              hypergrad=Implicit("cg", maxiter=2, tol=0.0, ridge=10.0))
    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=4, tensor=1))
    rules = sh.AxisRules()
    base = model.init(jax.random.key(0))
    adapters = init_lora(model, jax.random.key(1), rank=2, alpha=4.0,
                         targets=("q_proj", "v_proj", "up_proj"))
    adapters = jax.tree.map(  # B away from 0: the adapted model is not the base
        lambda x: x + 0.5 * jax.random.normal(jax.random.key(2), x.shape), adapters)
    refresher = refresh.Refresher(ONLINE, model, task.train, weighting="sigmoid",
                                  batch_sharding=sh.batch_sharding(mesh, rules, 1))
    n = len(task.train)

    def init(frozen):
        state = init_state(adapters, n, method_cfg, frozen=base if frozen else None)
        return state.replace(online=refresher.init_buffer())

    def compiled(frozen):
        shapes = jax.eval_shape(lambda: init(frozen))
        state_sh = train.state_shardings(
            mesh, rules, shapes, lora_axes(model.config, adapters), method_cfg,
            frozen_axes=model.param_axes() if frozen else None).replace(
            online=ol.buffer_shardings(mesh, rules, shapes.online))
        if frozen:
            steps = ol.make_online_steps(lm_lora_example_loss(model), model, method_cfg, ONLINE,
                                         frozen=True)
        else:  # theta = the adapters, the base a constant of the model's forward
            def forward(params, ids, attention_mask=None):
                return model.forward(base, ids, attention_mask=attention_mask, lora=params)

            steps = ol.make_online_steps(lm_example_loss(forward), forward, method_cfg, ONLINE)
        run = train.compile_steps(steps, method_cfg, mesh, rules, state_sh)
        return run, jax.jit(lambda: init(frozen), out_shardings=state_sh)()

    lora_run, state = compiled(True)
    state, metrics = refresher(state, 0)
    rows = jax.device_get(state.online.batch())
    mask = rows["loss_mask"] > 0
    assert metrics["online_refreshed"] == 6 and mask.sum() > 0
    adapted = np.asarray(ol.token_logprobs(model, adapters, rows, base))
    np.testing.assert_allclose(rows["logp"][mask], adapted[mask], atol=2e-5)
    alone = np.asarray(ol.token_logprobs(model, base, rows))
    assert np.abs(alone[mask] - adapted[mask]).max() > 1e-2  # the adapters counted

    closed_run, closed = compiled(False)
    closed = closed.replace(online=state.online)
    copy = functools.partial(jax.tree.map, jnp.copy)  # the steps donate their state
    batch = jax.device_put(task.train.batch(np.arange(8), task.train.max_len),
                           lora_run.batch_sharding)
    val = jax.device_put(task.validation.batch(np.arange(8), task.validation.max_len),
                         lora_run.batch_sharding)
    outs = []
    for run, s in ((lora_run, state), (closed_run, closed)):
        args = (batch, val) if method == "bmo" else (batch,)
        after, train_metrics = run.train(copy(s), *args)
        out = [after.theta, after.omega, train_metrics]
        if method == "bds":
            after, hyper_metrics = run.hyper(copy(s), batch, val)
            out += [after.omega, hyper_metrics]
        outs.append(jax.device_get(out))
    assert outs[0][2]["online_gen_loss"] > 0 and abs(outs[0][2]["online_ratio_mean"] - 1) < 1e-4
    for got, want in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    if method == "bds":
        assert np.abs(outs[0][3]).max() > 0  # the hypergradient moved the weights


def test_online_hypergradient_with_offline_rows_cut_to_their_length(bmo):
    """data.length_buckets under online bds: the offline rows, sorted by length, take their u
    in blocks cut to their lengths; the step equals the uncut one."""
    from jbilevel.algorithms.offline import make_steps
    from jbilevel.data.batching import length_blocks, length_buckets

    task, model = bmo.task, bmo.model
    state, _ = bmo.refresher(bmo.fresh(), 0)
    n = len(task.train)
    order = np.argsort(-task.train.length_N, kind="stable")
    off = task.train.batch(order, task.train.max_len)
    blocks = length_blocks(task.train.length_N, n,
                           length_buckets(task.train.length_N, 3, multiple=4,
                                          top=task.train.max_len))
    assert len(blocks) >= 2
    both = ol.combine(off, jax.device_get(state.online).batch() | {"ratio": np.ones_like(
        jax.device_get(state.online).loss_mask)}, 0.3)
    method = MethodConfig(method="bds", hessian_rows=0, hyper_chunk=5, omega_optim="sgd",
                          lr_omega=1e4, hypergrad=Implicit("cg", maxiter=3, tol=0.0,
                                                           ridge=100.0))
    mixed = ol.online_example_loss(bmo.loss, model.forward)
    val = task.validation.batch(np.arange(8), task.validation.max_len)
    start = init_state(jax.device_get(state.theta), n, method)
    new = {}
    for cut in (None, blocks):
        steps = make_steps(mixed, method, hyper_rows=ol.hyper_rows(
            bmo.loss, model.forward, method, 0.3, blocks=cut))
        new[cut is None], metrics = jax.jit(steps.hyper)(start, both, val)
        assert float(metrics["hyper_taken"]) == 1.0
    assert float(jnp.abs(new[True].omega).max()) > 0
    np.testing.assert_allclose(new[False].omega, new[True].omega, rtol=1e-4, atol=1e-6)


def _four_prompt_lengths(n_train: int, n_val: int, repeats, hidden: int, layers: int):
    """The quality task with question ``k`` lengthened by ``repeats(k)`` words (prompts of up to
    256 tokens), and a model of ``hidden`` x ``layers`` that takes them: (task, train set,
    model)."""
    from jbilevel.data import load_sft, make_task
    from jbilevel.data.tasks import TASK_TEMPLATE
    from jbilevel.models import ModelConfig, build

    task = make_task("quality", seed=0, n_train=n_train, n_val=n_val, n_test=n_val)
    rows = [{**r, "question": "Please, " * repeats(k) + r["question"]}
            for k, r in enumerate(task.train.rows)]
    train_set = load_sft(rows, schema="qa", prompt_template=TASK_TEMPLATE, max_len=256,
                         tokenizer=task.tokenizer)
    tok = task.tokenizer
    model = build(ModelConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_layers=layers,
                              num_heads=2 * layers, intermediate_size=2 * hidden,
                              max_position_embeddings=256, eos_token_id=tok.eos_id,
                              pad_token_id=tok.pad_id))
    return task, train_set, model


def test_sampler_calls_pad_prompts_to_their_length_bucket(monkeypatch):
    """data.length_buckets for the refresh: the selected questions sampled longest prompt
    first, each sampler call's prompts left-padded to the smallest prompt-length bucket that
    holds them; the rows fill the buffer of one row length, each question's responses, sampling
    log-probs and loss tokens those of one length (nucleus of one token: the argmax). Each
    refresh says what it sampled and how long it took."""
    import dataclasses
    import io
    import re

    import jbilevel.models
    from jbilevel.console import Console

    # 4 lengths interleaved, longest first
    task, train_set, model = _four_prompt_lengths(11, 4, lambda k: 7 * ((3 - k) % 4), 32, 2)
    tok = task.tokenizer
    online = dataclasses.replace(ONLINE, fraction=1.0, generate_batch_size=3, top_p=1e-6)
    batch_sharding = sh.batch_sharding(sh.make_mesh(sh.MeshConfig(data=1), jax.devices()[:1]),
                                       sh.AxisRules(), 1)
    method = MethodConfig(method="bmo", lr_theta=1e-3)
    widths, real = [], jbilevel.models.generate

    def spy(model, params, ids, mask, rng, **kw):
        widths.append(ids.shape[1])
        return real(model, params, ids, mask, rng, **kw)

    monkeypatch.setattr(jbilevel.models, "generate", spy)
    said = io.StringIO()

    def refreshed(buckets):
        ref = refresh.Refresher(online, model, train_set, weighting="sigmoid",
                                batch_sharding=batch_sharding, buckets=buckets,
                                console=Console(stream=said))
        state = init_state(model.init(jax.random.key(0)), len(train_set), method)
        buf = jax.device_get(ref(state.replace(online=ref.init_buffer()), 0)[0].online)
        assert buf.input_ids.shape == (12 * 2, ref.length)  # 11 questions, a padding slot
        by_question = {}
        for r in np.flatnonzero(buf.valid):
            keep = buf.attention_mask[r] > 0
            by_question.setdefault(int(buf.ids[r]), []).append(
                (buf.input_ids[r][keep].tolist(), buf.loss_mask[r][keep].tolist(),
                 buf.logp[r][keep]))
        return by_question, buf

    want, one = refreshed(1)
    gen_len = one.loss_mask[one.valid > 0].sum(axis=1).mean()
    # the sampler's program compiled once, within the refresh, and said so
    assert re.fullmatch(r"online refresh at step 0 \.\.\.\ncompiling the sampler \.\.\.\n"
                        r"compiled the sampler in \d+\.\d s\nonline refresh at step 0: 11 "
                        rf"questions, 2 responses each in 4 sampler calls, {gen_len:.1f} tokens "
                        r"a response \(\d+\.\d s\)\n", said.getvalue())
    longest = int(train_set.prompt_len_N.max())
    assert widths == [longest] * 4
    widths.clear()
    said.seek(0), said.truncate()
    got, cut = refreshed(4)
    # one program per prompt width, each named by it after the first; the longest width's is
    # the first refresher's, which this process holds already
    assert re.findall(r"(compiled|found) the sampler(.*?)(?: in | compiled already)",
                      said.getvalue()) == [("found", ""),
                                           ("compiled", " for prompts of 192 tokens"),
                                           ("compiled", " for prompts of 128 tokens")]
    # 3 prompts a call, longest first (3 + 3 + 3 + 2 of the 4 lengths; the padding slot takes
    # the shortest, not question 0, the longest): the prompt lengths' quartiles rounded up to
    # 64 tokens (128, 128, 192) and the longest
    assert widths == [longest, 192, 128, 128]
    prompt_R = train_set.prompt_len_N[cut.ids]
    assert (np.diff(prompt_R[cut.valid > 0]) <= 0).all()  # the buffer's rows longest first
    assert sorted(got) == sorted(want) == list(range(11))
    for q in want:
        for (ids, mask, logp), (ids1, mask1, logp1) in zip(got[q], want[q], strict=True):
            assert ids == ids1 and mask == mask1
            np.testing.assert_allclose(logp, logp1, atol=1e-5)
    for buf in (one, cut):  # every row's tokens first, then padding without attention or loss
        n_R = buf.attention_mask.sum(axis=1)
        after = np.arange(buf.input_ids.shape[1])[None, :] >= n_R[:, None]
        assert (buf.attention_mask[~after] == 1).all() and not buf.loss_mask[after].any()
        assert (buf.input_ids[after] == tok.pad_id).all()


# ------------------------------------------------- generated rows drawn by length bucket


def test_generated_buckets_by_hand():
    """The generated rows' length buckets, fixed before the first refresh from the lengths the
    training rows would have as buffer rows: quantiles rounded up to 64 tokens, the last one
    the buffer's width; a bucket expected to hold fewer rows of a full buffer than a draw
    joins the next wider one. A buffer's rows are then counted in those buckets."""
    length_N = np.array([10] * 5 + [70] * 20 + [130] * 3 + [200] * 10)
    # quartiles 70, 70, 182.5 -> 128, 192, and the buffer's 512; of a buffer of 38 rows the
    # 3 of 129-192 tokens are fewer than a draw of 8 and join the 10 up to 512
    assert ol.generated_buckets(length_N, 4, 512, 38, 8) == ((0, 128, 25), (128, 512, 13))
    assert ol.generated_buckets(length_N, 4, 512, 38, 3) == ((0, 128, 25), (128, 192, 3),
                                                             (192, 512, 10))
    # a buffer of another size: its rows in the same proportions (largest remainders: 12.5,
    # 1.5, 5 -> 13, 1, 5 in a buffer of 19, the 1 joining the 5)
    assert ol.generated_buckets(length_N, 4, 512, 76, 5) == ((0, 128, 50), (128, 192, 6),
                                                             (192, 512, 20))
    assert ol.generated_buckets(length_N, 4, 512, 19, 2) == ((0, 128, 13), (128, 512, 6))
    # rows longer than the buffer count at its width
    assert ol.generated_buckets(length_N, 4, 200, 38, 3) == ((0, 128, 25), (128, 192, 3),
                                                             (192, 200, 10))
    assert ol.generated_buckets(length_N, 1, 512, 38, 8) == ((0, 512, 38),)  # one length
    assert ol.generated_buckets(length_N, 4, 512, 38, 39) == ((0, 512, 38),)  # too few for 2
    # a bucket of no rows but the buffer's width: the one before it reaches that width
    assert ol.generated_buckets(length_N[25:], 4, 512, 13, 8) == ((0, 512, 13),)
    buckets = ((0, 128, 25), (128, 192, 3), (192, 512, 10))
    length_R = np.array([5] * 7 + [300] * 4 + [512])  # none of 129-192 tokens this time
    assert ol.generated_spans(length_R, buckets) == ((0, 128, 7), (128, 192, 0),
                                                     (192, 512, 5))


def _short_rows(state, cut):
    """The state with only the buffer's rows of at most ``cut`` tokens valid."""
    length_R = jnp.sum(state.online.attention_mask, axis=1)
    return state.replace(online=state.online.replace(
        valid=state.online.valid * (length_R <= cut)))


def test_draw_from_a_span_cuts_its_rows_to_the_width(bmo):
    """A draw from a length bucket: only the bucket's rows, cut to its width (the same rows as
    a draw from a buffer of those rows alone); where it holds fewer rows than asked, the
    others drawn are marked invalid."""
    state, _ = bmo.refresher(bmo.fresh(), 0)
    buf = jax.device_get(state.online)
    length_R = buf.attention_mask.sum(axis=1)
    cut = int(np.median(length_R[buf.valid > 0]))
    assert cut < buf.input_ids.shape[1]
    key = jax.random.key(3)
    longer = jax.device_get(ol.draw(state.online, key, 12, (cut, buf.input_ids.shape[1])))
    inside = (buf.valid > 0) & (length_R > cut)
    assert 0 < inside.sum() < 12
    assert longer["valid"].sum() == inside.sum()  # every row of the span, the rest invalid
    assert (longer["attention_mask"].sum(axis=1)[longer["valid"] > 0] > cut).all()
    short = jax.device_get(ol.draw(state.online, key, 12, (0, cut)))
    want = jax.device_get(ol.draw(_short_rows(state, cut).online, key, 12))
    assert short["input_ids"].shape == (12, cut) and 0 < short["valid"].sum() <= 12
    for k in want:  # the same rows, cut
        np.testing.assert_array_equal(short[k], want[k][:, :cut] if want[k].ndim == 2
                                      else want[k])
    real = want["valid"] > 0  # nothing but padding past the width
    assert not want["attention_mask"][real, cut:].any() and not want["loss_mask"][real, cut:].any()


def test_online_step_on_rows_cut_to_their_width_equals_the_uncut_one(bmo):
    """The train step with its generated rows drawn from a length bucket and cut to its width
    takes the same step as at the buffer's width on a buffer of those rows alone (the cut
    tokens are padding)."""
    state, _ = bmo.refresher(bmo.fresh(), 0)
    buf = jax.device_get(state.online)
    cut = int(np.median(buf.attention_mask.sum(axis=1)[buf.valid > 0]))
    state, short = jax.device_get((state, _short_rows(state, cut)))  # the steps donate theirs
    off = bmo.put(bmo.task.train.batch(np.arange(8), bmo.task.train.max_len))
    val = bmo.put(bmo.task.validation.batch(np.arange(8), bmo.task.validation.max_len))
    new = {}
    for span, start in (((0, cut), state), (None, short)):
        start = jax.device_put(start, bmo.state_sh)
        new[span], metrics = bmo.compiled.train(start, off, val, span)
        assert float(metrics["online_gen_loss"]) > 0
    got, want = jax.device_get(new[(0, cut)]), jax.device_get(new[None])
    got = got.replace(online=want.online)  # the buffers differ in their valid rows only
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not all(np.array_equal(a, b) for a, b in zip(  # a step was taken
        jax.tree.leaves(got.theta), jax.tree.leaves(state.theta), strict=True))


@pytest.fixture(scope="module")
def varied():
    """bmo + online over questions of four prompt lengths (up to 150 tokens), every question
    refreshed: the buffer's rows fall in several length buckets."""
    from types import SimpleNamespace


    task, train_set, model = _four_prompt_lengths(32, 8, lambda k: 9 * (k % 4), 16, 1)
    online = ol.OnlineConfig(every=3, fraction=1.0, num_samples=2, batch_size=8,
                             max_new_tokens=5)
    return Setup(SimpleNamespace(train=train_set, validation=task.validation), model,
                 MethodConfig(method="bmo", weighting="sigmoid", lr_omega=0.1), online,
                 buckets=4)


def test_bucketed_online_run_draws_each_step_from_one_bucket_and_resumes_exactly(varied,
                                                                                 tmp_path):
    """data.length_buckets under online generation: each train step draws its generated
    rows from one length bucket of the buffer, cut to its width, the bucket chosen in
    proportion to its rows; a run stopped after step 7 and resumed (its buckets read again
    from the checkpoint's buffer) ends bit-identical to a straight run."""
    import collections

    chosen = collections.Counter()
    train_args = varied.refresher.train_args

    def spy(state, step):
        got = train_args(state, step)
        chosen[got] += 1
        return got

    varied.refresher.train_args = spy
    try:
        straight, _, records = _train(varied, 10)
        spans = varied.refresher.spans
        first, step, _ = _train(varied, 7, tmp_path / "c")
        varied.refresher.spans = None  # a new process: the buckets come from the checkpoint
        resumed, step, _ = _train(varied, 10, tmp_path / "c")
    finally:
        varied.refresher.train_args = train_args
    assert step == 10 and int(resumed.online.born) == 9
    _same_run(resumed, straight)
    buf = jax.device_get(straight.online)
    length_R = buf.attention_mask.sum(axis=1)[buf.valid > 0]
    assert len(spans) >= 2 and sum(n for *_, n in spans) == len(length_R) == 64
    assert all(n >= 8 for *_, n in spans) and spans[0][1] < buf.input_ids.shape[1]
    assert set(chosen) <= {((a, b),) for a, b, _ in spans} and len(chosen) >= 2
    assert sum(chosen.values()) == 10 + 7 + 3
    assert all(np.isfinite(r["online_gen_loss"]) for _, r in records)


def test_generated_strata_by_hand():
    """A bds hypergradient's buffer rows from each length bucket: every row of each when it
    takes the whole buffer; else shares in proportion (largest remainders, one at least) in
    multiples of the devices, the bucket of fewest rows joined to its wider neighbour while
    there are more buckets than multiples. The step scales each share by the bucket's rows
    (strata_scales): 1 where every row is drawn or the shares are in proportion."""
    spans = ((0, 128, 25), (128, 192, 3), (192, 256, 10))
    assert ol.generated_strata(spans, 38) == spans == ol.generated_strata(spans, 64)
    # on 8 devices each bucket's rows are rounded up (the extra rows drawn are invalid)
    assert ol.generated_strata(spans, 40, ways=8) == ((0, 128, 32), (128, 192, 8),
                                                      (192, 256, 16))
    # 12 rows: one each, the other 9 by size (5.92, 0.71, 2.37 -> 5, 0, 2, and the two
    # largest remainders, 0.92 and 0.71, take one more each)
    twelve = ol.generated_strata(spans, 12)
    assert twelve == ((0, 128, 7), (128, 192, 2), (192, 256, 3))
    # 2 rows (or 16 on 8 devices) for 3 buckets: the 3 rows of 129-192 tokens join the wider
    # bucket (3 rows padded to 256 tokens, not the 25 narrowest to 192)
    for rows, ways in ((2, 1), (16, 8)):
        assert ol.generated_strata(spans, rows, ways) == ((0, 128, ways), (128, 256, ways))
    # the widest bucket the fewest: the one before it joins it
    assert ol.generated_strata(((0, 64, 9), (64, 128, 20), (128, 256, 4)), 2) == (
        (0, 64, 1), (64, 256, 1))
    assert ol.generated_strata(((0, 512, 38),), 8) == ((0, 512, 8),)

    def scales(length_R, blocks, taken):
        from types import SimpleNamespace

        length_R = np.asarray(length_R)
        buffer = SimpleNamespace(valid=jnp.ones(len(length_R)), attention_mask=jnp.asarray(
            np.arange(512)[None, :] < length_R[:, None], jnp.int32))
        gens = tuple({"valid": jnp.asarray(np.arange(n) < t, jnp.float32)}
                     for (*_, n), t in zip(blocks, taken, strict=True))
        return np.asarray(ol.strata_scales(buffer, blocks, gens))

    length_R = [100] * 25 + [150] * 3 + [200] * 10
    np.testing.assert_array_equal(scales(length_R, spans, (25, 3, 10)), [1, 1, 1])
    np.testing.assert_allclose(scales(length_R, twelve, (7, 2, 3)), [
        25 / 38 * 12 / 7, 3 / 38 * 12 / 2, 10 / 38 * 12 / 3], rtol=1e-6)
    # a bucket with fewer rows than its share: all of them, the rest of its block invalid;
    # an empty one: nothing to scale
    np.testing.assert_allclose(scales([100] * 30 + [200] * 5, ((0, 128, 8), (128, 256, 8)),
                                      (8, 5)), [30 / 35 * 13 / 8, 5 / 35 * 13 / 5], rtol=1e-6)
    np.testing.assert_allclose(scales([100] * 30, ((0, 128, 8), (128, 256, 8)), (8, 0)),
                               [1, 0])


def test_hessian_blocks_sample_the_rows_one_batch_would():
    """The Hessian's sample of generated rows held in blocks of their own widths is
    ``hessian_sample`` of the blocks laid end to end, each row at its block's width."""
    from jbilevel.algorithms.offline import hessian_sample

    width = 6
    batch = {"ids": np.arange(23, dtype=np.int32),
             "input_ids": np.arange(23 * width, dtype=np.int32).reshape(23, width)}
    cuts = ((0, 5, 2), (5, 6, 3), (6, 17, 4), (17, 23, 6))  # (start, end, width)
    blocks = tuple({"ids": batch["ids"][a:b], "input_ids": batch["input_ids"][a:b, :w]}
                   for a, b, w in cuts)
    for rows in (0, 1, 4, 5, 7, 23, 30):
        method = MethodConfig(method="bds", hessian_rows=rows)
        want = hessian_sample(batch, method)
        got = ol.hessian_blocks(blocks, method)
        np.testing.assert_array_equal(np.concatenate([g["ids"] for g in got]), want["ids"])
        for g in got:  # each sampled row at its own block's width, the same tokens
            w = g["input_ids"].shape[1]
            np.testing.assert_array_equal(g["input_ids"], batch["input_ids"][g["ids"], :w])
        # on 2 devices a block whose rows do not split evenly joins the next wider ones,
        # its rows padded with zeros to their width (every row: blocks of 5 + 1 and 11 + 6)
        even = ol.hessian_blocks(blocks, method, ways=2)
        np.testing.assert_array_equal(np.concatenate([g["ids"] for g in even]), want["ids"])
        assert all(len(g["ids"]) % 2 == 0 for g in even[:-1])
        assert rows not in (0, 23, 30) or [len(g["ids"]) for g in even] == [6, 17]
        width_of = np.repeat([w for *_, w in cuts], [b - a for a, b, _ in cuts])
        for g in even:
            inside = np.arange(g["input_ids"].shape[1]) < width_of[g["ids"]][:, None]
            np.testing.assert_array_equal(g["input_ids"], np.where(
                inside, batch["input_ids"][g["ids"], :g["input_ids"].shape[1]], 0))


@pytest.fixture(scope="module")
def varied_bds(varied):
    """bds + online over ``varied``'s questions of four prompt lengths, 4 length buckets; SGD
    on omega with a large step (the step reads the hypergradient) and a Hessian over every
    row, so that the rows' order cannot change it."""
    method = MethodConfig(method="bds", weighting="sigmoid", hessian_rows=0, hyper_chunk=16,
                          omega_optim="sgd", lr_omega=1e4,  # one CG step: a third the compile
                          hypergrad=Implicit("cg", maxiter=1, tol=0.0, ridge=100.0))
    return Setup(varied.task, varied.model, method, varied.refresher.cfg, buckets=4)


def test_online_hypergradient_takes_generated_rows_at_their_bucket_widths(varied_bds):
    """data.length_buckets under online bds: a hypergradient over every training row takes
    every generated row from its length bucket, cut to the bucket's width (each bucket's
    rows padded with invalid ones to a multiple of the (2, 4) mesh's 8 ways), and moves omega
    as the same step at the buffer's width does."""
    s = varied_bds
    task = s.task
    state, _ = s.refresher(s.fresh(), 0)
    capacity = s.refresher.capacity
    (blocks,) = s.refresher.hyper_args(capacity, 8)(state, 0)
    width = s.refresher.length
    assert len(blocks) >= 2 and blocks[-1][1] <= width and blocks[0][1] < width
    spans = [sp for sp in s.refresher.spans if sp[2]]  # the buckets this buffer fills
    assert [b[:2] for b in blocks] == [sp[:2] for sp in spans] and all(
        b[2] == -(-sp[2] // 8) * 8 for b, sp in zip(blocks, spans, strict=True))
    assert sum(sp[2] for sp in spans) == int(jax.device_get(state.online.valid).sum()) == 64
    hyper_b = s.put(task.train.batch(np.arange(len(task.train)), task.train.max_len))
    val_b = s.put(task.validation.batch(np.arange(8), task.validation.max_len))
    new = {}
    for args in ((blocks,), ()):
        start = jax.tree.map(lambda x: x.copy(), state)  # the step donates its state
        new[args], metrics = s.compiled.hyper(start, hyper_b, val_b, *args)
        assert float(metrics["hyper_taken"]) == 1.0
    got, want = ((state.omega - new[a].omega) / 1e4 for a in ((blocks,), ()))
    scale = float(jnp.abs(want).max())
    assert scale > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


def test_online_hypergradient_draws_its_share_from_each_bucket(varied_bds):
    """A hyper batch of 8 of the 32 training rows takes a quarter of the 64 buffer rows,
    shared over the length buckets in multiples of the (2, 4) mesh's 8 ways: distinct valid
    rows of each bucket, cut to its width; the weights that move are the offline rows' and
    the drawn rows' questions'."""
    s = varied_bds
    task = s.task
    state, _ = s.refresher(s.fresh(), 0)
    ways = sh.data_parallel_size(s.mesh, sh.AxisRules())
    rows = ol.hyper_buffer_rows(s.refresher.capacity, 8, len(task.train), ways)
    (blocks,) = s.refresher.hyper_args(rows, ways)(state, 0)
    assert rows == 16 and [b[2] for b in blocks] == [8, 8]
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 2), state.step)
    drawn = jax.device_get(ol.hyper_buffer(state.online, key, 8, len(task.train), blocks))
    buf = jax.device_get(state.online)
    for (shorter, width, n), gen in zip(blocks, drawn, strict=True):
        length = gen["attention_mask"].sum(axis=1)
        assert gen["input_ids"].shape == (n, width) and np.all(gen["valid"] == 1)
        assert np.all((length > shorter) & (length <= width))
        rows_of = {tuple(r) for r in buf.input_ids[:, :width].tolist()}
        assert {tuple(r) for r in gen["input_ids"].tolist()} <= rows_of
    offline = np.arange(8)
    reached = {int(i) for gen in drawn for i in gen["ids"]}
    state, _ = s.compiled.hyper(state, s.put(task.train.batch(offline, task.train.max_len)),
                                s.put(task.validation.batch(np.arange(8),
                                                            task.validation.max_len)),
                                blocks)
    moved = set(np.flatnonzero(np.asarray(state.omega)).tolist())
    assert moved == set(offline.tolist()) | reached


def test_bucketed_refreshes_keep_the_steps_programs(varied_bds):
    """The generated rows' length buckets are fixed before the first refresh, from the
    training rows' lengths: whatever lengths a refresh's samples have, train steps draw from
    those buckets, and a hypergradient over a sample of the training rows takes the same
    shares of the buffer, so one program of each serves the whole run (the step scales the
    shares by the rows each bucket holds). Over the whole buffer it takes every row of each
    bucket."""
    s = varied_bds
    task, ref = s.task, s.refresher
    ways = sh.data_parallel_size(s.mesh, sh.AxisRules())
    rows = ol.hyper_buffer_rows(ref.capacity, 12, len(task.train), ways)
    assert rows == 24  # of the 64 rows: 8 from each of the 3 buckets
    fixed = [b[:2] for b in ref.generated_buckets]
    assert len(fixed) >= 3 and fixed[-1][1] == ref.length
    state, _ = ref(s.fresh(), 0)
    length_R = jax.device_get(jnp.sum(state.online.attention_mask, axis=1))
    # the same refresh with its longer samples dropped, as if they had stopped sooner
    short = _short_rows(state, fixed[1][1])
    hyper_args, held = [], []
    for st in (state, short):
        ref.spans = None  # the buckets' rows counted again, from this buffer
        assert [sp[:2] for sp in ref._current_spans(st)] == fixed
        held.append(ref.spans)
        assert {ref.train_args(st, t)[0] for t in range(12)} <= set(fixed)
        hyper_args.append(ref.hyper_args(rows, ways)(st, 0))
    assert held[0] != held[1] and held[1][-1][2] == 0 < held[0][-1][2]
    assert int((length_R > fixed[1][1]).sum()) == held[0][-1][2]
    assert hyper_args[0] == hyper_args[1] == (tuple((*b, 8) for b in fixed),)
    # the whole buffer (a hyper batch of every training row): every row of each bucket
    for st, spans in zip((state, short), held, strict=True):
        ref.spans = None
        (every,) = ref.hyper_args(ref.capacity, ways)(st, 0)
        assert [b[2] for b in every] == [-(-n // ways) * ways for *_, n in spans if n]

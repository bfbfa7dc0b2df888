"""Online self-refining generation: ratios by hand, the sampling log-probs used, selection,
omega gradients through generated rows, and an exact resume with the buffer checkpointed."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbilevel import sharding as sh
from jbilevel import train
from jbilevel.algorithms import MethodConfig, init_state
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
        got = ol.select_questions(jax.random.key(0), omega, n=3, mode="dynamic", weighting=kind)
        assert sorted(np.asarray(got).tolist()) == [1, 3, 5]
    picks = {int(ol.select_questions(jax.random.key(k), omega, n=2, mode="dynamic",
                                     weighting="softmax")[1]) for k in range(16)}
    assert picks == {1, 3}  # the tie between ids 1 and 3 is broken at random
    rand = np.asarray(ol.select_questions(jax.random.key(1), omega, n=5, mode="random",
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

ONLINE = ol.OnlineConfig(every=3, fraction=0.25, num_samples=2, batch_size=8, max_new_tokens=6)


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


BMO = MethodConfig(method="bmo")


def _mesh(sharded: bool):
    """The (2, 4) mesh of 8 fake devices, or one device (compiles faster)."""
    if sharded:
        return sh.make_mesh(sh.MeshConfig(data=2, fsdp=4, tensor=1)), sh.AxisRules()
    return sh.make_mesh(sh.MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1]), sh.AxisRules()


def _refresh(lm, online=ONLINE, method=BMO):
    """A fresh state (one device) after one refresh at step 0."""
    task, model = lm
    mesh, rules = _mesh(False)
    ref = ol.Refresher(online, model, task.train, weighting=method.weighting,
                       batch_sharding=sh.batch_sharding(mesh, rules, 1), seed=0)

    def init():
        state = init_state(model.init(jax.random.key(0)), len(task.train), method)
        return state.replace(online=ref.init_buffer())

    shapes = jax.eval_shape(init)
    state_sh = train.state_shardings(mesh, rules, shapes, model.param_axes(), method)
    state_sh = state_sh.replace(online=ol.buffer_shardings(mesh, rules, shapes.online))
    state = jax.jit(init, out_shardings=state_sh)()
    state, metrics = ref(state, 0)
    return state, metrics, ref, state_sh, (mesh, rules)


def test_refresh_fills_the_buffer_with_model_logprobs(lm):
    task, model = lm
    state, metrics, ref, _, _ = _refresh(lm)
    buf = jax.device_get(state.online)
    assert ref.capacity == 12 and buf.valid.sum() == 12  # 6 questions x 2 samples
    assert metrics["online_refreshed"] == 6 and int(buf.born) == 0
    gen = ol.draw(state.online, jax.random.key(0), 12)
    assert float(jnp.sum(gen["valid"])) == 12  # draws take valid rows first
    # the stored log-probs are the sampling model's: at the same theta, ratio 1 on every token
    logp = ol.token_logprobs(model.forward, state.theta, buf.batch())
    mask = buf.loss_mask > 0
    assert mask.sum() > 12
    np.testing.assert_allclose(np.asarray(logp)[mask], buf.logp[mask], atol=2e-5)
    ratio, _ = ol.importance_ratio(logp, buf.logp, buf.loss_mask, kind="per_sequence", clip=10.0,
                                   floor=-10.0)
    np.testing.assert_allclose(np.asarray(ratio)[mask], 1.0, atol=1e-4)
    # a generated row's loss is then the plain SFT loss on its tokens, times its scale
    mixed_loss = ol.online_example_loss(lm_example_loss(model.forward), model.forward)
    off = task.train.batch(np.arange(8), task.train.max_len)
    gen = {**buf.batch(), "ratio": np.asarray(ratio)}
    both = ol.combine(off, gen, 0.25)
    got = mixed_loss(state.theta, both)
    plain = lm_example_loss(model.forward)
    want_off, want_gen = plain(state.theta, off), plain(state.theta, buf.batch())
    n_off, n_gen = 8, 12
    n = n_off + n_gen
    want = np.concatenate([want_off * 0.75 * n / n_off, want_gen * 0.25 * n / n_gen])
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # weighted mean over valid rows = 0.75 mean_offline + 0.25 mean_generated
    valid = np.asarray(both["valid"])
    mixed = (np.asarray(got) * valid).sum() / valid.sum()
    gen_mean = (np.asarray(want_gen) * buf.valid).sum() / n_gen
    np.testing.assert_allclose(mixed, 0.75 * np.mean(want_off) + 0.25 * gen_mean, rtol=1e-5)


def test_sampler_denominator_stores_the_tempered_logprobs(lm):
    _, model = lm
    online = ol.OnlineConfig(every=3, fraction=0.25, num_samples=2, batch_size=8,
                             max_new_tokens=6, temperature=0.5, denominator="sampler")
    state, _, _, _, _ = _refresh(lm, online)
    buf = jax.device_get(state.online)
    logits = model.forward(state.theta, buf.input_ids, attention_mask=buf.attention_mask)
    tempered = jax.nn.log_softmax(logits / 0.5, axis=-1)
    want = np.take_along_axis(np.asarray(tempered), buf.labels[..., None], axis=-1)[..., 0]
    mask = buf.loss_mask > 0
    np.testing.assert_allclose(buf.logp[mask], want[mask], atol=5e-5)
    untempered = ol.token_logprobs(model.forward, state.theta, buf.batch())
    assert np.abs(np.asarray(untempered)[mask] - buf.logp[mask]).max() > 0.1  # not these


@pytest.mark.parametrize("base", ["bmo", "bds"])
def test_generated_rows_move_their_question_weight(lm, base):
    """Sigmoid weights: only ids in a batch get gradient, so omega of a question that is in
    the buffer but not in the offline batch moves only through its generated rows."""
    task, model = lm
    method = MethodConfig(method=base, weighting="sigmoid", lr_omega=0.1, hyper_every=1)
    state, _, _, state_sh, (mesh, rules) = _refresh(lm, method=method)
    assert not np.any(np.asarray(state.omega))
    in_buffer = set(np.asarray(state.online.ids)[np.asarray(state.online.valid) > 0].tolist())
    offline_ids = [i for i in range(len(task.train)) if i not in in_buffer][:8]
    steps = ol.make_online_steps(lm_example_loss(model.forward), model.forward, method, ONLINE)
    compiled = train.compile_steps(steps, method, mesh, rules, state_sh)
    batch = compiled_put(task.train.batch(offline_ids, task.train.max_len), compiled)
    val = compiled_put(task.validation.batch(np.arange(8), task.validation.max_len), compiled)
    if base == "bmo":
        state, metrics = compiled.train(state, batch, val)
    else:
        state, metrics = compiled.hyper(state, batch, val)
    omega = np.asarray(state.omega)
    untouched = set(range(len(task.train))) - in_buffer - set(offline_ids)
    assert all(omega[i] == 0 for i in untouched)
    assert all(omega[i] != 0 for i in in_buffer)
    if base == "bmo":
        assert 0 < metrics["online_ratio_mean"] and np.isfinite(metrics["online_gen_loss"])


def compiled_put(batch, compiled):
    return jax.device_put(batch, compiled.batch_sharding)


def test_interrupted_online_run_resumes_exactly(lm, tmp_path):
    """bds + online, refresh every 3 steps, hypergradient every 4: a run stopped after step 7
    (buffer from the step-6 refresh in its checkpoint) and resumed to 10 equals a straight run."""
    from jbilevel.data import Batcher

    task, model = lm
    method = MethodConfig(method="bds", hyper_every=4, lr_omega=0.1)
    mesh, rules = _mesh(True)
    ref = ol.Refresher(ONLINE, model, task.train, weighting=method.weighting,
                       batch_sharding=sh.batch_sharding(mesh, rules, 1), seed=0)

    def init():
        state = init_state(model.init(jax.random.key(0)), len(task.train), method)
        return state.replace(online=ref.init_buffer())

    shapes = jax.eval_shape(init)
    state_sh = train.state_shardings(mesh, rules, shapes, model.param_axes(), method)
    state_sh = state_sh.replace(online=ol.buffer_shardings(mesh, rules, shapes.online))
    steps = ol.make_online_steps(lm_example_loss(model.forward), model.forward, method, ONLINE)
    compiled = train.compile_steps(steps, method, mesh, rules, state_sh)

    def run(total, ckpt_dir=None):
        buckets = (task.train.max_len,)
        data = Batcher(task.train, 8, seed=0, buckets=buckets)
        val = Batcher(task.validation, 8, seed=1, buckets=buckets)
        hyper = Batcher(task.train, 24, seed=2, shuffle=False, buckets=buckets)
        loop = train.LoopConfig(steps=total, log_every=5, checkpoint_every=0, progress=False)
        ckpt = Checkpointer(ckpt_dir) if ckpt_dir else None
        if ckpt is None:
            state, start = jax.jit(init, out_shardings=state_sh)(), 0
        else:
            state, start = train.restore_or_init(ckpt, init, state_sh,
                                                 train.data_sources(data, val, hyper))
        records = []
        state, step = train.run(compiled, method, loop, state, data, val, start_step=start,
                                ckpt=ckpt, hyper_batches=hyper, before_step=ref,
                                on_log=lambda s, r: records.append((s, r)))
        if ckpt is not None:
            ckpt.close()
        return jax.device_get(state), step, records

    first, step, _ = run(7, tmp_path / "c")
    assert step == 7 and int(first.online.born) == 6
    resumed, step, records = run(10, tmp_path / "c")
    straight, _, straight_records = run(10)
    assert step == 10 and int(resumed.online.born) == 9
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _same_but_speed(records[-1], straight_records[-1])
    assert records[-1][1]["online_refreshed"] == 6


def _same_but_speed(a, b):
    drop = {"steps_per_s"}
    return a[0] == b[0] and {k: v for k, v in a[1].items() if k not in drop} == {
        k: v for k, v in b[1].items() if k not in drop}

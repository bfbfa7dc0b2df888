"""The chunked hypergradient (Hessian on a sample, per-example term in chunks), in float64.

With the Hessian on the whole set it must equal ``jbilevel.hypergrad`` for any chunk size;
with the Hessian on a sample it must equal the formula of docs/design.md written out
with a dense Hessian; and the bds hyper step must take it when ``hyper_chunk`` is set.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jbilevel import objectives, weights
from jbilevel.algorithms import MethodConfig, init_state, make_steps
from jbilevel.algorithms.offline import hessian_sample
from jbilevel.chunked import hypergrad_chunked
from jbilevel.implicit import Implicit, hypergrad

N, PAD, D, H = 37, 3, 3, 4  # N real rows (prime, so few chunk sizes divide it) + PAD padding


def mlp_loss(theta, batch):
    hidden = jnp.tanh(batch["x"] @ theta["w1"] + theta["b1"][None, :])
    return 0.5 * (hidden @ theta["w2"] - batch["y"]) ** 2


def _problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N + PAD, D))
    y = np.sin(x @ rng.normal(size=D))
    # Padding rows first (so a chunk padded by repeating the last row repeats a real one):
    # finite garbage with ids that collide with a real example's; none of it may count.
    x[:PAD] = 50.0
    ids = np.concatenate([np.zeros(PAD, int), np.arange(N)])
    train = {"x": jnp.asarray(x), "y": jnp.asarray(y), "ids": jnp.asarray(ids, jnp.int32),
             "valid": jnp.asarray(np.arange(N + PAD) >= PAD, float)}
    xv = rng.normal(size=(11, D))
    val = {"x": jnp.asarray(xv), "y": jnp.asarray(np.sin(xv @ rng.normal(size=D)))}
    theta = {"w1": jnp.asarray(rng.normal(size=(D, H))), "b1": jnp.asarray(rng.normal(size=H)),
             "w2": jnp.asarray(rng.normal(size=H))}
    omega = jnp.asarray(0.3 * rng.normal(size=N))
    return train, val, theta, omega


@pytest.mark.parametrize("weighting", ["softmax", "sigmoid"])
def test_equals_unchunked_hypergrad_with_whole_set_hessian(x64, weighting):
    train, val, theta, omega = _problem()
    inner = objectives.inner_objective(mlp_loss, weighting=weighting, mu=0.05)
    outer = objectives.outer_objective(mlp_loss)
    method = Implicit(maxiter=30, tol=0.0, ridge=0.5)
    ref = jax.jit(lambda th, om: hypergrad(inner, outer, th, om, train, val,
                                           method=method))(theta, omega)
    assert float(jnp.linalg.norm(ref)) > 1e-3
    chunks = (3, 8, 64) if weighting == "softmax" else (7,)  # of 40 rows: 3, 7 leave a remainder
    for chunk in chunks:
        got = jax.jit(lambda th, om, c=chunk: hypergrad_chunked(
            inner, outer, th, om, train, train, val, chunk=c, method=method))(theta, omega)
        err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
        assert err <= 1e-10, (chunk, err)


def test_hessian_on_a_sample_matches_dense_formula(x64):
    train, val, theta, omega = _problem()
    inner = objectives.inner_objective(mlp_loss, mu=0.05)
    outer = objectives.outer_objective(mlp_loss)
    sample = jax.tree.map(lambda a: a[::3], train)  # 14 rows, one of them padding
    ridge = 0.5  # H + ridge I is indefinite here: CG runs through it to the exact solve
    method = Implicit(maxiter=40, tol=1e-13, ridge=ridge, on_negative_curvature="continue")
    got, info = jax.jit(lambda th, om: hypergrad_chunked(
        inner, outer, th, om, sample, train, val, chunk=6, method=method,
        return_info=True))(theta, omega)
    assert float(info.residual) < 1e-10
    # Dense: v = (H_sample + ridge I)^-1 grad f; u_i = grad l_i . v; d = -(1/N) J_s^T u.
    flat, unravel = ravel_pytree(theta)
    h = jax.jit(jax.hessian(lambda p: inner(unravel(p), omega, sample)))(flat)
    v = jnp.linalg.solve(h + ridge * jnp.eye(flat.size), ravel_pytree(
        jax.grad(outer)(theta, val))[0])
    real = jax.tree.map(lambda a: a[PAD:], train)
    jac_NxP = jax.jit(jax.jacobian(lambda p: mlp_loss(unravel(p), real)))(flat)
    want = -weights.weights_vjp(omega, jac_NxP @ v / N, "softmax")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-9, atol=1e-12)


def test_bds_hyper_step_uses_chunks_and_hessian_sample(x64):
    train, val, theta, _ = _problem()
    n_rows = N + PAD
    # ridge 5: H + ridge I is positive definite at this theta (at 0.5 CG meets negative
    # curvature, and the guarded step leaves omega as it was)
    base = dict(method="bds", lr_omega=0.3, hypergrad=Implicit(maxiter=8, tol=0.0, ridge=5.0))
    state = init_state(theta, N, MethodConfig(**base))

    def omega_of(cfg):
        new, metrics = jax.jit(make_steps(mlp_loss, cfg).hyper)(state, train, val)
        assert float(metrics["hyper_taken"]) == 1.0 and float(metrics["cg_residual"]) < 1
        return new.omega

    unchunked = omega_of(MethodConfig(**base, hyper_chunk=0, hessian_rows=0))
    chunked = omega_of(MethodConfig(**base, hyper_chunk=7, hessian_rows=0))
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(unchunked), rtol=1e-10)
    sampled = omega_of(MethodConfig(**base, hyper_chunk=7, hessian_rows=10))
    assert not np.allclose(np.asarray(sampled), np.asarray(unchunked))
    # The sample is 10 rows evenly strided over the 40, so a data axis stays balanced.
    picked = hessian_sample(train, MethodConfig(**base, hessian_rows=10))["ids"]
    np.testing.assert_array_equal(np.asarray(picked), np.asarray(train["ids"][0:40:4]))
    assert hessian_sample(train, MethodConfig(**base, hessian_rows=n_rows)) is train


def test_errors_name_the_problem():
    inner = objectives.inner_objective(mlp_loss)
    outer = objectives.outer_objective(mlp_loss)
    train, val, theta, omega = _problem()
    theta = jax.tree.map(lambda a: a.astype(jnp.float32), theta)
    with pytest.raises(ValueError, match="chunk=0 must be >= 1"):
        hypergrad_chunked(inner, outer, theta, omega, train, train, val, chunk=0)
    with pytest.raises(ValueError, match="must be an InnerObjective"):
        hypergrad_chunked(lambda t, o, b: inner(t, o, b), outer, theta, omega, train, train,
                          val, chunk=4)
    with pytest.raises(ValueError, match=r"leaves \['y'\] do not have one entry per row"):
        hypergrad_chunked(inner, outer, theta, omega, train, {**train, "y": train["y"][:5]},
                          val, chunk=4)
    with pytest.raises(ValueError, match="hyper_chunk=-1 must be >= 0"):
        MethodConfig(hyper_chunk=-1)


def test_rows_split_over_8_devices_give_the_same_result(x64):
    train, val, theta, omega = _problem()
    inner = objectives.inner_objective(mlp_loss, mu=0.05)
    outer = objectives.outer_objective(mlp_loss)
    fn = jax.jit(lambda th, om, b: hypergrad_chunked(
        inner, outer, th, om, jax.tree.map(lambda a: a[::2], b), b, val, chunk=8,
        method=Implicit(maxiter=5, tol=0.0, ridge=0.5)))  # 5 CG steps, as bds
    single = fn(theta, omega, train)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    split = fn(theta, omega, jax.device_put(train, rows))
    assert len(jax.tree.leaves(jax.device_put(train, rows))[0].sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(split), np.asarray(single), rtol=1e-10, atol=1e-14)


def test_hyper_rows_cut_to_their_length_give_the_same_step():
    """data.length_buckets for bds: a hyper batch sorted by length, each length bucket's rows
    taking their per-example term at that length (offline_hyper_rows(blocks=)) and so do the
    Hessian sample's rows (every 4th row) in its products, gives the step of the same batch
    at the longest length: the cut tokens are padding. Also with the batch's rows split over
    8 devices (the blocks cut across their shards)."""
    from jbilevel import sharding as sh
    from jbilevel.algorithms.offline import offline_hyper_rows, sample_blocks
    from jbilevel.data import Batcher, load_sft
    from jbilevel.data.batching import length_blocks, length_buckets
    from jbilevel.models import ModelConfig, build

    rows = [{"question": f"{i}?" + "ab" * (i % 7) * 4, "response": "x" * (1 + i % 5)}
            for i in range(45)]
    ds = load_sft(rows, prompt_template="{question}", max_len=96)
    model = build(ModelConfig(vocab_size=ds.tokenizer.vocab_size, hidden_size=16,
                              num_layers=2, num_heads=2, intermediate_size=32))
    loss = objectives.lm_example_loss(model.forward)
    cfg = MethodConfig(method="bds", hessian_rows=12, hyper_chunk=8, lr_omega=0.1,
                       hypergrad=Implicit("cg", maxiter=3, tol=0.0, ridge=100.0))
    buckets = length_buckets(ds.length_N, 3, multiple=8)
    blocks = length_blocks(ds.length_N, 48, buckets)
    assert len(blocks) == 3 and blocks[-1][1] == 48  # 3 padding rows, in the last block
    assert sample_blocks(48, cfg, blocks) == tuple(
        (-(-s // 4), -(-e // 4), n) for s, e, n in blocks)
    state = init_state(model.init(jax.random.key(0)), len(ds), cfg)
    val = ds.batch(np.arange(8), 96)
    cut = next(Batcher(ds, 48, seed=1, buckets=buckets[-1:], sort_by_length=True))
    lengths = cut["attention_mask"].sum(1)
    assert all(lengths[s:e].max() <= n for s, e, n in blocks) and np.all(np.diff(lengths) <= 0)
    want, metrics = jax.jit(make_steps(loss, cfg).hyper)(state, cut, val)  # uncut
    assert metrics["hyper_taken"] == 1
    hyper = jax.jit(make_steps(loss, cfg, hyper_rows=offline_hyper_rows(cfg, blocks)).hyper)
    got, _ = hyper(state, cut, val)
    assert float(jnp.abs(want.omega).max()) > 0  # the step moved the weights
    np.testing.assert_allclose(np.asarray(got.omega), np.asarray(want.omega), rtol=2e-4,
                               atol=1e-7)
    mesh = sh.make_mesh(sh.MeshConfig(data=8))
    split, _ = hyper(state, jax.device_put(cut, sh.batch_sharding(mesh, sh.AxisRules(), 1)),
                     val)
    np.testing.assert_allclose(np.asarray(split.omega), np.asarray(got.omega), rtol=2e-4,
                               atol=1e-7)
    # a sample's blocks scaled by their strata's weights (stratum_scales): each block's
    # per-example term carries its scale; the Hessian's products weigh every row alike
    hessian, groups = offline_hyper_rows(cfg, blocks, (2.0, 1.0, 0.5))(loss, cut)
    assert [scale for *_, scale in groups] == [2.0, 1.0, 0.5]
    assert all(scale is None for *_, scale, _ in hessian.groups)
    # on 8 devices the Hessian sample's 12 rows (2 / 5 / 5 by block) lie in blocks ending at
    # multiples of 8: the first 8 at the longest length, the last 4 at the shortest
    assert sample_blocks(48, cfg, blocks) == ((0, 2, 64), (2, 7, 48), (7, 12, 24))
    assert sample_blocks(48, cfg, blocks, ways=8) == ((0, 8, 64), (8, 12, 24))


def test_split_loss_over_length_buckets_equals_one_length():
    """The evaluation passes with data.length_buckets: the split sorted by length, batches
    padded to their bucket, one program per length; the same mean loss."""
    from jbilevel.data import load_sft
    from jbilevel.experiment import split_loss
    from jbilevel.models import ModelConfig, build

    rows = [{"question": f"{i}?" + "ab" * (i % 7) * 16, "response": "x" * (1 + i % 5)}
            for i in range(45)]
    ds = load_sft(rows, prompt_template="{question}", max_len=256)
    model = build(ModelConfig(vocab_size=ds.tokenizer.vocab_size, hidden_size=16,
                              num_layers=2, num_heads=2, intermediate_size=32))
    params = model.init(jax.random.key(0))
    loss = objectives.lm_example_loss(model.forward)
    one = split_loss(loss, ds, 8)(params)
    traces = []

    def counted(p, b):
        traces.append(b["input_ids"].shape[1])
        return loss(p, b)

    three = split_loss(counted, ds, 8, buckets=3)(params)
    assert len(set(traces)) == len(traces) == 3  # one program per length
    np.testing.assert_allclose(three, one, rtol=1e-6)

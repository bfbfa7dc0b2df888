"""The offline methods on a problem with a known answer.

Least squares where half the training examples follow a consistent wrong rule: a method
that learns data weights from a clean validation set must put its weight on the clean half
and end with a lower validation loss than uniform SFT.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbilevel import weights
from jbilevel.adjoint import Implicit
from jbilevel.algorithms import MethodConfig, init_state, lambda_at, make_steps
from jbilevel.algorithms.offline import omega_optimizer, theta_optimizer

N, D = 200, 8


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=D)
    w_bad = -w_true + rng.normal(size=D) * 0.3  # a systematic wrong rule
    x_train = rng.normal(size=(N, D))
    good = np.arange(N) < N // 2
    y_train = np.where(good, x_train @ w_true, x_train @ w_bad) + 0.1 * rng.normal(size=N)
    x_val = rng.normal(size=(40, D))
    y_val = x_val @ w_true + 0.1 * rng.normal(size=40)
    train = {"x": jnp.asarray(x_train, jnp.float32), "y": jnp.asarray(y_train, jnp.float32),
             "ids": jnp.arange(N, dtype=jnp.int32), "valid": jnp.ones(N, jnp.float32)}
    val = {"x": jnp.asarray(x_val, jnp.float32), "y": jnp.asarray(y_val, jnp.float32),
           "ids": jnp.zeros(40, jnp.int32), "valid": jnp.ones(40, jnp.float32)}
    return train, val, good


def example_loss(theta, batch):
    return 0.5 * (batch["x"] @ theta["w"] - batch["y"]) ** 2


def _run(cfg, steps, train, val):
    fns = make_steps(example_loss, cfg)
    state = init_state({"w": jnp.zeros(D)}, N, cfg)
    train_step = jax.jit(fns.train)
    hyper_step = jax.jit(fns.hyper) if fns.hyper else None
    for i in range(steps):
        if cfg.method == "bmo":
            state, _ = train_step(state, train, val)
        else:
            state, _ = train_step(state, train)
        if hyper_step is not None and (i + 1) % cfg.hyper_every == 0:
            state, _ = hyper_step(state, train, val)
    val_loss = float(jnp.mean(example_loss(state.theta, val)))
    return state, val_loss


def test_bmo_one_step_golden():
    # Golden numbers after one bmo step on the fixed problem. They change only if the bmo
    # update rule, Adam's settings or the problem generator change; re-derive them then.
    train, val, _ = _problem()
    cfg = MethodConfig(method="bmo", lr_theta=0.1, lr_omega=0.05)
    state = init_state({"w": jnp.zeros(D)}, N, cfg)
    new, metrics = jax.jit(make_steps(example_loss, cfg).train)(state, train, val)
    s_N = weights.weights(new.omega, "softmax")
    # Adam's first step moves every coordinate by lr * sign(grad).
    np.testing.assert_allclose(np.abs(np.asarray(new.theta["w"])), 0.1, rtol=1e-4)
    np.testing.assert_allclose(np.abs(np.asarray(new.omega)), 0.05, rtol=1e-3)
    # Examples with a loss above the weighted mean lose weight, those below gain it.
    loss_B = np.asarray(example_loss(state.theta, train))
    assert np.all((np.asarray(s_N) < 1) == (loss_B > loss_B.mean()))
    assert int(new.step) == 1
    np.testing.assert_allclose(float(metrics["loss"]), loss_B.mean(), rtol=1e-6)
    val_loss = float(jnp.mean(example_loss(state.theta, val)))
    np.testing.assert_allclose(float(metrics["total_loss"]),
                               0.5 * val_loss + 0.5 * loss_B.mean(), rtol=1e-6)


def test_bmo_and_bds_beat_sft_and_find_clean_data():
    train, val, good = _problem()
    _, sft_val = _run(MethodConfig(method="sft", lr_theta=0.05), 300, train, val)
    bmo, bmo_val = _run(MethodConfig(method="bmo", lr_theta=0.05, lr_omega=0.05), 300,
                        train, val)
    bds, bds_val = _run(MethodConfig(method="bds", lr_theta=0.05, lr_omega=0.3, hyper_every=10,
                                     hypergrad=Implicit("cg", maxiter=20, tol=0.0, ridge=0.1)),
                        300, train, val)
    for state, val_loss in ((bmo, bmo_val), (bds, bds_val)):
        s_N = np.asarray(weights.weights(state.omega, "softmax"))
        assert s_N[good].sum() / s_N.sum() > 0.9
        assert val_loss < 0.2 * sft_val


def test_bds_hyper_step_gated_on_the_validation_loss():
    # hyper_max_val_loss: the hypergradient step runs only when the validation batch's loss
    # is at or below the bar; otherwise omega and its optimizer state stay as they are.
    train, val, _ = _problem()
    base = dict(method="bds", lr_theta=0.05, lr_omega=0.3,
                hypergrad=Implicit("cg", maxiter=5, tol=0.0, ridge=1.0))
    state = init_state({"w": jnp.zeros(D)}, N, MethodConfig(**base))
    val_loss = float(jnp.mean(example_loss(state.theta, val)))
    ungated, m_ungated = jax.jit(make_steps(example_loss, MethodConfig(**base)).hyper)(
        state, train, val)
    assert float(m_ungated["hyper_taken"]) == 1.0  # the guard: a converged solve is taken
    above = MethodConfig(**base, hyper_max_val_loss=2 * val_loss)
    taken, m_taken = jax.jit(make_steps(example_loss, above).hyper)(state, train, val)
    np.testing.assert_array_equal(np.asarray(taken.omega), np.asarray(ungated.omega))
    assert float(m_taken["hyper_taken"]) == 1.0
    assert float(m_taken["hypergrad_norm"]) == pytest.approx(float(m_ungated["hypergrad_norm"]))
    below = MethodConfig(**base, hyper_max_val_loss=0.5 * val_loss)
    skipped, m_skipped = jax.jit(make_steps(example_loss, below).hyper)(state, train, val)
    assert not np.allclose(np.asarray(ungated.omega), 0.0)
    np.testing.assert_array_equal(np.asarray(skipped.omega), np.asarray(state.omega))
    jax.tree.map(np.testing.assert_array_equal, skipped.opt_omega, state.opt_omega)
    assert float(m_skipped["hyper_taken"]) == 0.0 and float(m_skipped["hypergrad_norm"]) == 0.0
    for m in (m_ungated, m_taken, m_skipped):
        assert float(m["val_loss"]) == pytest.approx(val_loss, rel=1e-6)
    with pytest.raises(ValueError, match="hyper_max_val_loss=-1.0 must be >= 0"):
        MethodConfig(hyper_max_val_loss=-1.0)


def test_lambda_schedule_and_config_errors():
    cfg = MethodConfig(method="bmo", lam=0.5, lam_decay=0.1, lam_min=0.1)
    assert [lambda_at(cfg, e) for e in range(6)] == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1, 0.1])
    with pytest.raises(ValueError, match="lr_omega=0.0 must be > 0"):
        MethodConfig(lr_omega=0.0)
    with pytest.raises(ValueError, match="lam_min <= lam"):
        MethodConfig(lam=0.2, lam_min=0.3)


def test_bmo_sgd_omega_step_is_the_plain_gradient_step():
    # d/domega_i of mean_b s_b l_b with s = N softmax(omega), at omega = 0 (s = 1), is
    # (l_i - mean_b l_b) / B for a full batch (B = N): SGD moves each logit by lr times that.
    train, val, _ = _problem()
    cfg = MethodConfig(method="bmo", lr_theta=0.1, lr_omega=2.0, omega_optim="sgd")
    state = init_state({"w": jnp.zeros(D)}, N, cfg)
    new, _ = jax.jit(make_steps(example_loss, cfg).train)(state, train, val)
    loss_B = np.asarray(example_loss(state.theta, train), np.float64)
    np.testing.assert_allclose(np.asarray(new.omega), -2.0 * (loss_B - loss_B.mean()) / N,
                               rtol=1e-4, atol=1e-7)


def test_weight_decay_shrinks_matrices_only():
    # With a zero gradient, AdamW's step is -lr * weight_decay * x on matrices; vectors stay.
    cfg = MethodConfig(method="sft", lr_theta=0.1, weight_decay=0.5, clip=0.0)
    theta = {"m": jnp.full((2, 3), 2.0), "v": jnp.full((3,), 2.0)}
    tx = theta_optimizer(cfg)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, theta), tx.init(theta), theta)
    np.testing.assert_allclose(np.asarray(updates["m"]), -0.1 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["v"]), 0.0, atol=0)
    with pytest.raises(ValueError, match="weight_decay=-1"):
        MethodConfig(weight_decay=-1)


def test_warmup_ramps_the_theta_step_size_linearly():
    # A constant gradient makes every Adam step lr_t * sign(g); lr_t = lr * min(t / warmup, 1).
    cfg = MethodConfig(method="sft", lr_theta=0.1, warmup=4, clip=0.0)
    tx = theta_optimizer(cfg)
    theta = {"m": jnp.ones((2, 2))}
    grads = jax.tree.map(jnp.ones_like, theta)
    state, steps = tx.init(theta), []
    for _ in range(6):
        updates, state = tx.update(grads, state, theta)
        steps.append(float(updates["m"][0, 0]))
    np.testing.assert_allclose(steps, [0.0, -0.025, -0.05, -0.075, -0.1, -0.1], rtol=1e-5)
    with pytest.raises(ValueError, match="warmup=-1"):
        MethodConfig(warmup=-1)


def test_decay_steps_take_the_theta_step_size_down_a_cosine_after_the_warmup():
    # lr_t = lr * t / warmup during the warmup, then lr * (1 + cos(pi * (t - w) / (T - w))) / 2
    # down to 0 at T = decay_steps, where it stays.
    cfg = MethodConfig(method="sft", lr_theta=0.1, warmup=2, decay_steps=6, clip=0.0)
    tx = theta_optimizer(cfg)
    theta = {"m": jnp.ones((2, 2))}
    grads = jax.tree.map(jnp.ones_like, theta)
    state, steps = tx.init(theta), []
    for _ in range(8):
        updates, state = tx.update(grads, state, theta)
        steps.append(-float(updates["m"][0, 0]))
    cosine = [0.1 * (1 + np.cos(np.pi * k / 4)) / 2 for k in range(5)]
    np.testing.assert_allclose(steps, [0.0, 0.05, *cosine, 0.0], rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="decay_steps=2 must be > warmup=2"):
        MethodConfig(warmup=2, decay_steps=2)



def test_omega_step_max_caps_every_logits_step():
    g = jnp.asarray([1e-5, -1e-4, 1.0])
    for optim, lr in (("sgd", 1000.0), ("adam", 0.3)):
        capped = omega_optimizer(MethodConfig(omega_optim=optim, lr_omega=lr,
                                              omega_step_max=0.05))
        free = omega_optimizer(MethodConfig(omega_optim=optim, lr_omega=lr))
        step_capped, _ = capped.update(g, capped.init(g))
        step_free, _ = free.update(g, free.init(g))
        np.testing.assert_allclose(step_capped, jnp.clip(step_free, -0.05, 0.05), rtol=1e-6)
        if optim == "sgd":  # small entries keep their proportion; only the large one is capped
            np.testing.assert_allclose(step_capped, [-0.01, 0.05, -0.05], rtol=1e-5)
    with pytest.raises(ValueError, match="omega_step_max"):
        MethodConfig(omega_step_max=-1.0)


def test_omega_eps_shrinks_the_steps_of_logits_with_weak_hypergradients():
    """Adam's first step is -lr g / (|g| + eps): about a full step for every logit at the
    default eps, a fraction |g| / (|g| + eps) of one with a larger eps."""
    g = jnp.asarray([1e-7, -1e-5, 1e-3])
    for eps in (1e-8, 1e-5):
        tx = omega_optimizer(MethodConfig(lr_omega=0.1, omega_eps=eps))
        step, _ = tx.update(g, tx.init(g))
        np.testing.assert_allclose(step, -0.1 * g / (jnp.abs(g) + eps), rtol=1e-4)
    with pytest.raises(ValueError, match="omega_eps"):
        MethodConfig(omega_eps=-1.0)


def test_omega_normalize_gives_sign_consistent_logits_full_steps_when_the_scale_swings():
    """Adam's step is m / sqrt(v): when the whole gradient vector's size swings tenfold between
    steps, a logit whose gradient keeps its sign moves by less than lr per step.
    Scaled to unit norm first, every step counts alike and the same logit moves by about lr;
    with sgd the step vector's norm is lr_omega, and a zero gradient (a skipped step) stays
    zero."""
    direction = jnp.asarray([1.0, -2.0, 0.5, -0.5])
    # the hypergradient norms of a bds run on the safety task, in the order they came
    scales = [5.3e-4, 2.0e-3, 2.5e-4, 2.5e-3, 1.8e-3, 9.5e-4, 1.3e-3, 1.9e-4, 4.2e-4, 3.6e-4,
              1.2e-3, 3.8e-4, 2.2e-4, 5.3e-4] * 2

    def moved(cfg):
        tx, omega = omega_optimizer(cfg), jnp.zeros(4)
        state = tx.init(omega)
        for s in scales:
            u, state = tx.update(s * direction, state, omega)
            omega = omega + u
        return np.abs(np.asarray(omega)) / (0.1 * len(scales))  # fraction of full steps

    plain = moved(MethodConfig(lr_omega=0.1))
    normalised = moved(MethodConfig(lr_omega=0.1, omega_normalize=True))
    assert plain.max() < 0.85, plain
    assert normalised.min() > 0.95, normalised
    sgd = omega_optimizer(MethodConfig(omega_optim="sgd", lr_omega=0.3, omega_normalize=True))
    for g in (1e-6 * direction, 1e3 * direction):
        step, _ = sgd.update(g, sgd.init(g))
        np.testing.assert_allclose(jnp.linalg.norm(step), 0.3, rtol=1e-6)
    step, _ = sgd.update(jnp.zeros(4), sgd.init(jnp.zeros(4)))
    np.testing.assert_array_equal(step, jnp.zeros(4))


def test_omega_weight_decay_pulls_every_logit_toward_zero_decoupled_from_its_step():
    """AdamW's decay: the step adds -lr * decay * omega to Adam's (SGD: lr * decay * omega to
    the gradient), so a logit with a steady hypergradient settles near -sign(g) / decay; at 0
    the optimizer (and its state, which checkpoints hold) is plain Adam."""
    g, omega = jnp.asarray([1e-6, -1e-3, 0.0]), jnp.asarray([2.0, -1.0, 3.0])
    adam = omega_optimizer(MethodConfig(lr_omega=0.1))
    decayed = omega_optimizer(MethodConfig(lr_omega=0.1, omega_weight_decay=0.5))
    step_adam, _ = adam.update(g, adam.init(omega), omega)
    step, _ = decayed.update(g, decayed.init(omega), omega)
    np.testing.assert_allclose(step, step_adam - 0.1 * 0.5 * omega, rtol=1e-6)
    sgd = omega_optimizer(MethodConfig(omega_optim="sgd", lr_omega=10.0, omega_weight_decay=0.5))
    step, _ = sgd.update(g, sgd.init(omega), omega)
    np.testing.assert_allclose(step, -10.0 * (g + 0.5 * omega), rtol=1e-6)
    w, state = jnp.zeros(1), decayed.init(jnp.zeros(1))  # a steady gradient of one sign
    for _ in range(400):
        u, state = decayed.update(jnp.asarray([1e-4]), state, w)
        w = w + u
    np.testing.assert_allclose(w, [-1 / 0.5], rtol=1e-3)
    assert jax.tree.structure(adam.init(omega)) == jax.tree.structure(
        omega_optimizer(MethodConfig(lr_omega=0.1, omega_weight_decay=0.0)).init(omega))
    with pytest.raises(ValueError, match="omega_weight_decay"):
        MethodConfig(omega_weight_decay=-1.0)


def test_omega_decay_steps_take_the_weight_step_size_down_a_cosine():
    """With a steady hypergradient Adam's step is lr_t in size: lr_omega at the first weight
    step, half of it halfway, 0 from omega_decay_steps on."""
    tx = omega_optimizer(MethodConfig(lr_omega=0.2, omega_decay_steps=10))
    g, state = jnp.asarray([1e-4, -1e-3]), tx.init(jnp.zeros(2))
    sizes = []
    for _ in range(12):
        u, state = tx.update(g, state, jnp.zeros(2))
        sizes.append(float(u[1]))
    want = [0.2 * 0.5 * (1 + np.cos(np.pi * k / 10)) if k < 10 else 0.0 for k in range(12)]
    np.testing.assert_allclose(sizes, want, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="omega_decay_steps"):
        MethodConfig(omega_decay_steps=-1)

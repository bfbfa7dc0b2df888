"""Composing jbilevel's pure functions: hypergradients, a bilevel loop, a trainer step on an LM.

    python examples/compose.py

docs/api.md quotes this file; tests/test_examples.py runs it and checks that every code
block of docs/api.md still appears here verbatim, so neither can drift from the library.
"""

from __future__ import annotations

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jbilevel
from jbilevel import objectives, problems, weights
from jbilevel.algorithms import MethodConfig, init_state, make_steps
from jbilevel.implicit import Implicit, Neumann, Unrolled
from jbilevel.models import ModelConfig, build, load_pretrained, save_pretrained


def hypergradients() -> dict:
    """Part 1: one hypergradient, four ways; they agree on a converged inner problem."""
    # --8<-- [start:objectives]
    p = problems.least_squares(0, n_useful=60, n_useless=15, dim=20)
    train = jax.tree.map(jnp.asarray, p.train)  # x (N, D), y (N,), ids (N,), valid (N,)
    val = jax.tree.map(jnp.asarray, p.val)

    def example_loss(theta, batch):  # pure: one loss per row, shape (B,)
        return 0.5 * (batch["x"] @ theta - batch["y"]) ** 2

    mu = 1e-2
    inner = objectives.inner_objective(example_loss, weighting="softmax", mu=mu)
    outer = objectives.outer_objective(example_loss)
    omega = weights.init_logits(75, "softmax", jnp.float64)  # one logit per example
    # --8<-- [end:objectives]

    # --8<-- [start:solver]
    def gradient_descent(theta_init, omega, batch):  # any inner solver, even a black box
        step = lambda _, th: th - 0.3 * jax.grad(inner)(th, omega, batch)
        return jax.lax.fori_loop(0, 500, step, theta_init)

    solve = jbilevel.implicit_solver(inner, gradient_descent, maxiter=100, tol=1e-10)
    theta0 = jnp.zeros(20)
    theta = solve(theta0, omega, train)  # theta*(omega), differentiable in omega
    validation_loss = lambda om: outer(solve(theta0, om, train), val)
    d_solver = jax.jit(jax.grad(validation_loss))(omega)
    # --8<-- [end:solver]

    # --8<-- [start:hypergrad]
    d_omega, info = jbilevel.hypergrad(inner, outer, theta, omega, train, val,
                                       solver="cg", maxiter=100, tol=1e-10, ridge=0.0,
                                       return_info=True)
    print(f"CG residual {float(info.residual):.1e} after {int(info.iterations)} HVPs, "
          f"validation loss {float(info.outer_loss):.4f}")
    # The differentiation method is a value: same call, other estimators.
    d_neumann = jbilevel.hypergrad(inner, outer, theta, omega, train, val,
                                   method=Neumann(steps=200, alpha=0.3))
    d_unrolled = jbilevel.hypergrad(inner, outer, theta, omega, train, val,
                                    method=Unrolled(steps=200, lr=0.3))
    d_damped = jbilevel.hypergrad(inner, outer, theta, omega, train, val,
                                  method=Implicit(solver="cg", maxiter=5, ridge=1.0))
    # --8<-- [end:hypergrad]

    exact = jax.grad(lambda om: outer(
        problems.ridge_solution(weights.weights(om), train, mu), val))(omega)
    rel = lambda d: float(jnp.linalg.norm(d - exact) / jnp.linalg.norm(exact))
    errors = {"implicit_solver": rel(d_solver), "hypergrad": rel(d_omega),
              "neumann": rel(d_neumann), "unrolled": rel(d_unrolled),
              "damped_cg5_ridge1": rel(d_damped)}
    for name, err in errors.items():
        print(f"  {name:>18}: relative error vs closed form {err:.1e}")
    return errors


def bilevel_loop() -> dict:
    """Part 2: BDS with an exactly solved inner problem, as a jitted outer step."""
    p = problems.least_squares(0, n_useful=60, n_useless=15, dim=20)
    train, val = jax.tree.map(jnp.asarray, p.train), jax.tree.map(jnp.asarray, p.val)
    inner = objectives.inner_objective(problems.square_loss, weighting="softmax", mu=1e-3)
    outer = objectives.outer_objective(problems.square_loss)
    # --8<-- [start:loop]
    tx = optax.adam(0.1)

    @jax.jit
    def outer_step(omega, opt_state):
        theta = problems.ridge_solution(weights.weights(omega), train, 1e-3)  # exact argmin
        d_omega = jbilevel.hypergrad(inner, outer, theta, omega, train, val, maxiter=100)
        updates, opt_state = tx.update(d_omega, opt_state, omega)
        return optax.apply_updates(omega, updates), opt_state

    omega = weights.init_logits(75, "softmax", jnp.float64)
    opt_state = tx.init(omega)
    for _ in range(100):
        omega, opt_state = outer_step(omega, opt_state)
    s = weights.weights(omega, "softmax")  # mean weight 1
    print(f"weight mass on useless examples: {float(s[p.useless_N].sum() / s.sum()):.3f} "
          f"(uniform: {p.useless_N.mean():.3f}), "
          f"effective sample size {float(weights.health(s)['ess']):.2f}")
    # --8<-- [end:loop]
    return {"useless_mass": float(s[p.useless_N].sum() / s.sum()),
            "ess": float(weights.health(s)["ess"])}


def trainer_steps_on_an_lm() -> dict:
    """Part 3: an HF-format checkpoint, the LM loss, and the trainer's pure bds steps."""
    with tempfile.TemporaryDirectory() as model_dir:
        # --8<-- [start:lm]
        config = ModelConfig(vocab_size=12, hidden_size=32, num_layers=1, num_heads=2,
                             intermediate_size=64)
        save_pretrained(model_dir, build(config).init(jax.random.key(0)), config)
        forward, params, config = load_pretrained(model_dir)  # any local HF directory
        example_loss = objectives.lm_example_loss(forward)  # masked response-token NLL
        train, val, _, corrupt = problems.shift_sequences(0, n=256, n_val=32)

        cfg = MethodConfig(method="bds", lr_theta=3e-3, lr_omega=0.3, hyper_every=10,
                           hypergrad=Implicit("cg", maxiter=5, tol=0.0, ridge=10.0))
        steps = make_steps(example_loss, cfg)
        state = init_state(params, n_examples=256, cfg=cfg)
        train_step, hyper_step = jax.jit(steps.train), jax.jit(steps.hyper)
        rng = np.random.default_rng(0)
        for i in range(1, 41):
            idx = rng.choice(256, 32, replace=False)
            state, metrics = train_step(state, {k: v[idx] for k, v in train.items()})
            if i % cfg.hyper_every == 0:
                idx = rng.choice(256, 64, replace=False)
                state, hyper_metrics = hyper_step(state, {k: v[idx] for k, v in train.items()},
                                                  val)
        print(f"LM: train loss {float(metrics['loss']):.3f}, "
              f"validation loss {float(hyper_metrics['val_loss']):.3f}, "
              f"CG residual {float(hyper_metrics['cg_residual']):.2f}")
        save_pretrained(model_dir, state.theta, config)  # loads in transformers unchanged
        # --8<-- [end:lm]
    s = np.asarray(weights.weights(state.omega))
    return {"val_loss": float(hyper_metrics["val_loss"]),
            "corrupt_mass": float(s[corrupt].sum() / s.sum())}


def main() -> dict:
    with jax.enable_x64(True):  # float64 for the derivative comparisons of parts 1 and 2
        errors = hypergradients()
        loop = bilevel_loop()
    lm = trainer_steps_on_an_lm()
    return {"errors": errors, "loop": loop, "lm": lm}


if __name__ == "__main__":
    main()

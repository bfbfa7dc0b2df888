"""Shared small bilevel problems with exact solutions (float64 callers)."""

import jax
import jax.numpy as jnp
import numpy as np

from jbilevel import objectives, weights

N, D, M = 24, 5, 12
MU = 0.1


def sq_loss(theta, batch):
    return 0.5 * (batch["x"] @ theta - batch["y"]) ** 2


def ridge_data(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(N, D)))
    y = x @ jnp.asarray(rng.normal(size=D)) + 0.3 * jnp.asarray(rng.normal(size=N))
    xv = jnp.asarray(rng.normal(size=(M, D)))
    yv = xv @ jnp.asarray(rng.normal(size=D))
    train = {"x": x, "y": y, "ids": jnp.arange(N), "valid": jnp.ones(N)}
    val = {"x": xv, "y": yv}
    omega = jnp.asarray(0.5 * rng.normal(size=N))
    return train, val, omega


def ridge_solution(omega, train, kind="softmax"):
    """argmin_theta sum_i s_i 0.5 (x_i theta - y_i)^2 / n + mu/2 |theta|^2, by a dense solve."""
    s_B = weights.batch_weights(omega, train["ids"], kind) * train["valid"]
    n = jnp.sum(train["valid"])
    x = train["x"]
    a = x.T @ (s_B[:, None] * x) / n + MU * jnp.eye(x.shape[1])
    return jnp.linalg.solve(a, x.T @ (s_B * train["y"]) / n)


def ridge_closed_form_hypergrad(omega, train, val, kind="softmax"):
    f = objectives.outer_objective(sq_loss)
    return jax.grad(lambda o: f(ridge_solution(o, train, kind), val))(omega)


def ridge_objectives(kind="softmax"):
    return (objectives.inner_objective(sq_loss, weighting=kind, mu=MU),
            objectives.outer_objective(sq_loss))


def rel_err(a, b):
    a = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(a)])
    b = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(b)])
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def jit_hypergrad(inner, outer, inner_batch, outer_batch, **kwargs):
    """``(theta, omega) -> hypergrad(...)`` compiled once: far faster than eager dispatch."""
    from jbilevel.implicit import hypergrad

    return jax.jit(
        lambda theta, omega: hypergrad(inner, outer, theta, omega, inner_batch, outer_batch,
                                       **kwargs)
    )

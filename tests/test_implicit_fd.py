"""Hypergradients vs central finite differences of the re-solved inner problem (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
from _problems import jit_hypergrad, rel_err
from flax import nnx
from jax.flatten_util import ravel_pytree

from jbilevel import objectives
from jbilevel.implicit import implicit_solver

EPS = 1e-5


def _newton(inner, theta, omega, batch, steps):
    """Plain Newton on the flattened parameters: quadratic convergence to machine precision."""
    flat, unravel = ravel_pytree(theta)
    g_flat = lambda z: inner(unravel(z), omega, batch)

    def step(_, z):
        return z - jnp.linalg.solve(jax.hessian(g_flat)(z), jax.grad(g_flat)(z))

    return unravel(jax.lax.fori_loop(0, steps, step, flat))


def _central_fd(outer_of_omega, omega):
    f = jax.jit(outer_of_omega)
    eye = np.eye(omega.shape[0])
    return np.asarray([(f(omega + EPS * e) - f(omega - EPS * e)) / (2 * EPS) for e in eye])


def _logistic_loss(theta, batch):
    return jax.nn.softplus(-batch["y"] * (batch["x"] @ theta["w"] + theta["b"]))


def test_weighted_logistic_regression_vs_finite_differences(x64):
    rng = np.random.default_rng(0)
    n, d = 20, 4
    w_true = rng.normal(size=d)
    x = rng.normal(size=(n, d))
    y = np.sign(x @ w_true + 0.5 * rng.normal(size=n))
    xv = rng.normal(size=(10, d))
    train = {"x": jnp.asarray(x), "y": jnp.asarray(y), "ids": jnp.arange(n), "valid": jnp.ones(n)}
    val = {"x": jnp.asarray(xv), "y": jnp.asarray(np.sign(xv @ w_true))}
    g = objectives.inner_objective(_logistic_loss, weighting="softmax", mu=0.1)
    f = objectives.outer_objective(_logistic_loss)
    omega = jnp.asarray(0.5 * rng.normal(size=n))
    theta0 = {"w": jnp.zeros(d), "b": jnp.zeros(())}
    theta = jax.jit(lambda t: _newton(g, t, omega, train, 30))(theta0)

    d_omega = jit_hypergrad(g, f, train, val, maxiter=100, tol=1e-12)(theta, omega)
    fd = _central_fd(lambda o: f(_newton(g, theta, o, train, 8), val), omega)
    assert rel_err(d_omega, fd) < 1e-4
    # Same through implicit_solver + jax.grad.
    solve = implicit_solver(g, lambda th, o, b: _newton(g, th, o, b, 30), tol=1e-12)
    d_solver = jax.jit(jax.grad(lambda o: f(solve(theta0, o, train), val)))(omega)
    assert rel_err(d_solver, fd) < 1e-4


class _MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(2, 8, param_dtype=jnp.float64, rngs=rngs)
        self.l2 = nnx.Linear(8, 1, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))[:, 0]


def test_flax_nnx_mlp_vs_finite_differences(x64):
    rng = np.random.default_rng(1)
    n = 16
    x = rng.normal(size=(n, 2))
    y = np.sin(x[:, 0]) + 0.5 * x[:, 1] + 0.3 * rng.normal(size=n)
    xv = rng.normal(size=(8, 2))
    train = {"x": jnp.asarray(x), "y": jnp.asarray(y), "ids": jnp.arange(n), "valid": jnp.ones(n)}
    val = {"x": jnp.asarray(xv), "y": jnp.asarray(np.sin(xv[:, 0]) + 0.5 * xv[:, 1])}
    graphdef, state = nnx.split(_MLP(nnx.Rngs(0)))

    def loss_B(params, batch):
        return 0.5 * (nnx.merge(graphdef, params)(batch["x"]) - batch["y"]) ** 2

    g = objectives.inner_objective(loss_B, weighting="sigmoid", mu=0.05)
    f = objectives.outer_objective(loss_B)
    omega = jnp.asarray(0.5 * rng.normal(size=n))

    @jax.jit
    def fit(params):
        step = lambda _, p: jax.tree.map(lambda a, b: a - 0.2 * b, p, jax.grad(g)(p, omega, train))
        return _newton(g, jax.lax.fori_loop(0, 300, step, params), omega, train, 20)

    theta = fit(state)
    assert isinstance(theta, nnx.State)
    grad_norm = jnp.linalg.norm(ravel_pytree(jax.grad(g)(theta, omega, train))[0])
    assert float(grad_norm) < 1e-12  # precondition: theta is the inner minimiser

    d_omega = jit_hypergrad(g, f, train, val, maxiter=200, tol=1e-12)(theta, omega)
    fd = _central_fd(lambda o: f(_newton(g, theta, o, train, 8), val), omega)
    assert rel_err(d_omega, fd) < 1e-4
    native = jit_hypergrad(g, f, train, val, maxiter=200, tol=1e-12, backend="native")(
        theta, omega
    )
    assert rel_err(native, d_omega) < 1e-10

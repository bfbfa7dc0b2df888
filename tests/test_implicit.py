"""Hypergradients on weighted ridge regression, where the answer is known in closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _problems import (
    MU,
    N,
    jit_hypergrad,
    rel_err,
    ridge_closed_form_hypergrad,
    ridge_data,
    ridge_objectives,
    ridge_solution,
    sq_loss,
)

from jbilevel import objectives
from jbilevel.implicit import Implicit, Neumann, Unrolled, hypergrad, implicit_solver

EXACT = dict(maxiter=200, tol=1e-14)


@pytest.mark.parametrize("solver", ["cg", "gmres", "normal_cg", "bicgstab"])
def test_ridge_matches_closed_form(x64, solver):
    train, val, omega = ridge_data()
    g, f = ridge_objectives()
    theta = ridge_solution(omega, train)
    d_omega, info = jit_hypergrad(g, f, train, val, solver=solver, return_info=True, **EXACT)(
        theta, omega
    )
    assert rel_err(d_omega, ridge_closed_form_hypergrad(omega, train, val)) < 1e-10
    assert float(info.residual) < 1e-10
    if solver in ("cg", "normal_cg"):
        assert 1 <= int(info.iterations) <= 200
    np.testing.assert_allclose(info.outer_loss, f(theta, val), rtol=1e-14)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_jaxopt_fast_and_native_paths_agree(x64, kind):
    train, val, omega = ridge_data(1)
    g, f = ridge_objectives(kind)
    theta = ridge_solution(omega, train, kind)
    run = lambda m: jit_hypergrad(g, f, train, val, method=m)(theta, omega)
    jaxopt_path = run(Implicit(backend="jaxopt", fast=False, **EXACT))
    fast_path = run(Implicit(backend="native", fast=True, **EXACT))
    native_path = run(Implicit(backend="native", fast=False, **EXACT))
    assert rel_err(fast_path, jaxopt_path) < 1e-10
    assert rel_err(native_path, jaxopt_path) < 1e-10
    assert rel_err(jaxopt_path, ridge_closed_form_hypergrad(omega, train, val, kind)) < 1e-10


def test_truncated_cg_reports_its_residual(x64):
    train, val, omega = ridge_data()
    g, f = ridge_objectives()
    theta = ridge_solution(omega, train)
    _, info = hypergrad(g, f, theta, omega, train, val, maxiter=2, tol=0.0, return_info=True)
    assert int(info.iterations) == 2
    assert 1e-6 < float(info.residual) < 1.0


def test_unrolled_and_neumann_converge_to_implicit(x64):
    train, val, omega = ridge_data()
    g, f = ridge_objectives()
    theta = ridge_solution(omega, train)
    run = lambda m: jit_hypergrad(g, f, train, val, method=m)(theta, omega)
    exact = run(Implicit(**EXACT))
    unrolled = [rel_err(run(Unrolled(steps=k, lr=0.3)), exact) for k in (5, 20, 80)]
    neumann = [rel_err(run(Neumann(steps=k - 1, alpha=0.3)), exact) for k in (5, 20, 80)]
    assert unrolled[0] > unrolled[1] > unrolled[2]
    assert unrolled[2] < 1e-3
    # Started at theta*, K unrolled GD steps are the K-term Neumann series with alpha = lr.
    np.testing.assert_allclose(unrolled, neumann, rtol=1e-6)


def test_unrolled_with_optax_optimizer(x64):
    import optax

    train, val, omega = ridge_data()
    g, f = ridge_objectives()
    theta = ridge_solution(omega, train)
    exact = jit_hypergrad(g, f, train, val, **EXACT)(theta, omega)
    approx = jit_hypergrad(g, f, train, val, method=Unrolled(steps=80, optimizer=optax.sgd(0.3)))(
        theta, omega
    )
    assert rel_err(approx, exact) < 1e-3


def test_softmax_reaches_all_logits_sigmoid_only_batch_ids(x64):
    train, val, omega = ridge_data()
    sub = {k: v[:8] for k, v in train.items()}
    for kind in ("softmax", "sigmoid"):
        g, f = ridge_objectives(kind)
        theta = ridge_solution(omega, sub, kind)
        d = np.asarray(jit_hypergrad(g, f, sub, val, **EXACT)(theta, omega))
        assert np.all(d[:8] != 0)
        if kind == "softmax":
            assert np.all(d[8:] != 0)
            np.testing.assert_allclose(d.sum(), 0.0, atol=1e-12)  # softmax is shift-invariant
        else:
            np.testing.assert_array_equal(d[8:], 0.0)


def test_jit_and_vmap_over_omegas(x64):
    train, val, omega = ridge_data()
    g, f = ridge_objectives()
    omegas = jnp.stack([omega, 0.5 * omega, -omega])
    thetas = jax.vmap(lambda o: ridge_solution(o, train))(omegas)
    hg = lambda th, om: hypergrad(g, f, th, om, train, val, **EXACT)
    batched = jax.jit(jax.vmap(hg))(thetas, omegas)
    for k in range(3):
        exact = ridge_closed_form_hypergrad(omegas[k], train, val)
        assert rel_err(batched[k], exact) < 1e-10
        assert rel_err(jax.jit(hg)(thetas[k], omegas[k]), exact) < 1e-10


def test_pytree_theta_and_omega(x64):
    train, val, _ = ridge_data()
    rng = np.random.default_rng(3)
    omega = {"scale": jnp.asarray(0.3 * rng.normal(size=N)),
             "gate": jnp.asarray(rng.normal(size=N))}

    def loss_B(theta, batch):
        return 0.5 * (batch["x"] @ theta["w"] + theta["b"] - batch["y"]) ** 2

    def w_N(om):
        return jnp.exp(om["scale"]) * jax.nn.sigmoid(om["gate"])

    def inner(theta, om, batch):
        reg = jnp.sum(theta["w"] ** 2) + theta["b"] ** 2
        return jnp.mean(w_N(om) * loss_B(theta, batch)) + 0.5 * MU * reg

    def outer(theta, batch):
        return jnp.mean(loss_B(theta, batch))

    def solve(om):
        x1 = jnp.concatenate([train["x"], jnp.ones((N, 1))], axis=1)
        a = x1.T @ (w_N(om)[:, None] * x1) / N + MU * jnp.eye(x1.shape[1])
        z = jnp.linalg.solve(a, x1.T @ (w_N(om) * train["y"]) / N)
        return {"w": z[:-1], "b": z[-1]}

    theta = solve(omega)
    exact = jax.grad(lambda om: outer(solve(om), val))(omega)
    for backend in ("jaxopt", "native"):
        d = jit_hypergrad(inner, outer, train, val, backend=backend, **EXACT)(theta, omega)
        assert jax.tree.structure(d) == jax.tree.structure(omega)
        assert rel_err(d, exact) < 1e-10


@pytest.mark.parametrize("backend", ["jaxopt", "native"])
def test_implicit_solver_matches_closed_form(x64, backend):
    train, val, omega = ridge_data()
    g, f = ridge_objectives()

    def gd(theta_init, om, batch):  # deliberately not differentiable-friendly: stop_gradient
        sol = ridge_solution(jax.lax.stop_gradient(om), batch)
        return theta_init * 0 + sol

    solve = implicit_solver(g, gd, backend=backend, **EXACT)
    d = jax.jit(jax.grad(lambda om: f(solve(jnp.zeros(5), om, train), val)))(omega)
    assert rel_err(d, ridge_closed_form_hypergrad(omega, train, val)) < 1e-10
    # The backward solve's residual is reported: tiny when solved, large when truncated.
    theta = solve(jnp.zeros(5), omega, train)
    grad_f = jax.grad(f)(theta, val)
    residual, _ = solve.backward_residual(theta, omega, train, grad_f)
    assert float(residual) < 1e-10
    short = implicit_solver(g, gd, backend=backend, maxiter=1, tol=0.0)
    assert float(short.backward_residual(theta, omega, train, grad_f)[0]) > 1e-3


# ----------------------------------------------------------------------------- bad input


def test_ids_outside_omega_raise(x64):
    train, val, omega = ridge_data()
    g, f = ridge_objectives()
    theta = ridge_solution(omega, train)
    with pytest.raises(ValueError, match=r"outside \[0, 20\)"):
        hypergrad(g, f, theta, omega[:20], train, val)


def test_non_finite_losses_named(x64):
    train, val, omega = ridge_data()
    g, f = ridge_objectives()
    theta = ridge_solution(omega, train)
    bad = dict(train, y=train["y"].at[7].set(jnp.nan))
    with pytest.raises(ValueError, match=r"inner per-example losses are not finite.*rows \[7\]"):
        hypergrad(g, f, theta, omega, bad, val)
    with pytest.raises(ValueError, match="outer loss is not finite"):
        hypergrad(g, f, theta, omega, train, dict(val, y=val["y"].at[0].set(jnp.inf)))


def test_non_float_omega_raises():
    train, val, _ = ridge_data()
    g, f = ridge_objectives()
    with pytest.raises(ValueError, match="omega has dtype int"):
        hypergrad(g, f, jnp.zeros(5), jnp.zeros(N, jnp.int32), train, val)


def test_weights_in_a_closure_raise_instead_of_zero_gradient(x64):
    train, val, omega = ridge_data()
    f = objectives.outer_objective(sq_loss)
    captured = jax.nn.softmax(omega) * N

    def closure_inner(theta, om, batch):  # ignores om: weights were captured
        return jnp.mean(captured * sq_loss(theta, batch)) + 0.5 * MU * jnp.sum(theta**2)

    theta = ridge_solution(omega, train)
    with pytest.raises(ValueError, match="does not depend on omega"):
        hypergrad(closure_inner, f, theta, omega, train, val)
    solve = implicit_solver(closure_inner, lambda th, om, b: th)
    with pytest.raises(ValueError, match="does not depend on omega"):
        jax.grad(lambda om: f(solve(theta, om, train), val))(omega)


def test_solver_output_structure_mismatch_raises(x64):
    train, _, omega = ridge_data()
    g, _ = ridge_objectives()
    solve = implicit_solver(g, lambda th, om, b: {"w": th})
    with pytest.raises(ValueError, match="solve_fn returned a pytree with structure"):
        solve(jnp.zeros(5), omega, train)


def test_bad_method_values():
    with pytest.raises(ValueError, match="unknown solver 'lu'"):
        Implicit(solver="lu")
    with pytest.raises(ValueError, match="backend must be one of"):
        Implicit(backend="torch")


def test_package_reexports_public_api():
    import jbilevel

    assert jbilevel.hypergrad is hypergrad
    assert jbilevel.implicit_solver is implicit_solver


def test_concrete_calls_compile_once_and_match_the_op_by_op_path(x64):
    from jbilevel import implicit

    train, val, omega = ridge_data()
    g, f = ridge_objectives()
    method = Implicit(**EXACT)
    implicit._hypergrad_jit.clear_cache()
    results = []
    for scale in (1.0, 1.5):  # new omega and theta values, same shapes: no new compile
        om = scale * omega  # (a constant shift would leave the softmax weights as they were)
        theta = ridge_solution(om, train)
        results.append(hypergrad(g, f, theta, om, train, val, method=method))
        op_by_op = implicit._hypergrad_core(g, f, method, None, theta, om, train, val)[0]
        assert rel_err(results[-1], op_by_op) < 1e-12
        assert rel_err(results[-1], ridge_closed_form_hypergrad(om, train, val)) < 1e-10
    assert implicit._hypergrad_jit._cache_size() == 1
    assert rel_err(results[0], results[1]) > 1e-3  # the second call did not reuse old values
    # a Python scalar in a batch may be read as a static value: that call runs op by op
    assert not implicit._cacheable((g, f, method, None), (theta, om, dict(train, scale=2.0), val))
    assert not implicit._cacheable(([g], f, method, None), (theta, om, train, val))  # unhashable

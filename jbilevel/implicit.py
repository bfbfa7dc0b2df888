"""Hypergradients of ``f(theta*(omega))`` where ``theta*(omega) = argmin_theta g(theta, omega)``.

The differentiation method is a value (docs/design.md, Conventions): ``Implicit`` (implicit
function theorem, a Krylov solve of ``H v = grad f``), ``Neumann`` (truncated Neumann series
for ``H^-1``) or ``Unrolled`` (backprop through K inner optimizer steps). All share
``hypergrad``'s signature so tests compare them directly. The implicit ones are compositions
of the building blocks in ``jbilevel.adjoint`` (the adjoint solve, the per-example term, the
weight Jacobian), as are ``jbilevel.chunked.hypergrad_chunked`` (a whole training set) and
online bds.

This is the only module that imports jaxopt, and only lazily (``backend="jaxopt"``), so
``backend="native"`` (plain ``jax.custom_vjp`` and our own solvers) works without it.

Weights must be passed as ``omega``: data weights captured in a closure would silently get a
zero gradient (``custom_root`` is a ``custom_vjp``), so every entry point checks, by tracing,
that the optimality condition ``grad_theta g`` depends on omega and raises otherwise.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jbilevel import checks, linsolve
from jbilevel.adjoint import (  # noqa: F401  (BACKENDS, DEFAULT_BACKEND, Neumann: re-exported)
    BACKENDS,
    DEFAULT_BACKEND,
    HypergradInfo,
    Implicit,
    Neumann,
    adjoint,
    as_f32,
    cast_like,
    differentiable_grad,
    example_u,
    hvp,
    linear_solver,
    solve_info,
    weight_vjp,
)
from jbilevel.objectives import InnerObjective, check_ids


def _jaxopt():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no longer maintained.*")
        import jaxopt

    return jaxopt


# --------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class Unrolled:
    """Backprop through K inner optimizer steps started at the given theta.

    Started at theta*, the result tends to the implicit hypergradient as K grows (it is the
    Neumann series with alpha = lr). Memory grows with K: a reference, not an LLM method.

    Fields:
      steps: K inner steps.
      lr: gradient-descent step size (ignored when optimizer is given).
      optimizer: optional optax GradientTransformation used instead of plain gradient descent.
    """

    steps: int = 50
    lr: float = 0.1
    optimizer: Any = None


# --------------------------------------------------------------------------- pieces


def _mixed_native(inner_loss, theta, omega, batch, v):
    """``-(d/domega grad_theta g)^T v`` by a VJP through the optimality condition."""
    optimality = lambda om: differentiable_grad(inner_loss)(theta, om, batch)
    _, vjp = jax.vjp(optimality, omega)
    return jax.tree.map(jnp.negative, vjp(cast_like(v, theta))[0])


def _solve_and_mix(method, inner_loss, outer_loss, theta, omega, batch, outer_batch, chunk=None):
    """Returns (d_omega, HypergradInfo) for Implicit and Neumann."""
    use_fast = method.fast and isinstance(inner_loss, InnerObjective)
    if isinstance(method, Implicit) and method.backend == "jaxopt" and not use_fast:
        f_val, grad_f = jax.value_and_grad(outer_loss)(theta, outer_batch)
        solve = linear_solver(method, hvp(inner_loss, theta, omega, batch, method.ridge))
        info = {}

        def jaxopt_solve(_matvec, rhs):
            # jaxopt hands us A^T as a reverse-over-reverse VJP; H is symmetric, so we solve
            # with our forward-over-reverse HVP instead (cheaper, and identical to the other
            # paths, which isolates the mixed term when comparing them).
            x, *info["solve"] = solve(as_f32(rhs))
            return cast_like(x, theta)

        optimality = lambda th, om: differentiable_grad(inner_loss)(th, om, batch)
        (d_omega,) = _jaxopt().implicit_diff.root_vjp(
            optimality, theta, (omega,), grad_f, solve=jaxopt_solve
        )
        return d_omega, solve_info(method, f_val, *info["solve"])
    v, info = adjoint(inner_loss, outer_loss, theta, omega, batch, outer_batch, method,
                      chunk=chunk)
    if use_fast:
        check_ids(omega, batch)
        u_R, ids_R, valid_R = example_u(inner_loss.example_loss, theta, batch, v, chunk=chunk)
        d_omega = weight_vjp(inner_loss.weighting, omega, ids_R, u_R, valid_R)
    else:
        d_omega = _mixed_native(inner_loss, theta, omega, batch, v)
    return d_omega, info


def _unrolled(method: Unrolled, inner_loss, outer_loss, theta, omega, inner_batch, outer_batch):
    opt = method.optimizer

    def theta_k(om):
        grad_g = lambda th: differentiable_grad(inner_loss)(th, om, inner_batch)
        if opt is None:
            step = lambda _, th: linsolve.tree_axpy(-method.lr, grad_g(th), th)
            return jax.lax.fori_loop(0, method.steps, step, theta)

        def opt_step(_, carry):
            th, state = carry
            updates, state = opt.update(grad_g(th), state, th)
            return jax.tree.map(jnp.add, th, updates), state

        return jax.lax.fori_loop(0, method.steps, opt_step, (theta, opt.init(theta)))[0]

    return jax.grad(lambda om: outer_loss(theta_k(om), outer_batch))(omega)


# --------------------------------------------------------------------------- public API


def _hypergrad_core(inner_loss, outer_loss, method, chunk, theta, omega, inner_batch,
                    outer_batch):
    """(d_omega, HypergradInfo): the computation behind ``hypergrad``."""
    if isinstance(method, Unrolled):
        f_val = outer_loss(theta, outer_batch)
        if jnp.ndim(f_val) != 0:
            raise ValueError(
                f"hypergrad: outer_loss must return a scalar, got shape {jnp.shape(f_val)}")
        d_omega = _unrolled(method, inner_loss, outer_loss, theta, omega, inner_batch, outer_batch)
        return d_omega, HypergradInfo(jnp.full((), jnp.nan, f_val.dtype),
                                      jnp.asarray(method.steps, jnp.int32), f_val,
                                      jnp.zeros((), bool))
    return _solve_and_mix(method, inner_loss, outer_loss, theta, omega, inner_batch, outer_batch,
                          chunk)


# Called with concrete arrays, hypergrad runs as one compiled program, cached per (losses,
# method): op by op, the solver's loop compiled afresh on every call (0.2-0.4 s for a
# 64-example problem).
_hypergrad_jit = jax.jit(_hypergrad_core, static_argnums=(0, 1, 2, 3))


def _cacheable(statics, arrays) -> bool:
    """Whether the compiled path applies: hashable losses and method, only concrete arrays
    (a Python scalar in a batch may be read as a static value, which jit would trace)."""
    try:
        hash(statics)
    except TypeError:
        return False
    return all(isinstance(x, jax.Array | np.ndarray) and not isinstance(x, jax.core.Tracer)
               for x in jax.tree.leaves(arrays))


def hypergrad(
    inner_loss: Callable,
    outer_loss: Callable,
    theta,
    omega,
    inner_batch,
    outer_batch,
    *,
    solver: str = "cg",
    maxiter: int = 100,
    tol: float = 1e-6,
    ridge: float = 0.0,
    backend: str = DEFAULT_BACKEND,
    method: Implicit | Neumann | Unrolled | None = None,
    return_info: bool = False,
    chunk: int | None = None,
):
    """Hypergradient ``dF/domega`` of ``F(omega) = outer_loss(theta*(omega), outer_batch)``.

    The invariant is ``grad_theta inner_loss(theta, omega, inner_batch) == 0``: theta must be
    (approximately) the inner minimiser; the result is exact when it is and the solve
    converges. With ``H = hess_theta g`` the implicit method computes
    ``solve (H + ridge I) v = grad_theta f`` then ``-(d/domega grad_theta g)^T v``.

    Args:
      inner_loss: ``g(theta, omega, inner_batch) -> scalar``; an ``InnerObjective`` takes the
        fast mixed-term path.
      outer_loss: ``f(theta, outer_batch) -> scalar``.
      theta: inner solution, any pytree of float arrays.
      omega: data-weight logits, any pytree of float arrays (an ``InnerObjective`` needs a
        1-D array of N logits).
      inner_batch, outer_batch: whatever the losses read (for ``InnerObjective``: a batch dict
        with ``ids`` and optional ``valid``).
      solver, maxiter, tol, ridge, backend: build ``Implicit(...)`` when method is None.
      method: ``Implicit | Neumann | Unrolled``; overrides the solver arguments.
      return_info: also return a ``HypergradInfo`` (residual, iterations, outer loss,
        negative curvature).
      chunk: for an ``InnerObjective`` over a batch with the rows on axis 0, run the
        Hessian-vector products and the per-example JVPs over this many rows at a time (the
        same result; memory of a pass over ``chunk`` rows instead of the whole batch).

    Returns:
      d_omega with omega's pytree structure, or ``(d_omega, info)`` if return_info.

    Raises:
      ValueError: non-float leaves, ids outside omega, inner loss that ignores omega, or
        (when not traced) a non-finite result, naming the cause.

    Called outside ``jax.jit`` with arrays, it runs as one program compiled once per
    (inner_loss, outer_loss, method), so a research loop pays the compile once. As under
    ``jax.jit``, the losses must then be pure: a loss that reads a global array which is later
    rebound keeps the value it was compiled with. Unhashable losses or methods, and batches
    holding Python scalars, run op by op as before.
    """
    if chunk is not None and chunk < 1:
        raise ValueError(f"hypergrad: chunk={chunk} must be >= 1 (None: the whole batch)")
    if method is None:
        method = Implicit(solver=solver, maxiter=maxiter, tol=tol, ridge=ridge, backend=backend)
    if not isinstance(method, Implicit | Neumann | Unrolled):
        raise ValueError(f"hypergrad: method must be Implicit, Neumann or Unrolled, got {method!r}")
    checks.check_float_tree("theta", theta)
    checks.check_float_tree("omega", omega)
    checks.check_inner_batch(inner_loss, omega, inner_batch)
    checks.check_omega_used(inner_loss, theta, omega, inner_batch)

    statics = (inner_loss, outer_loss, method, chunk)
    arrays = (theta, omega, inner_batch, outer_batch)
    core = _hypergrad_jit if _cacheable(statics, arrays) else _hypergrad_core
    d_omega, info = core(*statics, *arrays)
    f_val = info.outer_loss
    if checks.is_concrete(f_val) and not np.isfinite(np.asarray(f_val)):
        raise ValueError(f"hypergrad: outer loss is not finite ({float(f_val)}) at theta")
    if checks.is_concrete(d_omega) and not all(
        np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(d_omega)
    ):
        checks.raise_non_finite(inner_loss, theta, omega, inner_batch, f_val)
    return (d_omega, info) if return_info else d_omega


def implicit_solver(
    inner_loss: Callable,
    solve_fn: Callable,
    *,
    solver: str = "cg",
    maxiter: int = 100,
    tol: float = 1e-6,
    ridge: float = 0.0,
    backend: str = DEFAULT_BACKEND,
) -> Callable:
    """Wrap an inner solver so that its output is differentiable in omega (and the batch).

    The invariant is ``grad_theta inner_loss(solve(theta_init, omega, batch), omega, batch)
    == 0``; gradients flow by the implicit function theorem, never through solve_fn's
    iterations, and theta_init gets a zero gradient.

    Args:
      inner_loss: ``g(theta, omega, batch) -> scalar``.
      solve_fn: ``(theta_init, omega, batch) -> theta*``, any (even non-differentiable) solver.
      solver, maxiter, tol, ridge: the linear solve in the backward pass (see ``Implicit``).
      backend: "jaxopt" (``jaxopt.implicit_diff.custom_root``) or "native"
        (``jax.custom_vjp``).

    Returns:
      ``solve(theta_init, omega, batch) -> theta*``. ``solve.backward_residual(theta, omega,
      batch, cotangent) -> (residual, iterations)`` runs the backward pass's linear solve for
      a cotangent on theta* (e.g. ``grad_theta f``) and reports its relative residual
      ``|(H + ridge I) v - c| / |c|``, so truncated solves are never hidden.
    """
    Implicit(solver=solver, maxiter=maxiter, tol=tol, ridge=ridge, backend=backend)  # validate

    optimality = differentiable_grad(inner_loss)  # (theta, omega, batch) -> grad_theta g

    def linear_solve(matvec, b):
        if ridge:
            base = matvec
            matvec = lambda v: linsolve.tree_axpy(ridge, v, base(v))
        return linsolve.solve(solver, matvec, b, maxiter=maxiter, tol=tol)[0]

    if backend == "jaxopt":
        inner_solve = _jaxopt().implicit_diff.custom_root(optimality, solve=linear_solve)(
            solve_fn
        )
    else:

        @jax.custom_vjp
        def inner_solve(theta_init, omega, batch):
            return solve_fn(theta_init, omega, batch)

        def fwd(theta_init, omega, batch):
            theta = solve_fn(theta_init, omega, batch)
            return theta, (theta_init, theta, omega, batch)

        def bwd(res, ct):
            theta_init, theta, omega, batch = res
            v = cast_like(linear_solve(hvp(inner_loss, theta, omega, batch), as_f32(ct)), theta)
            _, vjp = jax.vjp(lambda om, b: optimality(theta, om, b), omega, batch)
            d_omega, d_batch = vjp(jax.tree.map(jnp.negative, v))
            return jax.tree.map(jnp.zeros_like, theta_init), d_omega, d_batch

        inner_solve.defvjp(fwd, bwd)

    def solve(theta_init, omega, batch):
        checks.check_inner_batch(inner_loss, omega, batch)
        out = jax.eval_shape(solve_fn, theta_init, omega, batch)
        if jax.tree.structure(out) != jax.tree.structure(theta_init):
            raise ValueError(
                "implicit_solver: solve_fn returned a pytree with structure "
                f"{jax.tree.structure(out)}, but theta_init has {jax.tree.structure(theta_init)}"
            )
        checks.check_omega_used(inner_loss, theta_init, omega, batch)
        return inner_solve(theta_init, omega, batch)

    def backward_residual(theta, omega, batch, cotangent):
        matvec = hvp(inner_loss, theta, omega, batch, ridge)
        _, iterations, residual, _ = linsolve.solve(solver, matvec, as_f32(cotangent),
                                                    maxiter=maxiter, tol=tol)
        return residual, iterations

    solve.backward_residual = backward_residual
    return solve

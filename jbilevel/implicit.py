"""Hypergradients of ``f(theta*(omega))`` where ``theta*(omega) = argmin_theta g(theta, omega)``.

The differentiation method is a value (docs/design.md, Conventions): ``Implicit`` (implicit
function theorem, a Krylov solve of ``H v = grad f``), ``Neumann`` (truncated Neumann series
for ``H^-1``) or ``Unrolled`` (backprop through K inner optimizer steps). All share
``hypergrad``'s signature so tests compare them directly. ``jbilevel.chunked.hypergrad_chunked``
is the implicit method for a whole training set.

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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jbilevel import checks, linsolve
from jbilevel import weights as weights_lib
from jbilevel.objectives import InnerObjective, check_ids

BACKENDS = ("jaxopt", "native")
# One switch to drop jaxopt: set to "native".
DEFAULT_BACKEND = "jaxopt"


def _jaxopt():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no longer maintained.*")
        import jaxopt

    return jaxopt


# --------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class Implicit:
    """Implicit function theorem: solve ``(H + ridge I) v = grad_theta f`` by a Krylov method.

    Fields:
      solver: "cg" (default; H SPD), "gmres", "bicgstab" or "normal_cg".
      maxiter: most Hessian-vector products in the solve (k in the cost 1 + c k + 1).
      tol: target relative residual ``|H v - b| / |b|``.
      ridge: damping added to H; biases the hypergradient but bounds it when H is ill-posed.
      backend: "jaxopt" (mixed term via ``jaxopt.implicit_diff.root_vjp``) or "native".
      fast: for an ``InnerObjective``, compute the mixed term as one JVP of ``loss_B``
        followed by the closed-form weight Jacobian (no second-order pass over omega).
    """

    solver: str = "cg"
    maxiter: int = 100
    tol: float = 1e-6
    ridge: float = 0.0
    backend: str = DEFAULT_BACKEND
    fast: bool = True

    def __post_init__(self):
        if self.solver not in linsolve.SOLVERS:
            raise ValueError(
                f"Implicit: unknown solver {self.solver!r} "
                f"(choose from {', '.join(linsolve.SOLVERS)})"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"Implicit: backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.maxiter < 1 or self.tol < 0 or self.ridge < 0:
            raise ValueError(
                f"Implicit: need maxiter >= 1, tol >= 0, ridge >= 0; got maxiter={self.maxiter}, "
                f"tol={self.tol}, ridge={self.ridge}"
            )


@dataclasses.dataclass(frozen=True)
class Neumann:
    """``v = alpha sum_{j=0..K} (I - alpha (H + ridge I))^j b``; converges if alpha < 2/lambda_max.

    Fields:
      steps: K, the number of Hessian-vector products.
      alpha: step size of the series (like an inner learning rate).
      ridge: damping added to H.
      fast: as in ``Implicit``.
    """

    steps: int = 50
    alpha: float = 0.1
    ridge: float = 0.0
    fast: bool = True


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


class HypergradInfo(NamedTuple):
    """Diagnostics of one hypergradient (arrays, so it passes through jit and vmap).

    Fields:
      residual: relative residual ``|H v - grad f| / |grad f|`` of the solve (NaN: Unrolled).
      iterations: Hessian-vector products used (-1 if the solver does not report it).
      outer_loss: ``f(theta, outer_batch)``.
    """

    residual: jax.Array
    iterations: jax.Array
    outer_loss: jax.Array


# --------------------------------------------------------------------------- pieces


def _hvp(inner_loss, theta, omega, batch, ridge):
    """Forward-over-reverse ``v -> (H + ridge I) v``, H the Hessian of g in theta."""
    grad_g = lambda th: jax.grad(inner_loss)(th, omega, batch)

    def matvec(v):
        hv = jax.jvp(grad_g, (theta,), (v,))[1]
        return hv if ridge == 0 else linsolve.tree_axpy(ridge, v, hv)

    return matvec


def _example_u(example_loss, theta, batch, v):
    """``u_B = <grad l_b(theta), v>`` for every row: one forward-mode JVP of ``loss_B``."""
    return jax.jvp(lambda th: example_loss(th, batch), (theta,), (v,))[1]


def _mixed_from_u(inner: InnerObjective, omega, ids_B, u_B, valid_B):
    """``-(1/n) J_s^T u_N`` with ``u_N`` the valid rows' u scattered onto their ids."""
    valid_B = jnp.ones_like(u_B) if valid_B is None else valid_B.astype(u_B.dtype)
    n_valid = jnp.sum(valid_B)
    scale_B = valid_B / jnp.where(n_valid > 0, n_valid, 1.0)
    # where, not a product: a padding row's u may be anything, even non-finite.
    contrib_B = jnp.where(valid_B > 0, scale_B * u_B, 0.0)
    u_N = jnp.zeros(omega.shape, u_B.dtype).at[ids_B].add(contrib_B, mode="drop")
    return -weights_lib.weights_vjp(omega, u_N.astype(omega.dtype), inner.weighting)


def _mixed_fast(inner: InnerObjective, theta, omega, batch, v):
    """``-(d/domega grad_theta g)^T v`` as one JVP of loss_B plus the weight Jacobian."""
    ids_B = check_ids(omega, batch)
    u_B = _example_u(inner.example_loss, theta, batch, v)
    return _mixed_from_u(inner, omega, ids_B, u_B, batch.get("valid"))


def _mixed_native(inner_loss, theta, omega, batch, v):
    optimality = lambda om: jax.grad(inner_loss)(theta, om, batch)
    _, vjp = jax.vjp(optimality, omega)
    return jax.tree.map(jnp.negative, vjp(v)[0])


def _linear_solver(method, matvec):
    """``rhs -> (v, iterations, residual)`` solving ``matvec(v) = rhs`` as method says."""
    if isinstance(method, Neumann):
        return lambda rhs: _neumann(matvec, rhs, method.steps, method.alpha)
    return lambda rhs: linsolve.solve(
        method.solver, matvec, rhs, maxiter=method.maxiter, tol=method.tol
    )


def _solve_and_mix(method, inner_loss, theta, omega, batch, b):
    """Returns (d_omega, iterations, residual) for Implicit and Neumann."""
    solve = _linear_solver(method, _hvp(inner_loss, theta, omega, batch, method.ridge))
    use_fast = method.fast and isinstance(inner_loss, InnerObjective)
    if isinstance(method, Implicit) and method.backend == "jaxopt" and not use_fast:
        info = {}

        def jaxopt_solve(_matvec, rhs):
            # jaxopt hands us A^T as a reverse-over-reverse VJP; H is symmetric, so we solve
            # with our forward-over-reverse HVP instead (cheaper, and identical to the other
            # paths, which isolates the mixed term when comparing them).
            x, info["iterations"], info["residual"] = solve(rhs)
            return x

        optimality = lambda th, om: jax.grad(inner_loss)(th, om, batch)
        (d_omega,) = _jaxopt().implicit_diff.root_vjp(
            optimality, theta, (omega,), b, solve=jaxopt_solve
        )
        return d_omega, info["iterations"], info["residual"]
    v, iterations, residual = solve(b)
    if use_fast:
        d_omega = _mixed_fast(inner_loss, theta, omega, batch, v)
    else:
        d_omega = _mixed_native(inner_loss, theta, omega, batch, v)
    return d_omega, iterations, residual


def _neumann(matvec, b, steps, alpha):
    def body(_, carry):
        term, acc = carry
        term = linsolve.tree_axpy(-alpha, matvec(term), term)
        return term, jax.tree.map(jnp.add, acc, term)

    _, acc = jax.lax.fori_loop(0, steps, body, (b, b))
    v = jax.tree.map(lambda a: alpha * a, acc)
    residual = linsolve._true_residual(matvec, v, b)
    return v, jnp.asarray(steps, jnp.int32), residual


def _unrolled(method: Unrolled, inner_loss, outer_loss, theta, omega, inner_batch, outer_batch):
    opt = method.optimizer

    def theta_k(om):
        grad_g = lambda th: jax.grad(inner_loss)(th, om, inner_batch)
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


def _hypergrad_core(inner_loss, outer_loss, method, theta, omega, inner_batch, outer_batch):
    """(d_omega, iterations, residual, outer loss): the computation behind ``hypergrad``."""
    f_val, grad_f = jax.value_and_grad(outer_loss)(theta, outer_batch)
    if jnp.ndim(f_val) != 0:
        raise ValueError(
            f"hypergrad: outer_loss must return a scalar, got shape {jnp.shape(f_val)}"
        )
    if isinstance(method, Unrolled):
        d_omega = _unrolled(method, inner_loss, outer_loss, theta, omega, inner_batch, outer_batch)
        iterations = jnp.asarray(method.steps, jnp.int32)
        residual = jnp.full((), jnp.nan, f_val.dtype)
    else:
        d_omega, iterations, residual = _solve_and_mix(
            method, inner_loss, theta, omega, inner_batch, grad_f
        )
    return d_omega, iterations, residual, f_val


# Called with concrete arrays, hypergrad runs as one compiled program, cached per (losses,
# method): op by op, the solver's loop compiled afresh on every call (0.2-0.4 s for a
# 64-example problem).
_hypergrad_jit = jax.jit(_hypergrad_core, static_argnums=(0, 1, 2))


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
      return_info: also return a ``HypergradInfo`` (residual, iterations, outer loss).

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
    if method is None:
        method = Implicit(solver=solver, maxiter=maxiter, tol=tol, ridge=ridge, backend=backend)
    if not isinstance(method, Implicit | Neumann | Unrolled):
        raise ValueError(f"hypergrad: method must be Implicit, Neumann or Unrolled, got {method!r}")
    checks.check_float_tree("theta", theta)
    checks.check_float_tree("omega", omega)
    checks.check_inner_batch(inner_loss, omega, inner_batch)
    checks.check_omega_used(inner_loss, theta, omega, inner_batch)

    statics, arrays = (inner_loss, outer_loss, method), (theta, omega, inner_batch, outer_batch)
    core = _hypergrad_jit if _cacheable(statics, arrays) else _hypergrad_core
    d_omega, iterations, residual, f_val = core(*statics, *arrays)
    if checks.is_concrete(f_val) and not np.isfinite(np.asarray(f_val)):
        raise ValueError(f"hypergrad: outer loss is not finite ({float(f_val)}) at theta")
    if checks.is_concrete(d_omega) and not all(
        np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(d_omega)
    ):
        checks.raise_non_finite(inner_loss, theta, omega, inner_batch, f_val)
    if return_info:
        return d_omega, HypergradInfo(residual, iterations, f_val)
    return d_omega


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

    def optimality(theta, omega, batch):
        return jax.grad(inner_loss)(theta, omega, batch)

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
            hvp = _hvp(inner_loss, theta, omega, batch, 0.0)
            v = linear_solve(hvp, ct)
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
        hvp = _hvp(inner_loss, theta, omega, batch, ridge)
        _, iterations, residual = linsolve.solve(solver, hvp, cotangent, maxiter=maxiter, tol=tol)
        return residual, iterations

    solve.backward_residual = backward_residual
    return solve

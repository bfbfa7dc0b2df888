"""Matrix-free linear solvers on pytrees that report how well they solved.

Each solver returns ``(x, iterations, residual, negative_curvature)`` with
``residual = |A x - b| / |b|`` so a caller can tell an exact implicit hypergradient from a
truncated one, and ``negative_curvature`` True where CG met ``p^T A p <= 0``: A is not
positive definite, so CG's minimisation argument does not hold (it may still converge on a
nonsingular indefinite A, but a truncated solve can point anywhere). CG's residual is its
recursive estimate (free); the others pay one extra matvec for the true residual.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

SOLVERS = ("cg", "gmres", "bicgstab", "normal_cg")


def tree_vdot(a, b) -> jax.Array:
    """Real inner product of two pytrees with the same structure, accumulated in at least
    float32.

    An elementwise product and a sum, not ``jnp.vdot``: vdot flattens its arguments, and
    flattening an array split over a mesh axis gathers it whole on every device.
    """
    def dot(x, y):
        dtype = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
        return jnp.sum(x.astype(dtype) * y.astype(dtype))

    return sum(dot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def tree_axpy(alpha, x, y):
    """``alpha * x + y`` leafwise (alpha a scalar)."""
    return jax.tree.map(lambda a, b: (alpha * a + b).astype(b.dtype), x, y)


def _norm(x) -> jax.Array:
    return jnp.sqrt(tree_vdot(x, x))


def _relative(r_norm, b_norm):
    # NaN in, NaN out: a non-finite right-hand side must not look like a converged solve.
    return jnp.where(b_norm == 0, 0.0, r_norm / jnp.where(b_norm == 0, 1.0, b_norm))


def true_residual(matvec, x, b):
    """``|A x - b| / |b|`` (0 when b is 0)."""
    return _relative(_norm(jax.tree.map(jnp.subtract, matvec(x), b)), _norm(b))


def _identity(tree):
    return tree


def cg(matvec: Callable, b, *, maxiter: int, tol: float, constrain: Callable = _identity,
       stop_on_negative: bool = False):
    """Conjugate gradient for symmetric positive definite ``A``, starting at 0.

    Stops when ``|r| <= tol |b|`` or after ``maxiter`` matvecs, whichever comes first, and
    reports whether any direction had non-positive curvature (``p^T A p <= 0``).

    Args:
      matvec, b: ``x -> A x`` and the right-hand side (pytrees).
      maxiter, tol: iteration limit and relative residual target.
      constrain: applied to every iterate, residual and direction (a sharding pin: the
        vectors then stay split like b instead of being gathered).
      stop_on_negative: truncated CG (as in truncated-Newton methods): at the first direction
        with ``p^T A p <= 0`` stop without stepping along it and return the iterate reached.
        Until then CG has minimised ``x^T A x / 2 - b^T x`` over a subspace on which A is
        positive definite, so that iterate is a solve restricted to A's positive part. If the
        very first direction is negative the iterate is still 0 (iterations is then 1).

    Returns:
      (x, iterations, relative recursive residual, negative curvature met); iterations counts
      matvecs, including the one that found the negative direction.
    """
    b_norm = _norm(b)
    x0 = constrain(jax.tree.map(jnp.zeros_like, b))
    rr0 = tree_vdot(b, b)

    def cond(state):
        *_, rr, k, _ = state
        # Written as "not converged" so that a NaN residual keeps iterating (and stays NaN).
        going = (k < maxiter) & ~(jnp.sqrt(rr) <= tol * b_norm)
        return going & ~state[-1] if stop_on_negative else going

    def body(state):
        x, r, p, rr, k, negative = state
        ap = matvec(p)
        pap = tree_vdot(p, ap)
        bad = (pap <= 0) & (rr > 0)
        negative = negative | bad
        # pap == 0 only when p == 0 (converged) or A is singular: step 0 instead of NaN.
        alpha = jnp.where(pap != 0, rr / jnp.where(pap != 0, pap, 1.0), 0.0)
        if stop_on_negative:  # no step along the bad direction (and the loop ends)
            alpha = jnp.where(bad, 0.0, alpha)
        x = constrain(tree_axpy(alpha, p, x))
        r = constrain(tree_axpy(-alpha, ap, r))
        rr_new = tree_vdot(r, r)
        beta = jnp.where(rr != 0, rr_new / jnp.where(rr != 0, rr, 1.0), 0.0)
        p = constrain(tree_axpy(beta, p, r))
        return x, r, p, rr_new, k + 1, negative

    state = (x0, constrain(b), constrain(b), rr0, jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    x, _, _, rr, k, negative = jax.lax.while_loop(cond, body, state)
    return x, k, _relative(jnp.sqrt(rr), b_norm), negative


def neumann(matvec: Callable, b, *, steps: int, alpha: float):
    """``x = alpha sum_{j=0..steps} (I - alpha A)^j b``, the truncated Neumann series of
    ``A^-1 b`` (converges when ``alpha < 2 / lambda_max(A)``).

    Returns:
      (x, steps, true relative residual, False).
    """

    def body(_, carry):
        term, acc = carry
        term = tree_axpy(-alpha, matvec(term), term)
        return term, jax.tree.map(jnp.add, acc, term)

    _, acc = jax.lax.fori_loop(0, steps, body, (b, b))
    x = jax.tree.map(lambda a: alpha * a, acc)
    return x, jnp.asarray(steps, jnp.int32), true_residual(matvec, x, b), jnp.zeros((), bool)


def solve(name: str, matvec: Callable, b, *, maxiter: int, tol: float,
          constrain: Callable = _identity, stop_on_negative: bool = False):
    """Solve ``A x = b`` with a named solver.

    Args:
      name: "cg" (A SPD), "gmres", "bicgstab" (any nonsingular A), "normal_cg" (CG on
        ``A A`` with right-hand side ``A b``: the normal equations for a symmetric A, robust
        to an indefinite Hessian at a saddle point).
      matvec: ``x -> A x`` on pytrees shaped like b.
      b: right-hand side pytree.
      maxiter: most matvecs (gmres: total Krylov steps, restarting every 20).
      tol: relative residual target.
      constrain: CG's sharding pin for its vectors (see :func:`cg`).
      stop_on_negative: CG only: truncated CG (see :func:`cg`).

    Returns:
      (x, iterations, residual, negative_curvature): residual is ``|A x - b| / |b|``;
      iterations is -1 where the solver does not report it (gmres, bicgstab);
      negative_curvature is CG's (False for the other solvers).
    """
    if name == "cg":
        return cg(matvec, b, maxiter=maxiter, tol=tol, constrain=constrain,
                  stop_on_negative=stop_on_negative)
    never = jnp.zeros((), bool)
    if name == "normal_cg":
        x, k, _, _ = cg(lambda v: matvec(matvec(v)), matvec(b), maxiter=maxiter, tol=tol,
                        constrain=constrain)
        return x, k, true_residual(matvec, x, b), never
    unknown = jnp.full((), -1, jnp.int32)
    if name == "gmres":
        restart = max(1, min(maxiter, 20))
        x, _ = jax.scipy.sparse.linalg.gmres(
            matvec, b, tol=tol, atol=0.0, restart=restart, maxiter=math.ceil(maxiter / restart)
        )
        return x, unknown, true_residual(matvec, x, b), never
    if name == "bicgstab":
        x, _ = jax.scipy.sparse.linalg.bicgstab(matvec, b, tol=tol, atol=0.0, maxiter=maxiter)
        return x, unknown, true_residual(matvec, x, b), never
    raise ValueError(f"unknown linear solver {name!r} (choose from {', '.join(SOLVERS)})")

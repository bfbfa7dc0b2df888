"""Matrix-free linear solvers on pytrees that report how well they solved.

Each solver returns ``(x, iterations, residual)`` with ``residual = |A x - b| / |b|`` so a
caller can tell an exact implicit hypergradient from a truncated one. CG's residual is its
recursive estimate (free); the others pay one extra matvec for the true residual.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

SOLVERS = ("cg", "gmres", "bicgstab", "normal_cg")


def tree_vdot(a, b) -> jax.Array:
    """Real inner product of two pytrees with the same structure."""
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def tree_axpy(alpha, x, y):
    """``alpha * x + y`` leafwise (alpha a scalar)."""
    return jax.tree.map(lambda a, b: (alpha * a + b).astype(b.dtype), x, y)


def _norm(x) -> jax.Array:
    return jnp.sqrt(tree_vdot(x, x))


def _relative(r_norm, b_norm):
    # NaN in, NaN out: a non-finite right-hand side must not look like a converged solve.
    return jnp.where(b_norm == 0, 0.0, r_norm / jnp.where(b_norm == 0, 1.0, b_norm))


def _true_residual(matvec, x, b):
    return _relative(_norm(jax.tree.map(jnp.subtract, matvec(x), b)), _norm(b))


def cg(matvec: Callable, b, *, maxiter: int, tol: float):
    """Conjugate gradient for symmetric positive definite ``A``, starting at 0.

    Stops when ``|r| <= tol |b|`` or after ``maxiter`` matvecs, whichever comes first.

    Returns:
      (x, iterations, relative recursive residual).
    """
    b_norm = _norm(b)
    x0 = jax.tree.map(jnp.zeros_like, b)
    rr0 = tree_vdot(b, b)

    def cond(state):
        _, _, _, rr, k = state
        # Written as "not converged" so that a NaN residual keeps iterating (and stays NaN).
        return (k < maxiter) & ~(jnp.sqrt(rr) <= tol * b_norm)

    def body(state):
        x, r, p, rr, k = state
        ap = matvec(p)
        pap = tree_vdot(p, ap)
        # pap == 0 only when p == 0 (converged) or A is singular: step 0 instead of NaN.
        alpha = jnp.where(pap != 0, rr / jnp.where(pap != 0, pap, 1.0), 0.0)
        x = tree_axpy(alpha, p, x)
        r = tree_axpy(-alpha, ap, r)
        rr_new = tree_vdot(r, r)
        beta = jnp.where(rr != 0, rr_new / jnp.where(rr != 0, rr, 1.0), 0.0)
        p = tree_axpy(beta, p, r)
        return x, r, p, rr_new, k + 1

    x, _, _, rr, k = jax.lax.while_loop(cond, body, (x0, b, b, rr0, jnp.zeros((), jnp.int32)))
    return x, k, _relative(jnp.sqrt(rr), b_norm)


def solve(name: str, matvec: Callable, b, *, maxiter: int, tol: float):
    """Solve ``A x = b`` with a named solver.

    Args:
      name: "cg" (A SPD), "gmres", "bicgstab" (any nonsingular A), "normal_cg" (CG on
        ``A A`` with right-hand side ``A b``: the normal equations for a symmetric A, robust
        to an indefinite Hessian at a saddle point).
      matvec: ``x -> A x`` on pytrees shaped like b.
      b: right-hand side pytree.
      maxiter: most matvecs (gmres: total Krylov steps, restarting every 20).
      tol: relative residual target.

    Returns:
      (x, iterations, residual): residual is ``|A x - b| / |b|``; iterations is -1 where the
      solver does not report it (gmres, bicgstab).
    """
    if name == "cg":
        return cg(matvec, b, maxiter=maxiter, tol=tol)
    if name == "normal_cg":
        x, k, _ = cg(lambda v: matvec(matvec(v)), matvec(b), maxiter=maxiter, tol=tol)
        return x, k, _true_residual(matvec, x, b)
    unknown = jnp.full((), -1, jnp.int32)
    if name == "gmres":
        restart = max(1, min(maxiter, 20))
        x, _ = jax.scipy.sparse.linalg.gmres(
            matvec, b, tol=tol, atol=0.0, restart=restart, maxiter=math.ceil(maxiter / restart)
        )
        return x, unknown, _true_residual(matvec, x, b)
    if name == "bicgstab":
        x, _ = jax.scipy.sparse.linalg.bicgstab(matvec, b, tol=tol, atol=0.0, maxiter=maxiter)
        return x, unknown, _true_residual(matvec, x, b)
    raise ValueError(f"unknown linear solver {name!r} (choose from {', '.join(SOLVERS)})")

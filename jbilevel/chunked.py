"""The implicit hypergradient for many training rows, in bounded memory.

A composition of ``jbilevel.adjoint``'s building blocks: the Hessian is estimated on a sample
of rows (:func:`~jbilevel.adjoint.adjoint`), the per-example term ``u_i = <grad l_i, v>`` is
taken for every row, a fixed-size chunk of rows per forward-mode JVP
(:func:`~jbilevel.adjoint.example_u`), and the weight Jacobian maps u to omega
(:func:`~jbilevel.adjoint.weight_vjp`). Memory is that of one HVP over the sample or one JVP
over a chunk, not of an HVP over all rows (which took 21 GB for the 4000-example quality task).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from jbilevel import checks
from jbilevel.adjoint import HypergradInfo, Implicit, Neumann, adjoint, example_u, weight_vjp
from jbilevel.objectives import InnerObjective, check_ids


def hypergrad_chunked(
    inner_loss: InnerObjective,
    outer_loss: Callable,
    theta,
    omega,
    hessian_batch,
    example_batch,
    outer_batch,
    *,
    chunk: int,
    method: Implicit | Neumann | None = None,
    return_info: bool = False,
):
    """Implicit hypergradient with the Hessian on a sample and the mixed term over many rows.

    ``solve (H + ridge I) v = grad_theta f`` with H the Hessian of
    ``inner_loss(., omega, hessian_batch)``; then ``u_i = <grad l_i(theta), v>`` for every row
    of example_batch, ``chunk`` rows per forward-mode JVP, and
    ``d omega = -(1/n) J_s(omega)^T u`` with n the number of valid rows. With
    ``hessian_batch == example_batch`` it equals ``hypergrad(inner_loss, outer_loss, theta,
    omega, example_batch, outer_batch, method=method)`` for every chunk size.

    Args:
      inner_loss: an ``InnerObjective`` (the per-example losses are needed).
      outer_loss: ``f(theta, outer_batch) -> scalar``.
      theta, omega: as in ``hypergrad``; omega is the 1-D array of N logits.
      hessian_batch: rows on which H is estimated (a sample of the training set).
      example_batch: the rows whose weights get a hypergradient (a sample, or all N rows);
        every leaf has the rows on axis 0; ``valid == 0`` rows are ignored.
      outer_batch: validation batch.
      chunk: rows per JVP; capped at the number of rows; need not divide it.
      method: ``Implicit`` (default ``Implicit()``) or ``Neumann``; the fast flag and backend
        are ignored (this is the fast path by construction).
      return_info: also return a ``HypergradInfo``.

    Returns:
      d_omega shaped like omega, or ``(d_omega, info)`` if return_info.
    """
    method = Implicit() if method is None else method
    if not isinstance(method, Implicit | Neumann):
        raise ValueError(f"hypergrad_chunked: method must be Implicit or Neumann, got {method!r}")
    if not isinstance(inner_loss, InnerObjective):
        raise ValueError(
            "hypergrad_chunked: inner_loss must be an InnerObjective "
            "(jbilevel.objectives.inner_objective), whose per-example losses it needs"
        )
    if chunk < 1:
        raise ValueError(f"hypergrad_chunked: chunk={chunk} must be >= 1")
    checks.check_float_tree("theta", theta)
    checks.check_inner_batch(inner_loss, omega, hessian_batch)
    checks.check_omega_used(inner_loss, theta, omega, hessian_batch)
    check_ids(omega, example_batch)

    v, info = adjoint(inner_loss, outer_loss, theta, omega, hessian_batch, outer_batch, method)
    u_R, ids_R, valid_R = example_u(inner_loss.example_loss, theta, example_batch, v,
                                    chunk=max(chunk, 1))
    d_omega = weight_vjp(inner_loss.weighting, omega, ids_R, u_R, valid_R)
    raise_if_non_finite(d_omega, inner_loss, theta, omega, hessian_batch, info)
    return (d_omega, info) if return_info else d_omega


def raise_if_non_finite(d_omega, inner_loss, theta, omega, batch, info: HypergradInfo) -> None:
    """Outside a trace, a non-finite hypergradient raises with its likely cause (inside one,
    the trainer's omega step checks ``info.usable()`` and skips it instead)."""
    if checks.is_concrete(d_omega) and not np.all(np.isfinite(np.asarray(d_omega))):
        checks.raise_non_finite(inner_loss, theta, omega, batch, info.outer_loss)



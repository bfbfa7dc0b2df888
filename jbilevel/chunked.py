"""The implicit hypergradient for a whole training set, in bounded memory.

The Hessian is estimated on a sample of rows; the per-example term ``u_i = <grad l_i, v>`` is
taken for every row, a fixed-size chunk of rows per forward-mode JVP. Memory is that of one
HVP over the sample or one JVP over a chunk, not of an HVP over the whole set (which took 21 GB
for the 4000-example quality task). bds takes this path when its hyper batch is row-aligned
(``MethodConfig.hyper_chunk``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jbilevel import checks
from jbilevel.implicit import (
    HypergradInfo,
    Implicit,
    Neumann,
    _example_u,
    _hvp,
    _linear_solver,
    _mixed_from_u,
)
from jbilevel.objectives import InnerObjective, check_ids


def _interleaved_chunks(batch: dict, chunk: int) -> dict:
    """Rows -> ``(K, chunk, ...)``; chunk k holds rows k, k + K, k + 2K, ... (valid=0 padding).

    Interleaved rather than contiguous so that, when the rows are split over a data axis,
    every chunk is split the same way and each step of the loop keeps all devices busy.
    """
    n = batch["ids"].shape[0]
    k = -(-n // chunk)
    pad = k * chunk - n
    valid_B = batch.get("valid")
    valid_B = jnp.ones((n,), jnp.float32) if valid_B is None else valid_B

    def split(x, fill_mode):
        if pad:
            x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), mode=fill_mode)
        return jnp.swapaxes(x.reshape(chunk, k, *x.shape[1:]), 0, 1)

    # Padding repeats the last row (a well-formed input) and marks it invalid.
    out = {name: jax.tree.map(lambda x: split(x, "edge"), value)
           for name, value in batch.items() if name != "valid"}
    out["valid"] = split(valid_B, "constant")
    return out


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
    """Implicit hypergradient with the Hessian on a sample and the mixed term over all rows.

    ``solve (H + ridge I) v = grad_theta f`` with H the Hessian of
    ``inner_loss(., omega, hessian_batch)``; then ``u_i = <grad l_i(theta), v>`` for every row
    of example_batch, ``chunk`` rows per forward-mode JVP (a ``lax.map``), and
    ``d omega = -(1/n) J_s(omega)^T u`` with n the number of valid rows. Memory is that of one
    HVP over hessian_batch or one JVP over ``chunk`` rows, whichever is larger, not of an HVP
    over the whole set. With ``hessian_batch == example_batch`` it equals
    ``hypergrad(inner_loss, outer_loss, theta, omega, example_batch, outer_batch,
    method=method)`` for every chunk size.

    Args:
      inner_loss: an ``InnerObjective`` (the per-example losses are needed).
      outer_loss: ``f(theta, outer_batch) -> scalar``.
      theta, omega: as in ``hypergrad``; omega is the 1-D array of N logits.
      hessian_batch: rows on which H is estimated (a sample of the training set; g is a mean,
        so its Hessian estimates the whole set's).
      example_batch: the rows whose weights get a hypergradient (e.g. all N examples);
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
    ids_B = check_ids(omega, example_batch)
    unaligned = [jax.tree_util.keystr(path) for path, x in
                 jax.tree_util.tree_leaves_with_path(example_batch)
                 if not (jnp.ndim(x) and jnp.shape(x)[0] == ids_B.shape[0])]
    if unaligned:
        raise ValueError(
            f"hypergrad_chunked: example_batch leaves {', '.join(unaligned)} do not have one "
            f"entry per row of ids ({ids_B.shape[0]}); chunks are cut by rows, so every leaf "
            "needs the rows on axis 0 (use hypergrad for other batch layouts)"
        )

    v, info = adjoint(inner_loss, outer_loss, theta, omega, hessian_batch, outer_batch, method)
    u_R, ids_R, valid_R = example_u(inner_loss.example_loss, theta, example_batch, v, chunk)
    d_omega = finish(inner_loss, theta, omega, hessian_batch, ids_R, u_R, valid_R, info)
    return (d_omega, info) if return_info else d_omega


def adjoint(inner_loss: InnerObjective, outer_loss: Callable, theta, omega, hessian_batch,
            outer_batch, method: Implicit | Neumann):
    """``v`` solving ``(H + ridge I) v = grad_theta f``, H the Hessian of
    ``inner_loss(., omega, hessian_batch)``, and the solve's ``HypergradInfo``."""
    f_val, grad_f = jax.value_and_grad(outer_loss)(theta, outer_batch)
    matvec = _hvp(inner_loss, theta, omega, hessian_batch, method.ridge)
    v, iterations, residual = _linear_solver(method, matvec)(grad_f)
    return v, HypergradInfo(residual, iterations, f_val)


def example_u(example_loss: Callable, theta, batch: dict, v, chunk: int):
    """``u_b = <grad l_b(theta), v>`` for every row of ``batch``, ``chunk`` rows per JVP.

    Returns ``(u_R, ids_R, valid_R)`` in chunk order (R >= rows: padding rows are invalid).
    """
    chunks = _interleaved_chunks(batch, min(chunk, batch["ids"].shape[0]))
    u_KxC = jax.lax.map(lambda b: _example_u(example_loss, theta, b, v), chunks)
    return u_KxC.reshape(-1), chunks["ids"].reshape(-1), chunks["valid"].reshape(-1)


def finish(inner_loss: InnerObjective, theta, omega, hessian_batch, ids_R, u_R, valid_R,
           info: HypergradInfo):
    """``d omega = -(1/n) J_s^T u`` from the rows' u (n valid rows); non-finite raises."""
    d_omega = _mixed_from_u(inner_loss, omega, ids_R, u_R, valid_R)
    if checks.is_concrete(d_omega) and not np.all(np.isfinite(np.asarray(d_omega))):
        checks.raise_non_finite(inner_loss, theta, omega, hessian_batch, info.outer_loss)
    return d_omega

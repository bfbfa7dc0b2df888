"""Data-weight parameterisations: free logits ``omega_N`` -> weights ``s_N``.

- ``softmax``: ``s = N * softmax(omega)``; weights compete, mean weight is exactly 1.
- ``sigmoid``: ``s = 2 * sigmoid(omega)``; independent weights in (0, 2).

Both give weight 1 at ``omega = 0``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("softmax", "sigmoid")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"weights: unknown kind {kind!r} (choose from {', '.join(KINDS)})")


def init_logits(n: int, kind: str = "softmax", dtype=jnp.float32) -> jax.Array:
    """Logits giving every example weight 1.

    Args:
      n: number of examples N.
      kind: "softmax" or "sigmoid".
      dtype: float dtype of the logits.

    Returns:
      omega_N of zeros.
    """
    _check_kind(kind)
    return jnp.zeros((n,), dtype)


def weights(omega_N: jax.Array, kind: str = "softmax") -> jax.Array:
    """Weights ``s_N`` for all examples.

    Args:
      omega_N: logits, shape (N,).
      kind: "softmax" (``N * softmax``) or "sigmoid" (``2 * sigmoid``).

    Returns:
      s_N, same shape and dtype as omega_N.
    """
    _check_kind(kind)
    if omega_N.ndim != 1:
        raise ValueError(f"weights: omega must be 1-D (N,), got shape {omega_N.shape}")
    if kind == "softmax":
        return omega_N.shape[0] * jax.nn.softmax(omega_N)
    return 2.0 * jax.nn.sigmoid(omega_N)


def batch_weights(omega_N: jax.Array, ids_B: jax.Array, kind: str = "softmax") -> jax.Array:
    """Weights of the examples in a batch.

    Args:
      omega_N: logits for the whole training set.
      ids_B: int example ids in [0, N). Out-of-range ids are clipped here (padding rows may
        carry any id); callers that care check ids concretely (see objectives).
      kind: weighting kind.

    Returns:
      s_B = s_N[ids_B]. For softmax this still reads all of omega (the normaliser), which is
      why softmax hypergradients reach every logit.
    """
    return jnp.take(weights(omega_N, kind), ids_B, mode="clip")


def weights_vjp(omega_N: jax.Array, u_N: jax.Array, kind: str = "softmax") -> jax.Array:
    """Jacobian-transpose product ``J_s(omega)^T u``, in closed form.

    Args:
      omega_N: logits.
      u_N: cotangent on the weights.
      kind: weighting kind.

    Returns:
      softmax: ``N p * (u - <p, u>)`` with ``p = softmax(omega)``;
      sigmoid: ``2 sigma (1 - sigma) u``.
    """
    _check_kind(kind)
    if u_N.shape != omega_N.shape:
        raise ValueError(f"weights_vjp: u shape {u_N.shape} != omega shape {omega_N.shape}")
    if kind == "softmax":
        p_N = jax.nn.softmax(omega_N)
        return omega_N.shape[0] * p_N * (u_N - jnp.vdot(p_N, u_N))
    sig_N = jax.nn.sigmoid(omega_N)
    return 2.0 * sig_N * (1.0 - sig_N) * u_N


def health(s_N: jax.Array) -> dict[str, jax.Array]:
    """Summary statistics of a weight vector, to watch for collapse onto few examples.

    Args:
      s_N: non-negative weights.

    Returns:
      dict with
        entropy: entropy of ``s / sum(s)`` divided by ``log N`` (1 = uniform, 0 = one example),
        ess: effective sample size fraction ``(sum s)^2 / (N sum s^2)`` (1 = uniform),
        frac_above_1: fraction of weights strictly above 1.
    """
    n = s_N.shape[0]
    p_N = s_N / jnp.sum(s_N)
    plogp_N = jnp.where(p_N > 0, p_N * jnp.log(jnp.where(p_N > 0, p_N, 1.0)), 0.0)
    entropy = -jnp.sum(plogp_N) / jnp.log(n) if n > 1 else jnp.ones((), s_N.dtype)
    ess = jnp.sum(s_N) ** 2 / (n * jnp.sum(s_N**2))
    return {
        "entropy": entropy,
        "ess": ess,
        "frac_above_1": jnp.mean((s_N > 1).astype(s_N.dtype)),
    }

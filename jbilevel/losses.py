"""Per-example token losses for supervised fine-tuning.

Every LM objective in jbilevel reduces a (B, L, V) logits array to one loss per example
(``loss_B``), because data weights act on examples, not tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits_BxLxV: jax.Array, labels_BxL: jax.Array) -> jax.Array:
    """Token negative log-likelihood, computed in float32.

    Args:
      logits_BxLxV: next-token logits, any float dtype (bf16 is upcast before the softmax
        because a bf16 logsumexp over a large vocabulary loses ~2 decimal digits).
      labels_BxL: int targets aligned with the logits positions (already shifted). Values
        outside [0, V) (e.g. HF's -100 on prompt tokens) are clipped: those positions must be
        masked out by the caller.

    Returns:
      nll_BxL float32, ``logsumexp(logits) - logits[label]``.
    """
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    vocab = logits_BxLxV.shape[-1]
    labels_BxL = jnp.clip(labels_BxL, 0, vocab - 1)
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_BxL = jnp.take_along_axis(logits_BxLxV, labels_BxL[..., None], axis=-1)[..., 0]
    return lse_BxL - target_BxL


def per_example_nll(
    logits_BxLxV: jax.Array,
    labels_BxL: jax.Array,
    mask_BxL: jax.Array,
    *,
    reduction: str = "mean",
) -> jax.Array:
    """Masked per-example NLL: the ``l_i`` of docs/design.md (The math).

    Args:
      logits_BxLxV: next-token logits (any float dtype).
      labels_BxL: targets aligned with the logits (already shifted).
      mask_BxL: 1 on tokens that count (response tokens), 0 elsewhere.
      reduction: "mean" (mean over masked tokens: the paper's l_i) or "sum".

    Returns:
      loss_B float32. An example with no masked tokens gets 0 (not NaN), so padding rows and
      fully-masked examples are harmless in any weighted sum.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"per_example_nll: reduction must be 'mean' or 'sum', got {reduction!r}")
    if logits_BxLxV.shape[:-1] != labels_BxL.shape or labels_BxL.shape != mask_BxL.shape:
        raise ValueError(
            "per_example_nll: shapes disagree: logits "
            f"{logits_BxLxV.shape}, labels {labels_BxL.shape}, mask {mask_BxL.shape} "
            "(need logits (B, L, V), labels and mask (B, L))"
        )
    mask_BxL = mask_BxL.astype(jnp.float32)
    # where(), not multiply: a masked position may hold a clipped label with a huge nll.
    nll_BxL = jnp.where(mask_BxL > 0, token_nll(logits_BxLxV, labels_BxL), 0.0) * mask_BxL
    total_B = jnp.sum(nll_BxL, axis=-1)
    if reduction == "sum":
        return total_B
    count_B = jnp.sum(mask_BxL, axis=-1)
    return total_B / jnp.where(count_B > 0, count_B, 1.0)


def weighted_mean(
    loss_B: jax.Array, w_B: jax.Array, valid_B: jax.Array | None = None
) -> jax.Array:
    """``sum_b valid_b w_b l_b / sum_b valid_b``: the inner objective's data term.

    The denominator counts valid rows, not weight mass, so that the mean weight (1 at init)
    sets the loss scale and the gradient w.r.t. the weights is not projected away.

    Args:
      loss_B: per-example losses.
      w_B: per-example weights.
      valid_B: 1 for real rows, 0 for padding rows (default: all rows valid).

    Returns:
      a scalar; 0 when no row is valid.
    """
    if valid_B is None:
        valid_B = jnp.ones_like(loss_B)
    valid_B = valid_B.astype(loss_B.dtype)
    n_valid = jnp.sum(valid_B)
    total = jnp.sum(jnp.where(valid_B > 0, w_B * loss_B, 0.0) * valid_B)
    return total / jnp.where(n_valid > 0, n_valid, 1.0)

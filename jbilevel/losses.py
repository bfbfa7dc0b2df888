"""Per-example token losses for supervised fine-tuning.

Every LM objective in jbilevel reduces a batch to one loss per example (``loss_B``), because
data weights act on examples, not tokens. Language models never hold their whole
[rows, tokens, vocab] logits: :func:`chunked_token_nll` applies the output projection to a
few positions at a time (a 512-token batch of 64 rows over a 151,936-token vocabulary would
otherwise be 20 GB of float32 logits), and gradients, Hessian-vector products and
per-example JVPs recompute each chunk instead of storing it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def at_least_f32(*dtypes) -> jnp.dtype:
    """The dtype the losses, logits and norms compute in: float32 for bfloat16, float16 and
    float32 inputs (the mixed-precision rule), float64 for float64 ones (x64 mode), so that a
    float64 model computes in float64 throughout."""
    return jnp.result_type(jnp.float32, *dtypes)


def token_nll(logits_BxLxV: jax.Array, labels_BxL: jax.Array) -> jax.Array:
    """Token negative log-likelihood, computed in float32 (float64 for float64 logits).

    Args:
      logits_BxLxV: next-token logits, any float dtype (bf16 is upcast before the softmax
        because a bf16 logsumexp over a large vocabulary loses ~2 decimal digits).
      labels_BxL: int targets aligned with the logits positions (already shifted). Values
        outside [0, V) (e.g. HF's -100 on prompt tokens) are clipped: those positions must be
        masked out by the caller.

    Returns:
      nll_BxL float32 (float64 for float64 logits), ``logsumexp(logits) - logits[label]``.
    """
    logits_BxLxV = logits_BxLxV.astype(at_least_f32(logits_BxLxV.dtype))
    vocab = logits_BxLxV.shape[-1]
    labels_BxL = jnp.clip(labels_BxL, 0, vocab - 1)
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_BxL = jnp.take_along_axis(logits_BxLxV, labels_BxL[..., None], axis=-1)[..., 0]
    return lse_BxL - target_BxL


def chunk_positions(rows: int, length: int, vocab: int, budget_bytes: int,
                    row_ways: int = 1) -> int:
    """Positions per chunk such that one chunk's float32 logits take at most ``budget_bytes``
    on each device (``rows / row_ways`` rows there); at least 1, at most ``length``."""
    per_position = 4 * vocab * max(1, -(-rows // max(1, row_ways)))
    return int(min(length, max(1, budget_bytes // per_position)))


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's soft cap, ``cap * tanh(x / cap)`` (None: x unchanged)."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def chunked_token_nll(
    hidden_BxLxD: jax.Array,
    head_VxD: jax.Array,
    labels_BxL: jax.Array,
    *,
    chunk: int,
    constrain_logits: Callable[[jax.Array], jax.Array] | None = None,
    constrain_head: Callable[[jax.Array], jax.Array] | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Token NLL of ``logits = hidden @ head^T`` computed ``chunk`` positions at a time.

    Equal to ``token_nll(einsum("bld,vd->blv", hidden, head), labels)`` (float32 logits),
    but only one chunk's (B, chunk, V) logits exist at a time, in the forward pass and in
    every derivative: each chunk is a ``jax.checkpoint``, so reverse mode keeps the hidden
    chunk and recomputes its logits, and forward-over-reverse (Hessian-vector products) and
    forward mode (per-example JVPs) go chunk by chunk too. Chunks run along the sequence, so
    every chunk holds all rows and keeps the batch's sharding.

    Args:
      hidden_BxLxD: final hidden states (after the final norm), any float dtype.
      head_VxD: output projection (the tied embedding or lm_head), same dtype as hidden.
      labels_BxL: targets as in :func:`token_nll` (out-of-range values are clipped).
      chunk: positions per chunk (>= 1); L need not be a multiple.
      constrain_logits, constrain_head: optional sharding pins applied inside each chunk to
        its logits and to the head (the model pins rows to the batch axes and the head to its
        parameter sharding, so that the head's gradient, summed over chunks, stays split over
        the mesh instead of being accumulated whole on every device).
      softcap: Gemma 2's final soft cap, ``logits = softcap * tanh(logits / softcap)``.

    Returns:
      nll_BxL float32 (float64 for a float64 hidden and head).
    """
    b, length, d = hidden_BxLxD.shape
    if head_VxD.ndim != 2 or head_VxD.shape[1] != d:
        raise ValueError(f"chunked_token_nll: head {head_VxD.shape} does not match hidden "
                         f"{hidden_BxLxD.shape} (need head (V, D))")
    if labels_BxL.shape != (b, length):
        raise ValueError(f"chunked_token_nll: labels {labels_BxL.shape} do not match hidden "
                         f"{hidden_BxLxD.shape}")
    if chunk < 1:
        raise ValueError(f"chunked_token_nll: chunk={chunk} must be >= 1")
    chunk = min(chunk, length)
    k = -(-length // chunk)
    pad = k * chunk - length
    if pad:
        hidden_BxLxD = jnp.pad(hidden_BxLxD, ((0, 0), (0, pad), (0, 0)))
        labels_BxL = jnp.pad(labels_BxL, ((0, 0), (0, pad)))

    def one(args):
        h_BxCxD, y_BxC = args
        w_VxD = head_VxD if constrain_head is None else constrain_head(head_VxD)
        logits_BxCxV = jnp.einsum("bcd,vd->bcv", h_BxCxD, w_VxD,
                                  preferred_element_type=at_least_f32(h_BxCxD.dtype,
                                                                      w_VxD.dtype))
        if constrain_logits is not None:
            logits_BxCxV = constrain_logits(logits_BxCxV)
        return token_nll(soft_cap(logits_BxCxV, softcap), y_BxC)

    if k == 1:  # nothing to recompute chunk by chunk: as jnp would do it
        return one((hidden_BxLxD, labels_BxL))[:, :length]
    h_KxBxCxD = jnp.moveaxis(hidden_BxLxD.reshape(b, k, chunk, d), 1, 0)
    y_KxBxC = jnp.moveaxis(labels_BxL.reshape(b, k, chunk), 1, 0)
    nll_KxBxC = jax.lax.map(jax.checkpoint(one), (h_KxBxCxD, y_KxBxC))
    return jnp.moveaxis(nll_KxBxC, 0, 1).reshape(b, k * chunk)[:, :length]


def masked_mean(nll_BxL: jax.Array, mask_BxL: jax.Array, *, reduction: str = "mean"
                ) -> jax.Array:
    """Per-example reduction of token NLLs over the masked (response) tokens.

    Args:
      nll_BxL: token losses (e.g. from :func:`token_nll` or :func:`chunked_token_nll`).
      mask_BxL: 1 on tokens that count, 0 elsewhere.
      reduction: "mean" (mean over masked tokens: the paper's l_i) or "sum".

    Returns:
      loss_B float32; an example with no masked tokens gets 0 (not NaN).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"masked_mean: reduction must be 'mean' or 'sum', got {reduction!r}")
    mask_BxL = mask_BxL.astype(jnp.float32)
    # where(), not multiply: a masked position may hold a clipped label with a huge nll.
    total_B = jnp.sum(jnp.where(mask_BxL > 0, nll_BxL, 0.0) * mask_BxL, axis=-1)
    if reduction == "sum":
        return total_B
    count_B = jnp.sum(mask_BxL, axis=-1)
    return total_B / jnp.where(count_B > 0, count_B, 1.0)


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
    if logits_BxLxV.shape[:-1] != labels_BxL.shape or labels_BxL.shape != mask_BxL.shape:
        raise ValueError(
            "per_example_nll: shapes disagree: logits "
            f"{logits_BxLxV.shape}, labels {labels_BxL.shape}, mask {mask_BxL.shape} "
            "(need logits (B, L, V), labels and mask (B, L))"
        )
    return masked_mean(token_nll(logits_BxLxV, labels_BxL), mask_BxL, reduction=reduction)


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

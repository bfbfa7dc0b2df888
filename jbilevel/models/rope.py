"""Rotary position embeddings with the HF scaling types default, linear, dynamic (NTK), llama3."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jbilevel.models.config import ModelConfig


def _base_inv_freq(base, dim: int):
    # Same float32 arithmetic as HF: 1 / base ** (arange(0, dim, 2) / dim).
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return 1.0 / (base ** exps)


def _static_inv_freq(c: ModelConfig) -> np.ndarray:
    dim = c.rotary_dim
    inv = _base_inv_freq(np.float32(c.rope_theta), dim).astype(np.float32)
    if c.rope_type == "linear":
        inv = inv / np.float32(c.rope_factor)
    elif c.rope_type == "llama3":
        factor = c.rope_factor
        old = c.rope_original_max_position_embeddings or c.max_position_embeddings
        low_wl = old / c.rope_low_freq_factor
        high_wl = old / c.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        inv_l = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - c.rope_low_freq_factor) / (
            c.rope_high_freq_factor - c.rope_low_freq_factor)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(medium, smoothed, inv_l).astype(np.float32)
    return inv


def inv_freq(c: ModelConfig, positions_BxL: jnp.ndarray) -> jnp.ndarray:
    """Inverse frequencies (rotary_dim/2,), f32.

    For "dynamic" RoPE the base grows with the current length max(positions)+1 once it exceeds
    max_position_embeddings, as HF recomputes it each forward (HF keeps the largest length seen
    in a stateful cache; this function is stateless, which equals HF for a single forward pass
    and for generation, where the length only grows).
    """
    if c.rope_type != "dynamic":
        return jnp.asarray(_static_inv_freq(c))
    dim = c.rotary_dim
    seq_len = (jnp.max(positions_BxL) + 1).astype(jnp.float32)
    max_pos = jnp.float32(c.max_position_embeddings)
    seq_len = jnp.maximum(seq_len, max_pos)
    f = jnp.float32(c.rope_factor)
    base = jnp.float32(c.rope_theta) * ((f * seq_len / max_pos) - (f - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim)


def cos_sin(c: ModelConfig, positions_BxL: jnp.ndarray):
    """Returns (cos_BxLxR, sin_BxLxR) in f32, R = rotary_dim, HF's [freqs, freqs] layout."""
    inv_R2 = inv_freq(c, positions_BxL)
    ang_BxLxR2 = jnp.einsum("bl,r->blr", positions_BxL.astype(jnp.float32), inv_R2)
    emb_BxLxR = jnp.concatenate([ang_BxLxR2, ang_BxLxR2], axis=-1)
    return jnp.cos(emb_BxLxR), jnp.sin(emb_BxLxR)


def apply(x_BxLxHxK: jnp.ndarray, cos_BxLxR, sin_BxLxR) -> jnp.ndarray:
    """Rotates the first R features of every head (rotate-half convention); the rest pass."""
    r = cos_BxLxR.shape[-1]
    dtype = x_BxLxHxK.dtype
    cos = cos_BxLxR.astype(dtype)[:, :, None, :]
    sin = sin_BxLxR.astype(dtype)[:, :, None, :]
    x_rot, x_pass = x_BxLxHxK[..., :r], x_BxLxHxK[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x_rot * jnp.broadcast_to(cos, x_rot.shape) + rotated * jnp.broadcast_to(sin, x_rot.shape)
    return jnp.concatenate([out, x_pass], axis=-1)

"""Decoder-only LMs (Llama, Qwen, Mistral, Gemma, GPT-NeoX, GPT-2): pure functions of dict pytrees.

Parameter layout (layers stacked on a leading axis N and scanned with lax.scan):

    embed/embedding        (V, D)          ("vocab", "embed")
    pos_embed/embedding    (P, D)          gpt2 only
    layers/attn_norm/{scale,bias}   (N, D)  bias: LayerNorm families only
    layers/{q}/kernel      (N, D, H, K)    layers/{k,v}/kernel (N, D, KV, K); bias (N, H|KV, K)
    layers/o/kernel        (N, H, K, D)    bias (N, D)
    layers/{q,k}_norm/scale (N, K)         qk_norm (Qwen3, Gemma 3) only
    layers/post_{attn,mlp}_norm/scale (N, D)   gemma_norms only
    layers/mlp_norm/{scale,bias}
    layers/gate/kernel     (N, D, F)       llama only (SwiGLU)
    layers/up/kernel       (N, D, F)       bias (N, F)
    layers/down/kernel     (N, F, D)       bias (N, D)
    final_norm/{scale,bias}
    lm_head/kernel         (V, D)          absent when tie_word_embeddings

hf_io.py maps this to and from the exact HF tensor names.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jbilevel import losses
from jbilevel.models import rope
from jbilevel.models.config import ModelConfig
from jbilevel.sharding import batch_ways, constrain

# LoRA target (HF module name) -> projection site in this module, per family.
LORA_SITES = {
    "llama": {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
              "gate_proj": "gate", "up_proj": "up", "down_proj": "down"},
    "gpt_neox": {"query_key_value": "qkv", "dense": "o", "dense_h_to_4h": "up",
                 "dense_4h_to_h": "down"},
    "gpt2": {"c_attn": "qkv", "attn.c_proj": "o", "c_fc": "up", "mlp.c_proj": "down"},
}
_NEG = -1e30
_ACT = ("batch", None, None)  # activations (B, L, D): rows split, so FSDP gathers weights


def _specs(c: ModelConfig) -> dict:
    """Nested dict of (shape, logical axes, init kind) for every parameter."""
    n, d, v = c.num_layers, c.hidden_size, c.vocab_size
    h, kv, k, f = c.num_heads, c.kv_heads, c.dim_per_head, c.mlp_size
    ln = c.family != "llama"
    unit = "zeros" if c.gemma_norms else "ones"  # Gemma's norms scale by 1 + weight

    def norm(prefix_shape, prefix_axes):
        out = {"scale": (prefix_shape + (d,), prefix_axes + ("embed",), unit)}
        if ln:
            out["bias"] = (prefix_shape + (d,), prefix_axes + ("embed",), "zeros")
        return out

    L = ("layers",)
    layers = {
        "attn_norm": norm((n,), L),
        "q": {"kernel": ((n, d, h, k), L + ("embed", "heads", "head_dim"), "normal")},
        "k": {"kernel": ((n, d, kv, k), L + ("embed", "kv_heads", "head_dim"), "normal")},
        "v": {"kernel": ((n, d, kv, k), L + ("embed", "kv_heads", "head_dim"), "normal")},
        "o": {"kernel": ((n, h, k, d), L + ("heads", "head_dim", "embed"), "normal")},
        "mlp_norm": norm((n,), L),
        "up": {"kernel": ((n, d, f), L + ("embed", "mlp"), "normal")},
        "down": {"kernel": ((n, f, d), L + ("mlp", "embed"), "normal")},
    }
    if c.qkv_bias:
        layers["q"]["bias"] = ((n, h, k), L + ("heads", "head_dim"), "zeros")
        for name in ("k", "v"):
            layers[name]["bias"] = ((n, kv, k), L + ("kv_heads", "head_dim"), "zeros")
    if c.o_bias:
        layers["o"]["bias"] = ((n, d), L + ("embed",), "zeros")
    if c.qk_norm:
        for name in ("q_norm", "k_norm"):
            layers[name] = {"scale": ((n, k), L + ("head_dim",), unit)}
    if c.gemma_norms:
        layers["post_attn_norm"] = norm((n,), L)
        layers["post_mlp_norm"] = norm((n,), L)
    if c.family == "llama":
        layers["gate"] = {"kernel": ((n, d, f), L + ("embed", "mlp"), "normal")}
    if c.mlp_bias:
        for name in ("gate", "up") if c.family == "llama" else ("up",):
            layers[name]["bias"] = ((n, f), L + ("mlp",), "zeros")
        layers["down"]["bias"] = ((n, d), L + ("embed",), "zeros")
    specs = {
        "embed": {"embedding": ((v, d), ("vocab", "embed"), "normal")},
        "layers": layers,
        "final_norm": norm((), ()),
    }
    if c.family == "gpt2":
        specs["pos_embed"] = {
            "embedding": ((c.max_position_embeddings, d), (None, "embed"), "normal")}
    if not c.tie_word_embeddings:
        specs["lm_head"] = {"kernel": ((v, d), ("vocab", "embed"), "normal")}
    return specs


def _is_spec(x) -> bool:
    return isinstance(x, tuple) and len(x) == 3 and isinstance(x[2], str)


@functools.partial(jax.jit, static_argnames=("c", "dtype"))
def _init(c: ModelConfig, rng, dtype):
    specs = _specs(c)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    # One normal draw for all weights, sliced: one RNG op compiles far faster than dozens.
    sizes = [math.prod(shape) if kind == "normal" else 0 for shape, _, kind in leaves]
    flat = 0.02 * jax.random.normal(rng, (sum(sizes),), jnp.float32)
    out, start = [], 0
    for size, (shape, _, kind) in zip(sizes, leaves, strict=True):
        if kind == "ones":
            out.append(jnp.ones(shape, dtype))
        elif kind == "zeros":
            out.append(jnp.zeros(shape, dtype))
        else:
            out.append(flat[start:start + size].reshape(shape).astype(dtype))
            start += size
    return jax.tree.unflatten(treedef, out)


@dataclasses.dataclass(frozen=True)
class Model:
    """A decoder LM bound to its config. All methods are pure; `forward` is jittable."""

    config: ModelConfig

    def init(self, rng: jax.Array, dtype=jnp.float32) -> dict:
        """Random parameters (normal(0, 0.02) weights, unit norms, zero biases).

        Args:
          rng: PRNG key.
          dtype: parameter dtype (f32 or bf16).
        Returns:
          Nested dict pytree, layout in this module's docstring.
        """
        return _init(self.config, rng, jnp.dtype(dtype))

    def param_axes(self) -> dict:
        """Same structure as params; leaves are tuples of logical axis names (or None)."""
        return jax.tree.map(lambda s: s[1], _specs(self.config), is_leaf=_is_spec)

    def forward(self, params, input_ids_BxL, *, attention_mask=None, positions=None, lora=None):
        """Logits of a batch of token ids.

        Args:
          params: parameter pytree from `init` or `load_pretrained`.
          input_ids_BxL: int token ids.
          attention_mask: (B, L), 1 = real token, 0 = padding (left or right with attention
            "xla"; the fused paths take per-row lengths and need right padding). Default all
            ones.
          positions: (B, L) position ids. Default: cumsum(mask) - 1 clipped at 0, which is
            0, 1, 2, ... from the first real token (so left padding gets the HF generate
            positions and right padding the plain arange).
          lora: optional `jbilevel.models.lora.LoRA` adapters.
        Returns:
          logits_BxLxV in float32 (float64 for float64 params). Rows of padded query
          positions are finite but meaningless.
        """
        mask_BxL, pos_BxL = _mask_positions(input_ids_BxL, attention_mask, positions)
        logits, _ = apply(self.config, params, input_ids_BxL, pos_BxL, mask_BxL, lora=lora)
        return logits

    def token_nll(self, params, input_ids_BxL, labels_BxL, *, attention_mask=None,
                  positions=None, lora=None):
        """``-log p(labels_t | input_ids_<=t)`` for every position, without full logits.

        Equal to ``losses.token_nll(self.forward(...), labels_BxL)``, but the output
        projection runs ``config.loss_chunk_mib`` of float32 logits per device at a time
        (``losses.chunked_token_nll``), so memory follows the chunk, not rows x tokens x
        vocab, in the loss and in all its derivatives.

        Args:
          params, input_ids_BxL, attention_mask, positions, lora: as in :meth:`forward`.
          labels_BxL: targets aligned with the positions (already shifted).
        Returns:
          nll_BxL float32 (float64 for float64 params).
        """
        c = self.config
        mask_BxL, pos_BxL = _mask_positions(input_ids_BxL, attention_mask, positions)
        hidden_BxLxD, head_VxD = apply(c, params, input_ids_BxL, pos_BxL, mask_BxL, lora=lora,
                                       hidden_only=True)
        b, length = labels_BxL.shape
        chunk = length
        if c.loss_chunk_mib:
            chunk = losses.chunk_positions(b, length, c.vocab_size, c.loss_chunk_mib * 2**20,
                                           row_ways=batch_ways())
        return losses.chunked_token_nll(
            hidden_BxLxD, head_VxD, labels_BxL, chunk=chunk, softcap=c.final_softcap,
            constrain_logits=lambda z: constrain(z, ("loss_rows", None, "loss_vocab")),
            constrain_head=lambda w: constrain(w, ("loss_vocab", None)))


def build(config: ModelConfig) -> Model:
    """Returns the Model for `config` (any supported family)."""
    return Model(config)


def _mask_positions(ids_BxL, attention_mask, positions):
    if attention_mask is None:
        mask_BxL = jnp.ones(ids_BxL.shape, jnp.int32)
    else:
        mask_BxL = jnp.asarray(attention_mask).astype(jnp.int32)
    if positions is None:
        positions = jnp.maximum(jnp.cumsum(mask_BxL, axis=1) - 1, 0)
    return mask_BxL, jnp.asarray(positions).astype(jnp.int32)


def _rms_norm(x, p, eps, plus_one=False):
    """RMSNorm of x (..., D) over its last axis: the model width, or one head's (q/k norms).

    ``plus_one``: Gemma's, which scales by ``1 + weight`` in float32 before the cast back.
    Computed in float32 (float64 for float64 x)."""
    x32 = x.astype(losses.at_least_f32(x.dtype))
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    y32 = x32 * jax.lax.rsqrt(var + eps)
    scale = p["scale"].reshape((1,) * (x.ndim - 1) + (-1,))
    if plus_one:
        return (y32 * (1.0 + scale.astype(x32.dtype))).astype(x.dtype)
    return scale * y32.astype(x.dtype)


def _norm(c: ModelConfig):
    """The family's norm: RMSNorm (Gemma's with 1 + weight) or LayerNorm."""
    if c.family == "llama":
        return functools.partial(_rms_norm, plus_one=c.gemma_norms)
    return _layer_norm


def _layer_norm(x_BxLxD, p, eps):
    x32 = x_BxLxD.astype(losses.at_least_f32(x_BxLxD.dtype))
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    y = y * p["scale"].astype(x32.dtype)[None, None, :] + p["bias"].astype(x32.dtype)[
        None, None, :]
    return y.astype(x_BxLxD.dtype)


def _act(name, x):
    if name == "silu":
        return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=(name == "gelu_new"))


def _add_bias(y, p):
    if "bias" not in p:
        return y
    b = p["bias"]
    return y + b.reshape((1,) * (y.ndim - b.ndim) + b.shape)


def _lora_delta(lw, hf_name, scale, x_BxLxI):
    """scale * (x @ A) @ B for one layer's adapter, or None when the site has none."""
    if hf_name is None or hf_name not in lw:
        return None
    a_IxR, b_RxO = lw[hf_name]["a"], lw[hf_name]["b"]
    xa_BxLxR = jnp.einsum("bli,ir->blr", x_BxLxI, a_IxR.astype(x_BxLxI.dtype))
    return scale * jnp.einsum("blr,ro->blo", xa_BxLxR, b_RxO.astype(x_BxLxI.dtype))


# Set while a trace needs attention that autodiff can take in any mode and to any order.
_ANY_ORDER: contextvars.ContextVar = contextvars.ContextVar("jbilevel_any_order", default=False)


@contextlib.contextmanager
def differentiable_attention():
    """Within this context, models trace ``attention="cudnn"`` and ``"dot_product"`` through
    XLA's implementation of ``jax.nn.dot_product_attention``.

    cuDNN's fused attention has one reverse-mode rule and nothing else, so ``jax.jvp`` of it,
    and any second derivative (the hypergradient's Hessian-vector products and per-example
    JVPs), fails ("Differentiation rule for 'dot_product_attention_fwd_wrapper' not
    implemented"). ``jbilevel.adjoint`` traces its forward-mode and second-order passes in
    this context, so a model configured for cuDNN trains with it and takes hypergradients
    through XLA's attention: the same function up to rounding, with the scores materialised
    (per layer and per row chunk, under remat).
    """
    token = _ANY_ORDER.set(True)
    try:
        yield
    finally:
        _ANY_ORDER.reset(token)


def _fused_attention(c: ModelConfig, q_BxLxHxK, k_BxLxKVxK, v_BxLxKVxK, mask_BxL):
    """Causal attention via ``jax.nn.dot_product_attention`` (optionally cuDNN flash attention;
    XLA's inside :func:`differentiable_attention`).

    Padding is given as per-row lengths, so rows must be right-padded (real tokens first).
    """
    lengths_B = mask_BxL.sum(axis=-1).astype(jnp.int32)
    window = None if c.sliding_window is None else (c.sliding_window - 1, 0)
    dtype = q_BxLxHxK.dtype
    implementation = ("xla" if _ANY_ORDER.get()  # None could pick cuDNN on a GPU
                      else "cudnn" if c.attention == "cudnn" else None)
    return jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxLxKVxK.astype(dtype), v_BxLxKVxK.astype(dtype), is_causal=True,
        query_seq_lengths=lengths_B, key_value_seq_lengths=lengths_B, local_window_size=window,
        implementation=implementation)


def _layer(c: ModelConfig, sites: dict, scale, x_BxLxD, p, lw, cos_sin, mask_info, cache_kv,
           local=None, prefill=False):
    """One decoder block. Returns (x_BxLxD, new cache (k, v) or None).

    ``local``: whether this layer attends through the sliding window, where the layers differ
    (a traced bool inside the layer scan); None where they do not. ``cos_sin`` is then a pair:
    the global layers' RoPE tables and the windowed layers' (None: the same tables).
    ``prefill``: see :func:`apply`.
    """
    norm = _norm(c)
    if cos_sin is not None and isinstance(cos_sin[0], tuple):
        global_cs, local_cs = cos_sin
        if local_cs is None:
            cos_sin = global_cs
        elif local is None:  # every layer windowed
            cos_sin = local_cs
        else:
            cos_sin = tuple(jnp.where(local, a, b) for a, b in zip(local_cs, global_cs,
                                                                   strict=True))
    b, seq, _ = x_BxLxD.shape
    h, kv, k = c.num_heads, c.kv_heads, c.dim_per_head

    def proj(name, y, eq):
        out = _add_bias(jnp.einsum(eq, y, p[name]["kernel"]), p[name])
        delta = _lora_delta(lw, sites.get(name), scale, y.reshape(b, seq, -1))
        if delta is not None:
            out = out + delta.reshape(out.shape)
        return out

    def attention(y_BxLxD):
        q = proj("q", y_BxLxD, "bld,dhk->blhk")
        kk = proj("k", y_BxLxD, "bld,dhk->blhk")
        vv = proj("v", y_BxLxD, "bld,dhk->blhk")
        fused = _lora_delta(lw, sites.get("qkv"), scale, y_BxLxD)
        if fused is not None:
            if c.family == "gpt_neox":  # HF packs (H, 3, K)
                f = fused.reshape(b, seq, h, 3, k)
                dq, dk, dv = f[:, :, :, 0], f[:, :, :, 1], f[:, :, :, 2]
            else:  # gpt2 packs (3, H, K)
                f = fused.reshape(b, seq, 3, h, k)
                dq, dk, dv = f[:, :, 0], f[:, :, 1], f[:, :, 2]
            q, kk, vv = q + dq, kk + dk, vv + dv
        if c.qk_norm:  # per head, after the projections (and their adapters), before RoPE
            q = norm(q, p["q_norm"], c.norm_eps)
            kk = norm(kk, p["k_norm"], c.norm_eps)
        if cos_sin is not None:
            q = rope.apply(q, *cos_sin)
            kk = rope.apply(kk, *cos_sin)
        kv_mask_BxS, q_slot_L, cache_index = mask_info
        if cache_kv is None and c.attention != "xla":
            return proj("o", _fused_attention(c, q, kk, vv, kv_mask_BxS), "blhk,hkd->bld"), None
        if cache_kv is None:
            k_all, v_all, kv_axes = kk, vv, "bsnk"
            new_cache = None
        else:  # cache (B, KV, S, K): batch axes lead, so attention reads it without a copy
            ck, cv = cache_kv
            start = (0, 0, cache_index, 0)
            copies = ck.shape[0] // b  # a prefill's rows, each written for its samples
            if copies * b != ck.shape[0] or (copies > 1 and not prefill):
                raise ValueError(f"a cache of {ck.shape[0]} rows for {b} rows of tokens "
                                 "(several copies of each only in a prefill)")

            def write(cache, new_BxLxNxK):
                new = new_BxLxNxK.transpose(0, 2, 1, 3).astype(cache.dtype)
                if copies > 1:
                    new = jnp.repeat(new, copies, axis=0)
                return jax.lax.dynamic_update_slice(cache, new, start)

            new_cache = (write(ck, kk), write(cv, vv))
            if prefill:  # the cache held nothing before: the tokens attend to themselves
                k_all, v_all, kv_axes = kk, vv, "bsnk"
            else:
                (k_all, v_all), kv_axes = new_cache, "bnsk"
        s = k_all.shape[kv_axes.index("s")]
        k_slot_S = jnp.arange(s)
        allowed_1xLxS = k_slot_S[None, None, :] <= q_slot_L[None, :, None]
        if c.sliding_window is not None:
            near_1xLxS = (q_slot_L[None, :, None] - k_slot_S[None, None, :]) < c.sliding_window
            allowed_1xLxS &= near_1xLxS if local is None else (near_1xLxS | ~local)
        allowed_BxLxS = allowed_1xLxS & (kv_mask_BxS[:, None, :] > 0)
        q5 = q.reshape(b, seq, kv, h // kv, k)
        scores = jnp.einsum(f"blngk,{kv_axes}->bngls", q5, k_all.astype(q5.dtype),
                            preferred_element_type=losses.at_least_f32(q5.dtype))
        scores = scores * ((c.query_scale or k) ** -0.5)
        scores = losses.soft_cap(scores, c.attn_softcap)
        scores = jnp.where(allowed_BxLxS[:, None, None, :, :], scores, _NEG)
        probs = jax.nn.softmax(scores, axis=-1).astype(v_all.dtype)
        o5 = jnp.einsum(f"bngls,{kv_axes}->blngk", probs, v_all).astype(y_BxLxD.dtype)
        out = proj("o", o5.reshape(b, seq, h, k), "blhk,hkd->bld")
        return out, new_cache

    def mlp(y_BxLxD):
        up = proj("up", y_BxLxD, "bld,df->blf")
        if c.family == "llama":
            hid = _act(c.activation, proj("gate", y_BxLxD, "bld,df->blf")) * up
        else:
            hid = _act(c.activation, up)
        return proj("down", hid, "blf,fd->bld")

    attn_out, new_cache = attention(norm(x_BxLxD, p["attn_norm"], c.norm_eps))
    if c.gemma_norms:
        attn_out = norm(attn_out, p["post_attn_norm"], c.norm_eps)
    if c.parallel_residual:
        x_BxLxD = x_BxLxD + attn_out + mlp(norm(x_BxLxD, p["mlp_norm"], c.norm_eps))
    else:
        x_BxLxD = x_BxLxD + attn_out
        mlp_out = mlp(norm(x_BxLxD, p["mlp_norm"], c.norm_eps))
        if c.gemma_norms:
            mlp_out = norm(mlp_out, p["post_mlp_norm"], c.norm_eps)
        x_BxLxD = x_BxLxD + mlp_out
    return x_BxLxD, new_cache


def _per_layer(c: ModelConfig, stacked) -> tuple:
    """A stacked (N, ...) layer pytree as N per-layer pytrees; a tuple passes through."""
    if isinstance(stacked, tuple):
        return stacked
    return tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(c.num_layers))


def unstack_layers(c: ModelConfig, params, lora=None):
    """(params, lora) with the stacked layer weights split into tuples of per-layer pytrees.

    `apply` with a cache takes either form. Decoding loops split once, outside the loop:
    slicing a stacked weight inside the loop body copies it on every iteration. The
    optimization barrier keeps XLA from sinking the slices back into the loop.
    """
    layers = _per_layer(c, params["layers"])
    lw = _per_layer(c, {} if lora is None else lora.weights)
    layers, lw = jax.lax.optimization_barrier((layers, lw))
    params = dict(params, layers=layers)
    return params, None if lora is None else dataclasses.replace(lora, weights=lw)


def apply(c: ModelConfig, params, ids_BxL, pos_BxL, kv_mask_BxS, *, lora=None, cache=None,
          cache_index=0, last_only=False, hidden_only=False, stream_layers=False,
          prefill=False):
    """Core forward, optionally through a KV cache.

    Args:
      c: config; params: parameter pytree; ids_BxL, pos_BxL: tokens and their positions.
      kv_mask_BxS: 1 for key slots that hold real tokens. Without a cache S == L; with a cache
        S is the cache length and the L new tokens are written at slots cache_index..+L.
      lora: optional LoRA adapters.
      cache: None, or a tuple with one (k, v) pair per layer, each (B, KV, S, K). With a cache
        the layers run unrolled: scanning them would restack the whole cache on every call
        (every decoded token), while separate buffers are updated in place.
      last_only: logits of the last position only, L -> 1 (a prefill before decoding).
      hidden_only: return ``(hidden_BxLxD, head_VxD)`` (after the final norm, in the compute
        dtype) instead of logits, for a loss that applies the head itself (cache must be None).
      stream_layers: with a cache, each layer's weights wait for the previous layer's output
        (an optimization barrier), so weights split over fsdp are gathered one layer at a
        time; otherwise XLA may gather every layer's up front (the whole model on a device).
      prefill: the cache holds nothing yet (``cache_index`` 0): the L tokens attend to each
        other only (L x L scores, not L x S; ``kv_mask_BxS`` is then B x L), and their keys
        and values go to slots 0..L-1. The cache may hold G rows for each of the B (a prompt's
        G samples): each row's keys and values are written to its G copies, so a prompt is
        prefilled once, not once per sample.
    Returns:
      (logits_BxLxV float32 (float64 for float64 params), updated cache (same structure) or
      None).
    """
    if prefill and (cache is None or not isinstance(cache_index, int) or cache_index != 0):
        raise ValueError("prefill=True fills an empty cache: pass the cache and cache_index=0")
    if c.compute_dtype is not None:
        cd = jnp.dtype(c.compute_dtype)
        params = jax.tree.map(lambda a: a.astype(cd), params)
    x = jnp.take(params["embed"]["embedding"], ids_BxL, axis=0)
    if c.gemma_norms:  # Gemma scales the embeddings by sqrt(D), in their dtype
        x = x * jnp.asarray(c.hidden_size ** 0.5, x.dtype)
    if c.family == "gpt2":
        x = x + jnp.take(params["pos_embed"]["embedding"], pos_BxL, axis=0)
    x = constrain(x, _ACT)
    cs = None if c.family == "gpt2" else rope.cos_sin(c, pos_BxL)
    if c.rope_local_theta is not None:  # Gemma 3: plain RoPE at another base on windowed layers
        plain = c.replace(rope_type="default", rope_theta=c.rope_local_theta, rope_factor=1.0)
        cs = (cs, rope.cos_sin(plain, pos_BxL))
    local_N = jnp.asarray(c.local_layers) if c.windows_differ else None
    q_slot_L = cache_index + jnp.arange(ids_BxL.shape[1])
    mask_info = (kv_mask_BxS, q_slot_L, cache_index)
    if lora is None:
        lw, scale, sites = {}, 0.0, {}
    else:
        lw, scale = lora.weights, lora.scale
        sites = {site: name for name, site in LORA_SITES[c.family].items()}

    def body(x_BxLxD, xs):
        p, lwl, ckv, local = xs
        x_BxLxD = constrain(x_BxLxD, _ACT)
        x_BxLxD, new = _layer(c, sites, scale, x_BxLxD, p, lwl, cs, mask_info, ckv, local,
                              prefill=prefill)
        return x_BxLxD, new

    if c.remat:
        policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
                  if c.remat_policy == "dots" else None)
        body = jax.checkpoint(body, prevent_cse=False, policy=policy)
    if cache is None:
        x, _ = jax.lax.scan(body, x, (params["layers"], lw, None, local_N),
                            unroll=min(c.scan_unroll, c.num_layers))
        new_cache = None
    else:
        if len(cache) != c.num_layers:
            raise ValueError(f"cache has {len(cache)} layers, the model {c.num_layers}")
        new_cache = []
        layers, lw_layers = _per_layer(c, params["layers"]), _per_layer(c, lw)
        for i, ckv in enumerate(cache):
            p_i, lw_i = layers[i], lw_layers[i]
            if stream_layers:
                (p_i, lw_i), x = jax.lax.optimization_barrier(((p_i, lw_i), x))
            x, new = body(x, (p_i, lw_i, ckv, None if local_N is None else local_N[i]))
            new_cache.append(new)
        new_cache = tuple(new_cache)
    if last_only:
        x = x[:, -1:]
    x = _norm(c)(x, params["final_norm"], c.norm_eps)
    head = params["embed"]["embedding"] if c.tie_word_embeddings else params["lm_head"]["kernel"]
    if hidden_only:
        return x, head
    logits = jnp.einsum("bld,vd->blv", x, head,
                        preferred_element_type=losses.at_least_f32(x.dtype, head.dtype))
    logits = losses.soft_cap(logits, c.final_softcap)
    logits = constrain(logits, ("batch", None, "vocab"))
    return logits, new_cache

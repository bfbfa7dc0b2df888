"""KV-cached sampling from left-padded prompts, with per-token log-probs.

On a device mesh (``generate(..., mesh=)``, as online generation runs under the training
mesh) the prompts and the KV cache are split over the batch axes, and the parameters are
gathered over ``fsdp`` once per call into a decoding sharding (tensor-parallel axes kept), so
the loop over decoded tokens moves no weights; ``gather_params=False`` keeps them
fsdp-sharded (for a model that does not fit one device), and then every decoded token
gathers them again, one layer at a time (``apply(stream_layers=True)``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jbilevel import sharding as sh
from jbilevel.losses import token_nll
from jbilevel.models.transformer import _is_spec, _specs, apply, unstack_layers

_CACHE_AXES = ("batch", "kv_heads", None, "head_dim")


@dataclasses.dataclass(frozen=True)
class Generation:
    """Sampled continuations; unpacks as (tokens, logprobs, mask).

    tokens_BxGxT: sampled ids (pad_id after EOS). mask_BxGxT: 1 up to and including the first
    EOS, 0 after. logprobs_BxGxT: log-prob of each token under the *untempered* model,
    log_softmax(logits)[token], i.e. what `forward` gives for the same tokens (what the
    importance ratio of online self-refinement needs). sampling_logprobs_BxGxT: log-prob under
    the distribution actually sampled from (temperature, top-k, top-p applied; 0 for greedy).
    Masked positions hold 0 in both. decoded: how many of the T positions were decoded (an
    int32 scalar): decoding stops once every row has stopped, the later positions padding.
    """

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    sampling_logprobs: jax.Array
    decoded: jax.Array

    def __iter__(self):
        return iter((self.tokens, self.logprobs, self.mask))


jax.tree_util.register_dataclass(
    Generation, data_fields=["tokens", "logprobs", "mask", "sampling_logprobs", "decoded"],
    meta_fields=[])


def _process(logits_BxV, temperature, top_k: int, top_p: float):
    z = logits_BxV / temperature
    if top_k > 0:
        kth_Bx1 = jax.lax.top_k(z, top_k)[0][:, -1:]
        z = jnp.where(z < kth_Bx1, -jnp.inf, z)
    if top_p < 1.0:
        sorted_BxV = jnp.flip(jnp.sort(z, axis=-1), axis=-1)
        probs = jax.nn.softmax(sorted_BxV, axis=-1)
        before_BxV = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        keep = before_BxV < top_p  # always keeps the top token
        cutoff_Bx1 = jnp.min(jnp.where(keep, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        z = jnp.where(z < cutoff_Bx1, -jnp.inf, z)
    return z


def _token_logprob(logits_BxV, tok_B):
    """log_softmax(logits)[tok] without materialising the (B, V) log-softmax."""
    return -token_nll(logits_BxV[:, None, :], tok_B[:, None])[:, 0]


def decoding_rules(rules: sh.AxisRules, gather_params: bool = True) -> sh.AxisRules:
    """The axis table while decoding: the training table with the parameters' ``embed``
    dimension unsplit (gathered over fsdp once), unless ``gather_params`` is False."""
    return sh.AxisRules.from_mapping({**dict(rules.rules), "embed": None}) if gather_params \
        else rules


@functools.partial(jax.jit, static_argnames=(
    "c", "max_new_tokens", "num_samples", "top_k", "top_p", "greedy", "mesh", "rules",
    "stream_layers"))
def _generate(c, params, ids_BxP, mask_BxP, rng, temperature, eos_id, pad_id, lora, *,
              max_new_tokens, num_samples, top_k, top_p, greedy, mesh=None, rules=None,
              stream_layers=False):
    if mesh is None:
        return _sample(c, params, ids_BxP, mask_BxP, rng, temperature, eos_id, pad_id, lora,
                       max_new_tokens=max_new_tokens, num_samples=num_samples, top_k=top_k,
                       top_p=top_p, greedy=greedy)
    with sh.activation_sharding(mesh, rules):
        if c.compute_dtype is not None:  # gather what the forward uses, not the master copy
            params = jax.tree.map(lambda a: a.astype(jnp.dtype(c.compute_dtype)), params)
        axes = jax.tree.map(lambda spec: spec[1], _specs(c), is_leaf=_is_spec)
        params = jax.tree.map(sh.constrain, params, axes)
        return _sample(c, params, ids_BxP, mask_BxP, rng, temperature, eos_id, pad_id, lora,
                       max_new_tokens=max_new_tokens, num_samples=num_samples, top_k=top_k,
                       top_p=top_p, greedy=greedy, stream_layers=stream_layers)


def _sample(c, params, ids_BxP, mask_BxP, rng, temperature, eos_id, pad_id, lora, *,
            max_new_tokens, num_samples, top_k, top_p, greedy, stream_layers=False):
    g, t_new = num_samples, max_new_tokens
    b, p = ids_BxP.shape
    prompt_mask = mask_BxP.astype(jnp.int32)
    mask = jnp.repeat(prompt_mask, g, axis=0)
    bg = b * g
    dtype = jnp.dtype(c.compute_dtype) if c.compute_dtype else params["embed"]["embedding"].dtype
    # The last sampled token is never fed back, so the cache holds p + t_new - 1 slots.
    shape = (bg, c.kv_heads, p + t_new - 1, c.dim_per_head)
    cache = tuple((sh.constrain(jnp.zeros(shape, dtype), _CACHE_AXES),
                   sh.constrain(jnp.zeros(shape, dtype), _CACHE_AXES))
                  for _ in range(c.num_layers))
    params, lora = unstack_layers(c, params, lora)  # once, for the prefill and the loop
    # Each prompt is prefilled once (its keys and values written for its G samples), its
    # tokens attending to each other only: p x p scores, not p x the cache's length.
    pos = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    logits, cache = apply(c, params, ids_BxP, pos, prompt_mask, lora=lora, cache=cache,
                          cache_index=0, last_only=True, stream_layers=stream_layers,
                          prefill=True)
    kv_mask_BxS = jnp.concatenate([mask, jnp.ones((bg, t_new - 1), jnp.int32)], axis=1)
    next_pos_B = jnp.sum(mask, axis=1)

    def pick(logits_BxV, done_B, key):
        key, sub = jax.random.split(key)
        if greedy:
            tok_B = jnp.argmax(logits_BxV, axis=-1)
            lp_sample_B = jnp.zeros((bg,), jnp.float32)
        else:
            z = _process(logits_BxV, temperature, top_k, top_p)
            tok_B = jax.random.categorical(sub, z, axis=-1)
            lp_sample_B = _token_logprob(z, tok_B)
        lp_B = _token_logprob(logits_BxV, tok_B)
        valid_B = ~done_B
        tok_B = jnp.where(valid_B, tok_B, pad_id).astype(ids_BxP.dtype)
        done_B = done_B | jnp.any(tok_B[:, None] == eos_id[None, :], axis=1)  # -1: never
        out = (tok_B, jnp.where(valid_B, lp_B, 0.0), valid_B.astype(jnp.int32),
               jnp.where(valid_B, lp_sample_B, 0.0))
        return out, done_B, key

    # One decoding step per new token until every row has stopped (or T tokens): the
    # remaining positions would be padding, so a batch whose answers end early stops there.
    def more(carry):
        t, _, _, done_B, _, _ = carry
        return (t < t_new - 1) & ~jnp.all(done_B)

    def step(carry):
        t, cache, logits_BxV, done_B, key, outs = carry
        out, done_B, key = pick(logits_BxV, done_B, key)
        new_logits, cache = apply(c, params, out[0][:, None], (next_pos_B + t)[:, None],
                                  kv_mask_BxS, lora=lora, cache=cache, cache_index=p + t,
                                  stream_layers=stream_layers)
        outs = tuple(o_TxB.at[t].set(o_B) for o_TxB, o_B in zip(outs, out, strict=True))
        return t + 1, cache, new_logits[:, 0], done_B, key, outs

    # what a stopped row writes: pad, log-probs 0, mask 0
    outs = (jnp.full((t_new, bg), pad_id, ids_BxP.dtype), jnp.zeros((t_new, bg), jnp.float32),
            jnp.zeros((t_new, bg), jnp.int32), jnp.zeros((t_new, bg), jnp.float32))
    init = (jnp.int32(0), cache, jnp.repeat(logits[:, -1], g, axis=0), jnp.zeros((bg,), bool),
            rng, outs)
    t, _, last_logits, done, key, outs = jax.lax.while_loop(more, step, init)
    decoded = t + jnp.where(jnp.all(done), 0, 1)  # the last position, unless all had stopped
    last, _, _ = pick(last_logits, done, key)
    toks, lps, masks, slps = (o_TxB.at[t].set(o_B)
                              for o_TxB, o_B in zip(outs, last, strict=True))

    def shape_out(x_TxBG):
        return x_TxBG.T.reshape(b, g, t_new)

    return Generation(shape_out(toks), shape_out(lps), shape_out(masks), shape_out(slps), decoded)


def generate(model, params, prompt_ids_BxP, prompt_mask_BxP, rng, *, max_new_tokens: int,
             num_samples: int = 1, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             greedy: bool = False, eos_id: int | list[int] | None = None, pad_id: int = 0,
             lora=None, mesh=None, rules: sh.AxisRules | None = None,
             gather_params: bool = True,
             lower: bool = False) -> Generation | jax.stages.Lowered:
    """Samples num_samples continuations per prompt through a KV cache (one jitted program).

    Args:
      model: a Model (its config is the static part of the jit).
      params: parameter pytree.
      prompt_ids_BxP, prompt_mask_BxP: LEFT-padded prompts (mask 1 = real token, at least one
        real token per row); positions start at 0 on the first real token, as HF generate.
      rng: PRNG key (unused when greedy).
      max_new_tokens: T, the most tokens sampled per row.
      num_samples: G continuations per prompt (rows b*G .. b*G+G-1 share prompt b).
      temperature, top_k (0 = off), top_p (1 = off): the sampling distribution.
      greedy: argmax decoding (HF do_sample=False).
      eos_id: stop token (or list of them, as HF eos_token_id); it is kept (mask 1) and
        later positions get pad_id and mask 0.
      lora: optional LoRA adapters.
      mesh: run on this device mesh: prompt rows and the KV cache split over the batch
        axes of ``rules`` (default ``AxisRules()``), parameters gathered over fsdp once per
        call (see the module docstring; ``gather_params=False`` keeps them split).
      lower: return the call's program lowered (``jax.stages.Lowered``) instead of running
        it; ``params``, the prompts and ``rng`` may then be ``jax.ShapeDtypeStruct`` s (with
        the shardings a run's arrays have). It is the very program such a call runs, so a
        compilation cache filled ahead of time (``scripts/compile_check.py``) serves the run.
    Returns:
      Generation(tokens_BxGxT, logprobs_BxGxT, mask_BxGxT, sampling_logprobs_BxGxT, decoded);
      see its docstring for which log-prob is which. Decoding stops early once every row has
      stopped (``decoded`` < T); the positions after are padding, as they would be anyway.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (or use greedy=True)")
    eos_list = [] if eos_id is None else ([eos_id] if isinstance(eos_id, int) else list(eos_id))
    # the scalars and stop ids as host values: jax.numpy would compile a conversion for each
    # (small programs, but compiled within the sampler's first call)
    eos = np.asarray(eos_list or [-1], np.int32)
    program = _generate.lower if lower else _generate
    return program(model.config, params, _array(prompt_ids_BxP), _array(prompt_mask_BxP),
                   rng, np.float32(temperature), eos, np.int32(pad_id), lora,
                   max_new_tokens=max_new_tokens, num_samples=num_samples, top_k=int(top_k),
                   top_p=float(top_p), greedy=bool(greedy), mesh=mesh,
                   rules=None if mesh is None else decoding_rules(rules or sh.AxisRules(),
                                                                  gather_params),
                   stream_layers=mesh is not None and not gather_params)


def _array(x):
    """An array for the jitted sampler; a ``jax.ShapeDtypeStruct`` stays one (lowering)."""
    return x if isinstance(x, jax.ShapeDtypeStruct) else jnp.asarray(x)

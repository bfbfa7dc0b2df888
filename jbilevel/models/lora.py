"""LoRA adapters on the HF-named projections: y = x W + (alpha / r) (x A) B, B = 0 at init."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jbilevel.models.config import ModelConfig
from jbilevel.models.transformer import LORA_SITES


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Adapter weights (the trainable pytree part) plus alpha and rank (static metadata).

    weights[hf_module_name] = {"a": (N, in, r), "b": (N, r, out)}, stacked over the N layers.
    Gradients and optimizer states have the same structure; alpha and rank never get one.
    """

    weights: dict
    alpha: float
    rank: int

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


jax.tree_util.register_dataclass(LoRA, data_fields=["weights"], meta_fields=["alpha", "rank"])


def _config(model_or_config) -> ModelConfig:
    return model_or_config if isinstance(model_or_config, ModelConfig) else model_or_config.config


def site_dims(c: ModelConfig, site: str) -> tuple[int, int]:
    """(input, output) features of a LoRA site's kernel (``LORA_SITES``' values)."""
    d, f = c.hidden_size, c.mlp_size
    hk, kvk = c.num_heads * c.dim_per_head, c.kv_heads * c.dim_per_head
    return {"q": (d, hk), "k": (d, kvk), "v": (d, kvk), "o": (hk, d), "gate": (d, f),
            "up": (d, f), "down": (f, d), "qkv": (d, hk + 2 * kvk)}[site]


# Logical axes of each site's (input, output) dimension, for sharding the adapters like the
# kernels they adapt (A's input dim as the kernel's, B's output dim as the kernel's).
_SITE_AXES = {"q": ("embed", "heads"), "k": ("embed", "kv_heads"), "v": ("embed", "kv_heads"),
              "o": ("heads", "embed"), "gate": ("embed", "mlp"), "up": ("embed", "mlp"),
              "down": ("mlp", "embed"), "qkv": ("embed", "heads")}


def lora_axes(config: ModelConfig, lora: LoRA) -> LoRA:
    """Logical axes of the adapters (same pytree as ``lora``), for ``sharding.tree_shardings``.

    A (N, in, r) is sharded on its input dim and B (N, r, out) on its output dim like the
    adapted kernel; the rank dim is whole.
    """
    axes = {}
    for name in lora.weights:
        i, o = _SITE_AXES[LORA_SITES[config.family][name]]
        axes[name] = {"a": ("layers", i, None), "b": ("layers", None, o)}
    return LoRA(axes, lora.alpha, lora.rank)


def resolve_targets(c: ModelConfig, targets) -> list[str]:
    """HF module names -> this family's LoRA site keys ("c_proj" means both GPT-2 c_projs)."""
    sites = LORA_SITES[c.family]
    out = []
    for t in targets:
        names = [n for n in sites if n == t or n.endswith("." + t)]
        if not names:
            raise ValueError(f"LoRA target {t!r} is not a {c.family} projection "
                             f"(available: {sorted(sites)})")
        out.extend(n for n in names if n not in out)
    return out


def init_lora(model_or_config, rng, *, rank: int, alpha: float, targets=("q_proj", "v_proj"),
              dtype=jnp.float32) -> LoRA:
    """Fresh adapters: A ~ U(-1/sqrt(in), 1/sqrt(in)) (as PEFT), B = 0, so forward is unchanged.

    Args:
      model_or_config: a Model or ModelConfig.
      rng: PRNG key.
      rank, alpha: LoRA rank r and alpha; the update is scaled by alpha / r.
      targets: HF module names, e.g. q_proj/v_proj (llama), query_key_value (gpt_neox),
        c_attn (gpt2).
    Returns:
      LoRA pytree for `forward(..., lora=)`, `generate(..., lora=)` and `merge_lora`.
    """
    c = _config(model_or_config)
    names = resolve_targets(c, targets)
    keys = jax.random.split(rng, len(names))
    weights = {}
    for key, name in zip(keys, names, strict=True):
        i, o = site_dims(c, LORA_SITES[c.family][name])
        bound = 1.0 / i ** 0.5
        a = jax.random.uniform(key, (c.num_layers, i, rank), jnp.float32, -bound, bound)
        weights[name] = {"a": a.astype(dtype), "b": jnp.zeros((c.num_layers, rank, o), dtype)}
    return LoRA(weights, float(alpha), int(rank))


def kernel_updates(params, lora: LoRA, config: ModelConfig) -> dict:
    """``{site: (alpha / r) A B}`` in float32, each shaped as the kernel it updates (a fused
    qkv adapter split into its q, k and v parts in HF's packing)."""
    c = config
    h, k = c.num_heads, c.dim_per_head
    n = c.num_layers
    out = {}
    for name, w in lora.weights.items():
        site = LORA_SITES[c.family][name]
        delta_NxIxO = lora.scale * jnp.einsum(
            "nir,nro->nio", w["a"].astype(jnp.float32), w["b"].astype(jnp.float32))
        if site == "qkv":
            d = c.hidden_size
            if c.family == "gpt_neox":
                parts = delta_NxIxO.reshape(n, d, h, 3, k)
                split = [parts[:, :, :, j] for j in range(3)]
            else:
                parts = delta_NxIxO.reshape(n, d, 3, h, k)
                split = [parts[:, :, j] for j in range(3)]
            updates = dict(zip(("q", "k", "v"), split, strict=True))
        else:
            updates = {site: delta_NxIxO}
        for s, dlt in updates.items():
            out[s] = dlt.reshape(params["layers"][s]["kernel"].shape)
    return out


def merge_lora(params, lora: LoRA, config: ModelConfig):
    """Returns params with W += (alpha / r) A B folded in (for save_pretrained or inference),
    added in float32 and stored in W's dtype.

    Invariant: forward(merge_lora(p, l, c), x) == forward(p, x, lora=l) up to rounding.
    """
    layers = dict(params["layers"])
    for s, dlt in kernel_updates(params, lora, config).items():
        kern = layers[s]["kernel"]
        layers[s] = {**layers[s],
                     "kernel": (kern.astype(jnp.float32) + dlt).astype(kern.dtype)}
    return {**params, "layers": layers}


def merge_rounding(params, lora: LoRA, config: ModelConfig) -> dict:
    """What storing the merged weights in the base's dtype does to the adapters' update
    (what :func:`merge_lora` keeps of ``(alpha / r) A B``, against the update itself).

    Returns: ``{"lost": the share of the update's nonzero elements rounded to nothing,
    "error": |kept - update| / |update| over every adapted kernel}``, as float32 scalars
    (both 0 for float32 weights). A bfloat16 weight keeps 8 significant bits, so an update
    below about 1/256 of it is lost: the learning rates of LLM fine-tuning make such updates.
    """
    lost = nonzero = err2 = norm2 = jnp.float32(0)
    for s, dlt in kernel_updates(params, lora, config).items():
        base = params["layers"][s]["kernel"]
        kept = (base.astype(jnp.float32) + dlt).astype(base.dtype).astype(jnp.float32) - base
        lost += jnp.sum((kept == 0) & (dlt != 0), dtype=jnp.float32)
        nonzero += jnp.sum(dlt != 0, dtype=jnp.float32)
        err2 += jnp.sum(jnp.square(kept - dlt))
        norm2 += jnp.sum(jnp.square(dlt))
    return {"lost": lost / jnp.maximum(nonzero, 1.0),
            "error": jnp.sqrt(err2 / jnp.maximum(norm2, jnp.finfo(jnp.float32).tiny))}

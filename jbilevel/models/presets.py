"""Named architectures of the paper's reference runs, as :class:`ModelConfig` values.

Each preset is the model's HF ``config.json`` read through :meth:`ModelConfig.from_hf`, so a
preset and ``load_pretrained`` of the real checkpoint describe the same parameter tree. They
let compile-only checks and configs name a model without its weights.
"""

from __future__ import annotations

from jbilevel.models.config import ModelConfig

# The architecture fields of each model's HF config.json (EleutherAI/pythia-1b,
# meta-llama/Meta-Llama-3-8B-Instruct, Qwen/Qwen2.5-0.5B, Qwen/Qwen2.5-1.5B, Qwen/Qwen3-1.7B,
# Qwen/Qwen3-8B, google/gemma-2-2b and google/gemma-3-1b-it), as transformers 4 wrote them.
_HF = {
    "pythia-1b": {
        "model_type": "gpt_neox", "vocab_size": 50304, "hidden_size": 2048,
        "num_hidden_layers": 16, "num_attention_heads": 8, "intermediate_size": 8192,
        "hidden_act": "gelu", "rotary_pct": 0.25, "rotary_emb_base": 10000,
        "max_position_embeddings": 2048, "layer_norm_eps": 1e-5,
        "use_parallel_residual": True, "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 0,
    },
    "llama-3-8b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "intermediate_size": 14336, "hidden_act": "silu", "rope_theta": 500000.0,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 128000, "eos_token_id": [128001, 128009],
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "intermediate_size": 4864, "hidden_act": "silu", "rope_theta": 1000000.0,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151643,
    },
    "qwen2.5-1.5b": {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "intermediate_size": 8960, "hidden_act": "silu", "rope_theta": 1000000.0,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151643,
    },
    "qwen3-1.7b": {
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2048,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "intermediate_size": 6144, "hidden_act": "silu",
        "rope_theta": 1000000.0, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "attention_bias": False, "use_sliding_window": False,
        "max_window_layers": 28, "bos_token_id": 151643, "eos_token_id": 151645,
    },
    "qwen3-8b": {
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096,
        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "intermediate_size": 12288, "hidden_act": "silu",
        "rope_theta": 1000000.0, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "attention_bias": False, "use_sliding_window": False,
        "max_window_layers": 36, "bos_token_id": 151643, "eos_token_id": 151645,
    },
    "gemma-2-2b": {
        "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 2304,
        "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
        "head_dim": 256, "intermediate_size": 9216, "hidden_activation": "gelu_pytorch_tanh",
        "rope_theta": 10000.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
        "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0, "tie_word_embeddings": True,
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
    },
    "gemma-3-1b": {
        "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 1152,
        "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 256, "intermediate_size": 6912, "hidden_activation": "gelu_pytorch_tanh",
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256,
        "sliding_window": 512, "sliding_window_pattern": 6, "attn_logit_softcapping": None,
        "final_logit_softcapping": None, "tie_word_embeddings": True,
        "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0,
    },
}
PRESETS = tuple(_HF)


def preset(name: str, **overrides) -> ModelConfig:
    """The named architecture, optionally with fields replaced (e.g. ``num_layers=4``).

    Args:
      name: one of :data:`PRESETS`.
      overrides: ModelConfig fields to change (``compute_dtype``, ``remat``, ``num_layers``...).
        Another ``num_layers`` keeps the windowed and full layers' pattern (Gemma), cut to
        those layers.
    Returns:
      The ModelConfig.
    """
    if name not in _HF:
        raise ValueError(f"unknown model preset {name!r} (available: {', '.join(PRESETS)})")
    config = ModelConfig.from_hf(_HF[name])
    if "num_layers" in overrides and "local_layers" not in overrides:
        config = with_layers(config, overrides.pop("num_layers"))
    return config.replace(**overrides)


def with_layers(config: ModelConfig, num_layers: int) -> ModelConfig:
    """``config`` with ``num_layers`` decoder layers (e.g. to compile a few layers of a large
    model); a model of windowed and full layers (Gemma) keeps its pattern, repeated or cut."""
    pattern = config.local_layers
    local = None if pattern is None else tuple(pattern[i % len(pattern)]
                                               for i in range(num_layers))
    return config.replace(num_layers=num_layers, local_layers=local)


def param_count(config: ModelConfig) -> int:
    """Number of parameters of the architecture (no arrays are built)."""
    import math

    import jax

    from jbilevel.models.transformer import _is_spec, _specs

    leaves = jax.tree.leaves(_specs(config), is_leaf=_is_spec)
    return sum(math.prod(shape) for shape, _, _ in leaves)

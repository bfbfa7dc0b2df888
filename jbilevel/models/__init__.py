"""Flax/JAX decoder LMs with exact HF checkpoint parity, LoRA and KV-cached sampling.

Families: Llama (also Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3 text), GPT-NeoX, GPT-2. Everything
is a pure function of a
plain dict parameter pytree; see `transformer.py` for the layout and `hf_io.py` for HF names.
"""

from jbilevel.models.base import base_model_path
from jbilevel.models.config import ModelConfig
from jbilevel.models.hf_io import (
    load_adapter,
    load_pretrained,
    load_tokenizer,
    read_config,
    save_adapter,
    save_pretrained,
)
from jbilevel.models.lora import LoRA, init_lora, lora_axes, merge_lora
from jbilevel.models.sampling import Generation, generate
from jbilevel.models.transformer import Model, build, differentiable_attention

__all__ = [
    "Generation",
    "LoRA",
    "Model",
    "ModelConfig",
    "base_model_path",
    "build",
    "differentiable_attention",
    "generate",
    "init_lora",
    "load_adapter",
    "load_pretrained",
    "load_tokenizer",
    "lora_axes",
    "merge_lora",
    "read_config",
    "save_adapter",
    "save_pretrained",
]

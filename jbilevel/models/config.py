"""One frozen config for every supported decoder family, read from and written to HF config.json."""

from __future__ import annotations

import dataclasses
from typing import Any

FAMILIES = ("llama", "gpt_neox", "gpt2")
# HF model_type -> family. Qwen2, Qwen3, Mistral, Gemma 2 and Gemma 3 (text) are Llama with
# options (q/k/v bias, q/k norms, sliding windows, Gemma's norms, scales and soft caps).
MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma2": "llama",
    "gemma3_text": "llama",
    "gpt_neox": "gpt_neox",
    "gpt2": "gpt2",
}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
ACTIVATIONS = ("silu", "gelu", "gelu_new")
ATTENTIONS = ("xla", "dot_product", "cudnn")
REMAT_POLICIES = ("nothing", "dots")
GEMMA = ("gemma2", "gemma3_text")
_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only LM; hashable, so it can be a static jit argument."""

    family: str = "llama"  # "llama" (also Qwen2/3, Mistral, Gemma 2/3), "gpt_neox" or "gpt2"
    vocab_size: int = 256  # rows of the token embedding and of the output head
    hidden_size: int = 64  # model width D
    num_layers: int = 2  # decoder blocks
    num_heads: int = 4  # query heads H
    num_kv_heads: int | None = None  # key/value heads (GQA); None means num_heads
    head_dim: int | None = None  # per-head width; None means hidden_size // num_heads
    intermediate_size: int | None = None  # MLP width F; None means 4 * hidden_size
    max_position_embeddings: int = 2048  # learned positions (gpt2) / RoPE scaling reference
    norm_eps: float = 1e-6  # RMSNorm (llama) or LayerNorm epsilon
    activation: str = "silu"  # "silu" (SwiGLU), "gelu" (exact), "gelu_new" (tanh approximation)
    tie_word_embeddings: bool = False  # output head shares the token embedding
    rope_theta: float = 10000.0  # RoPE base wavelength
    rope_type: str = "default"  # "default", "linear", "dynamic" (NTK) or "llama3"
    rope_factor: float = 1.0  # scaling factor of linear / dynamic / llama3 RoPE
    rope_low_freq_factor: float = 1.0  # llama3 RoPE only
    rope_high_freq_factor: float = 4.0  # llama3 RoPE only
    rope_original_max_position_embeddings: int | None = None  # llama3 RoPE context length
    partial_rotary_factor: float = 1.0  # fraction of head_dim that is rotated (GPT-NeoX: 0.25)
    qkv_bias: bool = False  # bias on the q/k/v projections (Qwen2, GPT-NeoX, GPT-2)
    o_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False  # bias on the MLP projections
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head's query and key, before RoPE
    parallel_residual: bool = False  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    sliding_window: int | None = None  # Mistral: attend to the last `sliding_window` tokens only
    # Which layers the window applies to (Gemma: alternate, or 5 of every 6); None: all of them.
    local_layers: tuple[bool, ...] | None = None
    rope_local_theta: float | None = None  # Gemma 3: plain RoPE at this base on windowed layers
    # Gemma 2 / 3 (model_type gemma2, gemma3_text; all of these go together):
    gemma_norms: bool = False  # RMSNorm scale 1 + weight in float32; attention and MLP outputs
    #   normalised too (post_attention / post_feedforward norms); embeddings times sqrt(D)
    query_scale: int | None = None  # scores scaled by query_scale ** -0.5 (None: head width)
    attn_softcap: float | None = None  # Gemma 2: scores = cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: logits = cap * tanh(logits / cap)
    model_type: str | None = None  # HF model_type written to config.json; None: family default
    bos_token_id: int | None = None  # copied to/from config.json
    eos_token_id: int | tuple[int, ...] | None = None  # copied to/from config.json (a list there)
    pad_token_id: int | None = None  # copied to/from config.json
    compute_dtype: str | None = None  # e.g. "bfloat16": params cast for compute; None: as stored
    remat: bool = False  # jax.checkpoint each decoder layer (recompute activations in backward)
    # with remat: "nothing" saved (recompute the whole layer) or "dots" (keep matmul outputs)
    remat_policy: str = "nothing"
    # Layers per iteration of the lax.scan over layers: 1 keeps one compiled layer body (fast
    # compiles at any depth); >= num_layers unrolls them all, which lets XLA overlap the layers
    # and drops the scan's stacked residual buffers (CPU, 4 layers: ~5% faster train step).
    scan_unroll: int = 1
    # "xla": explicit scores (any padding). "dot_product": jax.nn.dot_product_attention with
    # its default implementation; "cudnn": the same forced onto cuDNN flash attention (GPU,
    # bf16/f16). Both fused paths serve cache-free forwards and assume right padding (real
    # tokens first, as in jbilevel's training batches and its online buffer's rows); KV-cache
    # decoding always uses "xla", and so do the hypergradient's forward-mode and second-order
    # passes (cuDNN's kernel has one reverse-mode rule; ``differentiable_attention``).
    attention: str = "xla"
    # The LM loss applies the output projection this many MiB of float32 logits at a time on
    # each device (``jbilevel.losses.chunked_token_nll``); the [rows, tokens, vocab] logits are
    # never held whole. 0: one chunk (the whole sequence).
    loss_chunk_mib: int = 256

    def __post_init__(self):
        if isinstance(self.eos_token_id, list):  # as in config.json; a tuple keeps it hashable
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.local_layers, list):
            object.__setattr__(self, "local_layers", tuple(bool(x) for x in self.local_layers))
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} is not supported (choose from {FAMILIES})")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r} is not supported (choose {ROPE_TYPES})")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention={self.attention!r} is not supported ({ATTENTIONS})")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r} is not supported "
                             f"({REMAT_POLICIES})")
        if self.loss_chunk_mib < 0:
            raise ValueError(f"loss_chunk_mib={self.loss_chunk_mib} must be >= 0 (0: no chunks)")
        if self.scan_unroll < 1:
            raise ValueError(f"scan_unroll={self.scan_unroll} must be >= 1 (1: no unrolling)")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is not supported ({ACTIVATIONS})")
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.kv_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} not divisible by num_heads={self.num_heads}; "
                "set head_dim explicitly"
            )
        if self.rotary_dim % 2:
            raise ValueError(f"rotary dimension {self.rotary_dim} must be even")
        if self.family != "llama" and self.kv_heads != self.num_heads:
            raise ValueError(f"family={self.family!r} has no grouped-query attention")
        if self.model_type is not None and MODEL_TYPES.get(self.model_type) != self.family:
            raise ValueError(
                f"model_type={self.model_type!r} does not match family {self.family!r}")
        mt = self.hf_model_type
        if self.qk_norm != (mt in ("qwen3", "gemma3_text")):
            raise ValueError(f"qk_norm={self.qk_norm} with model_type={mt!r}: the query/key "
                             "norms are Qwen3's and Gemma 3's (model_type qwen3, gemma3_text)")
        if self.gemma_norms != (mt in GEMMA):
            raise ValueError(f"gemma_norms={self.gemma_norms} with model_type={mt!r}: Gemma's "
                             f"norms go with model_type {' or '.join(GEMMA)} and only with it")
        if self.rope_local_theta is not None and self.sliding_window is None:
            raise ValueError(f"rope_local_theta={self.rope_local_theta} is the RoPE base of the "
                             "windowed layers, and there are none: set a sliding_window")
        if self.local_layers is not None:
            if len(self.local_layers) != self.num_layers or self.sliding_window is None:
                raise ValueError(f"local_layers={self.local_layers} needs one entry per layer "
                                 f"({self.num_layers}) and a sliding_window")
        if self.attention != "xla" and (self.attn_softcap or self.windows_differ
                                        or self.rope_local_theta is not None):
            raise ValueError(
                f"attention={self.attention!r}: jax.nn.dot_product_attention has no soft cap "
                "and one window and RoPE for all layers; this model (Gemma) needs "
                "attention='xla'")

    @property
    def windows_differ(self) -> bool:
        """Some layers attend through the sliding window and others to the whole sequence."""
        return self.local_layers is not None and len(set(self.local_layers)) > 1

    def is_local(self, layer: int) -> bool:
        """Whether ``layer`` attends through the sliding window."""
        if self.sliding_window is None:
            return False
        return True if self.local_layers is None else self.local_layers[layer]

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def dim_per_head(self) -> int:
        return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def mlp_size(self) -> int:
        return 4 * self.hidden_size if self.intermediate_size is None else self.intermediate_size

    @property
    def rotary_dim(self) -> int:
        return int(self.dim_per_head * self.partial_rotary_factor)

    @property
    def hf_model_type(self) -> str:
        return self.model_type or self.family

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    # ----------------------------------------------------------------------------- HF mapping

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        """Reads a HF config.json dict (transformers 5 names; older rope_scaling/rope_theta too).

        Args:
          d: the parsed config.json.
        Returns:
          The ModelConfig; raises ValueError naming the field for anything unsupported.
        """
        mt = d.get("model_type")
        if mt not in MODEL_TYPES:
            hint = ""
            if mt == "gemma3":
                hint = (" (Gemma 3 4B and up are image-text models: jbilevel reads the text-only "
                        "Gemma3ForCausalLM, model_type gemma3_text, such as gemma-3-1b)")
            raise ValueError(
                f"config.json: unsupported architecture model_type={mt!r} "
                f"(architectures={d.get('architectures')}); supported: {sorted(MODEL_TYPES)}"
                + hint)
        family = MODEL_TYPES[mt]
        common = dict(
            family=family,
            model_type=mt,
            vocab_size=d["vocab_size"],
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )
        if family == "gpt2":
            if d.get("scale_attn_by_inverse_layer_idx") or d.get("reorder_and_upcast_attn"):
                raise ValueError("config.json: gpt2 scale_attn_by_inverse_layer_idx/"
                                 "reorder_and_upcast_attn are not supported")
            if d.get("scale_attn_weights") is False:
                raise ValueError("config.json: gpt2 scale_attn_weights=false is not supported")
            act = d.get("activation_function", "gelu_new")
            return cls(
                **common,
                hidden_size=d["n_embd"],
                num_layers=d["n_layer"],
                num_heads=d["n_head"],
                intermediate_size=d.get("n_inner"),
                max_position_embeddings=d.get("n_positions", 1024),
                norm_eps=d.get("layer_norm_epsilon", 1e-5),
                activation=_act(act),
                tie_word_embeddings=d.get("tie_word_embeddings", True),
                qkv_bias=True,
                o_bias=True,
                mlp_bias=True,
            )
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        local_theta = None
        if mt == "gemma3_text":  # RoPE per layer type: scaled on the global layers only
            rope, local_theta = _gemma3_rope(d)
        if "rope_theta" not in rope:
            rope["rope_theta"] = d.get("rope_theta", d.get("rotary_emb_base", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"config.json: rope_type={rope_type!r} is not supported {ROPE_TYPES}")
        default_partial = 0.25 if family == "gpt_neox" else 1.0
        partial = rope.get("partial_rotary_factor",
                           d.get("partial_rotary_factor", d.get("rotary_pct", default_partial)))
        rope_kw = dict(
            rope_theta=float(rope["rope_theta"]),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position_embeddings=rope.get("original_max_position_embeddings"),
            partial_rotary_factor=float(partial),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
        )
        if family == "gpt_neox":
            bias = d.get("attention_bias", True)
            return cls(
                **common,
                **rope_kw,
                hidden_size=d["hidden_size"],
                num_layers=d["num_hidden_layers"],
                num_heads=d["num_attention_heads"],
                intermediate_size=d.get("intermediate_size"),
                norm_eps=d.get("layer_norm_eps", 1e-5),
                activation=_act(d.get("hidden_act", "gelu")),
                tie_word_embeddings=d.get("tie_word_embeddings", False),
                qkv_bias=bias,
                o_bias=bias,
                mlp_bias=True,
                parallel_residual=d.get("use_parallel_residual", True),
            )
        if mt == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
        if mt in GEMMA:
            variant = _gemma(mt, d, local_theta)
        else:
            variant = dict(activation=_act(d.get("hidden_act", "silu")), qk_norm=mt == "qwen3",
                           sliding_window=_sliding_window(mt, d))
        return cls(
            **common,
            **rope_kw,
            **variant,
            hidden_size=d["hidden_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            num_kv_heads=d.get("num_key_value_heads"),
            head_dim=_head_dim(d),
            intermediate_size=d["intermediate_size"],
            norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=d.get("tie_word_embeddings", mt in GEMMA),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
        )

    def to_hf(self) -> dict[str, Any]:
        """Returns a config.json dict that transformers 5 loads as the same architecture."""
        mt = self.hf_model_type
        out: dict[str, Any] = dict(
            architectures=[_ARCH[mt]],
            model_type=mt,
            vocab_size=self.vocab_size,
            bos_token_id=self.bos_token_id,
            eos_token_id=(list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                          else self.eos_token_id),
            pad_token_id=self.pad_token_id,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        if self.family == "gpt2":
            out.update(
                n_embd=self.hidden_size,
                n_layer=self.num_layers,
                n_head=self.num_heads,
                n_inner=self.intermediate_size,
                n_positions=self.max_position_embeddings,
                layer_norm_epsilon=self.norm_eps,
                activation_function=self.activation,
            )
            return out
        rope: dict[str, Any] = dict(rope_type=self.rope_type, rope_theta=self.rope_theta)
        if self.rope_type != "default":
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope.update(
                low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position_embeddings,
            )
        if self.partial_rotary_factor != 1.0 or self.family == "gpt_neox":
            rope["partial_rotary_factor"] = self.partial_rotary_factor
        out.update(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.mlp_size,
            max_position_embeddings=self.max_position_embeddings,
            hidden_act=self.activation,
            rope_parameters=rope,
        )
        if self.family == "gpt_neox":
            if self.qkv_bias != self.o_bias:
                raise ValueError("gpt_neox needs qkv_bias == o_bias (HF attention_bias)")
            out.update(
                layer_norm_eps=self.norm_eps,
                use_parallel_residual=self.parallel_residual,
                attention_bias=self.qkv_bias,
            )
            return out
        out.update(
            num_key_value_heads=self.kv_heads,
            head_dim=self.dim_per_head,
            rms_norm_eps=self.norm_eps,
            mlp_bias=self.mlp_bias,
        )
        if mt == "qwen2" and (not self.qkv_bias or self.o_bias):
            raise ValueError("qwen2 needs qkv_bias=True, o_bias=False")
        if mt in ("qwen2", "qwen3"):
            # Every layer windowed or none (from_hf refuses a mix): max_window_layers 0.
            out.update(use_sliding_window=self.sliding_window is not None,
                       sliding_window=self.sliding_window, max_window_layers=0)
        elif mt in GEMMA:
            act = "gelu_pytorch_tanh" if self.activation == "gelu_new" else self.activation
            out.update(
                hidden_act=act, hidden_activation=act, query_pre_attn_scalar=self.query_scale,
                attn_logit_softcapping=self.attn_softcap,
                final_logit_softcapping=self.final_softcap, sliding_window=self.sliding_window,
                layer_types=["sliding_attention" if self.is_local(i) else "full_attention"
                             for i in range(self.num_layers)])
            if mt == "gemma3_text":
                local = dict(rope_type="default",
                             rope_theta=self.rope_local_theta or self.rope_theta)
                out["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
        elif mt == "mistral":
            out["sliding_window"] = self.sliding_window
        elif self.sliding_window is not None:
            raise ValueError("llama has no sliding window: use model_type='mistral'")
        if mt != "qwen2":
            if self.qkv_bias != self.o_bias:
                raise ValueError(f"{mt} needs qkv_bias == o_bias (HF attention_bias)")
            out["attention_bias"] = self.qkv_bias
        return out


def _gemma3_rope(d: dict[str, Any]) -> tuple[dict, float]:
    """(RoPE of the global layers, base of the windowed layers' plain RoPE) of a Gemma 3
    config.json: transformers 5 keys rope_parameters by layer type, 4 wrote rope_theta,
    rope_scaling and rope_local_base_freq."""
    params = d.get("rope_parameters") or {}
    if "full_attention" in params:
        local = params.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"config.json: rope_parameters.sliding_attention={local}: only "
                             "plain RoPE (rope_type default) is supported on windowed layers")
        return dict(params["full_attention"]), float(local.get("rope_theta", 10000.0))
    rope = dict(d.get("rope_scaling") or {})
    rope.setdefault("rope_theta", d.get("rope_theta", 1000000.0))
    return rope, float(d.get("rope_local_base_freq", 10000.0))


def _gemma(mt: str, d: dict[str, Any], local_theta: float | None) -> dict[str, Any]:
    """The Gemma 2 / Gemma 3 fields of a config.json (transformers' defaults where absent)."""
    if d.get("use_bidirectional_attention"):
        raise ValueError("config.json: use_bidirectional_attention=true (an encoder) is not "
                         "supported: jbilevel fine-tunes causal LMs")
    n, window = d["num_hidden_layers"], d.get("sliding_window")
    every = 2 if mt == "gemma2" else d.get("sliding_window_pattern", 6)
    kinds = d.get("layer_types") or [
        "sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    local = tuple(k == "sliding_attention" for k in kinds)
    if window is None or not any(local):
        window, local = None, None
    elif all(local):
        local = None
    caps = (50.0, 30.0) if mt == "gemma2" else (None, None)
    return dict(
        activation=_act(d.get("hidden_activation") or d.get("hidden_act", "gelu_pytorch_tanh")),
        qk_norm=mt == "gemma3_text", gemma_norms=True,
        query_scale=int(d.get("query_pre_attn_scalar", 256)),
        attn_softcap=d.get("attn_logit_softcapping", caps[0]),
        final_softcap=d.get("final_logit_softcapping", caps[1]),
        sliding_window=window, local_layers=local,
        rope_local_theta=local_theta if window is not None else None)


def _sliding_window(mt: str, d: dict[str, Any]) -> int | None:
    """The attention window of a Llama-family config.json: one for every layer, or None.

    Qwen2/Qwen3 window only the layers from ``max_window_layers`` on, and only with
    ``use_sliding_window`` (transformers 5 spells the result out as ``layer_types``); a model
    with windowed and full layers mixed is refused by name rather than run with one of them.
    """
    if mt == "llama":
        return None
    window = d.get("sliding_window")
    if mt == "mistral" or window is None:
        return window
    n = d["num_hidden_layers"]
    if not d.get("use_sliding_window", False):
        return None
    first = d.get("max_window_layers", 28)  # transformers' default for both
    kinds = d.get("layer_types") or [
        "sliding_attention" if i >= first else "full_attention" for i in range(n)]
    if set(kinds) == {"full_attention"}:
        return None
    if set(kinds) == {"sliding_attention"}:
        return window
    raise ValueError(
        f"config.json: {mt} with use_sliding_window=true windows only some layers "
        f"(layer_types {kinds}; max_window_layers={d.get('max_window_layers')}): a window on "
        "some layers and not others is not supported. Set use_sliding_window=false (full "
        "attention everywhere: the same model on sequences up to sliding_window tokens) or "
        "max_window_layers=0")


def _act(name: str) -> str:
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return "gelu_new"
    if name not in ACTIVATIONS:
        raise ValueError(f"config.json: activation {name!r} is not supported ({ACTIVATIONS})")
    return name


def _head_dim(d):
    hd = d.get("head_dim")
    return None if hd == d["hidden_size"] // d["num_attention_heads"] else hd

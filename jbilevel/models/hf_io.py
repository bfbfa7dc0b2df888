"""HF checkpoint I/O: exact tensor-name mapping, safetensors load (tensor by tensor) and save."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jbilevel.models.config import ModelConfig
from jbilevel.models.transformer import _is_spec, _specs, build

_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Buffers some HF checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias",
                     "attention.bias", "attention.masked_bias")


@dataclass(frozen=True)
class _Entry:
    """One HF tensor <-> one or more internal leaves (path, layer index or None)."""

    hf_name: str
    hf_shape: tuple
    targets: tuple  # ((path tuple, layer or None), ...)
    to_internal: Callable  # hf array -> tuple of internal arrays
    to_hf: Callable  # tuple of internal arrays -> hf array


def _linear(hf_name, path, layer, in_shape, out_shape):
    """torch Linear weight (out, in) <-> kernel in_shape + out_shape."""
    i, o = int(np.prod(in_shape)), int(np.prod(out_shape))
    return _Entry(hf_name, (o, i), ((path, layer),),
                  lambda t: (t.T.reshape(in_shape + out_shape),),
                  lambda a: a[0].reshape(i, o).T)


def _conv1d(hf_name, path, layer, in_shape, out_shape):
    """GPT-2 Conv1D weight (in, out) <-> kernel in_shape + out_shape."""
    i, o = int(np.prod(in_shape)), int(np.prod(out_shape))
    return _Entry(hf_name, (i, o), ((path, layer),),
                  lambda t: (t.reshape(in_shape + out_shape),),
                  lambda a: a[0].reshape(i, o))


def _vector(hf_name, path, layer, shape):
    n = int(np.prod(shape))
    return _Entry(hf_name, (n,), ((path, layer),),
                  lambda t: (t.reshape(shape),), lambda a: a[0].reshape(n))


def _same(hf_name, path, shape):
    return _Entry(hf_name, tuple(shape), ((path, None),), lambda t: (t,), lambda a: a[0])


def _fused_qkv(hf_name, layer, c: ModelConfig, bias: bool, neox: bool):
    """GPT-NeoX packs q,k,v per head as (H, 3, K); GPT-2 as (3, H, K). Linear vs Conv1D."""
    d, h, k = c.hidden_size, c.num_heads, c.dim_per_head
    kind = "bias" if bias else "kernel"
    targets = tuple(((n, kind), layer) for n in ("q", "k", "v"))
    lead = () if bias else (d,)
    packed = lead + ((h, 3, k) if neox else (3, h, k))
    axis = len(lead) + (1 if neox else 0)
    hf_shape = (3 * h * k,) if bias else ((3 * h * k, d) if neox else (d, 3 * h * k))

    def to_internal(t):
        t = t.T if (neox and not bias) else t
        t = t.reshape(packed)
        return tuple(np.take(t, j, axis=axis) for j in range(3))

    def to_hf(a):
        t = np.stack(a, axis=axis).reshape(lead + (3 * h * k,))
        return t.T if (neox and not bias) else t

    return _Entry(hf_name, hf_shape, targets, to_internal, to_hf)


def hf_entries(c: ModelConfig) -> list[_Entry]:
    """Every HF tensor of a checkpoint of `c`, in HF's order."""
    d, h, kv, k, f, v = (c.hidden_size, c.num_heads, c.kv_heads, c.dim_per_head, c.mlp_size,
                         c.vocab_size)
    specs = _specs(c)
    lay = specs["layers"]
    out: list[_Entry] = []
    if c.family == "llama":
        out.append(_same("model.embed_tokens.weight", ("embed", "embedding"), (v, d)))
        for i in range(c.num_layers):
            pre = f"model.layers.{i}."
            out.append(_vector(pre + "input_layernorm.weight", ("attn_norm", "scale"), i, (d,)))
            for n, heads in (("q", h), ("k", kv), ("v", kv)):
                out.append(_linear(pre + f"self_attn.{n}_proj.weight", (n, "kernel"), i, (d,),
                                   (heads, k)))
                if "bias" in lay[n]:
                    out.append(_vector(pre + f"self_attn.{n}_proj.bias", (n, "bias"), i,
                                       (heads, k)))
            out.append(_linear(pre + "self_attn.o_proj.weight", ("o", "kernel"), i, (h, k), (d,)))
            if "bias" in lay["o"]:
                out.append(_vector(pre + "self_attn.o_proj.bias", ("o", "bias"), i, (d,)))
            if c.qk_norm:
                for n in ("q_norm", "k_norm"):
                    out.append(_vector(pre + f"self_attn.{n}.weight", (n, "scale"), i, (k,)))
            if c.gemma_norms:  # Gemma normalises the attention output, then the MLP's input
                for hf, ours in (("post_attention_layernorm", "post_attn_norm"),
                                 ("pre_feedforward_layernorm", "mlp_norm"),
                                 ("post_feedforward_layernorm", "post_mlp_norm")):
                    out.append(_vector(pre + f"{hf}.weight", (ours, "scale"), i, (d,)))
            else:
                out.append(_vector(pre + "post_attention_layernorm.weight",
                                   ("mlp_norm", "scale"), i, (d,)))
            for n, fi, fo in (("gate", d, f), ("up", d, f), ("down", f, d)):
                out.append(_linear(pre + f"mlp.{n}_proj.weight", (n, "kernel"), i, (fi,), (fo,)))
                if "bias" in lay[n]:
                    out.append(_vector(pre + f"mlp.{n}_proj.bias", (n, "bias"), i, (fo,)))
        out.append(_same("model.norm.weight", ("final_norm", "scale"), (d,)))
        if not c.tie_word_embeddings:
            out.append(_same("lm_head.weight", ("lm_head", "kernel"), (v, d)))
    elif c.family == "gpt_neox":
        out.append(_same("gpt_neox.embed_in.weight", ("embed", "embedding"), (v, d)))
        for i in range(c.num_layers):
            pre = f"gpt_neox.layers.{i}."
            for hf, ours in (("input_layernorm", "attn_norm"),
                             ("post_attention_layernorm", "mlp_norm")):
                out.append(_vector(pre + hf + ".weight", (ours, "scale"), i, (d,)))
                out.append(_vector(pre + hf + ".bias", (ours, "bias"), i, (d,)))
            out.append(_fused_qkv(pre + "attention.query_key_value.weight", i, c, False, True))
            if c.qkv_bias:
                out.append(_fused_qkv(pre + "attention.query_key_value.bias", i, c, True, True))
            out.append(_linear(pre + "attention.dense.weight", ("o", "kernel"), i, (h, k), (d,)))
            if c.o_bias:
                out.append(_vector(pre + "attention.dense.bias", ("o", "bias"), i, (d,)))
            out.append(_linear(pre + "mlp.dense_h_to_4h.weight", ("up", "kernel"), i, (d,), (f,)))
            out.append(_vector(pre + "mlp.dense_h_to_4h.bias", ("up", "bias"), i, (f,)))
            out.append(_linear(pre + "mlp.dense_4h_to_h.weight", ("down", "kernel"), i, (f,),
                               (d,)))
            out.append(_vector(pre + "mlp.dense_4h_to_h.bias", ("down", "bias"), i, (d,)))
        out.append(_same("gpt_neox.final_layer_norm.weight", ("final_norm", "scale"), (d,)))
        out.append(_same("gpt_neox.final_layer_norm.bias", ("final_norm", "bias"), (d,)))
        if not c.tie_word_embeddings:
            # The original Pythia name; transformers 5 renames it to lm_head.weight on load.
            out.append(_same("embed_out.weight", ("lm_head", "kernel"), (v, d)))
    else:
        out.append(_same("transformer.wte.weight", ("embed", "embedding"), (v, d)))
        out.append(_same("transformer.wpe.weight", ("pos_embed", "embedding"),
                         (c.max_position_embeddings, d)))
        for i in range(c.num_layers):
            pre = f"transformer.h.{i}."
            for hf, ours in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
                out.append(_vector(pre + hf + ".weight", (ours, "scale"), i, (d,)))
                out.append(_vector(pre + hf + ".bias", (ours, "bias"), i, (d,)))
            out.append(_fused_qkv(pre + "attn.c_attn.weight", i, c, False, False))
            out.append(_fused_qkv(pre + "attn.c_attn.bias", i, c, True, False))
            out.append(_conv1d(pre + "attn.c_proj.weight", ("o", "kernel"), i, (h, k), (d,)))
            out.append(_vector(pre + "attn.c_proj.bias", ("o", "bias"), i, (d,)))
            out.append(_conv1d(pre + "mlp.c_fc.weight", ("up", "kernel"), i, (d,), (f,)))
            out.append(_vector(pre + "mlp.c_fc.bias", ("up", "bias"), i, (f,)))
            out.append(_conv1d(pre + "mlp.c_proj.weight", ("down", "kernel"), i, (f,), (d,)))
            out.append(_vector(pre + "mlp.c_proj.bias", ("down", "bias"), i, (d,)))
        out.append(_same("transformer.ln_f.weight", ("final_norm", "scale"), (d,)))
        out.append(_same("transformer.ln_f.bias", ("final_norm", "bias"), (d,)))
        if not c.tie_word_embeddings:
            out.append(_same("lm_head.weight", ("lm_head", "kernel"), (v, d)))
    return out


# Older / newer names of the same tensor.
_ALIASES = {"embed_out.weight": ("lm_head.weight",)}


def _get(tree, path, layer=None):
    if layer is not None:
        tree = tree["layers"]
    for p in path:
        tree = tree[p]
    return tree


def _weight_files(path: str) -> tuple[list[str], dict[str, str]]:
    """Returns (safetensors files, tensor name -> file) for a HF directory."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        files = sorted(set(weight_map.values()))
        for fname in files:
            if not os.path.exists(os.path.join(path, fname)):
                raise FileNotFoundError(f"{index}: lists {fname}, which is missing from {path}")
        return files, weight_map
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        pickled = sorted(f for f in os.listdir(path) if f.endswith(_PICKLED))
        if pickled:
            raise ValueError(
                f"{path}: only pickled weights ({', '.join(pickled)}); jbilevel refuses to "
                "unpickle "
                "untrusted files. Convert once with torch + transformers: "
                "AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, "
                "safe_serialization=True), then load `out`.")
        raise FileNotFoundError(f"{path}: no *.safetensors weights found")
    from safetensors import safe_open

    weight_map = {}
    for fname in files:
        with safe_open(os.path.join(path, fname), framework="numpy") as fh:
            for key in fh.keys():
                weight_map[key] = fname
    return files, weight_map


def read_config(path: str) -> ModelConfig:
    """ModelConfig from `path`/config.json, with errors naming the file."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (expected a local HF model directory)")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(
            f"{cfg_path}: missing config.json (is {path} a HF model directory?)")
    with open(cfg_path) as fh:
        d = json.load(fh)
    if d.get("auto_map"):
        raise ValueError(f"{cfg_path}: custom code (auto_map) is not supported; no remote code")
    try:
        return ModelConfig.from_hf(d)
    except KeyError as e:
        raise ValueError(f"{cfg_path}: missing field {e}") from None
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None


def load_pretrained(path: str, dtype=jnp.float32, *, shardings=None):
    """Loads a local HF causal-LM directory (config.json + *.safetensors) tensor by tensor.

    Args:
      path: directory with config.json and model.safetensors, or shards listed in
        model.safetensors.index.json. Pickled .bin/.pt are refused.
      dtype: parameter dtype.
      shardings: optional pytree of ``NamedSharding`` like the params: each leaf goes
        straight from host memory to its shards (no device ever holds a whole model; works
        across processes when every process reads the same directory).
    Returns:
      (forward, params, config): forward is `Model.forward` bound (pure, jittable).
    """
    config = read_config(path)
    model = build(config)
    files, weight_map = _weight_files(path)
    specs = _specs(config)
    np_dtype = np.dtype(jnp.dtype(dtype))
    host = jax.tree.map(lambda s: np.empty(s[0], np_dtype), specs, is_leaf=_is_spec)
    entries = hf_entries(config)
    from safetensors import safe_open

    by_file: dict[str, list[tuple[_Entry, str]]] = {}
    for e in entries:
        names = (e.hf_name,) + _ALIASES.get(e.hf_name, ())
        name = next((n for n in names if n in weight_map), None)
        if name is None:
            raise ValueError(f"{path}: tensor {e.hf_name!r} missing from {', '.join(files)}")
        by_file.setdefault(weight_map[name], []).append((e, name))
    known = {n for ents in by_file.values() for _, n in ents}
    unexpected = sorted(n for n in weight_map if n not in known
                        and not n.endswith(_IGNORED_SUFFIXES)
                        and not (config.tie_word_embeddings and n in ("lm_head.weight",
                                                                      "embed_out.weight")))
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors for {config.hf_model_type} "
                         f"(is the config right?): {unexpected[:5]}")
    for fname, ents in by_file.items():
        with safe_open(os.path.join(path, fname), framework="numpy") as fh:
            for e, name in ents:
                shape = tuple(fh.get_slice(name).get_shape())
                if shape != e.hf_shape:
                    raise ValueError(f"{os.path.join(path, fname)}: tensor {name!r} has shape "
                                     f"{shape}, config.json implies {e.hf_shape}")
                t = fh.get_tensor(name)
                for (p, layer), val in zip(e.targets, e.to_internal(t), strict=True):
                    leaf = _get(host, p, layer)
                    if layer is None:
                        leaf[...] = val
                    else:
                        leaf[layer] = val
                del t
    # Move leaf by leaf, dropping each host copy, so peak memory is one model plus one leaf.
    leaves, treedef = jax.tree.flatten(host)
    del host
    targets = [None] * len(leaves) if shardings is None else treedef.flatten_up_to(shardings)
    moved = []
    while leaves:
        leaf, target = leaves.pop(0), targets.pop(0)
        if target is None:
            moved.append(jnp.asarray(leaf))
        else:
            moved.append(jax.make_array_from_callback(leaf.shape, target, leaf.__getitem__))
    return model.forward, jax.tree.unflatten(treedef, moved), config


def save_pretrained(path: str, params, config: ModelConfig) -> None:
    """Writes config.json + model.safetensors that transformers loads unchanged.

    Args:
      path: output directory (created).
      params: parameter pytree (merge LoRA first with `lora.merge_lora`).
      config: its ModelConfig.
    """
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    host = jax.tree.map(np.asarray, params)
    tensors = {}
    dtypes = set()
    for e in hf_entries(config):
        vals = []
        for p, layer in e.targets:
            leaf = _get(host, p, layer)
            vals.append(leaf if layer is None else leaf[layer])
        t = np.ascontiguousarray(e.to_hf(tuple(vals)))
        if t.shape != e.hf_shape:
            raise ValueError(f"param for {e.hf_name} has shape {t.shape}, expected {e.hf_shape}")
        tensors[e.hf_name] = t
        dtypes.add(t.dtype)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    d = config.to_hf()
    d["dtype"] = "bfloat16" if np.dtype(jnp.bfloat16) in dtypes else "float32"
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(d, fh, indent=2, sort_keys=True)


def save_adapter(path: str, lora, config: ModelConfig, base_model: str | None = None) -> None:
    """Writes LoRA adapters as PEFT does: ``adapter_config.json`` + ``adapter_model.safetensors``.

    ``peft.PeftModel.from_pretrained(<the base in transformers>, path)`` then computes what
    ``forward(params, x, lora=lora)`` does, with the adapters exact (float32 as trained) where
    a merged model in the base's dtype rounds the update into its weights.

    Args:
      path: output directory (created).
      lora: the trained ``jbilevel.models.LoRA`` (numpy or jax leaves; whole on this host).
      config: the base model's ModelConfig.
      base_model: recorded as ``base_model_name_or_path`` (the base's directory).
    """
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {}
    for name, w in lora.weights.items():
        # PEFT: lora_A.weight (r, in), lora_B.weight (out, r), update = scale * B @ A on HF's
        # (out, in) weight; ours: a (in, r), b (r, out) with in and out in HF's order (the
        # fused qkv outputs too: merge_lora splits b's out dim in HF's packing)
        a, b = np.asarray(w["a"], np.float32), np.asarray(w["b"], np.float32)
        for i, module in enumerate(_adapted_modules(config, name)):
            tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank,
        "lora_alpha": lora.alpha, "target_modules": sorted(lora.weights), "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": config.family == "gpt2",  # GPT-2's Conv1D (in, out)
        "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": base_model or "",
    }
    with open(os.path.join(path, "adapter_config.json"), "w") as fh:
        json.dump(adapter_config, fh, indent=2, sort_keys=True)


def _adapted_modules(config: ModelConfig, name: str) -> list[str]:
    """PEFT's key prefix of LoRA target ``name`` (an HF module name) in each layer, in order."""
    modules = [e.hf_name.removesuffix(".weight") for e in hf_entries(config)
               if e.hf_name.endswith(f".{name}.weight")]
    if len(modules) != config.num_layers:
        raise ValueError(f"LoRA target {name!r}: {len(modules)} {config.family} modules end in "
                         f"it, expected one in each of {config.num_layers} layers")
    return [f"base_model.model.{m}" for m in modules]


def load_adapter(path: str, config: ModelConfig):
    """Reads LoRA adapters in PEFT's format (what :func:`save_adapter` writes, or PEFT's
    ``save_pretrained`` of a LoRA adapter on a base of ``config``'s family) as a
    ``jbilevel.models.LoRA`` with float32 numpy leaves (on this host).

    Raises:
      ValueError naming the file: adapter settings this LoRA does not compute (rsLoRA, DoRA,
      trained biases or whole modules), a target that is not a projection of the family, a
      missing or misshapen tensor.
    """
    from safetensors.numpy import load_file

    from jbilevel.models.lora import LoRA, resolve_targets, site_dims
    from jbilevel.models.transformer import LORA_SITES

    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing; is {path} a PEFT adapter directory?")
    with open(cfg_path) as fh:
        d = json.load(fh)
    unsupported = [k for k, off in (("peft_type", "LORA"), ("use_rslora", False),
                                    ("use_dora", False), ("bias", "none"),
                                    ("modules_to_save", None), ("rank_pattern", {}),
                                    ("alpha_pattern", {}), ("layers_to_transform", None))
                   if (d.get(k) or off) != off]
    if unsupported:
        raise ValueError(f"{cfg_path}: {', '.join(f'{k}={d[k]!r}' for k in unsupported)}: "
                         "jbilevel's LoRA is plain LoRA (peft_type LORA; one rank and alpha on "
                         "every layer of its targets; no rsLoRA, DoRA, trained biases or "
                         "modules_to_save)")
    targets = d.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else sorted(targets)
    if not targets:
        raise ValueError(f"{cfg_path}: no target_modules")
    try:
        names = resolve_targets(config, targets)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    file = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(file)
    rank = int(d["r"])
    weights = {}
    for name in names:
        n_in, n_out = site_dims(config, LORA_SITES[config.family][name])
        a, b = [], []
        for module in _adapted_modules(config, name):
            for key, into, shape in ((f"{module}.lora_A.weight", a, (rank, n_in)),
                                     (f"{module}.lora_B.weight", b, (n_out, rank))):
                if key not in tensors:
                    raise ValueError(f"{file}: tensor {key!r} missing (target {name!r})")
                if tensors[key].shape != shape:
                    raise ValueError(f"{file}: tensor {key!r} has shape {tensors[key].shape}; "
                                     f"rank r={rank} (adapter_config.json) on this "
                                     f"{config.family} model needs {shape}")
                into.append(tensors[key].astype(np.float32).T)
        weights[name] = {"a": np.stack(a), "b": np.stack(b)}
    return LoRA(weights, float(d["lora_alpha"]), rank)


def load_tokenizer(path: str):
    """transformers AutoTokenizer from a local directory (no hub, no remote code)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)

"""Config mapping, bad-input errors, padding, param axes, dtype, remat and unroll options."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbilevel.models import ModelConfig, build, load_pretrained, save_pretrained
from jbilevel.models.hf_io import read_config

ROOT = os.path.join(os.path.dirname(__file__), "fixtures", "models")
AXES = {"embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers", None}


def _copy(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(os.path.join(ROOT, name), dst)
    return dst


def test_config_roundtrips_through_hf_dict():
    for name in sorted(os.listdir(ROOT)):
        config = read_config(os.path.join(ROOT, name))
        assert ModelConfig.from_hf(config.to_hf()) == config, name


def test_config_accepts_pre_v5_rope_fields():
    old = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
           "num_hidden_layers": 2, "num_attention_heads": 4, "rope_theta": 500000.0,
           "rope_scaling": {"type": "linear", "factor": 4.0}}
    c = ModelConfig.from_hf(old)
    assert (c.rope_type, c.rope_theta, c.rope_factor) == ("linear", 500000.0, 4.0)
    neox = {"model_type": "gpt_neox", "vocab_size": 64, "hidden_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "rotary_pct": 0.5,
            "rotary_emb_base": 1000}
    c = ModelConfig.from_hf(neox)
    assert (c.partial_rotary_factor, c.rope_theta, c.rotary_dim) == (0.5, 1000.0, 4)
    qwen = dict(old, model_type="qwen2", rope_scaling=None)
    c = ModelConfig.from_hf(qwen)
    assert c.qkv_bias and not c.o_bias and c.rope_type == "default"


def test_sliding_window_read_per_layer_as_transformers_does():
    """Qwen2/Qwen3 window only the layers from max_window_layers on: all or none is one
    window for the model; a mix is refused by name (one window for every layer would be
    another model); what to_hf writes, transformers reads as the same layers."""
    transformers = pytest.importorskip("transformers")
    qwen3 = {"model_type": "qwen3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
             "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "sliding_window": 8, "max_window_layers": 28}
    assert ModelConfig.from_hf(qwen3).sliding_window is None
    assert ModelConfig.from_hf(dict(qwen3, use_sliding_window=True)).sliding_window is None
    for everywhere in ({"max_window_layers": 0}, {"layer_types": ["sliding_attention"] * 4}):
        c = ModelConfig.from_hf(dict(qwen3, use_sliding_window=True, **everywhere))
        assert (c.sliding_window, c.qk_norm) == (8, True)
        assert transformers.Qwen3Config(**c.to_hf()).layer_types == ["sliding_attention"] * 4
    for mt in ("qwen2", "qwen3"):
        with pytest.raises(ValueError, match="max_window_layers=2"):
            ModelConfig.from_hf(dict(qwen3, model_type=mt, use_sliding_window=True,
                                     max_window_layers=2))
    with pytest.raises(ValueError, match="qk_norm=True with model_type='llama'"):
        ModelConfig(qk_norm=True)


def test_gemma_config_defaults_and_refusals():
    """Gemma configs as transformers 4 wrote them (the hub's): the layer pattern, caps and
    RoPE bases from transformers' defaults; what jbilevel cannot run is refused by name."""
    from jbilevel.models.presets import preset

    gemma2 = preset("gemma-2-2b")
    assert gemma2.local_layers == (True, False) * 13 and gemma2.sliding_window == 4096
    assert (gemma2.attn_softcap, gemma2.final_softcap, gemma2.query_scale) == (50.0, 30.0, 256)
    assert gemma2.rope_local_theta is None and not gemma2.qk_norm and gemma2.gemma_norms
    gemma3 = preset("gemma-3-1b")
    assert (gemma3.rope_theta, gemma3.rope_local_theta, gemma3.attn_softcap) == (1e6, 1e4, None)
    assert gemma3.qk_norm and gemma3.eos_token_id == (1, 106)
    with pytest.raises(ValueError, match="attention='cudnn'.*needs attention='xla'"):
        gemma2.replace(attention="cudnn")
    with pytest.raises(ValueError, match="local_layers=.*one entry per layer"):
        gemma2.replace(num_layers=4)
    with pytest.raises(ValueError, match="gemma_norms=True with model_type='llama'"):
        gemma2.replace(model_type="llama", attn_softcap=None)
    hub = dict(gemma3.to_hf(), use_bidirectional_attention=True)
    with pytest.raises(ValueError, match="use_bidirectional_attention=true"):
        ModelConfig.from_hf(hub)


def test_unsupported_config_errors():
    with pytest.raises(ValueError, match="model_type='bert'"):
        ModelConfig.from_hf({"model_type": "bert", "vocab_size": 8})
    bad = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
           "num_hidden_layers": 2, "num_attention_heads": 4,
           "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_hf(bad)
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        ModelConfig(num_heads=4, num_kv_heads=3)


def test_load_errors_name_file_and_tensor(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        os.makedirs(tmp_path / "empty")
        load_pretrained(str(tmp_path / "empty"))
    d = _copy("llama", tmp_path)
    os.remove(d / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_pretrained(str(d))
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="pytorch_model.bin.*safe_serialization=True"):
        load_pretrained(str(d))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, model_type="t5")))
    with pytest.raises(ValueError, match="config.json.*unsupported architecture"):
        load_pretrained(str(d))
    (d / "config.json").write_text(json.dumps(dict(cfg, auto_map={"AutoModel": "x.Y"})))
    with pytest.raises(ValueError, match="auto_map"):
        load_pretrained(str(d))


def test_load_errors_on_shape_and_missing_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _copy("gpt2", tmp_path)
    tensors = load_file(d / "model.safetensors")
    name = "transformer.h.1.attn.c_attn.weight"
    save_file({**tensors, name: tensors[name][:, :-1]}, d / "model.safetensors")
    with pytest.raises(ValueError, match=f"model.safetensors: tensor '{name}' has shape"):
        load_pretrained(str(d))
    del tensors[name]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match=f"tensor '{name}' missing"):
        load_pretrained(str(d))


def test_sharded_checkpoint_with_index(tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _copy("qwen2", tmp_path)
    tensors = load_file(d / "model.safetensors")
    os.remove(d / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, d / fname)
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _, sharded, _ = load_pretrained(str(d))
    _, single, _ = load_pretrained(os.path.join(ROOT, "qwen2"))
    jax.tree.map(np.testing.assert_array_equal, sharded, single)


def test_right_padding_and_param_axes():
    config = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=2,
                         num_heads=4, num_kv_heads=2, intermediate_size=48, qkv_bias=True)
    model = build(config)
    params = model.init(jax.random.key(0))
    axes = model.param_axes()
    assert jax.tree.structure(params) == jax.tree.structure(
        axes, is_leaf=lambda x: isinstance(x, tuple))
    for p, ax in zip(jax.tree.leaves(params),
                     jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)), strict=True):
        assert len(ax) == p.ndim and set(ax) <= AXES
    assert axes["layers"]["k"]["kernel"] == ("layers", "embed", "kv_heads", "head_dim")
    ids = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
    mask = jnp.asarray([[1] * 8, [1] * 5 + [0] * 3])
    forward = jax.jit(model.forward)
    padded = forward(params, ids, attention_mask=mask)
    short = forward(params, ids[1:, :5])
    np.testing.assert_allclose(np.asarray(padded[1, :5]), np.asarray(short[0]), atol=1e-5)


def test_bf16_params_compute_dtype_and_remat():
    config = ModelConfig(family="gpt_neox", vocab_size=64, hidden_size=32, num_layers=2,
                         num_heads=4, parallel_residual=True, partial_rotary_factor=0.25,
                         qkv_bias=True, o_bias=True, mlp_bias=True)
    model = build(config)
    params = model.init(jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)

    def loss(m, p):
        return jnp.mean(jax.nn.log_softmax(m.forward(p, ids)) ** 2)

    g = jax.jit(jax.grad(lambda p: loss(model, p)))(params)
    g_remat = jax.jit(jax.grad(lambda p: loss(build(config.replace(remat=True)), p)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g, g_remat)
    for unroll in (2, 5):  # all layers unrolled (5 > num_layers is clamped)
        g_unrolled = jax.jit(jax.grad(
            lambda p, u=unroll: loss(build(config.replace(scan_unroll=u)), p)))(params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g, g_unrolled)
    with pytest.raises(ValueError, match="scan_unroll=0"):
        config.replace(scan_unroll=0)
    bf16 = model.init(jax.random.key(0), dtype=jnp.bfloat16)
    assert jax.tree.leaves(bf16)[0].dtype == jnp.bfloat16
    logits_bf16 = jax.jit(build(config.replace(compute_dtype="bfloat16")).forward)(params, ids)
    logits = jax.jit(model.forward)(params, ids)
    assert logits_bf16.dtype == jnp.float32
    assert 0 < float(jnp.abs(logits_bf16 - logits).max()) < 0.05


def test_save_bf16_writes_bf16(tmp_path):
    config = ModelConfig(family="gpt2", vocab_size=64, hidden_size=32, num_layers=1,
                         num_heads=4, max_position_embeddings=16, activation="gelu_new",
                         tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True,
                         norm_eps=1e-5)
    params = build(config).init(jax.random.key(0), dtype=jnp.bfloat16)
    save_pretrained(str(tmp_path), params, config)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    _, loaded, config2 = load_pretrained(str(tmp_path), dtype=jnp.bfloat16)
    assert config2 == config.replace(model_type="gpt2")
    jax.tree.map(np.testing.assert_array_equal, params, loaded)


def test_load_tokenizer_from_local_dir(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from jbilevel.models import load_tokenizer

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "[UNK]": 5}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded("hello world there")["input_ids"] == [3, 4, 5]
    assert loaded.pad_token_id == 0

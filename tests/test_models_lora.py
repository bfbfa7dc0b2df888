"""LoRA: zero-init invariance, merge equivalence (also through HF), targets, gradients."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbilevel.models import (
    ModelConfig,
    build,
    load_adapter,
    load_pretrained,
    save_adapter,
    save_pretrained,
)
from jbilevel.models.lora import LoRA, init_lora, merge_lora, merge_rounding

ROOT = os.path.join(os.path.dirname(__file__), "fixtures", "models")
TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}


def _randomise_b(lora: LoRA, rng) -> LoRA:
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(rng, len(leaves))
    new = [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, new)


@pytest.mark.parametrize("name", ["llama", "gpt_neox", "gpt2"])
def test_lora_zero_init_merge_and_hf(name, tmp_path):
    forward, params, config = load_pretrained(os.path.join(ROOT, name))
    forward = jax.jit(forward)
    ref = np.load(os.path.join(ROOT, name, "ref.npz"))
    ids = jnp.asarray(ref["input_ids"])
    lora = init_lora(config, jax.random.key(0), rank=4, alpha=8.0, targets=TARGETS[name])
    assert lora.scale == 2.0
    if name == "gpt2":  # "c_proj" means both GPT-2 c_proj modules, as in PEFT
        assert sorted(lora.weights) == ["attn.c_proj", "c_attn", "c_fc", "mlp.c_proj"]
    base = forward(params, ids)
    np.testing.assert_array_equal(np.asarray(forward(params, ids, lora=lora)), np.asarray(base))
    lora = _randomise_b(lora, jax.random.key(1))
    with_lora = np.asarray(forward(params, ids, lora=lora))
    assert np.abs(with_lora - np.asarray(base)).max() > 0.1
    merged = merge_lora(params, lora, config)
    np.testing.assert_allclose(np.asarray(forward(merged, ids)), with_lora, atol=1e-4, rtol=0)
    # The merged checkpoint is a plain HF checkpoint: HF's own fused-qkv layout must agree.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    save_pretrained(str(tmp_path), merged, config)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        hf_logits = hf(torch.tensor(ref["input_ids"])).logits.numpy()
    np.testing.assert_allclose(hf_logits, with_lora, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama", "gpt_neox", "gpt2"])
def test_saved_adapter_loads_in_peft_with_the_same_logits(name, tmp_path):
    """save_adapter writes what PEFT reads: the unmerged base in transformers plus the
    adapter directory in peft computes forward(params, x, lora=lora), every target of the
    family (fused qkv and GPT-2's Conv1D included)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    forward, params, config = load_pretrained(os.path.join(ROOT, name))
    ref = np.load(os.path.join(ROOT, name, "ref.npz"))
    lora = _randomise_b(init_lora(config, jax.random.key(0), rank=4, alpha=8.0,
                                  targets=TARGETS[name]), jax.random.key(1))
    with_lora = np.asarray(jax.jit(forward)(params, jnp.asarray(ref["input_ids"]), lora=lora))
    save_pretrained(str(tmp_path / "base"), params, config)
    save_adapter(str(tmp_path / "adapter"), lora, config, base_model=str(tmp_path / "base"))
    base = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "base"), dtype=torch.float32, attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        logits = model(torch.tensor(ref["input_ids"])).logits.numpy()
    np.testing.assert_allclose(logits, with_lora, atol=1e-4, rtol=0)
    # ... and load_adapter reads it back exactly, and reads what PEFT itself saves
    jax.tree.map(np.testing.assert_array_equal,
                 load_adapter(str(tmp_path / "adapter"), config), lora)
    model.save_pretrained(str(tmp_path / "by_peft"))
    jax.tree.map(np.testing.assert_array_equal,
                 load_adapter(str(tmp_path / "by_peft"), config), lora)


def test_lora_gradients_and_default_targets():
    config = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=2,
                         num_heads=4, num_kv_heads=2, intermediate_size=48)
    model = build(config)
    params = model.init(jax.random.key(0))
    lora = init_lora(model, jax.random.key(1), rank=2, alpha=2.0)
    assert sorted(lora.weights) == ["q_proj", "v_proj"]
    assert lora.weights["q_proj"]["a"].shape == (2, 32, 2)
    assert lora.weights["v_proj"]["b"].shape == (2, 2, 16)  # 2 kv heads x head_dim 8
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)

    def loss(lo):
        return jnp.mean(model.forward(params, ids, lora=lo) ** 2)

    grads = jax.jit(jax.grad(loss))(lora)
    assert isinstance(grads, LoRA) and grads.rank == 2
    # B = 0: A gets no gradient yet, B does.
    np.testing.assert_array_equal(np.asarray(grads.weights["q_proj"]["a"]), 0.0)
    assert float(jnp.abs(grads.weights["q_proj"]["b"]).max()) > 0


def test_lora_unknown_target_names_the_choices():
    config = ModelConfig(family="gpt_neox", vocab_size=64, hidden_size=32, num_layers=1,
                         num_heads=4)
    with pytest.raises(ValueError, match="q_proj.*query_key_value"):
        init_lora(config, jax.random.key(0), rank=2, alpha=4.0, targets=("q_proj",))


def test_merge_rounding_is_what_the_merge_keeps_of_the_update():
    """Rank 1 over a q kernel of ones: half the update's elements 2^-10 (below half a bfloat16
    step at 1.0, 2^-8: rounded to nothing), half 0.5 (1.5 is exact). float32 keeps all."""
    config = ModelConfig(family="llama", vocab_size=64, hidden_size=8, num_layers=2,
                         num_heads=2, num_kv_heads=2, intermediate_size=16)
    params = build(config).init(jax.random.key(0))
    params["layers"]["q"]["kernel"] = jnp.ones_like(params["layers"]["q"]["kernel"])
    small_or_half = jnp.where(jnp.arange(8) % 2 == 0, 2.0 ** -10, 0.5)
    lora = LoRA({"q_proj": {"a": jnp.ones((2, 8, 1)),
                            "b": jnp.broadcast_to(small_or_half, (2, 1, 8))}}, 1.0, 1)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    measured = merge_rounding(bf16, lora, config)
    assert float(measured["lost"]) == 0.5
    np.testing.assert_allclose(float(measured["error"]),
                               (2.0 ** -20 / (2.0 ** -20 + 0.25)) ** 0.5, rtol=1e-6)
    kept = (merge_lora(bf16, lora, config)["layers"]["q"]["kernel"].astype(jnp.float32) - 1.0)
    np.testing.assert_array_equal(np.asarray(kept[0, 0]).reshape(-1),
                                  np.where(np.arange(8) % 2 == 0, 0.0, 0.5))
    exact = merge_rounding(params, lora, config)
    assert (float(exact["lost"]), float(exact["error"])) == (0.0, 0.0)


def test_load_adapter_names_the_file_and_what_it_cannot_read(tmp_path):
    import json

    config = ModelConfig(family="llama", vocab_size=64, hidden_size=8, num_layers=2,
                         num_heads=2, num_kv_heads=2, intermediate_size=16)
    save_adapter(str(tmp_path), init_lora(config, jax.random.key(0), rank=2, alpha=4.0),
                 config)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "use_dora": True}))
    with pytest.raises(ValueError, match=rf"{path}: use_dora=True: jbilevel's LoRA is plain"):
        load_adapter(str(tmp_path), config)
    path.write_text(json.dumps({**saved, "alpha_pattern": {"v_proj": 16}}))
    with pytest.raises(ValueError, match=r"alpha_pattern=\{'v_proj': 16\}: jbilevel's LoRA"):
        load_adapter(str(tmp_path), config)
    path.write_text(json.dumps({**saved, "target_modules": ["q_proj", "c_attn"]}))
    with pytest.raises(ValueError, match=rf"{path}: LoRA target 'c_attn' is not a llama"):
        load_adapter(str(tmp_path), config)
    path.write_text(json.dumps({**saved, "target_modules": ["q_proj", "k_proj"]}))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: tensor "
                       r"'base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight' "
                       r"missing \(target 'k_proj'\)"):
        load_adapter(str(tmp_path), config)
    path.write_text(json.dumps({**saved, "r": 3}))
    with pytest.raises(ValueError, match=r"lora_A.weight' has shape \(2, 8\); rank r=3 "
                       r"\(adapter_config.json\) on this llama model needs \(3, 8\)"):
        load_adapter(str(tmp_path), config)

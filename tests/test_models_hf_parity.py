"""Logits and greedy decoding against HF transformers references (tests/fixtures/models).

The fixtures come from scripts/make_model_fixtures.py (torch + transformers 5, eager
attention, float32). Tolerances are float32 rounding; they may only change if the
fixtures are regenerated with a different transformers version.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbilevel import losses
from jbilevel.models import build, generate, load_pretrained, save_pretrained
from jbilevel.models.transformer import apply

ROOT = os.path.join(os.path.dirname(__file__), "fixtures", "models")
CASES = sorted(os.listdir(ROOT))
FAMILY = {"llama": "llama", "llama_tied_llama3": "llama", "llama_dynamic_bias": "llama",
          "qwen2": "llama", "qwen3": "llama", "mistral": "llama", "gemma2": "llama",
          "gemma3_text": "llama", "gpt_neox": "gpt_neox", "gpt_neox_seq": "gpt_neox",
          "gpt2": "gpt2"}


def test_all_fixture_cases_present():
    assert CASES == sorted(FAMILY)


@pytest.fixture(scope="module", params=CASES)
def case(request):
    path = os.path.join(ROOT, request.param)
    forward, params, config = load_pretrained(path)
    ref = dict(np.load(os.path.join(path, "ref.npz")))
    return request.param, path, jax.jit(forward), params, config, ref


def test_logits_match_hf(case):
    name, _, forward, params, config, ref = case
    assert config.family == FAMILY[name]
    logits = np.asarray(forward(params, jnp.asarray(ref["input_ids"])))
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)


def test_chunked_loss_matches_the_logits(case):
    """The loss path (output projection a few positions at a time, Gemma 2's final soft cap
    inside each chunk) against the token NLL of the HF-matched logits."""
    _, _, forward, params, config, ref = case
    x, y = jnp.asarray(ref["input_ids"][:, :-1]), jnp.asarray(ref["input_ids"][:, 1:])
    expected = losses.token_nll(forward(params, x), y)

    @jax.jit
    def in_chunks_of_3(p):
        mask = jnp.ones(x.shape, jnp.int32)
        positions = jnp.cumsum(mask, axis=1) - 1
        hidden, head = apply(config, p, x, positions, mask, hidden_only=True)
        return losses.chunked_token_nll(hidden, head, y, chunk=3, softcap=config.final_softcap)

    np.testing.assert_allclose(in_chunks_of_3(params), expected, atol=1e-5, rtol=0)
    model = build(config)  # its own chunks (one here), as training takes the loss
    np.testing.assert_allclose(jax.jit(model.token_nll)(params, x, y), expected, atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("name", ["qwen3", "gemma2", "gemma3_text"])
def test_logits_and_loss_on_a_mesh_match_hf(name):
    """Loaded straight into shards over data 2 x fsdp 2 x tensor 2 (heads split), activations
    pinned as in training: the HF logits, and the chunked loss of them."""
    from jbilevel import sharding as sh

    path = os.path.join(ROOT, name)
    config = load_pretrained(path)[2]
    model = build(config)
    mesh, rules = sh.make_mesh(sh.MeshConfig(data=2, fsdp=2, tensor=2)), sh.AxisRules()
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    shardings = sh.tree_shardings(mesh, rules, model.param_axes(), shapes)
    _, params, _ = load_pretrained(path, shardings=shardings)
    assert params["layers"]["q"]["kernel"].sharding.spec[2] == "tensor"
    ref = dict(np.load(os.path.join(path, "ref.npz")))
    ids = jnp.asarray(np.concatenate([ref["input_ids"]] * 4))  # 8 rows, one per device

    @jax.jit
    def pinned(p, x):
        with sh.activation_sharding(mesh, rules):
            return model.forward(p, x), model.token_nll(p, x[:, :-1], x[:, 1:])

    logits, nll = pinned(params, jax.device_put(ids, sh.batch_sharding(mesh, rules, 2)))
    np.testing.assert_allclose(np.asarray(logits)[:2], ref["logits"], atol=1e-4, rtol=0)
    want = losses.token_nll(jnp.asarray(ref["logits"])[:, :-1], ids[:2, 1:])
    np.testing.assert_allclose(np.asarray(nll)[:2], want, atol=1e-4, rtol=0)


def test_left_padded_logits_match_hf(case):
    _, _, forward, params, _, ref = case
    logits = np.asarray(forward(params, jnp.asarray(ref["pad_ids"]),
                                attention_mask=jnp.asarray(ref["pad_mask"])))
    real = ref["pad_mask"].astype(bool)
    np.testing.assert_allclose(logits[real], ref["pad_logits"][real], atol=1e-4, rtol=0)


# Decoding paths that differ: GQA, dynamic RoPE recomputed per step, sliding window, q/k norms
# (Qwen3), windows and RoPE per layer (Gemma), NeoX, GPT-2 (the other cases differ from these
# only in the forward pass, tested above; compile time).
GREEDY_CASES = ("llama", "llama_dynamic_bias", "mistral", "qwen3", "gemma2", "gemma3_text",
                "gpt_neox", "gpt2")


def test_greedy_matches_hf_generate(case):
    name, _, _, params, config, ref = case
    if name not in GREEDY_CASES:
        pytest.skip("decode path covered by another case")
    gen = generate(build(config), params, ref["prompt_ids"], ref["prompt_mask"],
                   jax.random.key(0), max_new_tokens=8, greedy=True)
    np.testing.assert_array_equal(np.asarray(gen.tokens[:, 0]), ref["greedy"])
    np.testing.assert_array_equal(np.asarray(gen.mask), 1)


def test_save_load_roundtrip_exact(case, tmp_path):
    _, _, _, params, config, _ = case
    save_pretrained(str(tmp_path), params, config)
    _, params2, config2 = load_pretrained(str(tmp_path))
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_saved_checkpoint_loads_in_hf_with_same_logits(case, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, path, _, params, config, ref = case
    save_pretrained(str(tmp_path), params, config)

    def hf_logits(directory):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            return model(torch.tensor(ref["input_ids"])).logits.numpy()

    # Bit-identical to the original checkpoint, both run by HF on this machine (the committed
    # reference logits were computed on another CPU, whose BLAS rounds differently).
    saved = hf_logits(str(tmp_path))
    np.testing.assert_array_equal(saved, hf_logits(path))
    np.testing.assert_allclose(saved, ref["logits"], atol=1e-4, rtol=0)

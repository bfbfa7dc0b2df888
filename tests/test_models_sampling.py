"""KV-cached sampling: log-probs agree with the forward pass, EOS masking, shapes."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbilevel.models import build, generate, load_pretrained
from jbilevel.models.sampling import _process

PATH = os.path.join(os.path.dirname(__file__), "fixtures", "models", "llama")


@pytest.fixture(scope="module")
def llama():
    forward, params, config = load_pretrained(PATH)
    ref = dict(np.load(os.path.join(PATH, "ref.npz")))
    return jax.jit(forward), params, config, ref


def _forward_logprobs(forward, params, prompt_ids, prompt_mask, gen):
    """log p(token_t | prefix) from one full forward over prompt + generated tokens."""
    b, g, t = gen.tokens.shape
    p = prompt_ids.shape[1]
    ids = jnp.concatenate([jnp.repeat(prompt_ids, g, axis=0), gen.tokens.reshape(b * g, t)], 1)
    mask = jnp.concatenate([jnp.repeat(prompt_mask, g, axis=0), gen.mask.reshape(b * g, t)], 1)
    logits = forward(params, ids, attention_mask=mask)
    logp = jax.nn.log_softmax(logits[:, p - 1:-1], axis=-1)
    tok = gen.tokens.reshape(b * g, t)
    return jnp.take_along_axis(logp, tok[:, :, None], axis=-1)[:, :, 0].reshape(b, g, t), logits


def test_sampled_logprobs_equal_forward_logprobs(llama):
    forward, params, config, ref = llama
    prompt_ids, prompt_mask = jnp.asarray(ref["prompt_ids"]), jnp.asarray(ref["prompt_mask"])
    gen = generate(build(config), params, prompt_ids, prompt_mask, jax.random.key(3),
                   max_new_tokens=8, num_samples=3, temperature=0.7,
                   eos_id=int(ref["greedy"][0, 1]))
    assert gen.tokens.shape == gen.logprobs.shape == gen.mask.shape == (2, 3, 8)
    want, logits = _forward_logprobs(forward, params, prompt_ids, prompt_mask, gen)
    m = np.asarray(gen.mask).astype(bool)
    assert m.sum() > 12  # enough live tokens to make the comparison mean something
    # logprobs: the untempered model's log_softmax, exactly what forward gives.
    np.testing.assert_allclose(np.asarray(gen.logprobs)[m], np.asarray(want)[m], atol=1e-4)
    # sampling_logprobs: the tempered distribution the tokens were drawn from.
    p = prompt_ids.shape[1]
    logp_t = jax.nn.log_softmax(logits[:, p - 1:-1] / 0.7, axis=-1)
    tok = gen.tokens.reshape(6, 8)
    want_t = jnp.take_along_axis(logp_t, tok[:, :, None], axis=-1)[:, :, 0].reshape(2, 3, 8)
    np.testing.assert_allclose(np.asarray(gen.sampling_logprobs)[m], np.asarray(want_t)[m],
                               atol=1e-4)
    assert np.abs(np.asarray(gen.sampling_logprobs - gen.logprobs)[m]).max() > 0.05
    # The three samples per prompt are independent draws.
    toks = np.asarray(gen.tokens)
    assert not (toks[:, 0] == toks[:, 1]).all()
    # Unpacks as the 3-tuple of the public contract.
    tokens, logprobs, mask = gen
    assert tokens is gen.tokens and logprobs is gen.logprobs and mask is gen.mask


def _dot_shapes(jaxpr):
    """The output shapes of every matrix product in a jaxpr, nested jaxprs included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn.outvars[0].aval.shape
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _dot_shapes(inner)


def test_each_prompt_is_prefilled_once_over_its_own_tokens(llama):
    """The prefill attends over the prompt's p slots (p x p scores, not p x the cache's
    length) once per prompt, not once per sample; what it computes is checked against the
    forward pass above."""
    _, params, config, ref = llama
    prompt_ids, prompt_mask = jnp.asarray(ref["prompt_ids"]), jnp.asarray(ref["prompt_mask"])
    (b, p), g, t = prompt_ids.shape, 3, 8
    jaxpr = jax.make_jaxpr(lambda params: generate(
        build(config), params, prompt_ids, prompt_mask, jax.random.key(3), max_new_tokens=t,
        num_samples=g, temperature=0.7))(params).jaxpr
    kv, group, k = config.kv_heads, config.num_heads // config.kv_heads, config.dim_per_head
    assert k not in (p, p + t - 1, group)  # so that a head dimension tells the products apart
    # the attention scores: (rows, kv heads) then queries, keys and the group, in the order
    # the einsum's product takes them (the product with the values has the head dimension)
    scores = [(s[0], sorted(s[2:])) for s in _dot_shapes(jaxpr)
              if len(s) == 5 and s[1] == kv and k not in s[2:]]
    assert sorted(scores) == sorted(
        [(b, sorted((p, p, group)))] * config.num_layers  # the prefill, once per prompt
        + [(b * g, sorted((1, p + t - 1, group)))] * config.num_layers)  # a decoding step


def test_top_k_top_p_filtering():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    kept = np.isfinite(np.asarray(_process(logits, 1.0, 2, 1.0)))
    np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [0, 0, 1, 1]])
    # top_p=0.7: smallest set with mass >= 0.7 is {0.5, 0.3}; 0.85 needs the 0.15 too.
    kept = np.isfinite(np.asarray(_process(logits, 1.0, 0, 0.7)))
    np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [0, 0, 1, 1]])
    kept = np.isfinite(np.asarray(_process(logits, 1.0, 0, 0.85)))
    np.testing.assert_array_equal(kept, [[1, 1, 1, 0], [0, 1, 1, 1]])
    z = _process(logits, 0.5, 3, 1.0)
    np.testing.assert_allclose(np.asarray(z[0, :3]), np.asarray(logits[0, :3] / 0.5), rtol=1e-6)


def test_eos_stops_and_masks(llama):
    _, params, config, ref = llama
    greedy = ref["greedy"]
    eos = [int(greedy[0, 1]), int(greedy[1, 2])]  # a list, as HF eos_token_id may be
    assert greedy[0, 0] not in eos
    gen = generate(build(config), params, ref["prompt_ids"], ref["prompt_mask"],
                   jax.random.key(0), max_new_tokens=8, greedy=True, eos_id=eos, pad_id=0)
    toks, mask = np.asarray(gen.tokens[:, 0]), np.asarray(gen.mask[:, 0])
    np.testing.assert_array_equal(mask[0], [1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(toks[0], list(greedy[0, :2]) + [0] * 6)
    np.testing.assert_array_equal(np.asarray(gen.logprobs[0, 0, 2:]), 0.0)
    stop = np.nonzero(np.isin(greedy[1], eos))[0][0] + 1
    np.testing.assert_array_equal(mask[1], [1] * stop + [0] * (8 - stop))
    np.testing.assert_array_equal(toks[1, :stop], greedy[1, :stop])
    np.testing.assert_array_equal(toks[1, stop:], 0)
    # decoding stops once both rows have: a longer budget decodes no further and gives the
    # same rows, padded
    assert int(gen.decoded) == max(2, stop) < 8
    longer = generate(build(config), params, ref["prompt_ids"], ref["prompt_mask"],
                      jax.random.key(0), max_new_tokens=40, greedy=True, eos_id=eos, pad_id=0)
    assert int(longer.decoded) == int(gen.decoded)
    for name in ("tokens", "logprobs", "mask", "sampling_logprobs"):
        a, b = np.asarray(getattr(gen, name)), np.asarray(getattr(longer, name))
        np.testing.assert_array_equal(b[..., :8], a, err_msg=name)
        np.testing.assert_array_equal(b[..., 8:], 0, err_msg=name)
    # without an end token every position is decoded
    assert int(generate(build(config), params, ref["prompt_ids"], ref["prompt_mask"],
                        jax.random.key(0), max_new_tokens=8, greedy=True).decoded) == 8


def test_generate_rejects_bad_arguments(llama):
    _, params, config, ref = llama
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(build(config), params, ref["prompt_ids"], ref["prompt_mask"],
                 jax.random.key(0), max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(build(config), params, ref["prompt_ids"], ref["prompt_mask"],
                 jax.random.key(0), max_new_tokens=2, temperature=0.0)

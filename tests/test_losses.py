import jax.numpy as jnp
import numpy as np
import pytest

from jbilevel import losses


def _logits():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.normal(size=(3, 4, 7)), jnp.float32)


def test_token_nll_matches_log_softmax():
    logits = _logits()
    labels = jnp.asarray([[0, 1, 2, 3], [4, 5, 6, 0], [1, 1, 1, 1]], jnp.int32)
    ref = -np.take_along_axis(np.asarray(logits - jnp.log(jnp.exp(logits).sum(-1, keepdims=True))),
                              np.asarray(labels)[..., None], -1)[..., 0]
    np.testing.assert_allclose(losses.token_nll(logits, labels), ref, rtol=1e-5)


def test_per_example_nll_masking_and_zero_mask():
    logits = _logits()
    labels = jnp.asarray([[0, 1, 2, 3], [4, 5, 6, 0], [-100, 1, 1, 1]], jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 1]], jnp.float32)
    tok = np.asarray(losses.token_nll(logits, jnp.clip(labels, 0)))
    mean = losses.per_example_nll(logits, labels, mask)
    total = losses.per_example_nll(logits, labels, mask, reduction="sum")
    np.testing.assert_allclose(mean[0], (tok[0, 2] + tok[0, 3]) / 2, rtol=1e-6)
    np.testing.assert_allclose(mean[2], (tok[2, 1] + tok[2, 3]) / 2, rtol=1e-6)
    np.testing.assert_allclose(total[0], tok[0, 2] + tok[0, 3], rtol=1e-6)
    # No response tokens: 0, not NaN.
    assert float(mean[1]) == 0.0 and float(total[1]) == 0.0
    # Changing a masked-out logit changes nothing.
    bumped = logits.at[0, 0].add(100.0)
    np.testing.assert_allclose(losses.per_example_nll(bumped, labels, mask), mean, rtol=1e-6)


def test_bf16_logits_give_f32_loss():
    logits = _logits()
    labels = jnp.zeros((3, 4), jnp.int32)
    mask = jnp.ones((3, 4), jnp.float32)
    out = losses.per_example_nll(logits.astype(jnp.bfloat16), labels, mask)
    assert out.dtype == jnp.float32
    ref = losses.per_example_nll(logits.astype(jnp.bfloat16).astype(jnp.float32), labels, mask)
    np.testing.assert_array_equal(out, ref)


def test_float64_logits_and_models_compute_in_float64(x64):
    """In x64 mode a float64 model keeps float64 through its norms, attention scores, logits
    and loss (float32 islands would cap an x64 comparison at float32's rounding)."""
    import jax

    from jbilevel.models import ModelConfig, build

    logits = _logits().astype(jnp.float64)
    labels = jnp.zeros((3, 4), jnp.int32)
    nll = losses.token_nll(logits, labels)
    assert nll.dtype == jnp.float64
    want = -jax.nn.log_softmax(logits, axis=-1)[..., 0]
    np.testing.assert_allclose(nll, want, rtol=1e-14)
    model = build(ModelConfig(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2,
                              intermediate_size=16))
    params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(jax.random.key(0)))
    ids = jnp.asarray([[1, 2, 3, 4]], jnp.int32)
    assert model.forward(params, ids).dtype == jnp.float64
    assert model.token_nll(params, ids, jnp.roll(ids, -1, axis=1)).dtype == jnp.float64


def test_per_example_nll_bad_inputs():
    logits = _logits()
    with pytest.raises(ValueError, match="reduction"):
        losses.per_example_nll(
            logits, jnp.zeros((3, 4), jnp.int32), jnp.ones((3, 4)), reduction="x"
        )
    with pytest.raises(ValueError, match="shapes disagree"):
        losses.per_example_nll(logits, jnp.zeros((3, 5), jnp.int32), jnp.ones((3, 5)))


def test_weighted_mean_counts_valid_rows():
    loss = jnp.asarray([1.0, 2.0, 3.0, 100.0])
    w = jnp.asarray([2.0, 1.0, 0.5, 7.0])
    valid = jnp.asarray([1.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(losses.weighted_mean(loss, w, valid), (2 + 2 + 1.5) / 3, rtol=1e-6)
    np.testing.assert_allclose(losses.weighted_mean(loss, w), (2 + 2 + 1.5 + 700) / 4, rtol=1e-6)
    assert float(losses.weighted_mean(loss, w, jnp.zeros(4))) == 0.0
    # A NaN loss on a padding row does not leak.
    assert np.isfinite(float(losses.weighted_mean(loss.at[3].set(jnp.nan), w, valid)))

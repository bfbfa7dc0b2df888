import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbilevel import objectives, weights


def _sq_loss(theta, batch):
    return 0.5 * (batch["x"] @ theta - batch["y"]) ** 2


def _batch():
    x = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    return {"x": x, "y": jnp.asarray([1.0, 2.0, 3.0]), "ids": jnp.asarray([2, 0, 1]),
            "valid": jnp.asarray([1.0, 1.0, 0.0])}


def test_inner_objective_value():
    theta = jnp.asarray([0.0, 0.0])
    omega = jnp.log(jnp.asarray([1.0, 2.0, 3.0]))
    g = objectives.inner_objective(_sq_loss, weighting="softmax", mu=0.5,
                                   theta_ref=jnp.asarray([1.0, 0.0]))
    s = weights.weights(omega, "softmax")  # [0.5, 1, 1.5]
    expected = (s[2] * 0.5 * 1.0 + s[0] * 0.5 * 4.0) / 2 + 0.25 * 1.0
    np.testing.assert_allclose(g(theta, omega, _batch()), expected, rtol=1e-6)
    f = objectives.outer_objective(_sq_loss)
    np.testing.assert_allclose(f(theta, _batch()), (0.5 + 2.0) / 2, rtol=1e-6)


def test_padding_row_may_carry_any_id():
    batch = dict(_batch(), ids=jnp.asarray([2, 0, 99]))
    g = objectives.inner_objective(_sq_loss, weighting="sigmoid")
    assert np.isfinite(float(g(jnp.zeros(2), jnp.zeros(3), batch)))


def test_bad_ids_and_shapes():
    g = objectives.inner_objective(_sq_loss)
    batch = dict(_batch(), valid=jnp.ones(3), ids=jnp.asarray([0, 1, 3]))
    with pytest.raises(ValueError, match=r"outside \[0, 3\).*\[3\]"):
        g(jnp.zeros(2), jnp.zeros(3), batch)
    with pytest.raises(ValueError, match="no 'ids'"):
        g(jnp.zeros(2), jnp.zeros(3), {"x": batch["x"], "y": batch["y"]})
    with pytest.raises(ValueError, match="1-D array of N logits"):
        g(jnp.zeros(2), jnp.zeros((3, 1)), _batch())
    with pytest.raises(ValueError, match="weighting must be one of"):
        objectives.inner_objective(_sq_loss, weighting="uniform")


def test_lm_example_loss_reads_batch_fields():
    vocab = 5
    table = jnp.asarray(np.random.default_rng(0).normal(size=(vocab, vocab)), jnp.float32)

    def forward(params, input_ids, attention_mask=None):
        return params[input_ids] * attention_mask[..., None]

    batch = {
        "input_ids": jnp.asarray([[1, 2, 3], [4, 0, 0]], jnp.int32),
        "attention_mask": jnp.asarray([[1, 1, 1], [1, 0, 0]], jnp.int32),
        "labels": jnp.asarray([[2, 3, 0], [0, 0, 0]], jnp.int32),
        "loss_mask": jnp.asarray([[0, 1, 1], [1, 0, 0]], jnp.float32),
        "ids": jnp.asarray([0, 1], jnp.int32),
        "valid": jnp.ones(2, jnp.float32),
    }
    loss = objectives.lm_example_loss(forward)(table, batch)
    lsm = jax.nn.log_softmax(table)
    np.testing.assert_allclose(loss, [-(lsm[2, 3] + lsm[3, 0]) / 2, -lsm[4, 0]], rtol=1e-6)


def test_lm_padding_rows_with_no_real_tokens_give_finite_gradients():
    # The Batcher pads a last partial batch with rows whose attention mask is all zero; the
    # model and the loss must keep those rows out without NaNs leaking into the gradient.
    from jbilevel.models import ModelConfig, build

    model = build(ModelConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=2))
    params = model.init(jax.random.key(0))
    batch = {
        "input_ids": jnp.ones((2, 8), jnp.int32), "labels": jnp.ones((2, 8), jnp.int32),
        "loss_mask": jnp.stack([jnp.ones(8), jnp.zeros(8)]),
        "attention_mask": jnp.stack([jnp.ones(8, jnp.int32), jnp.zeros(8, jnp.int32)]),
        "ids": jnp.array([0, 1], jnp.int32), "valid": jnp.array([1.0, 0.0]),
    }
    f = objectives.outer_objective(objectives.lm_example_loss(model.forward))
    loss, grads = jax.value_and_grad(f)(params, batch)
    assert bool(jnp.isfinite(loss))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbilevel import weights


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_init_is_all_ones(kind):
    omega = weights.init_logits(5, kind)
    np.testing.assert_allclose(weights.weights(omega, kind), np.ones(5), rtol=1e-6)
    np.testing.assert_allclose(
        weights.batch_weights(omega, jnp.asarray([4, 0]), kind), np.ones(2), rtol=1e-6
    )


def test_known_values():
    omega = jnp.log(jnp.asarray([1.0, 3.0]))
    np.testing.assert_allclose(weights.weights(omega, "softmax"), [0.5, 1.5], rtol=1e-6)
    np.testing.assert_allclose(
        weights.weights(jnp.asarray([0.0, jnp.log(3.0)]), "sigmoid"), [1.0, 1.5], rtol=1e-6
    )


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_weights_vjp_matches_autodiff(x64, kind):
    rng = np.random.default_rng(1)
    omega = jnp.asarray(rng.normal(size=6))
    u = jnp.asarray(rng.normal(size=6))
    _, vjp = jax.vjp(lambda o: weights.weights(o, kind), omega)
    np.testing.assert_allclose(weights.weights_vjp(omega, u, kind), vjp(u)[0], rtol=1e-12)


def test_health_on_known_vectors():
    h = weights.health(jnp.ones(4))
    np.testing.assert_allclose([h["entropy"], h["ess"], h["frac_above_1"]], [1, 1, 0], atol=1e-6)
    h = weights.health(jnp.asarray([4.0, 0.0, 0.0, 0.0]))
    np.testing.assert_allclose([h["entropy"], h["ess"], h["frac_above_1"]], [0, 0.25, 0.25],
                               atol=1e-6)
    h = weights.health(jnp.asarray([2.0, 2.0, 0.0, 0.0]))
    np.testing.assert_allclose([h["entropy"], h["ess"], h["frac_above_1"]], [0.5, 0.5, 0.5],
                               atol=1e-6)


def test_bad_kind():
    with pytest.raises(ValueError, match="unknown kind 'relu'"):
        weights.weights(jnp.zeros(3), "relu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbilevel import xla_options


@pytest.fixture
def checked_jaxlib(monkeypatch):
    monkeypatch.setattr(xla_options.metadata, "version", lambda name: "0.10.2")


def test_cpu_training_steps_get_the_dot_fusion_option(checked_jaxlib):
    assert xla_options.train_compiler_options("cpu", {}) == xla_options.CPU_TRAIN_OPTIONS
    assert xla_options.train_compiler_options("gpu", {}) is None
    assert xla_options.train_compiler_options("tpu", {}) is None


def test_opt_out_and_unchecked_jaxlib_change_nothing(monkeypatch):
    assert xla_options.train_compiler_options("cpu", {xla_options.OPT_OUT: "0"}) is None
    monkeypatch.setattr(xla_options.metadata, "version", lambda name: "0.11.0")
    assert xla_options.train_compiler_options("cpu", {}) is None


def test_this_jaxlib_compiles_with_the_option_and_keeps_the_numbers():
    # The option must be one this jaxlib knows (an unknown one fails the compile) and may only
    # change rounding: a weight gradient through a transpose, with and without it.
    options = xla_options.train_compiler_options("cpu", {})
    assert options is not None, "jaxlib outside CHECKED_JAXLIB: re-check the option"
    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((256, 64), (64, 128)))

    def loss(w):
        h = x @ w
        return jnp.sum(jax.nn.silu(h) * h)

    plain = jax.jit(jax.grad(loss))(w)
    fused = jax.jit(jax.grad(loss), compiler_options=options)(w)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(plain), rtol=1e-5, atol=1e-4)

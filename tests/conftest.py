"""The test world, set once: 8 fake CPU devices and strict rank promotion.

Nothing else in the test suite sets global JAX flags. Float64 tests opt in locally
with ``jax.enable_x64(True)`` (see the ``x64`` fixture).
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")

import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Run the test body with 64-bit floats enabled."""
    with jax.enable_x64(True):
        yield

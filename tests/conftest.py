"""The test world, set once: 8 fake CPU devices, strict rank promotion and a fast compile.

Nothing else in the test suite sets global JAX flags. Float64 tests opt in locally
with ``jax.enable_x64(True)`` (see the ``x64`` fixture).
"""

import os

# The suite's models are tiny, so XLA's CPU compile, not running the programs, is most of its
# time. Two flags cut it: LLVM's optimisation of the generated code at level 0 (2 by default)
# about halves compile-bound tests, and XLA:CPU's older (elemental IR) emitters for fusions
# instead of its MLIR fusion emitters compile the online bds hypergradient of test_online.py in
# 2.1 s against 6.0 s and halve the suite (8 minutes against 17 on a 2-core Intel Xeon;
# docs/performance.md). The HLO passes (fusion, layout) still run, and both emitters compute
# the same HLO operations: results differ in float32's last digits. Set before JAX starts its
# backend; the processes tests spawn inherit them.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), FAST_COMPILE]).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")

import pytest  # noqa: E402

from jbilevel.xla_options import CACHE_ENV, use_compilation_cache  # noqa: E402

_CACHE_AT_START = os.environ.get(CACHE_ENV)


@pytest.fixture(autouse=True)
def _compilation_cache_as_the_session_started():
    """A command run in this process (``cli.main(["demo", ...])``) may turn JAX's persistent
    compilation cache on for the process; the next test starts as the session did."""
    yield
    if os.environ.get(CACHE_ENV) != _CACHE_AT_START:
        use_compilation_cache(_CACHE_AT_START or "none")


@pytest.fixture
def cache_state(monkeypatch):
    """Every program cached (not only those that took 1 s to compile) once a test turns the
    persistent compilation cache on; the process's cache settings as they were afterwards."""
    monkeypatch.delenv(CACHE_ENV, raising=False)
    before = (jax.config.jax_compilation_cache_dir,
              jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    use_compilation_cache(before[0] or "none")


@pytest.fixture
def x64():
    """Run the test body with 64-bit floats enabled."""
    with jax.enable_x64(True):
        yield

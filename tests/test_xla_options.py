import os
import subprocess
import sys

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


class _FakeLibc:
    def __init__(self, accept=1):
        self.calls, self.accept = [], accept

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.accept


@pytest.fixture
def jax_not_started(monkeypatch):
    monkeypatch.setattr(xla_options, "_jax_started", lambda: False)
    monkeypatch.setattr(xla_options.metadata, "entry_points", lambda group: [])
    monkeypatch.setattr(xla_options, "find_spec", lambda name: None)


def test_host_malloc_tuning_sets_one_arena_no_mmap_no_trim(jax_not_started):
    libc = _FakeLibc()
    assert xla_options.tune_host_malloc({}, libc) is True
    assert libc.calls == [(-8, 1), (-4, 0), (-1, 2**31 - 1)]
    assert xla_options.tune_host_malloc({}, _FakeLibc(accept=0)) is False  # glibc refused


def test_host_malloc_tuning_is_skipped_off_cpu_opted_out_or_after_jax_started(
        jax_not_started, monkeypatch):
    for environ in ({"JAX_PLATFORMS": "cuda"}, {"JAX_PLATFORMS": "tpu,cpu"},
                    {xla_options.OPT_OUT: "0"}, {xla_options.MALLOC_OPT_OUT: "0"}):
        libc = _FakeLibc()
        assert xla_options.tune_host_malloc(environ, libc) is False, environ
        assert libc.calls == [], environ
    # an accelerator plugin is installed: skipped unless JAX_PLATFORMS puts the CPU first
    monkeypatch.setattr(xla_options.metadata, "entry_points", lambda group: ["cuda"])
    assert xla_options.tune_host_malloc({}, _FakeLibc()) is False
    assert xla_options.tune_host_malloc({"JAX_PLATFORMS": "cpu"}, _FakeLibc()) is True
    monkeypatch.setattr(xla_options.metadata, "entry_points", lambda group: [])
    monkeypatch.setattr(xla_options, "find_spec",  # libtpu is installed
                        lambda name: object() if name == "libtpu" else None)
    assert xla_options.tune_host_malloc({}, _FakeLibc()) is False
    # this test process has started JAX: the arena limit could no longer bind its threads
    monkeypatch.undo()
    libc = _FakeLibc()
    assert xla_options.tune_host_malloc({}, libc) is False and libc.calls == []


_FAULT_PROBE = """
import resource
from jbilevel.xla_options import tune_host_malloc
tuned = tune_host_malloc()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.tanh(x @ x.T) @ x)  # x @ x.T: a 64 MiB temporary buffer
x = jnp.full((4096, 64), 0.01, jnp.float32)
assert f.lower(x).compile().memory_analysis().temp_size_in_bytes >= 64 * 2**20
for _ in range(3):
    f(x).block_until_ready()
faults = []
for _ in range(11):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(tuned, sorted(faults)[5])  # the median call: now and then the heap still grows once
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuned_process_reuses_xla_temporary_buffers_instead_of_faulting_them_in():
    # A fresh process each: the tuning is process-wide and must precede JAX's start.
    def median_faults_per_call(environ):
        out = subprocess.run([sys.executable, "-c", _FAULT_PROBE], capture_output=True,
                             text=True, env=environ, check=True).stdout.split()
        return out[0] == "True", float(out[1])

    env = {k: v for k, v in os.environ.items()
           if k not in (xla_options.OPT_OUT, xla_options.MALLOC_OPT_OUT)}
    env["JAX_PLATFORMS"] = "cpu"
    tuned, tuned_faults = median_faults_per_call(env)
    untuned, untuned_faults = median_faults_per_call(
        dict(env, **{xla_options.MALLOC_OPT_OUT: "0"}))
    assert (tuned, untuned) == (True, False)
    pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert untuned_faults > 0.5 * pages  # glibc maps the 64 MiB block afresh on every call
    assert tuned_faults < 0.02 * pages

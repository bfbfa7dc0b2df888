import os

import pytest

from jbilevel import _xla_flags

FLAG = _xla_flags.CPU_FLAGS[0]


@pytest.fixture
def checked_jaxlib(monkeypatch):
    monkeypatch.setattr(_xla_flags.metadata, "version", lambda name: "0.10.2")


def test_cpu_defaults_append_to_the_users_flags(checked_jaxlib):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert _xla_flags.apply_cpu_defaults(env) == [FLAG]
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}"
    assert _xla_flags.apply_cpu_defaults(env) == []  # idempotent
    assert env["XLA_FLAGS"].count(FLAG) == 1


def test_a_flag_the_user_set_wins(checked_jaxlib):
    env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INVALID"}
    assert _xla_flags.apply_cpu_defaults(env) == []
    assert env["XLA_FLAGS"].endswith("LIBRARY_FUSION_TYPE_INVALID")


def test_opt_out_and_unchecked_jaxlib_add_nothing(monkeypatch):
    env = {_xla_flags.OPT_OUT: "0"}
    assert _xla_flags.apply_cpu_defaults(env) == [] and "XLA_FLAGS" not in env
    monkeypatch.setattr(_xla_flags.metadata, "version", lambda name: "0.11.0")
    env = {}
    assert _xla_flags.apply_cpu_defaults(env) == [] and "XLA_FLAGS" not in env


def test_importing_jbilevel_set_the_flag_for_this_process():
    # conftest imports jax before jbilevel but starts no backend, so the flag is in effect.
    assert FLAG in os.environ.get("XLA_FLAGS", "")

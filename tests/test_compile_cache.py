"""--compile-cache: JAX's persistent compilation cache, on for a process and the ones it starts."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbilevel import cli
from jbilevel.console import NORMAL, Console
from jbilevel.xla_options import CACHE_ENV, use_compilation_cache


def _entries(path):
    return sorted(p for p in os.listdir(path)) if os.path.isdir(path) else []


def test_programs_land_in_the_cache_and_none_turns_it_off(tmp_path, cache_state):
    # JAX compiled programs in this process before (other tests): the cache still turns on
    path = use_compilation_cache(tmp_path / "c")
    assert path == str(tmp_path / "c") and os.environ[CACHE_ENV] == path  # children inherit
    x = jnp.arange(6.0)
    assert float(jax.jit(lambda a: jnp.sin(a).sum() * 3.0)(x)) == pytest.approx(
        3.0 * float(np.sin(np.arange(6.0)).sum()), rel=1e-6)
    cached = _entries(path)
    assert cached, "the compiled program was not written to the cache"

    assert use_compilation_cache("none") is None and CACHE_ENV not in os.environ
    jax.jit(lambda a: jnp.cos(a).sum() * 5.0)(x)
    assert _entries(path) == cached  # off: nothing new written
    assert use_compilation_cache(None) is None  # None: what the environment says (unset)


def test_cli_demo_caches_in_its_out_dir_unless_told_otherwise(tmp_path, cache_state, capsys):
    console = Console(NORMAL)
    args = cli._build_parser().parse_args(["demo", "--out", str(tmp_path / "demo")])
    cli._compile_cache(args, console, args.out)
    assert os.environ[CACHE_ENV] == str(tmp_path / "demo" / "xla_cache")
    assert f"cached in {tmp_path / 'demo' / 'xla_cache'}" in capsys.readouterr().err

    args = cli._build_parser().parse_args(
        ["train", "--config", "x.yaml", "--compile-cache", str(tmp_path / "mine")])
    cli._compile_cache(args, console, "runs/x")
    assert os.environ[CACHE_ENV] == str(tmp_path / "mine")
    assert f"cached in {tmp_path / 'mine'}" in capsys.readouterr().err

    args = cli._build_parser().parse_args(
        ["demo", "--out", str(tmp_path / "demo"), "--compile-cache", "none"])
    cli._compile_cache(args, console, args.out)
    assert CACHE_ENV not in os.environ and "cached in" not in capsys.readouterr().err


def test_cli_train_caches_in_its_run_directory_and_eval_does_not(tmp_path, cache_state,
                                                                 capsys, monkeypatch):
    """train: OUT/xla_cache unless told otherwise (a resume loads its programs), made only
    when JAX writes the first program, so a refused run leaves its --out as it was; not by
    default on several CPU devices, as here; eval: no cache of its own (its --run may not be
    writable)."""
    console = Console(NORMAL)
    out = tmp_path / "run"
    args = cli._build_parser().parse_args(["train", "--config", "x.yaml", "--out", str(out)])
    assert cli._several_cpu_devices()  # the tests' 8 CPU devices
    cli._compile_cache(args, console, args.out)
    assert CACHE_ENV not in os.environ and "cached in" not in capsys.readouterr().err
    monkeypatch.setattr(cli, "_several_cpu_devices", lambda: False)  # a GPU, a TPU, one CPU
    cli._compile_cache(args, console, args.out)
    assert os.environ[CACHE_ENV] == str(out / "xla_cache") and not out.exists()
    assert f"cached in {out / 'xla_cache'}" in capsys.readouterr().err
    jax.jit(lambda a: jnp.tanh(a).sum() * 7.0)(jnp.arange(3.0))
    assert _entries(out / "xla_cache")  # JAX made it with the first program
    use_compilation_cache("none")
    args = cli._build_parser().parse_args(["eval", "--run", str(out)])
    cli._compile_cache(args, console)
    assert CACHE_ENV not in os.environ and "cached in" not in capsys.readouterr().err


def test_an_unwritable_cache_directory_is_a_clear_error(tmp_path, cache_state, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = cli.main(["eval", "--run", str(tmp_path / "no_run"),
                     "--compile-cache", str(blocker / "cache")])
    assert code == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"--compile-cache {blocker / 'cache'}: cannot make that directory" in err
    assert "'none'" in err

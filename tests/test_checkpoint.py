import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbilevel import sharding as sh
from jbilevel.checkpoint import Checkpointer, abstract_like

AXES = {"w": ("embed", "mlp"), "omega": ("examples",), "step": ()}


def _state(scale):
    return {
        "w": jnp.arange(64.0).reshape(8, 8) * scale,
        "omega": jnp.linspace(-1.0, 1.0, 12) * scale,
        "step": jnp.asarray(7, jnp.int32),
    }


def _place(state, mesh):
    shardings = sh.tree_shardings(mesh, sh.AxisRules(), AXES, state)
    return jax.device_put(state, shardings), shardings


def test_save_restore_onto_another_mesh_keep_n(tmp_path):
    mesh_a = sh.make_mesh(sh.MeshConfig(data=1, fsdp=8, tensor=1))
    mesh_b = sh.make_mesh(sh.MeshConfig(data=2, fsdp=2, tensor=2))
    with Checkpointer(tmp_path / "ckpt", keep=2) as ckpt:
        for step in (1, 2, 3):
            state, _ = _place(_state(step), mesh_a)
            ckpt.save(step, state, {"data": {"epoch": 0, "position": step * 5}})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3]
        _, shardings_b = _place(_state(0), mesh_b)
        restored, meta = ckpt.restore(abstract_like(_state(0), shardings_b))
    assert meta == {"data": {"epoch": 0, "position": 15}}
    for name, want in _state(3).items():
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(want))
        assert restored[name].sharding == shardings_b[name]
    assert restored["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_restore_errors(tmp_path):
    with Checkpointer(tmp_path / "empty") as ckpt:
        with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
            ckpt.restore({"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
        ckpt.save(0, {"w": jnp.ones(2)})
        ckpt.wait()
        with pytest.raises(ValueError, match=r"must carry a sharding.*\['w'\]"):
            ckpt.restore({"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
    with pytest.raises(ValueError, match="keep at least one"):
        Checkpointer(tmp_path / "x", keep=0)


def test_sigkill_during_save_leaves_last_finished_checkpoint(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal
        import jax.numpy as jnp
        from jbilevel.checkpoint import Checkpointer
        ckpt = Checkpointer({str(tmp_path / "ckpt")!r}, keep=3)
        ckpt.save(1, {{"w": jnp.full((4,), 1.0)}}, {{"pos": 1}})
        ckpt.wait()
        ckpt.save(2, {{"w": jnp.full((4_000_000,), 2.0)}}, {{"pos": 2}})
        os.kill(os.getpid(), signal.SIGKILL)  # preempted while step 2 is being written
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        step = ckpt.latest_step()
        assert step in (1, 2)  # step 2 is visible only if it was fully committed
        shape = (4,) if step == 1 else (4_000_000,)
        target = {"w": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh.replicated(
            sh.make_mesh(sh.MeshConfig(data=-1))))}
        restored, meta = ckpt.restore(target)
    assert meta == {"pos": step}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.full(shape, float(step)))

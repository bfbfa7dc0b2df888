"""sharding.constrain: FSDP activation pinning is exact, scoped to its context, skips misfits."""

import jax
import jax.numpy as jnp
import numpy as np

from jbilevel import sharding as sh
from jbilevel.models import ModelConfig, build

CONFIG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                     num_kv_heads=2, intermediate_size=48)


def _constraints(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("sharding_constraint")


def test_pinned_forward_matches_and_constrains_only_inside_the_context():
    model = build(CONFIG)
    params = model.init(jax.random.key(0))
    ids_BxL = jax.random.randint(jax.random.key(1), (8, 8), 0, 64)
    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=4, tensor=1))
    rules = sh.AxisRules()
    theta_sh = sh.tree_shardings(mesh, rules, model.param_axes(), params)

    def pinned(p, ids):
        with sh.activation_sharding(mesh, rules):
            return model.forward(p, ids)

    assert _constraints(model.forward, params, ids_BxL) == 0
    # embedding output, the scanned layer input, the logits
    assert _constraints(pinned, params, ids_BxL) == 3
    want = jax.jit(model.forward)(params, ids_BxL)
    got = jax.jit(pinned, in_shardings=(theta_sh, sh.batch_sharding(mesh, rules, 2)))(
        jax.device_put(params, theta_sh), ids_BxL)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    assert got.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))


def test_rows_that_do_not_split_are_left_alone():
    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=4, tensor=1))
    x_BxLxD = jnp.ones((3, 4, 8))  # 3 rows over 8 data-parallel devices
    with sh.activation_sharding(mesh, sh.AxisRules()):
        assert sh.constrain(x_BxLxD, ("batch", None, None)) is x_BxLxD
        assert sh.constrain(x_BxLxD, ("batch", None)) is x_BxLxD  # wrong rank (e.g. vmapped)

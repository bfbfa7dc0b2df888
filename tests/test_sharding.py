import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jbilevel import sharding as sh


def test_mesh_fill_axis():
    mesh = sh.make_mesh(sh.MeshConfig(data=-1, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=-1, tensor=1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sh.describe_mesh(mesh) == "data 2 x fsdp 4 x tensor 1 over 8 cpu devices"


@pytest.mark.parametrize(
    "cfg, match",
    [
        (dict(data=-1, fsdp=-1), "at most one axis.*e.g. mesh.data=1 mesh.fsdp=-1$"),
        (dict(fsdp=-1, tensor=-1), "e.g. mesh.data=1 mesh.fsdp=1 mesh.tensor=-1$"),
        (dict(data=3, fsdp=1, tensor=1), "needs 3 devices but 8"),
        (dict(data=-1, fsdp=3), "does not divide 8"),
        (dict(data=0), "positive or -1"),
    ],
)
def test_mesh_config_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        sh.make_mesh(sh.MeshConfig(**cfg))


def test_spec_from_rules_and_collision():
    rules = sh.AxisRules()
    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=2, tensor=2))
    assert rules.spec(("embed", "mlp"), (8, 16), mesh) == P("fsdp", "tensor")
    assert rules.spec(("batch", None), (4, 3), mesh) == P(("data", "fsdp"), None)
    # Mesh axes of size 1 are dropped so that specs stay valid on any mesh.
    mesh1 = sh.make_mesh(sh.MeshConfig(data=8, fsdp=1, tensor=1))
    assert rules.spec(("embed", "mlp"), (8, 16), mesh1) == P(None, None)
    with pytest.raises(ValueError, match="used by both logical axes 'heads' and 'mlp'"):
        rules.spec(("heads", "mlp"))
    with pytest.raises(ValueError, match="no sharding rule"):
        rules.spec(("nonsense",))
    with pytest.raises(ValueError, match=r"size 5\) is not divisible by mesh axes \('tensor',\)"):
        rules.spec(("embed", "vocab"), (8, 5), mesh, what="param wte")


def test_rules_validation():
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sh.AxisRules.from_mapping({"embed": "model"})
    rules = sh.AxisRules.from_mapping({"embed": None, "examples": "data"})
    assert rules.spec(("embed", "examples")) == P(None, "data")


def test_init_sharded_places_every_leaf():
    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=2, tensor=2))
    rules = sh.AxisRules()
    axes = {"w": ("embed", "mlp"), "b": ("mlp",), "omega": ("examples",)}

    def init(key):
        k1, k2 = jax.random.split(key)
        return {
            "w": jax.random.normal(k1, (8, 16)),
            "b": jnp.zeros((16,)),
            "omega": jax.random.normal(k2, (10,)),
        }

    tree, shardings = sh.init_sharded(init, mesh, rules, axes, jax.random.key(0))
    assert tree["w"].sharding.spec == P("fsdp", "tensor")
    assert tree["b"].sharding.spec == P("tensor")
    assert tree["omega"].sharding.spec == P(None)
    # Sharded initialisation gives the same numbers as the plain one.
    plain = init(jax.random.key(0))
    for name in plain:
        np.testing.assert_array_equal(np.asarray(tree[name]), np.asarray(plain[name]))
    assert sh.data_parallel_size(mesh, rules) == 4
    with pytest.raises(ValueError, match=r"param \['w'\]: 1 logical axes"):
        sh.tree_shardings(mesh, rules, {"w": ("embed",), "b": ("mlp",), "omega": ("examples",)},
                          jax.eval_shape(init, jax.random.key(0)))

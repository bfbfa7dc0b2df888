"""theta = LoRA adapters: steps touch only the adapters, match the merged model, shard exactly."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jbilevel import sharding as sh
from jbilevel import train
from jbilevel.adjoint import Implicit
from jbilevel.algorithms import MethodConfig, init_state, make_steps
from jbilevel.models import ModelConfig, build, init_lora, lora_axes
from jbilevel.objectives import lm_example_loss, lm_lora_example_loss

N, B, L = 16, 8, 12
CONFIG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                     num_kv_heads=2, intermediate_size=48)
MODEL = build(CONFIG)
ONE = sh.MeshConfig(data=1, fsdp=1, tensor=1)
MESH_2x4 = sh.MeshConfig(data=2, fsdp=4, tensor=1)


def _batch(seed, n=B):
    rng = np.random.default_rng(seed)
    ids_BxL = rng.integers(3, CONFIG.vocab_size, size=(n, L)).astype(np.int32)
    loss_mask = np.zeros((n, L), np.float32)
    loss_mask[:, L // 2:-1] = 1.0
    return {"input_ids": ids_BxL, "labels": np.roll(ids_BxL, -1, axis=1),
            "loss_mask": loss_mask, "attention_mask": np.ones((n, L), np.int32),
            "ids": rng.permutation(N)[:n].astype(np.int32), "valid": np.ones(n, np.float32)}


def _randomise_b(lora, seed):
    """Non-zero B, so that A gets gradients too (B = 0 at init)."""
    w = jax.tree.map(lambda x: x, lora.weights)
    for i, name in enumerate(sorted(w)):
        b = w[name]["b"]
        w[name]["b"] = 0.1 * jax.random.normal(jax.random.key(seed + i), b.shape, b.dtype)
    return type(lora)(w, lora.alpha, lora.rank)


def _cfg(method):
    return MethodConfig(method=method, lr_theta=1e-2, lr_omega=0.1, hyper_every=1,
                        hypergrad=Implicit("cg", maxiter=2, tol=0.0, ridge=1.0))


def _init(method, nonzero_b=False):
    cfg = _cfg(method)
    base = MODEL.init(jax.random.key(0))
    lora = init_lora(CONFIG, jax.random.key(1), rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    if nonzero_b:
        lora = _randomise_b(lora, 2)
    return cfg, (lambda: init_state(lora, N, cfg, frozen=base))


@functools.cache  # each (method, mesh) compiles once for the tests below
def _step(method, mesh_cfg, nonzero_b=True):
    """One train step (and a hypergradient step for bds) on ``mesh_cfg``."""
    cfg, init = _init(method, nonzero_b)
    mesh = sh.make_mesh(mesh_cfg, jax.devices()[: int(np.prod(mesh_cfg.sizes_tuple()))])
    rules = sh.AxisRules()
    shapes = jax.eval_shape(init)
    state_sh = train.state_shardings(mesh, rules, shapes, lora_axes(CONFIG, shapes.theta), cfg,
                                     frozen_axes=MODEL.param_axes())
    steps = make_steps(lm_lora_example_loss(MODEL.forward), cfg, frozen=True)
    compiled = train.compile_steps(steps, cfg, mesh, rules, state_sh)
    state = jax.jit(init, out_shardings=state_sh)()
    before = jax.device_get(state)
    if method == "bmo":
        state, metrics = compiled.train(state, _batch(0), _batch(1))
    else:
        state, metrics = compiled.train(state, _batch(0))
        state, hyper = compiled.hyper(state, _batch(2), _batch(1))
        metrics = {**metrics, **hyper}
    return before, state, jax.device_get(metrics)


@pytest.mark.parametrize("method", ["bds", "bmo"])
def test_lora_steps_change_only_adapters(method):
    before, state, metrics = _step(method, ONE)
    for a, b in zip(jax.tree.leaves(before.frozen), jax.tree.leaves(state.frozen), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [float(jnp.abs(a - b).max())
             for a, b in zip(jax.tree.leaves(before.theta), jax.tree.leaves(state.theta),
                             strict=True)]
    assert min(moved) > 1e-3, moved  # Adam's first step moves every A and B entry by ~lr
    # Adam's moments live on the adapters only: no buffer of the base model's size.
    n_adapter = sum(x.size for x in jax.tree.leaves(state.theta))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_theta) if x.ndim)
    assert n_opt == 2 * n_adapter
    assert float(jnp.abs(state.omega).max()) > 0  # the weights moved too
    assert np.isfinite(metrics["loss"])


def test_lora_gradient_equals_merged_model_gradient(x64):
    """The step's gradient is d/d(adapters) of the merged model's loss (pinned, float64)."""
    cfg, init = _init("sft", nonzero_b=True)
    state = jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x,
                         init())
    batch = _batch(0)
    merged_loss = lm_example_loss(MODEL.forward)

    def via_merge(lora):  # W + (alpha / r) A B, written out in float64 (merge_lora uses f32)
        layers = dict(state.frozen["layers"])
        for name, site in (("q_proj", "q"), ("v_proj", "v")):
            w = lora.weights[name]
            kernel = layers[site]["kernel"]
            delta = lora.scale * jnp.einsum("nir,nro->nio", w["a"], w["b"])
            layers[site] = {"kernel": kernel + delta.reshape(kernel.shape)}
        loss_B = merged_loss({**state.frozen, "layers": layers}, batch)
        return jnp.mean(loss_B)

    def via_adapters(lora):
        return jnp.mean(lm_lora_example_loss(MODEL.forward)(lora, state.frozen, batch))

    g_merge = jax.jit(jax.grad(via_merge))(state.theta)
    g_lora = jax.jit(jax.grad(via_adapters))(state.theta)
    for a, b in zip(jax.tree.leaves(g_merge), jax.tree.leaves(g_lora), strict=True):
        # float64 except the model's float32 logits; an f32 merge is off by ~1e-4 relative.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-7, atol=1e-12)
    norm = float(optax.tree.norm(g_lora))
    # Pinned: changes only with the model init, the LoRA init or the batch generator.
    np.testing.assert_allclose(norm, 0.2194417453818, rtol=1e-6)
    steps = make_steps(lm_lora_example_loss(MODEL.forward), cfg, frozen=True)
    _, metrics = jax.jit(steps.train)(state, batch)
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-6)


@pytest.mark.parametrize("method", ["bds", "bmo"])
def test_lora_step_parity_single_device_vs_2x4_mesh(method):
    _, single, m1 = _step(method, ONE)
    _, sharded, m8 = _step(method, MESH_2x4)
    a_spec = sharded.theta.weights["q_proj"]["a"].sharding.spec
    assert a_spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert sharded.frozen["layers"]["q"]["kernel"].sharding.spec[1] == "fsdp"
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for k in m1:
        np.testing.assert_allclose(m1[k], m8[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_frozen_loss_without_frozen_state_is_an_error():
    cfg, init = _init("sft")
    steps = make_steps(lm_lora_example_loss(MODEL.forward), cfg, frozen=True)
    with pytest.raises(ValueError, match="needs state.frozen"):
        steps.train(init().replace(frozen=None), _batch(0))

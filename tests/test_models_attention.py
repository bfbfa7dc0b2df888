"""The dot_product attention path (jax.nn.dot_product_attention) equals the explicit one, and
the hypergradient's higher-order passes never trace cuDNN's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jbilevel import implicit, objectives
from jbilevel.adjoint import example_u, hvp
from jbilevel.models import ModelConfig, build


@pytest.mark.parametrize("kw", [{}, {"num_kv_heads": 2}, {"sliding_window": 3}])
def test_fused_attention_matches_xla_on_right_padded_rows(kw):
    base = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, **kw)
    fused = build(base.replace(attention="dot_product"))
    params = build(base).init(jax.random.key(0))
    ids_BxL = np.asarray(jax.random.randint(jax.random.key(1), (3, 9), 3, 50))
    mask_BxL = np.ones_like(ids_BxL)
    mask_BxL[1, 6:] = 0  # right padding
    mask_BxL[2, 2:] = 0
    want = build(base).forward(params, ids_BxL, attention_mask=mask_BxL)
    got = fused.forward(params, ids_BxL, attention_mask=mask_BxL)
    real = mask_BxL.astype(bool)  # padded query rows are meaningless in both
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5)


def test_unknown_attention_is_refused():
    with pytest.raises(ValueError, match="attention='flash'"):
        ModelConfig(attention="flash")


def test_hypergradient_passes_trace_cudnn_models_with_xla_attention():
    """cuDNN attention has one reverse-mode rule only (and no CPU kernel): the adjoint's
    Hessian-vector products, its per-example JVPs and the mixed term trace it as XLA's, so a
    model configured for cuDNN gets the explicit-attention hypergradient."""
    base = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                       num_kv_heads=2, remat=True)
    params = build(base).init(jax.random.key(0))
    ids_BxL = np.asarray(jax.random.randint(jax.random.key(1), (4, 9), 3, 50))
    mask_BxL = np.ones_like(ids_BxL)
    mask_BxL[1, 6:] = 0  # right padding
    mask_BxL[3, 3:] = 0
    batch = {"input_ids": ids_BxL, "labels": np.roll(ids_BxL, -1, axis=1),
             "attention_mask": mask_BxL, "loss_mask": mask_BxL.astype(np.float32),
             "ids": np.arange(4, dtype=np.int32), "valid": np.ones(4, np.float32)}
    omega = jnp.linspace(-1.0, 1.0, 4)
    v = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)),
                     params)
    losses = {name: objectives.lm_example_loss(build(base.replace(attention=name)))
              for name in ("xla", "cudnn")}
    with pytest.raises(RuntimeError, match="cuDNN"):  # outside the passes: cuDNN, absent here
        losses["cudnn"](params, batch)

    @jax.jit
    def passes(params, omega, v, batch):  # chunked HVP and JVPs, unchunked mixed term
        out = {}
        for name, loss in losses.items():
            inner = objectives.inner_objective(loss)
            hv = hvp(inner, params, omega, batch, 0.5, chunk=3)(v)
            u, _, _ = example_u(loss, params, batch, v, chunk=3)
            mixed = implicit._mixed_native(inner, params, omega, batch, v)
            out[name] = (ravel_pytree(hv)[0], u, mixed)
        return out

    out = passes(params, omega, v, batch)
    for want, got in zip(out["xla"], out["cudnn"], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)

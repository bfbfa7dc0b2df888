"""The dot_product attention path (jax.nn.dot_product_attention) equals the explicit one."""

import jax
import numpy as np
import pytest

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

"""Online generation with the fused attention paths: generated rows come from left-padded
prompts, and the fused paths take per-row lengths (real tokens first); the buffer stores its
rows packed to the left, so every attention path gives the same online losses."""

import functools

import jax
import numpy as np
import pytest

from jbilevel import sharding as sh
from jbilevel.algorithms import MethodConfig, init_state, refresh
from jbilevel.algorithms import online as ol


@pytest.fixture(scope="module")
def refreshed():
    from jbilevel.data import make_task
    from jbilevel.models import ModelConfig, build

    task = make_task("quality", seed=0, n_train=24, n_val=8, n_test=8)
    tok = task.tokenizer
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=16, num_layers=2, num_heads=2,
                         intermediate_size=32, max_position_embeddings=64,
                         eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = build(config)
    mesh = sh.make_mesh(sh.MeshConfig(data=1), jax.devices()[:1])
    online = ol.OnlineConfig(every=1, fraction=0.5, num_samples=2, batch_size=8,
                             max_new_tokens=6)
    method = MethodConfig(method="bmo")
    refresher = refresh.Refresher(online, model, task.train, weighting=method.weighting,
                                  batch_sharding=sh.batch_sharding(mesh, sh.AxisRules(), 1))
    state = init_state(model.init(jax.random.key(0)), len(task.train), method)
    state, _ = refresher(state.replace(online=refresher.init_buffer()), 0)
    return config, refresher, state


def test_buffer_rows_are_packed_real_tokens_first(refreshed):
    _, refresher, state = refreshed
    buf = jax.device_get(state.online)
    prompt_len_N = refresher.dataset.prompt_len_N
    assert len(set(prompt_len_N[buf.ids[buf.valid > 0]])) > 1  # prompts of several lengths
    mask = buf.attention_mask
    lengths = mask.sum(axis=1)
    np.testing.assert_array_equal(mask, np.arange(mask.shape[1])[None] < lengths[:, None])
    # the labels still follow the tokens: label t is token t + 1 wherever there is a loss
    has_loss = buf.loss_mask[:, :-1] > 0
    np.testing.assert_array_equal(buf.labels[:, :-1][has_loss], buf.input_ids[:, 1:][has_loss])
    assert (buf.loss_mask[:, -1] == 0).all()


def test_fused_attention_gives_the_xla_online_losses(refreshed):
    """dot_product here (CPU); cudnn takes the same per-row lengths on GPUs."""
    from jbilevel.models import build

    config, refresher, state = refreshed
    batch = jax.device_get(state.online).batch()
    mask = batch["loss_mask"] > 0
    got, want = ({"logp": np.asarray(jax.jit(functools.partial(ol.token_logprobs, m.forward))(
                      state.theta, batch))[mask],
                  "loss": np.asarray(jax.jit(ol.generated_loss(m.forward))(
                      state.theta, {**batch, "ratio": batch["loss_mask"]}))}
                 for m in (build(config.replace(attention="dot_product")), build(config)))
    np.testing.assert_allclose(got["logp"], want["logp"], atol=2e-5)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    # and the stored sampling log-probs (from the KV-cache sampler) are these log-probs
    np.testing.assert_allclose(got["logp"], batch["logp"][mask], atol=2e-5)

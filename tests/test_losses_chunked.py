"""The chunked LM loss equals the full-logits one in value and in every derivative bds uses.

``Model.token_nll`` never holds [rows, tokens, vocab] logits; these tests pin it to
``losses.token_nll(Model.forward(...))`` in float32 at 1e-5 relative: the loss, its gradient,
a forward-over-reverse Hessian-vector product and the per-example JVP, with chunks that do
and do not divide the sequence, tied and untied heads.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbilevel import losses, objectives
from jbilevel.models import ModelConfig, build

RTOL = 1e-5
ROWS, LENGTH = 3, 11


def _setup(tie: bool, vocab: int = 97, chunk_mib: int = 0):
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4,
                      intermediate_size=64, tie_word_embeddings=tie, loss_chunk_mib=chunk_mib)
    model = build(cfg)
    params = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (ROWS, LENGTH)).astype(np.int32)
    mask = np.ones((ROWS, LENGTH), np.int32)
    mask[1, 8:] = 0  # a right-padded row
    loss_mask = (np.arange(LENGTH)[None, :] >= 4).astype(np.float32) * mask
    batch = {"input_ids": ids, "attention_mask": mask, "labels": np.roll(ids, -1, axis=1),
             "loss_mask": loss_mask}
    tangent = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
    return model, params, batch, tangent


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        scale = float(np.max(np.abs(np.asarray(y)))) or 1.0
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=RTOL * scale)


def _hidden(model, params, ids, attention_mask):
    from jbilevel.models.transformer import _mask_positions, apply

    mask, pos = _mask_positions(ids, attention_mask, None)
    return apply(model.config, params, ids, pos, mask, hidden_only=True)


class _FixedChunks:
    """A model whose token_nll uses ``chunk`` positions per chunk."""

    def __init__(self, model, chunk):
        self.model, self.chunk = model, chunk

    def token_nll(self, params, ids, labels, *, attention_mask=None, lora=None):
        hidden, head = _hidden(self.model, params, ids, attention_mask)
        return losses.chunked_token_nll(hidden, head, labels, chunk=self.chunk)


def test_chunk_positions_follow_the_budget():
    # 4 bytes x vocab 1000 x 8 rows = 32 kB per position; 100 kB -> 3 positions
    assert losses.chunk_positions(8, 50, 1000, 100_000) == 3
    assert losses.chunk_positions(8, 50, 1000, 100_000, row_ways=4) == 12  # 2 rows per device
    assert losses.chunk_positions(8, 50, 1000, 10) == 1
    assert losses.chunk_positions(8, 50, 1000, 10**12) == 50


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_nll_matches_full_logits(tie):
    model, params, batch, _ = _setup(tie)
    hidden, head = jax.jit(lambda p: _hidden(model, p, batch["input_ids"],
                                             batch["attention_mask"]))(params)
    full = losses.token_nll(jnp.einsum("bld,vd->blv", hidden, head), batch["labels"])
    for chunk in (1, 3, 4, 11, 64):
        _close(losses.chunked_token_nll(hidden, head, batch["labels"], chunk=chunk), full)


@pytest.mark.parametrize("tie", [False, True])
def test_loss_grad_hvp_and_example_jvp_match_unchunked(tie):
    model, params, batch, tangent = _setup(tie)
    chunked_loss = objectives.lm_example_loss(_FixedChunks(model, 3))  # 11 = 3 + 3 + 3 + 2
    full_loss = objectives.lm_example_loss(model.forward)  # full [rows, tokens, vocab] logits

    def mean(loss):
        return lambda p: jnp.mean(loss(p, batch))

    @jax.jit  # one program for both losses: the loss, its gradient, the HVP and the JVPs
    def values(p, v):
        return [(loss(p, batch), jax.grad(mean(loss))(p),
                 jax.jvp(jax.grad(mean(loss)), (p,), (v,))[1],  # forward-over-reverse HVP
                 jax.jvp(lambda q, f=loss: f(q, batch), (p,), (v,))[1])  # u_i = <grad l_i, v>
                for loss in (chunked_loss, full_loss)]

    got, want = values(params, tangent)
    for g, w in zip(got, want, strict=True):
        _close(g, w)


def test_model_token_nll_chunks_by_its_memory_budget():
    # vocab 30000: 4 B x 30000 x 3 rows = 360 kB per position, so 1 MiB -> 2 positions a chunk
    model, params, batch, _ = _setup(False, vocab=30000, chunk_mib=1)
    assert losses.chunk_positions(ROWS, LENGTH, 30000, 2**20) == 2
    full = jax.jit(lambda p: losses.token_nll(
        model.forward(p, batch["input_ids"], attention_mask=batch["attention_mask"]),
        batch["labels"]))(params)
    got = jax.jit(lambda p: model.token_nll(p, batch["input_ids"], batch["labels"],
                                            attention_mask=batch["attention_mask"]))(params)
    _close(got, full)
    hlo = jax.jit(lambda p: model.token_nll(p, batch["input_ids"], batch["labels"],
                                            attention_mask=batch["attention_mask"])
                  ).lower(params).as_text()
    assert f"{ROWS}x{LENGTH}x30000" not in hlo and f"{ROWS},{LENGTH},30000" not in hlo


def test_chunked_nll_rejects_mismatched_shapes():
    h = jnp.zeros((2, 5, 8))
    with pytest.raises(ValueError, match="head"):
        losses.chunked_token_nll(h, jnp.zeros((10, 7)), jnp.zeros((2, 5), jnp.int32), chunk=2)
    with pytest.raises(ValueError, match="labels"):
        losses.chunked_token_nll(h, jnp.zeros((10, 8)), jnp.zeros((2, 4), jnp.int32), chunk=2)
    with pytest.raises(ValueError, match="chunk"):
        losses.chunked_token_nll(h, jnp.zeros((10, 8)), jnp.zeros((2, 5), jnp.int32), chunk=0)


def test_vocab_parallel_loss_on_a_mesh_matches_one_device():
    """On a (data 2, fsdp 4) mesh the loss splits the vocabulary over fsdp (no device holds the
    whole head or its gradient); loss and gradient equal the single-device ones."""
    from jbilevel import sharding as sh

    model, params, batch, _ = _setup(False, vocab=96, chunk_mib=1)
    batch = {k: np.concatenate([v, v, v]) for k, v in batch.items()}  # 9 rows -> pad to 16
    batch = {k: np.concatenate([v, v[:7]]) for k, v in batch.items()}
    loss = objectives.lm_example_loss(model)
    mean = lambda p, b: jnp.mean(loss(p, b))
    want = jax.jit(jax.value_and_grad(mean))(params, batch)
    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=4, tensor=1))
    rules = sh.AxisRules()
    theta_sh = sh.tree_shardings(mesh, rules, model.param_axes(), params)

    def pinned(p, b):
        with sh.activation_sharding(mesh, rules, theta_sh):
            return jax.value_and_grad(mean)(p, b)

    fn = jax.jit(pinned, in_shardings=(theta_sh, sh.batch_sharding(mesh, rules, 1)))
    got = fn(jax.device_put(params, theta_sh), batch)
    _close(got, want)
    hlo = fn.lower(jax.device_put(params, theta_sh), batch).compile().as_text()
    assert not re.search(r"= f32\[96,32\][^ ]* all-(gather|reduce)", hlo)  # the whole head

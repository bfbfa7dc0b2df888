"""Sampling on the training mesh: same tokens as on one device, KV cache split with the rows,
and no weight gathered inside the loop over decoded tokens."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from jbilevel import sharding as sh
from jbilevel.models import ModelConfig, build, generate
from jbilevel.models.sampling import _generate, decoding_rules

CFG = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                  intermediate_size=64)


def _setup():
    model = build(CFG)
    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=4, tensor=1))
    rules = sh.AxisRules()
    params = model.init(jax.random.key(0))
    shardings = sh.tree_shardings(mesh, rules, model.param_axes(), params)
    params = jax.device_put(params, shardings)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, (8, 6)).astype(np.int32)
    mask = np.ones((8, 6), np.int32)
    mask[:3, :2] = 0  # left padding
    rows = sh.batch_sharding(mesh, rules, 2)
    return model, mesh, rules, params, jax.device_put(ids, rows), jax.device_put(mask, rows)


def test_mesh_sampling_matches_one_device():
    model, mesh, rules, params, ids, mask = _setup()
    kw = dict(max_new_tokens=5, num_samples=2, temperature=0.7, eos_id=3)
    want = generate(model, jax.device_get(params), np.asarray(ids), np.asarray(mask),
                    jax.random.key(1), **kw)
    for gather in (True, False):
        got = generate(model, params, ids, mask, jax.random.key(1), mesh=mesh, rules=rules,
                       gather_params=gather, **kw)
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
        np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs),
                                   rtol=1e-5, atol=1e-6)


def _loop_body_gathers(gather_params: bool) -> list[str]:
    """The all-gathers inside the compiled decoding loop (the innermost while body that runs
    the layers for one token)."""
    model, mesh, rules, params, ids, mask = _setup()
    hlo = _generate.lower(
        CFG, params, ids, mask, jax.random.key(1), jnp.float32(1.0), jnp.asarray([3]),
        jnp.int32(0), None, max_new_tokens=4, num_samples=1, top_k=0, top_p=1.0,
        greedy=False, mesh=mesh, rules=decoding_rules(rules, gather_params)).compile().as_text()
    bodies = re.findall(r"while\(.*?body=(%[\w.\-]+)", hlo)
    assert bodies
    gathers = []
    for name in bodies:
        block = hlo.split(f"\n{name} ", 1)[1].split("\n}\n", 1)[0]
        gathers += re.findall(r"= \w+\[[0-9,]*\][^ ]* all-gather", block)
    return gathers


def test_decoding_loop_moves_no_weights():
    assert _loop_body_gathers(gather_params=True) == []
    assert _loop_body_gathers(gather_params=False)  # the per-token gathers it avoids


def test_split_weights_are_gathered_one_layer_at_a_time():
    """gather_params=False is for a model whose weights do not fit one device: each decoded
    token gathers them again, and without apply(stream_layers=True) XLA hoists every layer's
    gathers out of the loop, holding the whole model twice (prefill and loop)."""
    cfg = ModelConfig(vocab_size=64, hidden_size=256, num_layers=8, num_heads=4,
                      intermediate_size=1024)
    model = build(cfg)
    mesh = sh.make_mesh(sh.MeshConfig(data=1, fsdp=8, tensor=1))
    rules = sh.AxisRules()
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    shardings = sh.tree_shardings(mesh, rules, model.param_axes(), shapes)
    params = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d),
                          shapes, shardings)
    ids = jax.ShapeDtypeStruct((8, 6), jnp.int32, sharding=sh.batch_sharding(mesh, rules, 2))
    layer = sum(np.prod(a.shape[1:]) * 4 for a in jax.tree.leaves(shapes["layers"]))

    def temp(gather: bool, stream: bool) -> int:
        return _generate.lower(
            cfg, params, ids, ids, jax.random.key(1), jnp.float32(1.0), jnp.asarray([3]),
            jnp.int32(0), None, max_new_tokens=4, num_samples=1, top_k=0, top_p=1.0,
            greedy=False, mesh=mesh, rules=decoding_rules(rules, gather),
            stream_layers=stream).compile().memory_analysis().temp_size_in_bytes

    streamed, hoisted, gathered = temp(False, True), temp(False, False), temp(True, False)
    # measured: 39.4 MB streamed, 68.3 MB hoisted (two copies of the 8 layers of 4.2 MB),
    # 48.4 MB gathered once
    assert streamed + 3 * layer < hoisted
    assert streamed < gathered


def test_evaluation_splits_its_prompts_over_the_mesh(monkeypatch):
    """The final evaluation decodes on the params' mesh with its prompts split over the data
    axes (unpinned, every device held every prompt's KV cache), and answers as on one
    device; 5 prompts a batch round up to 8, one per device."""
    import jbilevel.models
    from jbilevel import experiment
    from jbilevel.data import make_task

    task = make_task("quality", seed=0, n_train=8, n_val=4, n_test=11)
    tok = task.tokenizer
    model = build(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2,
                              num_heads=4, intermediate_size=64, max_position_embeddings=64,
                              eos_token_id=tok.eos_id, pad_token_id=tok.pad_id))
    params = model.init(jax.random.key(0))
    want = experiment.evaluate(model, params, task, "test", batch_size=5)
    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=4, tensor=1))
    rules = sh.AxisRules()
    sharded = jax.device_put(params, sh.tree_shardings(mesh, rules, model.param_axes(), params))
    calls = []
    real = jbilevel.models.generate

    def spy(model, params, ids, mask, rng, **kw):
        calls.append((ids.shape, ids.sharding, kw.get("mesh")))
        return real(model, params, ids, mask, rng, **kw)

    monkeypatch.setattr(jbilevel.models, "generate", spy)
    got = experiment.evaluate(model, sharded, task, "test", batch_size=5)
    assert got["predictions"] == want["predictions"] and got["accuracy"] == want["accuracy"]
    assert len(got["predictions"]) == 11 and len(calls) == 2  # 11 prompts, 8 a batch
    for shape, sharding, on in calls:
        assert shape[0] == 8 and on is mesh
        assert sharding.spec[0] == sh.batch_sharding(mesh, rules, 2).spec[0]


def test_evaluation_decodes_prompts_of_mixed_lengths_in_length_buckets(monkeypatch):
    """data.length_buckets for the greedy answers: prompts decoded longest first, each batch
    left-padded to the smallest of the prompt-length buckets that holds it, the answers back
    in the split's order and the same as at one length."""
    import dataclasses

    import jbilevel.models
    from jbilevel import experiment
    from jbilevel.data import load_sft, make_task
    from jbilevel.data.tasks import TASK_TEMPLATE

    task = make_task("quality", seed=0, n_train=8, n_val=4, n_test=12)
    rows = [{**r, "question": "Please, " * (7 * (k % 4)) + r["question"]}
            for k, r in enumerate(task.test.rows)]  # prompts of 4 lengths, interleaved
    test = load_sft(rows, schema="qa", prompt_template=TASK_TEMPLATE, max_len=256)
    task = dataclasses.replace(task, splits={**task.splits, "test": test})
    tok = task.tokenizer
    model = build(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2,
                              num_heads=4, intermediate_size=64, max_position_embeddings=256,
                              eos_token_id=tok.eos_id, pad_token_id=tok.pad_id))
    params = model.init(jax.random.key(0))
    calls = []
    real = jbilevel.models.generate

    def spy(model, params, ids, mask, rng, **kw):
        calls.append(ids.shape[1])
        return real(model, params, ids, mask, rng, **kw)

    monkeypatch.setattr(jbilevel.models, "generate", spy)
    want = experiment.evaluate(model, params, task, "test", batch_size=3)
    assert calls == [int(test.prompt_len_N.max())] * 4
    calls.clear()
    got = experiment.evaluate(model, params, task, "test", batch_size=3, buckets=4)
    assert got["predictions"] == want["predictions"] and got["accuracy"] == want["accuracy"]
    # 3 prompts of each length a batch, longest first: the buckets of 64 tokens (the prompt
    # lengths' quartiles rounded up) and the longest prompt
    assert calls == [int(test.prompt_len_N.max()), 192, 128, 128]

"""Cost of one implicit hypergradient on a decoder-only LM, in plain-gradient units.

    PYTHONPATH=. python benchmarks/hypergrad.py [--layers 4 --d 256 --seq 128 --batch 16
                                                 --vocab 32000 --chunk 4]

The model is jbilevel's own (``models.build``, the chunked LM loss), as the trainer runs it.
Prints one table: plain gradient, HVP (forward-over-reverse), the per-example term (one JVP of
loss_B + weight Jacobian: ``adjoint.example_u`` + ``weight_vjp``), jaxopt's mixed term (VJP of
grad_theta g w.r.t. omega), and full hypergradients (``jbilevel.hypergrad`` with
``chunk`` rows per forward-mode pass) with k = 1, 5, 10, 20 CG iterations; each as median wall
time after compile, as a ratio to one plain gradient, and as compiled peak memory (temp +
arguments). Then the target checks: time within 1.1 x (2 + c k) gradients (c = HVP / grad)
and peak memory within 1.5x the plain gradient's. Benchmark on an idle machine
(docs/design.md, Measuring).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jbilevel import objectives
from jbilevel.adjoint import Implicit, example_u, weight_vjp
from jbilevel.implicit import hypergrad
from jbilevel.models import ModelConfig, build
from jbilevel.xla_options import tune_host_malloc

MEMORY_TARGET = 1.5


def make_batch(rng, *, n, batch, seq, vocab, offset):
    ids = rng.integers(0, vocab, size=(batch, seq + 1)).astype(np.int32)
    mask = np.ones((batch, seq), np.float32)
    mask[:, : seq // 4] = 0  # prompt tokens
    return {"input_ids": jnp.asarray(ids[:, :-1]), "labels": jnp.asarray(ids[:, 1:]),
            "loss_mask": jnp.asarray(mask), "attention_mask": jnp.ones((batch, seq), jnp.int32),
            "ids": jnp.asarray(offset + np.arange(batch), jnp.int32),
            "valid": jnp.ones(batch, jnp.float32)}


def measure(fn, args, runs):
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    mem = compiled.memory_analysis()
    peak = None if mem is None else mem.temp_size_in_bytes + mem.argument_size_in_bytes
    return statistics.median(times), peak


def main():
    tune_host_malloc()  # as the jbilevel command does (jbilevel/xla_options.py)
    p = argparse.ArgumentParser()
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunk", type=int, default=4,
                   help="rows per forward-mode pass of the hypergradient (HVPs and JVPs)")
    p.add_argument("--n", type=int, default=1024, help="training-set size (len(omega))")
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()

    model = build(ModelConfig(vocab_size=a.vocab, hidden_size=a.d, num_layers=a.layers,
                              num_heads=a.heads, intermediate_size=4 * a.d,
                              max_position_embeddings=a.seq))
    params = model.init(jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    rng = np.random.default_rng(0)
    train = make_batch(rng, n=a.n, batch=a.batch, seq=a.seq, vocab=a.vocab, offset=0)
    val = make_batch(rng, n=a.n, batch=a.batch, seq=a.seq, vocab=a.vocab, offset=0)
    omega = jnp.asarray(0.1 * rng.normal(size=a.n), jnp.float32)
    example_loss = objectives.lm_example_loss(model)
    g = objectives.inner_objective(example_loss, weighting="softmax")
    f = objectives.outer_objective(example_loss)
    v = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)

    grad_fn = lambda th, om: jax.grad(g)(th, om, train)
    hvp_fn = lambda th, om, v: jax.jvp(lambda t: jax.grad(g)(t, om, train), (th,), (v,))[1]

    def fast_fn(th, om, v):
        u_R, ids_R, valid_R = example_u(example_loss, th, train, v, chunk=a.chunk)
        return weight_vjp("softmax", om, ids_R, u_R, valid_R)

    def jaxopt_fn(th, om, v):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*no longer maintained.*")
            from jaxopt.implicit_diff import root_vjp
        optimality = lambda t, o: jax.grad(g)(t, o, train)
        # Identity "solve": isolates jaxopt's mixed term, the VJP w.r.t. omega at v.
        return root_vjp(optimality, th, (om,), v, solve=lambda _mv, b: b)[0]

    def hg_fn(k):
        method = Implicit(maxiter=k, tol=0.0, ridge=10.0)  # tol 0: exactly k HVPs
        return lambda th, om: hypergrad(g, f, th, om, train, val, method=method,
                                        chunk=a.chunk)

    rows = [("plain gradient", grad_fn, (params, omega), a.runs + 2),
            ("HVP (fwd-over-rev)", hvp_fn, (params, omega, v), a.runs + 2),
            ("per-example term (JVP)", fast_fn, (params, omega, v), a.runs + 2),
            ("mixed term, jaxopt", jaxopt_fn, (params, omega, v), a.runs + 2)]
    # Fewer repeats for the long rows keeps the whole run near 3 minutes on an idle CPU.
    rows += [(f"hypergrad, k={k} CG", hg_fn(k), (params, omega), a.runs if k < 10 else 2)
             for k in (1, 5, 10, 20)]

    print(f"decoder LM (jbilevel.models, chunked loss): {n_params / 1e6:.2f}M params, d={a.d}, "
          f"layers={a.layers}, seq={a.seq}, batch={a.batch}, vocab={a.vocab}, f32, "
          f"hypergradient chunk={a.chunk} rows, backend={jax.default_backend()}, "
          f"devices used=1")
    print(f"{'measurement':<24}{'median s':>10}{'x grad':>9}{'peak MiB':>10}{'x grad mem':>11}")
    results = {}
    for name, fn, args, runs in rows:
        t, mem = measure(fn, args, runs)
        results[name] = (t, mem)
        t0, m0 = results["plain gradient"]
        mem_s = "n/a" if mem is None else f"{mem / 2**20:.1f}"
        memx = "n/a" if mem is None or not m0 else f"{mem / m0:.2f}"
        print(f"{name:<24}{t:>10.3f}{t / t0:>9.2f}{mem_s:>10}{memx:>11}", flush=True)

    t0, m0 = results["plain gradient"]
    c = results["HVP (fwd-over-rev)"][0] / t0
    print(f"\ntarget checks (c = HVP/grad = {c:.2f}):")
    for k in (1, 5, 10, 20):
        t, mem = results[f"hypergrad, k={k} CG"]
        bound = 1.1 * (1 + c * k + 1)
        print(f"  k={k:>2}: hypergrad {t / t0:6.2f} grads <= 1.1*(2 + c*k) = {bound:6.2f}: "
              f"{'PASS' if t / t0 <= bound else 'FAIL'};  peak mem {mem / m0:.2f}x <= "
              f"{MEMORY_TARGET}x: {'PASS' if mem / m0 <= MEMORY_TARGET else 'FAIL'}")
    fast = results["per-example term (JVP)"][0] / t0
    print(f"  per-example term {fast:.2f} grads <= 1.0: {'PASS' if fast <= 1.0 else 'FAIL'} "
          f"(jaxopt mixed term: {results['mixed term, jaxopt'][0] / t0:.2f} grads)")


if __name__ == "__main__":
    main()

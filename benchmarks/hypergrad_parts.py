"""Where one bds hypergradient's time goes, at the shapes of the fine-tuning demo.

    PYTHONPATH=. python benchmarks/hypergrad_parts.py [--rows 2000 --hessian-rows 64
                                                       --val-rows 200 --chunk 500 --seq 24]

The shipped base's architecture (hidden 128, 3 layers, 4 heads, MLP 512, vocabulary 512) with
random weights and tokens (``benchmarks/hypergrad.py``'s batches and timing): the pieces of
``jbilevel.adjoint``'s hypergradient as the bds trainer runs them (``hessian_rows`` rows for
H, every training row for the per-row term, ``hyper_chunk`` rows per forward-mode pass), each
jitted and timed as the median of a few calls after compiling. Prints one table: seconds and
the ratio to one training step's gradient (``--batch`` rows), then each CG setting's share of
a hypergradient (k HVPs + the validation gradient + the per-row term). Run it on an idle
machine; the ratios are what to compare.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from hypergrad import make_batch, measure  # benchmarks/hypergrad.py, this script's neighbour

from jbilevel import objectives
from jbilevel.adjoint import example_u, hvp, outer_value_and_grad
from jbilevel.models import ModelConfig, build
from jbilevel.xla_options import tune_host_malloc


def main():
    tune_host_malloc()  # as the jbilevel command does (jbilevel/xla_options.py)
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=2000, help="training rows (the per-row term)")
    p.add_argument("--hessian-rows", type=int, default=64)
    p.add_argument("--val-rows", type=int, default=200)
    p.add_argument("--batch", type=int, default=32, help="rows of one training step")
    p.add_argument("--chunk", type=int, default=500, help="rows per forward-mode pass")
    p.add_argument("--seq", type=int, default=24)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()

    model = build(ModelConfig(vocab_size=512, hidden_size=128, num_layers=3, num_heads=4,
                              intermediate_size=512, max_position_embeddings=2 * a.seq))
    params = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    loss_B = objectives.lm_example_loss(model)
    v = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)
    mean_loss = lambda th, b: loss_B(th, b).mean()  # noqa: E731
    grad = jax.grad(mean_loss)
    # jbilevel.adjoint's own pieces, as the bds trainer calls them; with --hessian-rows and
    # --val-rows below --chunk they take their unchunked paths, as the trainer does at these
    # sizes (64 and 200 rows, hyper_chunk 500). Uniform weights: omega does not enter.
    h_times = lambda th, v, b: hvp(lambda t, _, rows: mean_loss(t, rows), th, None, b)(v)  # noqa: E731
    val_grad = lambda th, b: outer_value_and_grad(mean_loss, th, b)[1]  # noqa: E731
    per_row = lambda th, v, b: example_u(loss_B, th, b, v, chunk=a.chunk)[0]  # noqa: E731

    def rows_of(n):
        return make_batch(rng, n=n, batch=n, seq=a.seq, vocab=512, offset=0)

    rows = [("train-step gradient", a.batch, grad, (params, rows_of(a.batch))),
            ("HVP (Hessian rows)", a.hessian_rows, h_times,
             (params, v, rows_of(a.hessian_rows))),
            ("validation gradient", a.val_rows, val_grad, (params, rows_of(a.val_rows))),
            ("per-row term (JVP)", a.rows, per_row, (params, v, rows_of(a.rows)))]
    print(f"base architecture, {jax.default_backend()}, seq {a.seq}, chunk {a.chunk}, "
          f"median of {a.runs}")
    print(f"{'piece':<22}{'rows':>6}{'seconds':>10}{'x step':>8}")
    seconds = {}
    for name, n, fn, args in rows:
        seconds[name] = measure(fn, args, a.runs)[0]
        print(f"{name:<22}{n:>6}{seconds[name]:>10.3f}"
              f"{seconds[name] / seconds['train-step gradient']:>8.1f}", flush=True)
    rest = seconds["validation gradient"] + seconds["per-row term (JVP)"]
    print("\nCG iterations k: a hypergradient = k HVPs + validation gradient + per-row term")
    for k in (1, 2, 5):
        total = k * seconds["HVP (Hessian rows)"] + rest
        print(f"  k={k}: {total:6.2f} s ({total / seconds['train-step gradient']:5.1f} steps), "
              f"the solve's HVPs {k * seconds['HVP (Hessian rows)'] / total:4.0%} of it")


if __name__ == "__main__":
    main()

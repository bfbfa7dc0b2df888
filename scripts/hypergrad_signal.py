"""How well do bds's hypergradient and the per-example loss tell clean from corrupted data?

Takes a finished run with ground truth (a built-in task, or files with ``data.truth``; its
``config.yaml`` and saved ``model/``), computes
at uniform weights the hypergradient of the validation loss w.r.t. every training example's
logit (``jbilevel.hypergrad_chunked``: Hessian on a random sample of rows, CG with ridge
damping) and prints the AUROC of ``-d omega`` (the direction a gradient step moves the
weights) and of ``-loss`` (low loss = likely clean, the signal bmo's weight update follows)
against the task's ground truth.

    python scripts/hypergrad_signal.py runs/quality_mix --ridge 10 1 --rows 64 512
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jbilevel import config, saved
from jbilevel.chunked import hypergrad_chunked
from jbilevel.data import auroc
from jbilevel.experiment import ExperimentConfig
from jbilevel.implicit import Implicit
from jbilevel.models import load_pretrained
from jbilevel.objectives import inner_objective, lm_example_loss, outer_objective


def _batch(dataset, length: int) -> dict:
    return {k: jnp.asarray(v) for k, v in dataset.batch(np.arange(len(dataset)), length).items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a finished `jbilevel train` output directory with ground truth")
    p.add_argument("--ridge", type=float, nargs="+", default=[10.0, 1.0])
    p.add_argument("--rows", type=int, nargs="+", default=[64], help="Hessian sample sizes")
    p.add_argument("--cg-iters", type=int, default=5)
    p.add_argument("--chunk", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="seed of the Hessian row samples")
    args = p.parse_args(argv)

    run = Path(args.run)
    cfg = config.load(ExperimentConfig, run / "config.yaml")
    task = saved.load_task(cfg, run / "model")
    if task.good_N is None:
        raise SystemExit(f"{run}/config.yaml: no ground truth (data files without data.truth)")
    forward, params, _ = load_pretrained(str(run / "model"))
    loss = lm_example_loss(forward)
    inner = inner_objective(loss, weighting=cfg.method.weighting)
    outer = outer_objective(loss)
    longest = max(task.train.length_N.max(), task.validation.length_N.max())
    length = int(-(-longest // 8) * 8)
    train, val = _batch(task.train, length), _batch(task.validation, length)
    good, n = task.good_N, len(task.train)

    loss_N = np.asarray(jax.jit(loss)(params, train))
    print(f"{run}: {n} training examples, {int(good.sum())} clean")
    print(f"loss: clean {loss_N[good == 1].mean():.3f}, corrupted {loss_N[good == 0].mean():.3f}"
          f", AUROC(-loss) {auroc(-loss_N, good):.3f}")
    print("| ridge | Hessian rows | AUROC(-d omega) | CG residual | seconds |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(args.seed)
    for ridge, rows in itertools.product(args.ridge, args.rows):
        pick = rng.choice(n, size=min(rows, n), replace=False)
        hessian = jax.tree.map(lambda x, pick=pick: x[pick], train)
        method = Implicit("cg", maxiter=args.cg_iters, tol=0.0, ridge=ridge)
        t = time.perf_counter()
        d, info = jax.jit(lambda th, om, h, m=method: hypergrad_chunked(
            inner, outer, th, om, h, train, val, chunk=args.chunk, method=m,
            return_info=True))(params, jnp.zeros(n), hessian)
        d = np.asarray(d)
        print(f"| {ridge:g} | {len(pick)} | {auroc(-d, good):.3f} | {float(info.residual):.2e} "
              f"| {time.perf_counter() - t:.0f} |")


if __name__ == "__main__":
    main()

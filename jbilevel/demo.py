"""Built-in CPU demo: learn data weights that down-weight corrupted training labels.

Weighted L2-regularised logistic regression; a fraction of the training labels are flipped.
Each outer step re-solves the inner problem (Newton, warm-started), takes the implicit
hypergradient of the clean validation loss w.r.t. the weight logits and updates them with
Adam. The weight mass should move from corrupted to clean examples and the validation loss
should drop. (A later trainer replaces this with the LLM demo.)
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jbilevel import objectives, weights
from jbilevel.implicit import hypergrad

N_TRAIN, N_VAL, DIM = 400, 100, 10
CORRUPT_FRAC = 0.4
MU = 1e-2
STEPS, LR = 20, 0.2


def _loss_B(theta, batch):
    return jax.nn.softplus(-batch["y"] * (batch["x"] @ theta["w"] + theta["b"]))


def _data(seed: int):
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=DIM)

    def sample(n):
        x = rng.normal(size=(n, DIM)).astype(np.float32)
        return x, np.sign(x @ w_true).astype(np.float32)

    x, y = sample(N_TRAIN)
    corrupt_N = rng.permutation(N_TRAIN) < int(CORRUPT_FRAC * N_TRAIN)
    y = np.where(corrupt_N, -y, y)
    xv, yv = sample(N_VAL)
    train = {"x": jnp.asarray(x), "y": jnp.asarray(y), "ids": jnp.arange(N_TRAIN, dtype=jnp.int32),
             "valid": jnp.ones(N_TRAIN, jnp.float32)}
    return train, {"x": jnp.asarray(xv), "y": jnp.asarray(yv)}, corrupt_N


def _newton(inner, theta, omega, batch, steps=10):
    # DIM + 1 parameters: an exact Newton solve is cheap and gives a true root, which is what
    # the implicit function theorem assumes.
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(theta)
    g = lambda z: inner(unravel(z), omega, batch)
    step = lambda _, z: z - jnp.linalg.solve(jax.hessian(g)(z), jax.grad(g)(z))
    return unravel(jax.lax.fori_loop(0, steps, step, flat))


def main(args) -> int:
    """Run the demo.

    Args:
      args: namespace with ``out`` (output directory) and ``seed``.

    Returns:
      process exit code (0 on success).
    """
    t0 = time.time()
    train, val, corrupt_N = _data(args.seed)
    inner = objectives.inner_objective(_loss_B, weighting="softmax", mu=MU)
    outer = objectives.outer_objective(_loss_B)
    opt = optax.adam(LR)

    @jax.jit
    def outer_step(theta, omega, opt_state):
        theta = _newton(inner, theta, omega, train)
        d_omega, info = hypergrad(inner, outer, theta, omega, train, val, maxiter=50, tol=1e-6,
                                  return_info=True)
        updates, opt_state = opt.update(d_omega, opt_state, omega)
        return theta, optax.apply_updates(omega, updates), opt_state, info

    clean = jnp.asarray(~corrupt_N, jnp.float32)

    def snapshot(step, theta, omega, info=None):
        s_N = weights.weights(omega, "softmax")
        h = weights.health(s_N)
        return {
            "step": step,
            "val_loss": float(outer(theta, val)),
            "val_acc": float(jnp.mean(jnp.sign(val["x"] @ theta["w"] + theta["b"]) == val["y"])),
            "mean_w_clean": float(jnp.sum(s_N * clean) / jnp.sum(clean)),
            "mean_w_corrupt": float(jnp.sum(s_N * (1 - clean)) / jnp.sum(1 - clean)),
            "ess": float(h["ess"]),
            "cg_residual": None if info is None else float(info.residual),
        }

    omega = weights.init_logits(N_TRAIN, "softmax")
    theta = _newton(inner, {"w": jnp.zeros(DIM), "b": jnp.zeros(())}, omega, train, 20)
    opt_state = opt.init(omega)
    rows = [snapshot(0, theta, omega)]
    for step in range(1, STEPS + 1):
        theta, omega, opt_state, info = outer_step(theta, omega, opt_state)
        if step % 5 == 0:
            final_theta = _newton(inner, theta, omega, train)
            rows.append(snapshot(step, final_theta, omega, info))

    print(f"jbilevel demo: weighted logistic regression, {N_TRAIN} train examples "
          f"({CORRUPT_FRAC:.0%} labels flipped), {N_VAL} clean validation examples")
    print(f"{'step':>5} {'val_loss':>9} {'val_acc':>8} {'w_clean':>8} {'w_corrupt':>9} "
          f"{'ess':>6} {'cg_resid':>9}")
    for r in rows:
        resid = "-" if r["cg_residual"] is None else f"{r['cg_residual']:.1e}"
        print(f"{r['step']:>5} {r['val_loss']:>9.4f} {r['val_acc']:>8.3f} "
              f"{r['mean_w_clean']:>8.3f} {r['mean_w_corrupt']:>9.3f} {r['ess']:>6.3f} "
              f"{resid:>9}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"task": "weighted_logistic_regression_flipped_labels", "seed": args.seed,
              "n_train": N_TRAIN, "corrupt_frac": CORRUPT_FRAC, "steps": STEPS,
              "history": rows, "seconds": round(time.time() - t0, 2)}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'results.json'} ({result['seconds']} s)")
    return 0

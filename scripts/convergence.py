"""Convergence experiments: where BDS's answer is known, on a tiny LM, and the hypergradient.

    python scripts/convergence.py                       # all three, writes docs/convergence/
    python scripts/convergence.py --only least_squares cg_error --out /tmp/conv

1. ``least_squares``: weighted ridge regression with useful and useless training examples
   (``jbilevel.problems.least_squares``), the inner problem solved exactly, omega moved by
   Adam along the exact implicit hypergradient (``jbilevel.hypergrad``). Reports the weight
   mass on useless examples and the validation-loss gap to the clean-data solution, against
   iterations, over seeds; direct mixing (uniform weights on train + validation) for contrast.
2. ``transformer``: a one-layer decoder (``jbilevel.models.build``) on a synthetic SFT task
   with systematically corrupted rows (``jbilevel.problems.shift_sequences``), trained by
   ``jbilevel.algorithms.make_steps`` for bds (implicit), bmo and mix; validation loss
   against iterations over seeds.
3. ``cg_error``: relative error of ``jbilevel.hypergrad(..., solver="cg", maxiter=k,
   ridge=r)`` against the exact hypergradient (closed form for ridge regression, a dense
   implicit-function solve for logistic regression), float64.

Each writes ``NAME.png``, ``NAME.json`` and ``NAME.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jbilevel
from jbilevel import objectives, problems, weights
from jbilevel.adjoint import Implicit
from jbilevel.algorithms import MethodConfig, init_state, make_steps
from jbilevel.models import ModelConfig, build

EXPERIMENTS = ("least_squares", "transformer", "cg_error")

# --------------------------------------------------------------------------- 1. least squares

# (name, problems.least_squares options). Fewer useless examples than parameters: their
# gradients cannot cancel, so the validation optimum needs zero weight on them. More useless
# examples than parameters: weightings that use some of them reach the same validation loss.
LS_SETTINGS = (
    ("other_param", dict(dim=20, n_useful=60, n_useless=15, useless="other_param")),
    ("noise_labels", dict(dim=20, n_useful=60, n_useless=15, useless="noise_labels")),
    ("other_param, 50 useless > D=10",
     dict(dim=10, n_useful=50, n_useless=50, useless="other_param")),
)


def least_squares_run(problem: problems.LeastSquares, *, steps: int, lr: float, mu: float,
                      cg_iters: int) -> dict:
    """BDS with an exactly solved inner problem on one ``LeastSquares`` problem (float64).

    Returns:
      dict of per-iteration lists ``useless_mass`` (fraction of the total weight on useless
      examples, before each step) and ``gap`` (validation loss minus the clean-data
      solution's), the largest relative CG residual ``max_cg_residual``, and
      ``mix_gap`` / ``mix_useless_mass`` for direct mixing.
    """
    train = jax.tree.map(jnp.asarray, problem.train)
    val = jax.tree.map(jnp.asarray, problem.val)
    useless_N = jnp.asarray(problem.useless_N)
    n = useless_N.shape[0]
    inner = objectives.inner_objective(problems.square_loss, weighting="softmax", mu=mu)
    outer = objectives.outer_objective(problems.square_loss)
    s_clean_N = jnp.asarray(problems.clean_weights(problem.useless_N))
    clean_loss = outer(problems.ridge_solution(s_clean_N, train, mu), val)
    both = {k: jnp.concatenate([train[k], val[k]]) for k in ("x", "y")}
    mix_loss = outer(problems.ridge_solution(jnp.ones_like(both["y"]), both, mu), val)
    tx = optax.adam(lr)

    @jax.jit
    def step(omega_N, opt_state):
        s_N = weights.weights(omega_N, "softmax")
        theta = problems.ridge_solution(s_N, train, mu)  # the exact inner solution
        d_omega, info = jbilevel.hypergrad(inner, outer, theta, omega_N, train, val,
                                           solver="cg", maxiter=cg_iters, tol=1e-12,
                                           return_info=True)
        updates, opt_state = tx.update(d_omega, opt_state, omega_N)
        mass = jnp.sum(jnp.where(useless_N, s_N, 0.0)) / n
        return optax.apply_updates(omega_N, updates), opt_state, (mass, info.outer_loss,
                                                                  info.residual)

    omega_N = weights.init_logits(n, "softmax", jnp.float64)
    opt_state = tx.init(omega_N)
    rows = []
    for _ in range(steps):
        omega_N, opt_state, row = step(omega_N, opt_state)
        rows.append(row)
    mass, loss, residual = (np.asarray(x) for x in zip(*jax.device_get(rows), strict=True))
    n_val = val["y"].shape[0]
    return {"useless_mass": _rounded(mass), "gap": _rounded(loss - float(clean_loss)),
            "max_cg_residual": float(residual.max()), "clean_loss": float(clean_loss),
            "mix_gap": float(mix_loss - clean_loss),
            "mix_useless_mass": float(np.sum(problem.useless_N) / (n + n_val))}


def least_squares_experiment(seeds=(0, 1, 2, 3, 4), *, steps: int = 500, lr: float = 0.1,
                             mu: float = 1e-3, settings=LS_SETTINGS, **problem_kw) -> dict:
    """Experiment 1 over settings and seeds; problem_kw overrides every setting's options."""
    out = {"config": {"seeds": list(seeds), "steps": steps, "lr_omega": lr, "mu": mu,
                      "optimizer": "adam", "weighting": "softmax"}, "settings": {}}
    with jax.enable_x64(True):
        for name, options in settings:
            options = {**options, **problem_kw}
            cg_iters = 5 * options["dim"]
            runs = [least_squares_run(problems.least_squares(seed, **options), steps=steps,
                                      lr=lr, mu=mu, cg_iters=cg_iters) for seed in seeds]
            out["settings"][name] = {"options": options, "cg_iters": cg_iters, "runs": runs}
    return out


def least_squares_table(result: dict) -> list[dict]:
    rows = []
    for name, setting in result["settings"].items():
        runs = setting["runs"]
        mass = np.array([r["useless_mass"] for r in runs])
        gap = np.array([r["gap"] for r in runs])
        steps = mass.shape[1]
        checkpoints = sorted({min(c, steps - 1) for c in (0, 50, 100, steps - 1)})
        row = {"setting": name}
        for c in checkpoints:
            row[f"useless mass @{c}"] = _mean_pm(mass[:, c])
        row["gap @end"] = _mean_pm(gap[:, -1])
        row["max cg residual"] = f"{max(r['max_cg_residual'] for r in runs):.1e}"
        row["mix: useless mass"] = f"{runs[0]['mix_useless_mass']:.3f}"
        row["mix: gap"] = _mean_pm(np.array([r["mix_gap"] for r in runs]))
        rows.append(row)
    return rows


def least_squares_plot(result: dict, path: Path) -> None:
    plt = _pyplot()
    names = list(result["settings"])
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 6.5), squeeze=False)
    for j, name in enumerate(names):
        runs = result["settings"][name]["runs"]
        for i, key in enumerate(("useless_mass", "gap")):
            ax = axes[i, j]
            curves = np.array([r[key] for r in runs])
            for c in curves:
                ax.plot(c, color="C0", alpha=0.3, lw=0.8)
            ax.plot(curves.mean(0), color="C0", lw=2, label="BDS (mean over seeds)")
            mix = np.mean([r["mix_useless_mass" if i == 0 else "mix_gap"] for r in runs])
            ax.axhline(mix, color="C3", ls="--", label="direct mixing")
            if i == 0:
                ax.set_yscale("log")
                ax.set_title(name, fontsize=10)
                ax.set_ylabel("weight mass on useless examples")
            else:
                ax.axhline(0.0, color="k", lw=0.5)
                ax.set_yscale("symlog", linthresh=1e-3)
                ax.set_ylabel("val loss - clean-data val loss")
                ax.set_xlabel("hypergradient steps")
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.suptitle("Least squares, inner problem solved exactly, exact implicit hypergradient")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- 2. transformer

TRANSFORMER_MODEL = ModelConfig(vocab_size=12, hidden_size=32, num_layers=1, num_heads=2,
                                intermediate_size=64, max_position_embeddings=16)
TRANSFORMER_METHODS = {
    "mix": MethodConfig(method="mix", lr_theta=3e-3),
    "bmo": MethodConfig(method="bmo", lr_theta=3e-3, lr_omega=1e-2, lam=0.5),
    "bds": MethodConfig(method="bds", lr_theta=3e-3, lr_omega=0.3, hyper_every=10,
                        hypergrad=Implicit("cg", maxiter=5, tol=0.0, ridge=10.0)),
}


def transformer_run(method: str, seed: int, *, steps: int, batch_size: int, hyper_batch: int,
                    eval_every: int, data_kw: dict) -> dict:
    """One method, one seed: validation-loss curve and final losses and weights."""
    cfg = TRANSFORMER_METHODS[method]
    train, val, test, corrupt_N = problems.shift_sequences(seed, **data_kw)
    model = build(TRANSFORMER_MODEL)
    example_loss = objectives.lm_example_loss(model)
    fns = make_steps(example_loss, cfg)
    n = corrupt_N.shape[0]
    state = init_state(model.init(jax.random.key(seed)), n, cfg)
    train_step = jax.jit(fns.train, donate_argnums=0)
    hyper_step = jax.jit(fns.hyper, donate_argnums=0) if fns.hyper is not None else None
    mean_loss = jax.jit(lambda theta, batch: jnp.mean(example_loss(theta, batch)))
    source = train
    if method == "mix":  # direct mixing: the validation rows join the training data
        source = {k: np.concatenate([train[k], val[k]]) for k in train}
    rng = np.random.default_rng(1000 + seed)

    def take(batch, size):
        idx_B = rng.choice(len(batch["ids"]), size, replace=False)
        return {k: v[idx_B] for k, v in batch.items()}

    curve_steps, curve = [0], [mean_loss(state.theta, val)]
    start = time.perf_counter()
    for i in range(1, steps + 1):
        if cfg.method == "bmo":
            state, _ = train_step(state, take(source, batch_size), take(val, batch_size))
        else:
            state, _ = train_step(state, take(source, batch_size))
        if hyper_step is not None and i % cfg.hyper_every == 0:
            state, _ = hyper_step(state, take(train, hyper_batch), val)
        if i % eval_every == 0 or i == steps:
            curve_steps.append(i)
            curve.append(mean_loss(state.theta, val))
    curve = _rounded(jax.device_get(curve))
    seconds = time.perf_counter() - start
    s_N = np.asarray(weights.weights(state.omega, cfg.weighting))
    if method == "mix":  # uniform weights over the training and the validation rows
        corrupt_mass = float(corrupt_N.sum() / len(source["ids"]))
    else:
        corrupt_mass = float(s_N[corrupt_N].sum() / n)
    return {"steps": curve_steps, "val_loss": curve, "final_val_loss": curve[-1],
            "final_test_loss": float(mean_loss(state.theta, test)),
            "corrupt_mass": corrupt_mass, "seconds": seconds}


def transformer_experiment(seeds=(0, 1, 2), *, methods=tuple(TRANSFORMER_METHODS),
                           steps: int = 300, batch_size: int = 32, hyper_batch: int = 64,
                           eval_every: int = 10, **data_kw) -> dict:
    """Experiment 2: every method over seeds, float32."""
    data_kw = {"n": 512, "n_val": 64, "n_test": 256, "corrupt_frac": 0.4, **data_kw}
    out = {"config": {"seeds": list(seeds), "steps": steps, "batch_size": batch_size,
                      "hyper_batch": hyper_batch, "data": data_kw,
                      "model": {k: getattr(TRANSFORMER_MODEL, k) for k in
                                ("vocab_size", "hidden_size", "num_layers", "num_heads",
                                 "intermediate_size")},
                      "methods": {m: _method_summary(TRANSFORMER_METHODS[m]) for m in methods}},
           "methods": {}}
    for method in methods:
        out["methods"][method] = [
            transformer_run(method, seed, steps=steps, batch_size=batch_size,
                            hyper_batch=hyper_batch, eval_every=eval_every, data_kw=data_kw)
            for seed in seeds]
    return out


def transformer_table(result: dict) -> list[dict]:
    rows = []
    for method, runs in result["methods"].items():
        rows.append({
            "method": method,
            "val loss @end": _mean_pm(np.array([r["final_val_loss"] for r in runs])),
            "test loss @end": _mean_pm(np.array([r["final_test_loss"] for r in runs])),
            "weight mass on corrupted": _mean_pm(np.array([r["corrupt_mass"] for r in runs])),
            "seconds per run": f"{np.mean([r['seconds'] for r in runs]):.1f}",
        })
    return rows


def transformer_plot(result: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for j, (method, runs) in enumerate(result["methods"].items()):
        curves = np.array([r["val_loss"] for r in runs])
        x = runs[0]["steps"]
        for c in curves:
            ax.plot(x, c, color=f"C{j}", alpha=0.3, lw=0.8)
        ax.plot(x, curves.mean(0), color=f"C{j}", lw=2, label=f"{method} (mean of {len(runs)})")
    frac = result["config"]["data"]["corrupt_frac"]
    ax.set_yscale("log")
    ax.set_xlabel("training steps")
    ax.set_ylabel("validation loss (mean response-token NLL)")
    ax.set_title(f"1-layer transformer, {frac:.0%} of training rows follow a wrong rule",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- 3. CG error

CG_ITERS = (1, 2, 4, 8, 16, 32, 64, 128)
CG_RIDGES = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def logistic_loss(theta_D: jax.Array, batch: dict) -> jax.Array:
    """Per-example ``log(1 + exp(-y x theta))`` with labels y in {-1, +1}."""
    return jax.nn.softplus(-batch["y"] * (batch["x"] @ theta_D))


def _conditioned_problem(seed: int, dim: int, n: int, n_val: int, decay: float):
    """Features scaled by logspace(0, -decay): an inner Hessian with a wide spectrum."""
    p = problems.least_squares(seed, n_useful=n, n_useless=0, n_val=n_val, dim=dim)
    scale_D = np.logspace(0.0, -decay, dim)
    train = {**p.train, "x": p.train["x"] * scale_D[None, :]}
    val = {**p.val, "x": p.val["x"] * scale_D[None, :]}
    omega_N = 0.5 * np.random.default_rng(seed + 1).normal(size=n)
    return train, val, omega_N


def _newton(inner, theta_D, omega_N, batch, iters: int = 20):
    def newton_step(_, th_D):
        h_DxD = jax.hessian(inner)(th_D, omega_N, batch)
        return th_D - jnp.linalg.solve(h_DxD, jax.grad(inner)(th_D, omega_N, batch))

    return jax.jit(lambda th_D: jax.lax.fori_loop(0, iters, newton_step, th_D))(theta_D)


@jax.jit
def _cosine(a, b):
    return jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))


def _dense_hypergrad(inner, outer, theta_D, omega_N, train, val):
    """``-(d grad_theta g / d omega)^T H^-1 grad f`` with dense matrices: the exact answer."""

    @jax.jit
    def dense(theta_D, omega_N):
        h_DxD = jax.hessian(inner)(theta_D, omega_N, train)
        v_D = jnp.linalg.solve(h_DxD, jax.grad(outer)(theta_D, val))
        mixed_DxN = jax.jacobian(lambda om: jax.grad(inner)(theta_D, om, train))(omega_N)
        return -(mixed_DxN.T @ v_D), h_DxD

    d_omega_N, h_DxD = dense(theta_D, omega_N)
    return d_omega_N, np.linalg.eigvalsh(np.asarray(h_DxD))


def cg_error_problem(name: str, seed: int = 0, *, dim: int = 40, n: int = 200, n_val: int = 50,
                     decay: float = 1.5, mu: float = 1e-3):
    """(inner, outer, theta*, omega, train, val, exact hypergradient, Hessian eigenvalues)."""
    train, val, omega_N = _conditioned_problem(seed, dim, n, n_val, decay)
    train, val = jax.tree.map(jnp.asarray, train), jax.tree.map(jnp.asarray, val)
    omega_N = jnp.asarray(omega_N)
    if name == "ridge":
        loss = problems.square_loss
        inner = objectives.inner_objective(loss, weighting="softmax", mu=mu)
        theta_D = problems.ridge_solution(weights.weights(omega_N), train, mu)
        outer = objectives.outer_objective(loss)
        closed_form = jax.grad(lambda om: outer(
            problems.ridge_solution(weights.weights(om), train, mu), val))(omega_N)
        _, eig = _dense_hypergrad(inner, outer, theta_D, omega_N, train, val)
        return inner, outer, theta_D, omega_N, train, val, closed_form, eig
    if name == "logistic":
        train = {**train, "y": jnp.where(train["y"] > 0, 1.0, -1.0)}
        val = {**val, "y": jnp.where(val["y"] > 0, 1.0, -1.0)}
        inner = objectives.inner_objective(logistic_loss, weighting="softmax", mu=mu)
        outer = objectives.outer_objective(logistic_loss)
        theta_D = _newton(inner, jnp.zeros(dim), omega_N, train)
        exact, eig = _dense_hypergrad(inner, outer, theta_D, omega_N, train, val)
        return inner, outer, theta_D, omega_N, train, val, exact, eig
    raise ValueError(f"cg_error_problem: unknown problem {name!r} (ridge, logistic)")


def cg_error_experiment(problem_names=("ridge", "logistic"), *, iters=CG_ITERS,
                        ridges=CG_RIDGES, seed: int = 0, **problem_kw) -> dict:
    """Experiment 3: relative error of the CG hypergradient for every (maxiter, ridge)."""
    out = {"config": {"iters": list(iters), "ridges": list(ridges), "seed": seed,
                      **{k: v for k, v in problem_kw.items()}}, "problems": {}}
    with jax.enable_x64(True):
        for name in problem_names:
            inner, outer, theta, omega, train, val, exact, eig = cg_error_problem(
                name, seed, **problem_kw)
            stationarity = float(jnp.linalg.norm(jax.grad(inner)(theta, omega, train)))
            errors, cosines = {}, {}
            for ridge in ridges:
                errs, cos = [], []
                for k in iters:
                    approx = jbilevel.hypergrad(inner, outer, theta, omega, train, val,
                                                solver="cg", maxiter=k, tol=0.0, ridge=ridge)
                    errs.append(float(jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact)))
                    cos.append(float(_cosine(approx, exact)))
                errors[str(ridge)], cosines[str(ridge)] = errs, cos
            out["problems"][name] = {"errors": errors, "cosines": cosines,
                                     "hessian_eig_min": float(eig[0]),
                                     "hessian_eig_max": float(eig[-1]),
                                     "inner_grad_norm": stationarity}
    return out


def cg_error_table(result: dict) -> list[dict]:
    iters = result["config"]["iters"]
    shown = [k for k in (1, 4, 16, 64, iters[-1]) if k in iters]
    rows = []
    for name, prob in result["problems"].items():
        for ridge, errs in prob["errors"].items():
            row = {"problem": name, "ridge": ridge}
            for k in shown:
                row[f"rel. error k={k}"] = f"{errs[iters.index(k)]:.1e}"
            for k in shown[1:3]:
                row[f"cosine k={k}"] = f"{prob['cosines'][ridge][iters.index(k)]:.3f}"
            rows.append(row)
    return rows


def cg_error_plot(result: dict, path: Path) -> None:
    plt = _pyplot()
    names = list(result["problems"])
    iters = result["config"]["iters"]
    fig, axes = plt.subplots(2, len(names), figsize=(5.2 * len(names), 7.5), squeeze=False)
    for j, name in enumerate(names):
        prob = result["problems"][name]
        top, bottom = axes[0, j], axes[1, j]
        for c, ridge in enumerate(prob["errors"]):
            top.plot(iters, np.maximum(prob["errors"][ridge], 1e-17), marker="o", ms=3,
                     color=f"C{c}", label=f"ridge {ridge}")
            bottom.plot(iters, prob["cosines"][ridge], marker="o", ms=3, color=f"C{c}")
        for ax in (top, bottom):
            ax.set_xscale("log")
        top.set_yscale("log")
        top.set_ylabel("relative error of the hypergradient")
        top.set_title(f"{name}: Hessian eigenvalues in [{prob['hessian_eig_min']:.1e}, "
                      f"{prob['hessian_eig_max']:.1e}]", fontsize=9)
        top.legend(fontsize=7)
        bottom.set_ylabel("cosine with the exact hypergradient")
        bottom.set_xlabel("CG iterations k (Hessian-vector products)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- output


def _rounded(x_T: np.ndarray) -> list[float]:
    return [float(f"{v:.4g}") for v in np.asarray(x_T, float)]


def _mean_pm(x: np.ndarray) -> str:
    x = np.asarray(x, float)
    return f"{x.mean():.3g} ± {x.std():.2g}" if x.size > 1 else f"{x.mean():.3g}"


def _method_summary(cfg: MethodConfig) -> dict:
    keys = {"mix": ("lr_theta",), "bmo": ("lr_theta", "lr_omega", "lam"),
            "bds": ("lr_theta", "lr_omega", "hyper_every")}[cfg.method]
    out = {k: getattr(cfg, k) for k in keys}
    if cfg.method == "bds":
        out.update(cg_iters=cfg.hypergrad.maxiter, ridge=cfg.hypergrad.ridge)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def markdown_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


RUNNERS = {
    "least_squares": (least_squares_experiment, least_squares_table, least_squares_plot),
    "transformer": (transformer_experiment, transformer_table, transformer_plot),
    "cg_error": (cg_error_experiment, cg_error_table, cg_error_plot),
}


def write(name: str, result: dict, out: Path, command: str) -> list[dict]:
    """Writes NAME.json (everything), NAME.md (the table) and NAME.png; returns the rows."""
    _, table, plot = RUNNERS[name]
    out.mkdir(parents=True, exist_ok=True)
    rows = table(result)
    (out / f"{name}.json").write_text(json.dumps({"command": command, **result}) + "\n")
    (out / f"{name}.md").write_text(f"Made by `{command}` ({result['seconds']:.0f} s).\n\n"
                                    + markdown_table(rows))
    plot(result, out / f"{name}.png")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS),
                        help="experiments to run (default: all)")
    parser.add_argument("--out", default="docs/convergence", help="output directory")
    args = parser.parse_args(argv)
    out = Path(args.out)
    for name in args.only:
        start = time.perf_counter()
        result = RUNNERS[name][0]()
        result["seconds"] = time.perf_counter() - start
        command = f"python scripts/convergence.py --only {name}"
        rows = write(name, result, out, command)
        print(f"{name}: {result['seconds']:.0f} s -> {out / name}.{{png,json,md}}")
        print(markdown_table(rows))


if __name__ == "__main__":
    main()

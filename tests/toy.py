"""A least-squares problem with a known answer, and the pieces the trainer tests share.

Half of the training examples follow a consistent wrong rule; the validation set is clean.
Used by the trainer tests in-process and from the subprocesses they start.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jbilevel import distributed, train
from jbilevel import sharding as sh
from jbilevel.adjoint import Implicit
from jbilevel.algorithms import MethodConfig, init_state, make_steps

N, D, B = 64, 8, 16
THETA_AXES = {"w": ("embed", "mlp"), "b": ("mlp",)}


def problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=(D, 4))
    x = rng.normal(size=(N, D)).astype(np.float32)
    good = np.arange(N) % 2 == 0
    y = np.where(good[:, None], x @ w_true, -(x @ w_true)).astype(np.float32)
    xv = rng.normal(size=(32, D)).astype(np.float32)
    train_set = {"x": x, "y": y, "ids": np.arange(N, dtype=np.int32),
                 "valid": np.ones(N, np.float32)}
    val_set = {"x": xv, "y": (xv @ w_true).astype(np.float32),
               "ids": np.zeros(32, np.int32), "valid": np.ones(32, np.float32)}
    return train_set, val_set, good


def example_loss(theta, batch):
    pred = batch["x"] @ theta["w"] + theta["b"][None, :]
    return 0.5 * jnp.mean((pred - batch["y"]) ** 2, axis=-1)


def init_theta():
    return {"w": jnp.zeros((D, 4)), "b": jnp.zeros((4,))}


class Batches:
    """Deterministic shuffled batches per (seed, epoch), with a position a checkpoint saves."""

    def __init__(self, arrays: dict, batch_size: int, seed: int = 0):
        self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
        self.n = len(next(iter(arrays.values())))
        self.epoch, self.position = 0, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.position + self.batch_size > self.n:
            self.epoch, self.position = self.epoch + 1, 0
        order = np.random.default_rng((self.seed, self.epoch)).permutation(self.n)
        idx = order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        idx = idx[distributed.process_slice(self.batch_size)]  # this process's rows
        return {k: v[idx] for k, v in self.arrays.items()}

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def setup(method: str, mesh_cfg: sh.MeshConfig, **overrides):
    """Config, compiled steps, state shardings and a fresh-state factory for one method."""
    cfg = MethodConfig(method=method, **{"lr_theta": 0.05, "lr_omega": 0.1, "hyper_every": 4,
                                          "hypergrad": Implicit("cg", maxiter=10, tol=0.0,
                                                                ridge=0.1), **overrides})
    import jax

    sizes = mesh_cfg.sizes_tuple()
    devices = jax.devices() if -1 in sizes else jax.devices()[: int(np.prod(sizes))]
    mesh = sh.make_mesh(mesh_cfg, devices)
    rules = sh.AxisRules()
    steps = make_steps(example_loss, cfg)

    def init():
        return init_state(init_theta(), N, cfg)

    state_sh = train.state_shardings(mesh, rules, jax.eval_shape(init), THETA_AXES, cfg)
    return cfg, train.compile_steps(steps, cfg, mesh, rules, state_sh), state_sh, init


def run_to(method: str, mesh_cfg: sh.MeshConfig, steps: int, ckpt_dir=None,
           checkpoint_every: int = 0, seed: int = 0, **overrides):
    """Trains ``method`` on the toy problem, resuming from ``ckpt_dir`` when it has a checkpoint."""
    from jbilevel.checkpoint import Checkpointer

    train_set, val_set, _ = problem(seed)
    cfg, compiled, state_sh, init = setup(method, mesh_cfg, **overrides)
    data = Batches(train_set, B, seed)
    val, hyper = Batches(val_set, 16, seed + 1), Batches(train_set, N, seed + 2)
    ckpt = Checkpointer(ckpt_dir, keep=2) if ckpt_dir else None
    if ckpt is not None:
        sources = train.data_sources(data, val, hyper)
        state, start, _ = train.restore_or_init(ckpt, init, state_sh, sources)
    else:
        import jax

        state, start = jax.jit(init, out_shardings=state_sh)(), 0
    loop = train.LoopConfig(steps=steps, log_every=4, checkpoint_every=checkpoint_every,
                            progress=False)
    state, step = train.run(compiled, cfg, loop, state, data, val, start_step=start, ckpt=ckpt,
                            hyper_batches=hyper)
    if ckpt is not None:
        ckpt.close()
    return state, step

"""Golden metrics after one step of every method on a tiny fixed LM problem.

Parameters and optimizer arithmetic are float64; the model's logits are float32 by design,
so losses carry float32 rounding and the tolerance is rtol 1e-6.

A change in any method's numbers is caught here even when every other test still passes.
To re-derive after an intentional change, run ``PYTHONPATH=. python tests/test_golden.py``
and paste its output over GOLDEN, saying in the commit what changed and why.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbilevel.adjoint import Implicit
from jbilevel.algorithms import MethodConfig, init_state, make_steps
from jbilevel.algorithms.offline import UNIFORM_METHODS
from jbilevel.data import Batcher, make_task
from jbilevel.experiment import training_set
from jbilevel.models import ModelConfig, build
from jbilevel.objectives import lm_example_loss

WHEN_TO_CHANGE = (
    "Golden values may change only with an intentional change of the model's init, the task "
    "data or tokenizer, batching, or a method's update rule or defaults (MethodConfig). "
    "Re-derive with `PYTHONPATH=. python tests/test_golden.py` and say why in the commit."
)

# fmt: off
GOLDEN = {
    "sft": {"grad_norm": 1.5664870687833858, "loss": 4.614995956420898,
            "theta_abs_sum": 150.08265548707774, "theta_sum": 44.165827985765176,
            "loss_after": 4.3598761558532715},
    "mix": {"grad_norm": 1.3639020442773118, "loss": 4.613781929016113,
            "theta_abs_sum": 149.2226693651018, "theta_sum": 45.83062155241352,
            "loss_after": 4.378088474273682},
    "val": {"grad_norm": 1.5435636927078564, "loss": 4.6218647956848145,
            "theta_abs_sum": 148.93998078120543, "theta_sum": 44.85391166462646,
            "loss_after": 4.396634101867676},
    "oracle": {"grad_norm": 1.5037785063163853, "loss": 4.627031326293945,
               "theta_abs_sum": 149.842247651575, "theta_sum": 42.30991875980438,
               "loss_after": 4.3909125328063965},
    "bmo": {"grad_norm": 1.1908378982551433, "loss": 4.614995956420898,
            "total_loss": 4.618430137634277, "val_loss": 4.6218647956848145,
            "weighted_loss": 4.614995956420898, "theta_abs_sum": 149.39006325117208,
            "theta_sum": 44.43504749140003, "loss_after": 4.388722896575928,
            "omega_dot_ids": 26.399995177984238},
    "bds": {"grad_norm": 1.566487093138035, "loss": 4.614995956420898,
            "weighted_loss": 4.614995956420898, "cg_negative_curvature": 0.0, "cg_truncated": 0.0,
            "cg_residual": 0.176720529794693, "hyper_taken": 1.0,
            "hypergrad_norm": 0.015271052718162537, "val_loss": 4.547434329986572,
            "theta_abs_sum": 150.08265478341997, "theta_sum": 44.16582718404521,
            "loss_after": 4.3598761558532715, "omega_dot_ids": -35.99918222427368},
}
# fmt: on


@functools.cache
def _world():
    """The task, the model's loss and the jitted steps, built once per process."""
    task = make_task("quality", seed=0, n_train=24, n_val=8, n_test=2, corrupt_frac=0.5,
                     max_len=32)
    model = build(ModelConfig(
        family="llama", vocab_size=task.tokenizer.vocab_size, hidden_size=16, num_layers=1,
        num_heads=2, intermediate_size=32, max_position_embeddings=32,
        eos_token_id=task.tokenizer.eos_id, pad_token_id=task.tokenizer.pad_id,
        bos_token_id=task.tokenizer.bos_id))
    return task, model, lm_example_loss(model.forward)


@functools.cache
def _jitted(kind: str):
    """sft, mix, val and oracle share one step function (they differ only in their data)."""
    _, _, example_loss = _world()
    steps = make_steps(example_loss, _config(kind))
    return (jax.jit(steps.train), jax.jit(steps.hyper) if steps.hyper else None,
            jax.jit(example_loss))


def _config(method: str) -> MethodConfig:
    return MethodConfig(method=method, lr_theta=1e-2, lr_omega=0.3,
                        hypergrad=Implicit("cg", maxiter=3, tol=0.0, ridge=10.0),
                        hessian_rows=6, hyper_chunk=5)


def one_step_metrics(method: str) -> dict[str, float]:
    """Metrics of one step (bds: one step, then one hypergradient step) plus checksums."""
    task, model, _ = _world()
    data_set, _ = training_set(task, method)
    kind = "sft" if method in UNIFORM_METHODS else method
    train_step, hyper_step, example_loss = _jitted(kind)
    batch = next(Batcher(data_set, 8, seed=0, buckets=(32,)))
    val = next(Batcher(task.validation, 8, seed=1, buckets=(32,)))
    every = next(Batcher(data_set, len(data_set), seed=2, buckets=(32,)))
    # omega sized to D_t for every method, so the uniform methods share one compiled step.
    state = init_state(model.init(jax.random.key(0), dtype=jnp.float64), len(task.train),
                       _config(method))
    if method == "bmo":
        state, metrics = train_step(state, batch, val)
    else:
        state, metrics = train_step(state, batch)
    if hyper_step is not None:
        state, hyper = hyper_step(state, every, val)
        metrics = {**metrics, **hyper}
    out = {k: float(v) for k, v in metrics.items()}
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(state.theta)]
    out["theta_abs_sum"] = float(sum(np.abs(x).sum() for x in leaves))
    out["theta_sum"] = float(sum(x.sum() for x in leaves))
    out["loss_after"] = float(np.mean(example_loss(state.theta, batch)))
    if method in ("bmo", "bds"):
        out["omega_dot_ids"] = float(np.vdot(state.omega, np.arange(state.omega.shape[0])))
    return out


@pytest.mark.parametrize("method", list(GOLDEN))
def test_one_step_golden(x64, method):
    got = one_step_metrics(method)
    want = GOLDEN[method]
    assert sorted(got) == sorted(want), f"{method}: metrics {sorted(got)} != {sorted(want)}"
    for key, value in want.items():
        np.testing.assert_allclose(
            got[key], value, rtol=1e-6, atol=1e-9,
            err_msg=f"{method}.{key} = {got[key]!r}, pinned {value!r}. {WHEN_TO_CHANGE}")


if __name__ == "__main__":
    with jax.enable_x64(True):
        for m in GOLDEN:
            print(f"    {m!r}: {one_step_metrics(m)!r},")

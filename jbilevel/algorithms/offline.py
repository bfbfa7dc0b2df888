"""Pure step functions for every offline method, on one code path.

- ``sft`` / ``mix`` / ``val`` / ``oracle``: uniform weighted-SFT steps; they differ only in
  which examples the data layer feeds (all, train + validation, validation, known-good).
- ``bmo``: the first-order penalty method of the paper's code. Per step, with stop-gradients
  ``sg``: ``theta -= grad[lam f(theta) + (1 - lam) mean sg(s_b) l_b(theta)]`` and
  ``omega -= grad_omega mean s_b(omega) sg(l_b(theta_before))``.
- ``bds``: alternating approximate implicit differentiation: inner steps on the weighted loss
  ``g(theta, omega)`` and, every ``hyper_every`` steps, an omega step along the implicit
  hypergradient of the validation loss (``hypergrad``: ``Implicit`` CG with ridge damping or
  ``Neumann``), with the Hessian on ``hessian_rows`` rows of the hyper batch and the
  per-example term over all of its rows, ``hyper_chunk`` at a time: a composition of
  ``jbilevel.adjoint``'s building blocks. The step is guarded: when the solve's relative
  residual exceeds 1, it meets negative curvature or the result is not finite, omega is left
  as it was and the step is logged as not taken (``hyper_taken`` 0).

Every step is ``step(state, batch[, val_batch]) -> (state, metrics)`` and pure, so the
trainer jits it once with shardings and donation.

theta is either the full parameters or LoRA adapters. With adapters the base parameters ride
in ``state.frozen``: each step binds them to the loss per call, so they enter the jitted step
as a (sharded, donated) argument, never as a baked-in constant, and every derivative (the
gradient, Adam's moments, bds's Hessian-vector products and CG vectors) lives on the adapters
only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jbilevel import losses, weights
from jbilevel import sharding as sh
from jbilevel.adjoint import (
    Implicit,
    Neumann,
    RowGroups,
    adjoint,
    cast_like,
    example_u,
    grouped_value_and_grad,
    outer_value_and_grad,
    weight_vjp,
)
from jbilevel.data.batching import even_blocks
from jbilevel.objectives import ExampleLoss, inner_objective, outer_objective

METHODS = ("sft", "mix", "val", "oracle", "bmo", "bds")
UNIFORM_METHODS = ("sft", "mix", "val", "oracle")


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Optimisation settings of a method. Defaults are the tiny-CPU-scale ones (docs/design.md)."""

    method: Literal["sft", "mix", "val", "oracle", "bmo", "bds"] = "bds"  # training method
    weighting: Literal["softmax", "sigmoid"] = "softmax"  # omega -> weights map
    lr_theta: float = 1e-3  # Adam step size for the model (paper code: 1e-5 full FT)
    lr_omega: float = 0.3  # Adam step size for the data logits (bds 0.3, bmo 1e-2 here)
    b1: float = 0.9  # Adam beta1 for both optimizers (paper code)
    b2: float = 0.95  # Adam beta2 for both optimizers (paper code)
    clip: float = 1.0  # global-norm gradient clip for theta (0 disables)
    weight_decay: float = 0.0  # decoupled (AdamW) decay of theta's matrices (0: plain Adam)
    warmup: int = 0  # theta's step size rises linearly from 0 to lr_theta over this many steps
    # theta's step size then follows a cosine from lr_theta down to 0 at this step (0: it stays
    # at lr_theta). Set it to loop.steps for the usual fine-tuning schedule.
    decay_steps: int = 0
    omega_optim: Literal["adam", "sgd"] = "adam"  # optimizer of the data logits
    # largest change of any one data logit per omega step (0: no limit). With sgd and a large
    # lr_omega, logits move in proportion to their hypergradient up to this cap, so the few
    # examples with the largest hypergradients cannot take all the weight in one step.
    omega_step_max: float = 0.0
    # Adam's epsilon for the data logits: a logit whose hypergradient is well below it moves
    # by less than a full step (optax's default 1e-8 gives every logit about the same step,
    # the noisy ones too)
    omega_eps: float = 1e-8
    # decoupled decay of the data logits toward 0 (every weight 1) in each omega step, as
    # AdamW's weight_decay (the step subtracts lr_omega * omega_weight_decay * omega): a logit
    # whose hypergradient keeps its sign settles near -+1/omega_weight_decay, one whose sign
    # keeps flipping stays near 0 instead of drifting with the noise (0: no decay)
    omega_weight_decay: float = 0.0
    # lr_omega follows a cosine down to 0 over this many weight steps (bds: hypergradient
    # steps taken; bmo: train steps), so the first steps move the logits in full and the late
    # ones, where the weights drift with the hypergradient's noise, hardly (0: constant)
    omega_decay_steps: int = 0
    # scale each weight step's gradient vector (bds: the hypergradient; bmo: the batch rows'
    # gradient) to unit norm before the optimizer. bds's hypergradient swung tenfold in size
    # between steps on the safety task (with the validation batch and theta); Adam then gives a
    # row whose hypergradient keeps its sign only part of a step (its first moment is small
    # against its second). Normalised, every step counts alike and such a row takes nearly
    # full steps (with sgd, lr_omega is the step vector's norm).
    omega_normalize: bool = False
    lam: float = 0.5  # bmo: weight of the validation loss in the theta update
    lam_decay: float = 0.0  # bmo: lam decreases by this much per epoch (paper code: 0.1)
    lam_min: float = 0.0  # bmo: floor of the lam schedule
    hyper_every: int = 100  # bds: inner steps between two hypergradient steps
    hyper_start: int = 0  # bds: no hypergradient step before this step (theta warm-up)
    # bds: skip a hypergradient step while the validation batch's loss is above this (0: never
    # skip). Until theta fits the task the hypergradient is noise; a loss level marks that
    # point per run, where hyper_start can only guess a step.
    hyper_max_val_loss: float = 0.0
    # bds: how the hypergradient solves H v = grad f: Implicit (Krylov; tol 0 runs maxiter
    # Hessian-vector products) or Neumann. Ridge 10 on the tiny built-in tasks (ridge 1 flipped
    # the hypergradient's sign there).
    hypergrad: Implicit | Neumann = Implicit(solver="cg", maxiter=5, tol=0.0, ridge=10.0)
    mu: float = 0.0  # bds: proximal/L2 strength inside the inner objective
    hessian_rows: int = 64  # bds: hyper-batch rows the Hessian is estimated on (0: all rows)
    # bds: rows per forward-mode pass of the hypergradient (Hessian-vector products and the
    # per-example JVPs): memory follows it, not the number of rows. A Hessian-vector product
    # over r rows needs about the memory of a train step over 2r rows, so half the batch size
    # keeps the hypergradient within a train step's memory. 0: all rows in one pass.
    hyper_chunk: int = 32
    # rows per reverse pass of the train step (gradient accumulation): the batch's gradient
    # is summed over passes of this many rows (float32, in the parameters' sharding) before
    # the one optimizer update, so activation memory follows train_chunk, not batch_size; bmo's
    # validation batch is cut the same way. Global rows, like batch_size: it must divide the
    # batches it cuts and be a multiple of the mesh's data-parallel size. 0: one pass.
    train_chunk: int = 0

    def __post_init__(self):
        for name in ("lr_theta", "lr_omega", "hyper_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if not isinstance(self.hypergrad, Implicit | Neumann):
            raise ValueError(f"hypergrad must be Implicit(...) or Neumann(...), got "
                             f"{self.hypergrad!r}")
        for name in ("clip", "weight_decay", "warmup", "decay_steps", "mu", "lam_decay",
                     "hyper_start", "hessian_rows", "hyper_chunk", "train_chunk",
                     "hyper_max_val_loss", "omega_step_max", "omega_eps",
                     "omega_weight_decay", "omega_decay_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.decay_steps and self.decay_steps <= self.warmup:
            raise ValueError(f"decay_steps={self.decay_steps} must be > warmup={self.warmup} "
                             "(or 0: no decay)")
        if not 0.0 <= self.lam_min <= self.lam <= 1.0:
            raise ValueError(f"need 0 <= lam_min <= lam <= 1, got lam={self.lam}, "
                             f"lam_min={self.lam_min}")


@flax.struct.dataclass
class TrainState:
    """Everything a method updates; a pytree (checkpointed and sharded as one)."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    theta: Any  # model parameters (or LoRA adapters)
    opt_theta: Any  # optax state for theta
    omega: jax.Array  # (N,) data-weight logits, one per training example
    opt_omega: Any  # optax state for omega
    lam: jax.Array  # float32 scalar: bmo's current validation weight
    frozen: Any = None  # untrained base params of a LoRA run (None: theta is the full model)
    online: Any = None  # online generation's buffer of generated pairs (None when offline)


def theta_optimizer(cfg: MethodConfig) -> optax.GradientTransformation:
    """Adam (AdamW on matrices when weight_decay > 0), after a global-norm clip if set; the step
    size warms up linearly over ``cfg.warmup`` steps, then stays at ``lr_theta``, or with
    ``cfg.decay_steps`` follows a cosine down to 0 at that step."""
    if cfg.decay_steps:
        lr = optax.warmup_cosine_decay_schedule(0.0, cfg.lr_theta, cfg.warmup, cfg.decay_steps)
    elif cfg.warmup:
        lr = optax.linear_schedule(0.0, cfg.lr_theta, cfg.warmup)
    else:
        lr = cfg.lr_theta
    if cfg.weight_decay:
        adam = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                           mask=lambda theta: jax.tree.map(lambda x: x.ndim >= 2, theta))
    else:
        adam = optax.adam(lr, b1=cfg.b1, b2=cfg.b2)
    return optax.chain(optax.clip_by_global_norm(cfg.clip), adam) if cfg.clip else adam


def omega_optimizer(cfg: MethodConfig) -> optax.GradientTransformation:
    """Adam, or plain SGD: Adam rescales the tiny softmax-coupling gradient of every logit to a
    full step, SGD moves each logit in proportion to its own gradient (both with
    ``omega_weight_decay`` pulling the logits toward 0, decoupled as in AdamW, and the step
    size on a cosine with ``omega_decay_steps``), after scaling the gradient to unit norm if
    ``omega_normalize``; then, if ``omega_step_max`` is set, every logit's step is clipped to
    that size."""
    lr = (optax.cosine_decay_schedule(cfg.lr_omega, cfg.omega_decay_steps)
          if cfg.omega_decay_steps else cfg.lr_omega)
    if cfg.omega_optim == "sgd":
        opt = optax.sgd(lr)
        if cfg.omega_weight_decay:
            opt = optax.chain(optax.add_decayed_weights(cfg.omega_weight_decay), opt)
    elif cfg.omega_weight_decay:
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.omega_eps,
                          weight_decay=cfg.omega_weight_decay)
    else:  # without the two: the optimizer state of checkpoints made before they existed
        opt = optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.omega_eps)
    if cfg.omega_normalize:  # eps far below any float32 norm a hypergradient has; 0 stays 0
        opt = optax.chain(optax.normalize_by_update_norm(eps=1e-30), opt)
    return optax.chain(opt, optax.clip(cfg.omega_step_max)) if cfg.omega_step_max else opt


def init_state(theta: Any, n_examples: int, cfg: MethodConfig, frozen: Any = None) -> TrainState:
    """Fresh state: every data weight 1, both optimizers at zero, lam at its start value.

    ``frozen``: the base parameters when theta is LoRA adapters (see ``make_steps(frozen=)``).
    """
    omega_N = weights.init_logits(n_examples, cfg.weighting)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        theta=theta,
        opt_theta=theta_optimizer(cfg).init(theta),
        omega=omega_N,
        opt_omega=omega_optimizer(cfg).init(omega_N),
        lam=jnp.asarray(cfg.lam, jnp.float32),
        frozen=frozen,
    )


def lambda_at(cfg: MethodConfig, epoch: int) -> float:
    """bmo's lam for a given epoch: ``max(lam_min, lam - lam_decay * epoch)``."""
    return max(cfg.lam_min, cfg.lam - cfg.lam_decay * epoch)


@dataclasses.dataclass(frozen=True)
class Steps:
    """The pure step functions of one method (unused ones are None)."""

    train: Callable  # (state, batch[, val_batch]) -> (state, metrics): one theta step
    hyper: Callable | None = None  # bds: (state, hyper_batch, val_batch) -> (state, metrics)
    evaluate: Callable | None = None  # (theta, batch) -> loss_B per example
    # online generation: the train step while the buffer is still empty (before the first
    # refresh), with train's signature: the offline step, which skips the generated rows
    train_offline: Callable | None = None
    # how many static arguments train takes after its batches, one compiled program for each
    # value (online: ``gen_span``, the length bucket a step draws its generated rows from)
    train_static: int = 0
    # the same for hyper (online bds: ``gen_blocks``, the rows it takes from each bucket)
    hyper_static: int = 0


def _mean(loss_B, batch, w_B=None):
    """Mean over the batch's valid rows, optionally weighted."""
    ones_B = jnp.ones_like(loss_B)
    return losses.weighted_mean(loss_B, ones_B if w_B is None else w_B,
                                batch.get("valid", ones_B))


def hessian_sample(hyper_batch: dict, cfg: MethodConfig) -> dict:
    """The ``cfg.hessian_rows`` rows of the hyper batch the bds Hessian is estimated on.

    Evenly strided, so rows split over a data axis stay balanced across devices; the trainer
    reshuffles the hyper batch each time, so the sample changes every hypergradient.
    """
    n = hyper_batch["ids"].shape[0]
    if not cfg.hessian_rows or cfg.hessian_rows >= n:
        return hyper_batch
    stride = n // cfg.hessian_rows
    return jax.tree.map(lambda x: x[: stride * cfg.hessian_rows : stride], hyper_batch)


def _apply(tx, grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


# (example_loss, hyper_batch) -> (hessian_batch, [(loss, rows, scale), ...]): the rows the
# bds Hessian is estimated on, and each group of rows that gets a per-example term, with the
# per-example loss of that group and a scale on its u (see make_steps).
HyperRows = Callable[[ExampleLoss, dict], tuple[dict, list[tuple[ExampleLoss, dict, Any]]]]


def offline_hyper_rows(cfg: MethodConfig, blocks=None, scales=None) -> HyperRows:
    """bds's default: the Hessian on ``hessian_sample`` rows, the per-example term on every
    row of the hyper batch.

    ``blocks``: ``((start, end, length), ...)`` (``jbilevel.data.batching.length_blocks``
    or ``length_strata``) for a hyper batch whose rows lie by length so (every row sorted by
    length, or a sample of a fixed number from each length bucket): each block's rows get
    their per-example term cut to ``length`` tokens, a group of its own, instead of every
    row at the longest one's length (the same u: the cut tokens are padding), and so do the
    Hessian sample's rows in its products (:func:`sample_blocks`). ``scales``: one per block
    on its per-example term (``jbilevel.data.batching.stratum_scales``: a sample's blocks
    out of proportion to their buckets' sizes); the Hessian's sample weighs its rows alike.
    """
    def rows(example_loss, batch):
        sample = hessian_sample(batch, cfg)
        cut = sample_blocks(batch["ids"].shape[0], cfg, blocks, sh.batch_ways())
        hessian = sample if not cut else RowGroups(tuple(
            (example_loss, rows, None, False) for rows in length_blocked(sample, cut)))
        return hessian, [(example_loss, block, scale) for block, scale in zip(
            length_blocked(batch, blocks), block_scales(blocks, scales), strict=True)]

    return rows


def block_scales(blocks, scales) -> tuple[float, ...]:
    """``scales``, or 1 for each block (one for the whole batch without blocks)."""
    return tuple(scales) if scales else (1.0,) * len(blocks or (None,))


def sample_blocks(n: int, cfg: MethodConfig, blocks, ways: int = 1):
    """The ``blocks`` of a hyper batch of ``n`` rows as they fall on its :func:`hessian_sample`
    (a strided sample keeps the rows' order, so each block's rows stay together): the
    Hessian's products then take each block's rows at its length too (a ``RowGroups`` of one
    group per block: the same sum over rows), each block's rows a multiple of ``ways`` (the
    data-parallel devices; ``jbilevel.data.batching.even_blocks``)."""
    if not blocks or not cfg.hessian_rows or cfg.hessian_rows >= n:
        return blocks
    cut = ((*sampled_range(start, end, n, cfg.hessian_rows), length)
           for start, end, length in blocks)
    return even_blocks(tuple((a, b, length) for a, b, length in cut if b > a), ways)


def sampled_range(start: int, end: int, n: int, hessian_rows: int) -> tuple[int, int]:
    """Which rows of :func:`hessian_sample` (``hessian_rows`` of ``n``, strided) come from rows
    ``start:end`` of the batch: sample rows ``first:stop``, batch rows ``first * stride``,
    ``(first + 1) * stride``, ... (``stop <= first``: none)."""
    stride = n // hessian_rows
    return -(-start // stride), min(-(-end // stride), hessian_rows)


def length_blocked(batch: dict, blocks) -> list[dict]:
    """A batch sorted by length as its ``blocks`` (``(start, end, length)``; None: the whole
    batch): rows ``start:end``, their token axes cut to ``length``."""
    if not blocks:
        return [batch]
    return [_block(batch, *b) for b in blocks]


def _block(batch: dict, start: int, end: int, length: int) -> dict:
    """Rows ``start:end`` of a batch, their token axes cut to ``length``."""
    return {k: x[start:end, :length] if x.ndim > 1 else x[start:end] for k, x in batch.items()}


def make_steps(example_loss: ExampleLoss, cfg: MethodConfig, *, frozen: bool = False,
               hyper_rows: HyperRows | None = None) -> Steps:
    """Builds the pure step functions of ``cfg.method``.

    Args:
      example_loss: pure ``(theta, batch) -> loss_B`` (e.g. ``objectives.lm_example_loss``),
        or with ``frozen=True`` ``(theta, frozen, batch) -> loss_B`` (e.g.
        ``objectives.lm_lora_example_loss``).
      cfg: method settings.
      frozen: theta is adapters over ``state.frozen``, which every step binds to the loss
        per call and never differentiates or updates. Every per-row loss the steps are
        given then takes ``(theta, frozen, rows)``: ``example_loss``, the losses of a
        ``RowGroups`` batch and those ``hyper_rows`` returns.
      hyper_rows: bds: which rows of a hyper batch estimate the Hessian and which get a
        per-example term, with which loss (default :func:`offline_hyper_rows`; online bds
        passes offline and generated rows with their own losses). The hypergradient is
        ``jbilevel.adjoint``'s composition: ``v = adjoint(...)`` on the Hessian rows,
        ``u = example_u(loss, rows, v) * scale`` per group (``cfg.hyper_chunk`` rows per
        JVP), ``d omega = weight_vjp(...)`` over all groups' rows.
    Returns:
      ``Steps``; ``train`` takes ``(state, batch)`` for uniform methods and bds, and
      ``(state, batch, val_batch)`` for bmo. ``evaluate`` is ``example_loss`` as given.
      bds's and bmo's ``train`` also take a ``jbilevel.adjoint.RowGroups`` batch, rows in
      groups each with its own per-row loss (online bds's offline and generated rows): the
      same objective, its gradient one reverse pass per group
      (``adjoint.grouped_value_and_grad``). With ``cfg.train_chunk`` every train step sums
      its gradient over passes of that many rows (gradient accumulation; the uniform
      methods' through ``adjoint.outer_value_and_grad``): the same update to float32
      rounding, in the activation memory of ``train_chunk`` rows.
    """
    tx_theta, tx_omega = theta_optimizer(cfg), omega_optimizer(cfg)
    chunk = cfg.train_chunk or None

    def binder(state: TrainState) -> Callable[[Any], ExampleLoss]:
        """``loss -> (theta, batch) -> loss_B``: this call's base params bound (frozen)."""
        if frozen:
            if state.frozen is None:
                raise ValueError("make_steps(frozen=True) needs state.frozen (the base params); "
                                 "pass frozen= to init_state")
            base = state.frozen
            return lambda loss: lambda theta, batch: loss(theta, base, batch)
        if state.frozen is not None:
            raise ValueError("state.frozen is set but make_steps was built without frozen=True, "
                             "so example_loss would ignore the base params")
        return lambda loss: loss

    def bind(state: TrainState):
        """This call's ``(theta, batch) -> loss_B`` and the objectives built on it."""
        loss = binder(state)(example_loss)
        return (loss, inner_objective(loss, weighting=cfg.weighting, mu=cfg.mu),
                outer_objective(loss))

    def bound_groups(state: TrainState, groups: RowGroups) -> RowGroups:
        """``groups`` with this call's base params bound to each group's loss (frozen)."""
        bound = binder(state)
        return RowGroups(tuple((bound(loss), rows, scale, skippable)
                               for loss, rows, scale, skippable in groups.groups))

    def uniform_step(state: TrainState, batch: dict):
        _, _, outer = bind(state)
        loss, grads = outer_value_and_grad(outer, state.theta, batch, chunk=chunk)
        grads = cast_like(grads, state.theta)  # summed over chunks in float32
        theta, opt_theta = _apply(tx_theta, grads, state.opt_theta, state.theta)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return state.replace(step=state.step + 1, theta=theta, opt_theta=opt_theta), metrics

    def groups_of(state, batch, example_loss, *, val_batch=None) -> RowGroups | None:
        """The batch as the RowGroups the step takes a pass per group (per chunk) of, or None
        for one pass over a plain batch (and bmo's validation batch)."""
        if isinstance(batch, RowGroups):
            return bound_groups(state, batch)
        rows = max(jax.tree.leaves(b)[0].shape[0] for b in (batch, val_batch or batch))
        if chunk is None or rows <= chunk:
            return None
        valid = batch.get("valid", jnp.ones(batch["ids"].shape, jnp.float32))
        return RowGroups(((example_loss, {**batch, "valid": valid}, None, False),))

    def weighted_step(state: TrainState, batch: dict | RowGroups):
        example_loss, inner, _ = bind(state)
        omega_N = jax.lax.stop_gradient(state.omega)
        groups = groups_of(state, batch, example_loss)
        if groups is not None:  # a reverse pass per group (chunk) of rows, gradients summed
            (g, (loss_B, _)), grads = grouped_value_and_grad(
                cfg.weighting, omega_N, groups, state.theta,
                extra=lambda theta: (inner.regulariser(theta), None), chunk=chunk)
            batch = groups.index()
        else:
            def loss_fn(theta):
                loss_B = example_loss(theta, batch)
                g = inner.data_term(loss_B, omega_N, batch) + inner.regulariser(theta)
                return g, loss_B

            (g, loss_B), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.theta)
        theta, opt_theta = _apply(tx_theta, grads, state.opt_theta, state.theta)
        metrics = {"loss": _mean(loss_B, batch), "weighted_loss": g,
                   "grad_norm": optax.tree.norm(grads)}
        return state.replace(step=state.step + 1, theta=theta, opt_theta=opt_theta), metrics

    def bmo_step(state: TrainState, batch: dict | RowGroups, val_batch: dict):
        example_loss, inner, outer = bind(state)
        groups = groups_of(state, batch, example_loss, val_batch=val_batch)
        if groups is not None:  # a reverse pass per group (chunk) of rows; the validation
            # term rides with the first group, or in chunks its own passes; the theta step's
            # weights without gradient, as below
            def val_term(theta):
                val = outer(theta, val_batch)
                return state.lam * val, val

            start = None
            if chunk is not None:
                val, val_grads = outer_value_and_grad(outer, state.theta, val_batch,
                                                      chunk=chunk)
                start = ((state.lam * val, val),
                         jax.tree.map(lambda x: state.lam * x, val_grads))
            (total, (loss_B, val)), grads = grouped_value_and_grad(
                cfg.weighting, jax.lax.stop_gradient(state.omega), groups, state.theta,
                coeff=1.0 - state.lam, extra=val_term if start is None else None, chunk=chunk,
                start=start)
            batch = groups.index()
        else:
            s_B = jax.lax.stop_gradient(
                weights.batch_weights(state.omega, batch["ids"], cfg.weighting))

            def loss_fn(theta):
                loss_B = example_loss(theta, batch)
                train = _mean(loss_B, batch, s_B.astype(loss_B.dtype))
                val = outer(theta, val_batch)
                return state.lam * val + (1.0 - state.lam) * train, (loss_B, val)

            (total, (loss_B, val)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.theta)
        loss_B = jax.lax.stop_gradient(loss_B)  # losses at theta before its update
        omega_loss, d_omega = jax.value_and_grad(inner.data_term, argnums=1)(
            loss_B, state.omega, batch)
        theta, opt_theta = _apply(tx_theta, grads, state.opt_theta, state.theta)
        omega, opt_omega = _apply(tx_omega, d_omega, state.opt_omega, state.omega)
        metrics = {"loss": _mean(loss_B, batch), "weighted_loss": omega_loss, "val_loss": val,
                   "total_loss": total, "grad_norm": optax.tree.norm(grads)}
        new = state.replace(step=state.step + 1, theta=theta, opt_theta=opt_theta,
                            omega=omega, opt_omega=opt_omega)
        return new, metrics

    def hyper_step(state: TrainState, hyper_batch: dict, val_batch: dict):
        if not cfg.hyper_max_val_loss:
            return hyper_update(state, hyper_batch, val_batch)
        _, _, outer = bind(state)
        val = outer(state.theta, val_batch)

        def update(state, hyper_batch, val_batch, val):
            return hyper_update(state, hyper_batch, val_batch)

        def skip(state, hyper_batch, val_batch, val):
            zero = jnp.zeros((), jnp.float32)
            return state, {"val_loss": val, "hypergrad_norm": zero, "cg_residual": zero,
                           "cg_negative_curvature": zero, "cg_truncated": zero,
                           "hyper_taken": zero}

        return jax.lax.cond(val <= cfg.hyper_max_val_loss, update, skip,
                            state, hyper_batch, val_batch, val)

    split_rows = hyper_rows or offline_hyper_rows(cfg)

    def hyper_update(state: TrainState, hyper_batch: dict, val_batch: dict):
        # the validation loss of the metrics is the adjoint's (its gradient's forward pass):
        # a separate forward over the validation batch cost ~1-2% of the step and ~10% of its
        # compile time at the quality task's shapes
        _, inner, outer = bind(state)
        bound = binder(state)
        hessian_batch, groups = split_rows(example_loss, hyper_batch)
        if isinstance(hessian_batch, RowGroups):
            hessian_batch = bound_groups(state, hessian_batch)
        groups = [(bound(loss), rows, scale) for loss, rows, scale in groups]
        v, info = adjoint(inner, outer, state.theta, state.omega, hessian_batch, val_batch,
                          cfg.hypergrad, chunk=cfg.hyper_chunk or None)
        us, ids, valids = [], [], []
        for loss, rows, scale in groups:
            u_R, ids_R, valid_R = example_u(loss, state.theta, rows, v,
                                            chunk=cfg.hyper_chunk or None)
            us.append(u_R * scale)
            ids.append(ids_R)
            valids.append(valid_R.astype(jnp.float32))
        d_omega = weight_vjp(cfg.weighting, state.omega, jnp.concatenate(ids),
                             jnp.concatenate(us), jnp.concatenate(valids))
        hypergrad_norm = jnp.linalg.norm(d_omega).astype(jnp.float32)
        # A solve that did not reduce its residual, met negative curvature without a truncated
        # iterate to use, or overflowed gives no usable direction: omega stays, and the
        # metrics say so.
        taken = info.usable() & jnp.isfinite(hypergrad_norm)
        omega, opt_omega = _apply(tx_omega, jnp.where(taken, d_omega, 0.0), state.opt_omega,
                                  state.omega)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(taken, a, b), new, old)
        metrics = {"val_loss": info.outer_loss, "hypergrad_norm": hypergrad_norm,
                   "cg_residual": jnp.asarray(info.residual, jnp.float32),
                   "cg_negative_curvature": info.negative_curvature.astype(jnp.float32),
                   "cg_truncated": jnp.asarray(info.truncated, jnp.float32),
                   "hyper_taken": taken.astype(jnp.float32)}
        return state.replace(omega=keep(omega, state.omega),
                             opt_omega=keep(opt_omega, state.opt_omega)), metrics

    if cfg.method in UNIFORM_METHODS:
        return Steps(train=uniform_step, evaluate=example_loss)
    if cfg.method == "bmo":
        return Steps(train=bmo_step, evaluate=example_loss)
    return Steps(train=weighted_step, hyper=hyper_step, evaluate=example_loss)

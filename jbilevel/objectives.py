"""Pure bilevel objectives: inner ``g(theta, omega, batch)`` and outer ``f(theta, batch)``.

An ``example_loss(theta, batch) -> loss_B`` is the user's model: one loss per row. The
inner objective weights it by ``s(omega)[batch["ids"]]``; the outer one averages it. The
inner objective is a frozen dataclass (not a closure) so that ``jbilevel.implicit`` can see
its parts and take the fast mixed-term path (one JVP of ``loss_B``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jbilevel import losses, weights

ExampleLoss = Callable[[Any, dict], jax.Array]


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _valid(batch: dict, loss_B: jax.Array) -> jax.Array:
    valid_B = batch.get("valid")
    if valid_B is None:
        return jnp.ones(loss_B.shape, loss_B.dtype)
    if valid_B.shape != loss_B.shape:
        raise ValueError(
            f"batch['valid'] has shape {valid_B.shape} but example_loss returned {loss_B.shape}"
        )
    return valid_B.astype(loss_B.dtype)


def _example_losses(example_loss: ExampleLoss, theta, batch: dict) -> jax.Array:
    loss_B = example_loss(theta, batch)
    if loss_B.ndim != 1:
        raise ValueError(
            f"example_loss must return one loss per example, shape (B,); got {loss_B.shape}"
        )
    return loss_B


def check_ids(omega_N: jax.Array, batch: dict) -> jax.Array:
    """Validate ``batch["ids"]`` against ``omega_N`` and return it.

    Shapes are always checked; id ranges only when the ids are concrete (not traced), since
    a traced value cannot raise. Rows with ``valid == 0`` may carry any id.

    Args:
      omega_N: 1-D logits, one per training example.
      batch: a batch dict holding ``ids`` (B,) and optionally ``valid`` (B,).

    Returns:
      ids_B.
    """
    if "ids" not in batch:
        raise ValueError(
            f"inner batch has no 'ids' (keys: {', '.join(sorted(batch))}); weighted objectives "
            "need stable example ids indexing omega"
        )
    if getattr(omega_N, "ndim", None) != 1:
        raise ValueError(
            f"omega must be a 1-D array of N logits for a weighted objective, got "
            f"{type(omega_N).__name__} with shape {getattr(omega_N, 'shape', None)}"
        )
    ids_B = batch["ids"]
    if ids_B.ndim != 1:
        raise ValueError(f"batch['ids'] must have shape (B,), got {ids_B.shape}")
    if _is_concrete(ids_B) and ids_B.size:
        # numpy, not jnp: inside a trace even jnp ops on concrete arrays return tracers.
        ids = np.asarray(ids_B)
        valid_B = batch.get("valid")
        if valid_B is not None and _is_concrete(valid_B):
            ids = ids[np.asarray(valid_B) > 0]
        n = omega_N.shape[0]
        bad = ids[(ids < 0) | (ids >= n)]
        if bad.size:
            raise ValueError(
                f"batch['ids'] holds ids outside [0, {n}) (omega has N={n} logits): "
                f"{bad[:5].tolist()}; size omega to the whole training set"
            )
    return ids_B


@dataclasses.dataclass(frozen=True, eq=False)
class InnerObjective:
    """Weighted inner objective.

    ``g(theta, omega, batch) = sum_b valid_b s_{ids_b} l_b / sum_b valid_b
    [+ mu/2 |theta - theta_ref|^2]``.

    Fields:
      example_loss: pure ``(theta, batch) -> loss_B``.
      weighting: "softmax" or "sigmoid" (see ``jbilevel.weights``).
      mu: proximal / L2 strength; makes the inner Hessian positive definite.
      theta_ref: centre of the proximal term (None: zero, i.e. plain L2).
    """

    example_loss: ExampleLoss
    weighting: str = "softmax"
    mu: float = 0.0
    theta_ref: Any = None

    def __post_init__(self):
        if self.weighting not in weights.KINDS:
            raise ValueError(
                f"inner_objective: weighting must be one of {weights.KINDS}, "
                f"got {self.weighting!r}"
            )
        if self.mu < 0:
            raise ValueError(f"inner_objective: mu must be >= 0, got {self.mu}")

    def data_term(self, loss_B: jax.Array, omega_N: jax.Array, batch: dict) -> jax.Array:
        """Weighted mean of given per-example losses (the omega-dependent part of g)."""
        ids_B = check_ids(omega_N, batch)
        if ids_B.shape != loss_B.shape:
            raise ValueError(
                f"batch['ids'] has shape {ids_B.shape} but example_loss returned {loss_B.shape}"
            )
        s_B = weights.batch_weights(omega_N, ids_B, self.weighting).astype(loss_B.dtype)
        return losses.weighted_mean(loss_B, s_B, _valid(batch, loss_B))

    def regulariser(self, theta) -> jax.Array:
        """``mu/2 |theta - theta_ref|^2`` (0 when mu == 0)."""
        if self.mu == 0:
            return jnp.zeros(())
        ref = self.theta_ref
        if ref is None:
            ref = jax.tree.map(jnp.zeros_like, theta)
        elif jax.tree.structure(ref) != jax.tree.structure(theta):
            raise ValueError(
                "inner_objective: theta_ref and theta have different pytree structures: "
                f"{jax.tree.structure(ref)} vs {jax.tree.structure(theta)}"
            )
        sq = jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), theta, ref)
        return 0.5 * self.mu * sum(jax.tree.leaves(sq))

    def __call__(self, theta, omega_N: jax.Array, batch: dict) -> jax.Array:
        loss_B = _example_losses(self.example_loss, theta, batch)
        return self.data_term(loss_B, omega_N, batch) + self.regulariser(theta)


def inner_objective(
    example_loss: ExampleLoss, *, weighting: str = "softmax", mu: float = 0.0, theta_ref=None
) -> InnerObjective:
    """Build the weighted inner objective g of docs/design.md (The math).

    Args:
      example_loss: pure ``(theta, batch) -> loss_B``.
      weighting: "softmax" (``N softmax``) or "sigmoid" (``2 sigmoid``).
      mu: strength of ``mu/2 |theta - theta_ref|^2``.
      theta_ref: pytree like theta (None: zeros).

    Returns:
      ``g(theta, omega_N, batch) -> scalar``; batch must hold ``ids`` (B,) and may hold
      ``valid`` (B,) plus whatever example_loss reads.
    """
    return InnerObjective(example_loss, weighting, mu, theta_ref)


@dataclasses.dataclass(frozen=True, eq=False)
class OuterObjective:
    """``f(theta, batch) = sum_b valid_b l_b / sum_b valid_b`` (validation loss)."""

    example_loss: ExampleLoss

    def __call__(self, theta, batch: dict) -> jax.Array:
        loss_B = _example_losses(self.example_loss, theta, batch)
        return losses.weighted_mean(loss_B, jnp.ones_like(loss_B), _valid(batch, loss_B))


def outer_objective(example_loss: ExampleLoss) -> OuterObjective:
    """Build the outer (validation) objective f.

    Args:
      example_loss: pure ``(theta, batch) -> loss_B``.

    Returns:
      ``f(theta, batch) -> scalar``, the valid-weighted mean of the per-example losses.
    """
    return OuterObjective(example_loss)


TokenNLL = Callable[..., jax.Array]


def token_nll_fn(model) -> TokenNLL:
    """``(params, input_ids, labels, *, attention_mask, lora=None) -> nll_BxL`` of a model.

    Args:
      model: a ``jbilevel.models.Model`` (its chunked :meth:`token_nll`, which never holds the
        [rows, tokens, vocab] logits), or a plain ``forward(params, ids, attention_mask=,
        [lora=]) -> logits_BxLxV`` callable (its logits are materialised whole: fine for small
        vocabularies and research code, not for LLMs).
    Returns:
      the token NLL function, float32 (B, L).
    """
    if hasattr(model, "token_nll"):
        return model.token_nll
    if not callable(model):
        raise TypeError(f"expected a jbilevel Model or a forward callable, got {model!r}")

    def nll(params, input_ids, labels, *, attention_mask=None, lora=None):
        kw = {} if lora is None else {"lora": lora}
        return losses.token_nll(model(params, input_ids, attention_mask=attention_mask, **kw),
                                labels)

    return nll


def lm_example_loss(model, *, reduction: str = "mean") -> ExampleLoss:
    """Per-example masked NLL for a causal LM.

    Args:
      model: a ``jbilevel.models.Model`` (chunked output projection; see
        :func:`token_nll_fn`) or ``forward(params, input_ids_BxL, attention_mask=mask_BxL) ->
        logits_BxLxV``.
      reduction: "mean" over response tokens (the paper's l_i) or "sum".

    Returns:
      ``example_loss(params, batch) -> loss_B`` reading ``input_ids``, ``attention_mask``,
      ``labels`` (already shifted) and ``loss_mask`` from the batch.
    """
    nll_fn = token_nll_fn(model)

    def example_loss(params, batch: dict) -> jax.Array:
        nll_BxL = nll_fn(params, batch["input_ids"], batch["labels"],
                         attention_mask=batch["attention_mask"])
        return losses.masked_mean(nll_BxL, batch["loss_mask"], reduction=reduction)

    return example_loss


def lm_lora_example_loss(model, *, reduction: str = "mean"
                         ) -> Callable[[Any, Any, dict], jax.Array]:
    """Per-example masked NLL of a causal LM through LoRA adapters over frozen base params.

    Args:
      model: a ``jbilevel.models.Model``, or ``forward(params, input_ids_BxL,
        attention_mask=, lora=) -> logits_BxLxV``.
      reduction: as in :func:`lm_example_loss`.

    Returns:
      ``example_loss(lora, base_params, batch) -> loss_B``, the signature of
      ``make_steps(..., frozen=True)``; differentiable in ``lora`` only by design.
    """
    nll_fn = token_nll_fn(model)

    def example_loss(lora, base_params, batch: dict) -> jax.Array:
        nll_BxL = nll_fn(base_params, batch["input_ids"], batch["labels"],
                         attention_mask=batch["attention_mask"], lora=lora)
        return losses.masked_mean(nll_BxL, batch["loss_mask"], reduction=reduction)

    return example_loss

"""The three building blocks every implicit hypergradient in jbilevel is composed of.

With ``g(theta, omega) = (1/n) sum_i s_i(omega) l_i(theta)`` the weighted inner loss and ``f`` the
validation loss, the implicit function theorem gives

    (H + ridge I) v = grad_theta f(theta)        H = hess_theta g        :func:`adjoint`
    u_i = <grad_theta l_i(theta), v>             one JVP per row chunk   :func:`example_u`
    dF/domega = -(1/n) J_s(omega)^T u            closed form             :func:`weight_vjp`

``jbilevel.hypergrad`` (one batch), ``jbilevel.chunked.hypergrad_chunked`` (the Hessian on a
sample, u over many rows) and online bds (offline and generated rows, each with its own loss)
are compositions of these; so is any research variant.

At LLM scale the theta-shaped vectors of the solve (right-hand side, CG iterate, residual,
direction, Hessian-vector product) are the memory that matters: each is a copy of the model.
They are held in float32 or wider (whatever theta's dtype: the solve's inner products lose
too much in bf16) and, inside a trainer step, pinned to theta's own sharding
(``sharding.constrain_like_params``), so every device holds its shard, never the whole vector.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from jbilevel import linsolve
from jbilevel import sharding as sh
from jbilevel import weights as weights_lib
from jbilevel.losses import at_least_f32
from jbilevel.models.transformer import differentiable_attention
from jbilevel.objectives import InnerObjective, OuterObjective

BACKENDS = ("jaxopt", "native")
# One switch to drop jaxopt: set to "native".
DEFAULT_BACKEND = "jaxopt"
NEGATIVE_CURVATURE = ("truncate", "continue")


@dataclasses.dataclass(frozen=True)
class Implicit:
    """Implicit function theorem: solve ``(H + ridge I) v = grad_theta f`` by a Krylov method.

    Fields:
      kind: "implicit" (names the method in YAML configs).
      solver: "cg" (default; H SPD), "gmres", "bicgstab" or "normal_cg".
      maxiter: most Hessian-vector products in the solve (k in the cost 1 + c k + 1).
      tol: target relative residual ``|H v - b| / |b|`` (0: always ``maxiter`` products).
      ridge: damping added to H; biases the hypergradient but bounds it when H is ill-posed.
      backend: "jaxopt" (mixed term via ``jaxopt.implicit_diff.root_vjp``) or "native".
      fast: for an ``InnerObjective``, compute the mixed term as one JVP of ``loss_B``
        followed by the closed-form weight Jacobian (no second-order pass over omega).
      on_negative_curvature: what CG does at a direction with ``p^T (H + ridge I) p <= 0``
        (theta is not at a minimum of g: the usual case in fine-tuning, where the inner
        problem is a few optimizer steps, not solved). "truncate" (default): stop there and
        use the iterate reached (a solve on H's positive part; truncated-Newton's rule); the
        weight step is skipped only when that iterate is still 0. "continue": run on (CG
        still converges on an indefinite but nonsingular system, as the exact hypergradient
        at a saddle needs); a trainer skips the weight step of any solve that met negative
        curvature. Other solvers ignore it.
    """

    kind: Literal["implicit"] = dataclasses.field(default="implicit", kw_only=True)
    solver: str = "cg"
    maxiter: int = 100
    tol: float = 1e-6
    ridge: float = 0.0
    backend: str = DEFAULT_BACKEND
    fast: bool = True
    on_negative_curvature: str = "truncate"

    def __post_init__(self):
        if self.kind != "implicit":
            raise ValueError(f"Implicit: kind must be 'implicit', got {self.kind!r}")
        if self.solver not in linsolve.SOLVERS:
            raise ValueError(
                f"Implicit: unknown solver {self.solver!r} "
                f"(choose from {', '.join(linsolve.SOLVERS)})"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"Implicit: backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.on_negative_curvature not in NEGATIVE_CURVATURE:
            raise ValueError(f"Implicit: on_negative_curvature must be one of "
                             f"{NEGATIVE_CURVATURE}, got {self.on_negative_curvature!r}")
        if self.maxiter < 1 or self.tol < 0 or self.ridge < 0:
            raise ValueError(
                f"Implicit: need maxiter >= 1, tol >= 0, ridge >= 0; got maxiter={self.maxiter}, "
                f"tol={self.tol}, ridge={self.ridge}"
            )


@dataclasses.dataclass(frozen=True)
class Neumann:
    """``v = alpha sum_{j=0..K} (I - alpha (H + ridge I))^j b``; converges if alpha < 2/lambda_max.

    Fields:
      kind: "neumann" (names the method in YAML configs).
      steps: K, the number of Hessian-vector products.
      alpha: step size of the series (like an inner learning rate).
      ridge: damping added to H.
      fast: as in ``Implicit``.
    """

    kind: Literal["neumann"] = dataclasses.field(default="neumann", kw_only=True)
    steps: int = 50
    alpha: float = 0.1
    ridge: float = 0.0
    fast: bool = True

    def __post_init__(self):
        if self.kind != "neumann":
            raise ValueError(f"Neumann: kind must be 'neumann', got {self.kind!r}")
        if self.steps < 1 or self.alpha <= 0 or self.ridge < 0:
            raise ValueError(f"Neumann: need steps >= 1, alpha > 0, ridge >= 0; got "
                             f"steps={self.steps}, alpha={self.alpha}, ridge={self.ridge}")


class HypergradInfo(NamedTuple):
    """Diagnostics of one hypergradient (arrays, so it passes through jit and vmap).

    Fields:
      residual: relative residual ``|H v - grad f| / |grad f|`` of the solve (NaN: Unrolled).
      iterations: Hessian-vector products used (-1 if the solver does not report it).
      outer_loss: ``f(theta, outer_batch)``.
      negative_curvature: CG met a direction with ``p^T H p <= 0`` (H + ridge I is not
        positive definite there: theta is not at a minimum of g, or the ridge is too small).
      truncated: CG stopped at that direction with a nonzero iterate, which v is
        (``Implicit(on_negative_curvature="truncate")``).
    """

    residual: jax.Array
    iterations: jax.Array
    outer_loss: jax.Array
    negative_curvature: jax.Array
    truncated: jax.Array | bool = False

    def usable(self) -> jax.Array:
        """Whether an omega step along this hypergradient is safe to take: the solve reduced
        the residual (``<= 1``), stayed finite, and met no negative curvature or was truncated
        before it."""
        return (jnp.isfinite(self.residual) & (self.residual <= 1.0)
                & (~self.negative_curvature | self.truncated) & jnp.isfinite(self.outer_loss))


def as_f32(tree):
    """Every leaf in at least float32 (the solve's working precision; float64 stays)."""
    return jax.tree.map(lambda x: x.astype(at_least_f32(x.dtype)), tree)


def cast_like(tree, ref):
    """``tree`` cast leaf by leaf to the dtypes of ``ref`` (a tangent must match its primal)."""
    return jax.tree.map(lambda x, r: x.astype(r.dtype), tree, ref)


def if_any_valid(valid, fn, *args, otherwise: Callable | None = None):
    """``fn(*args)`` if any entry of ``valid`` is > 0, else ``otherwise(*args)`` (default:
    zeros of fn's output's shapes).

    For passes over rows that may all be invalid (online bds's buffer of generated rows
    before its first refresh): the work runs only when one of them counts; the result is
    the same, since invalid rows weigh 0. Use it around a pass that is not differentiated
    in reverse mode: a forward, a Hessian-vector product taken whole, or inside a
    forward-mode JVP (whose branch of JVPs keeps everything inside). A branch inside a
    reverse-mode derivative passes its residuals out of the branch, which took 9% more
    memory in online bds's hypergradient at Pythia-1b on a v5e-64.

    To add the pass's result to a sum, pass the sum in and out of the branch (``fn(acc, ...)``
    returning ``acc + ...``, ``otherwise`` returning ``acc``) rather than adding the branch's
    result outside it: the sum is then written in place, where a sum outside the branch holds
    the branch's output, the sum and the new sum at once (each the size of the model for a
    gradient or a Hessian-vector product)."""
    def zeros(*a):
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *a))

    return jax.lax.cond(jnp.any(valid > 0), fn, otherwise or zeros, *args)


@dataclasses.dataclass(frozen=True)
class RowGroups:
    """A batch whose rows come in groups, each with its own per-row loss.

    g's data term is ``(1/n) sum_groups sum_rows valid_b s_{ids_b} scale loss_b``, n the
    valid rows of all groups: what one batch of all the rows gives with the groups' losses
    concatenated (``jbilevel.algorithms.online.combine``). :func:`hvp` sums one
    forward-over-reverse pass per group (per ``chunk`` rows of it) and
    :func:`grouped_value_and_grad` one reverse pass per group, so no pass spans rows of two
    losses and a step holds one group's activations at a time; a ``skippable`` group's passes
    run only when one of its rows is valid (:func:`if_any_valid` around the group's whole
    pass).

    Fields:
      groups: ``(example_loss, rows, scale, skippable)`` per group: ``(theta, rows) ->
        loss_B``; rows with ``ids``, ``valid`` and every leaf's rows on axis 0; a scalar
        multiplying the group's losses (None: 1).
    """

    groups: tuple

    def index(self) -> dict:
        """Every group's ``ids`` and ``valid`` (float32), concatenated in group order: what
        a per-row quantity of all the groups (their losses, one after the other) is read
        against."""
        return {"ids": jnp.concatenate([rows["ids"] for _, rows, _, _ in self.groups]),
                "valid": jnp.concatenate([rows["valid"].astype(jnp.float32)
                                          for _, rows, _, _ in self.groups])}


def _valid_total(row_sets) -> jax.Array:
    """The valid rows of all ``row_sets`` (at least 1: the mean's denominator)."""
    n = sum(jnp.sum(rows["valid"].astype(jnp.float32)) for rows in row_sets)
    return jnp.where(n > 0, n, 1.0)


def _group_share(weighting: str, omega, n, loss, scale, theta, rows):
    """A group's share of g's data term over all ``n`` valid rows, and its rows' (scaled)
    losses."""
    loss_B = loss(theta, rows)
    if scale is not None:
        loss_B = loss_B * scale
    s_B = weights_lib.batch_weights(omega, rows["ids"], weighting).astype(loss_B.dtype)
    valid_B = rows["valid"].astype(loss_B.dtype)
    return jnp.sum(jnp.where(valid_B > 0, s_B * loss_B, 0.0) * valid_B) / n, loss_B


def grouped_value_and_grad(weighting: str, omega, batch: RowGroups, theta, *,
                           coeff: float = 1.0, extra: Callable | None = None,
                           chunk: int | None = None, start=None):
    """``extra(theta) + coeff * g's data term`` on a :class:`RowGroups` batch, and its
    gradient in theta, one reverse-mode pass per group (with ``chunk``, per ``chunk`` rows
    of a group).

    A step over rows of several losses (online generation's offline and generated rows) then
    holds one group's activations at a time, where one pass over their concatenated losses
    holds both. Each pass adds its gradient to the sum of those before it; a ``skippable``
    group's pass runs only when one of its rows is valid (:func:`if_any_valid` around the
    group's whole value_and_grad, which is not differentiated further), the sum going through
    its branch. On a v5e-64 this took Llama-3-8B's online train step from 2.97 to 1.94 GiB
    of temporaries per chip (one pass over both groups; offline bds's step over one group:
    1.70).

    Args:
      weighting: omega's map to weights (``jbilevel.weights``).
      omega: the logits; pass ``jax.lax.stop_gradient`` of them for a theta step.
      batch: the groups.
      theta: where the value and gradient are taken.
      coeff: multiplies the data term.
      extra: ``theta -> (scalar, aux)``, added to the objective in the first pass over a group
        that is not skippable (a regulariser, bmo's validation term); with ``chunk`` or
        ``start``, in a pass of its own ahead of the groups.
      chunk: rows per reverse pass (gradient accumulation): each group is cut into
        interleaved chunks (:func:`interleaved_chunks`, padding rows invalid), one pass per
        chunk in a ``lax.scan``, the sum carried in float32 in theta's sharding and the
        gradient returned in theta's dtypes. The same value and gradient (to rounding) in the
        memory of a pass over ``chunk`` rows. None: a group in one pass.
      start: ``((value, aux), grads)`` of terms taken in passes of their own (bmo's
        validation term over its batch in chunks, :func:`outer_value_and_grad`): the sum
        starts from it, its aux returned as extra's. Takes the chunked path.
    Returns:
      ``((value, (loss_R, aux)), grads)``: ``loss_R`` every group's (scaled) per-row losses
      in :meth:`RowGroups.index`'s order; ``aux`` extra's (None without it); grads like theta.
    """
    if chunk is not None or start is not None:
        return _value_and_grad_in_chunks(weighting, omega, batch.groups, theta, coeff=coeff,
                                         extra=extra, chunk=chunk, start=start)
    groups = batch.groups
    lead = next((i for i, group in enumerate(groups) if not group[3]), None)
    if extra is not None and lead is None:
        raise ValueError("grouped_value_and_grad: extra needs a group that is not skippable "
                         "to ride with")
    n = _valid_total(rows for _, rows, _, _ in groups)
    acc, losses, aux = None, [], None  # acc: (value, grads) of the passes so far
    for i, (loss, rows, scale, skippable) in enumerate(groups):
        with_extra = extra is not None and i == lead

        def objective(th, rows, loss=loss, scale=scale, with_extra=with_extra):
            share, loss_B = _group_share(weighting, omega, n, loss, scale, th, rows)
            total, extra_aux = coeff * share, None
            if with_extra:
                term, extra_aux = extra(th)
                total = total + term
            return total, (loss_B, extra_aux)

        def accumulate(acc, th, rows, objective=objective):  # acc plus this group's pass
            (v, out), g = jax.value_and_grad(objective, has_aux=True)(th, rows)
            if acc is not None:
                v = acc[0] + v
                g = sh.constrain_like_params(jax.tree.map(jnp.add, acc[1], g))
            return (v, g), out

        def skip(acc, th, rows, accumulate=accumulate):  # the sum as it was, zero losses
            shapes = jax.eval_shape(accumulate, acc, th, rows)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            return (zeros[0] if acc is None else acc), zeros[1]

        if skippable:  # the sum passes through the branch (if_any_valid)
            acc, (loss_B, extra_aux) = if_any_valid(rows["valid"], accumulate, acc, theta, rows,
                                                    otherwise=skip)
        else:
            acc, (loss_B, extra_aux) = accumulate(acc, theta, rows)
        losses.append(loss_B)
        aux = extra_aux if with_extra else aux
    return (acc[0], (jnp.concatenate(losses), aux)), acc[1]


def _value_and_grad_in_chunks(weighting: str, omega, groups, theta, *, coeff, extra, chunk,
                              start):
    """:func:`grouped_value_and_grad` a chunk of rows per reverse pass, summed in float32."""
    if extra is not None and start is not None:
        raise ValueError("grouped_value_and_grad: give extra or start, not both")
    n = _valid_total(rows for _, rows, _, _ in groups)
    if start is None:
        dtype = at_least_f32(*(x.dtype for x in jax.tree.leaves(theta)))
        start = ((jnp.zeros((), dtype), None), jax.tree.map(jnp.zeros_like, theta))
        if extra is not None:  # a pass of its own: a scan's passes are all alike
            start = jax.value_and_grad(extra, has_aux=True)(theta)
    (value, aux), grads = start
    acc = (as_f32(value), sh.constrain_like_params(as_f32(grads)))
    losses = []
    for loss, rows, scale, skippable in groups:
        n_rows = rows["ids"].shape[0]
        chunks = interleaved_chunks(rows, min(chunk or n_rows, n_rows))

        def share(th, part, loss=loss, scale=scale):  # a chunk's share of the data term
            total, loss_B = _group_share(weighting, omega, n, loss, scale, th, part)
            return coeff * total, loss_B

        def group_pass(acc, chunks, share=share, n_rows=n_rows):
            acc, loss_KxC = _sum_of_passes(share, theta, chunks, acc)
            return acc, chunk_rows(loss_KxC, n_rows)

        def skip(acc, chunks, group_pass=group_pass):  # the sum as it was, zero losses
            shapes = jax.eval_shape(group_pass, acc, chunks)[1]
            return acc, jnp.zeros(shapes.shape, shapes.dtype)

        if skippable:  # the sum passes through the branch (if_any_valid)
            acc, loss_B = if_any_valid(chunks["valid"], group_pass, acc, chunks, otherwise=skip)
        else:
            acc, loss_B = group_pass(acc, chunks)
        losses.append(loss_B)
    return (acc[0], (jnp.concatenate(losses), aux)), cast_like(acc[1], theta)


def _row_aligned(batch: dict) -> bool:
    n = batch["ids"].shape[0]
    return all(jnp.ndim(x) and jnp.shape(x)[0] == n for x in jax.tree.leaves(batch))


def differentiable_grad(fn: Callable) -> Callable:
    """``jax.grad(fn)`` traced inside ``jbilevel.models.differentiable_attention``: the gradient
    to take when it is differentiated again (Hessian-vector products, the mixed term, unrolled
    steps), which a model's cuDNN attention cannot be."""
    grad = jax.grad(fn)

    def traced(*args):
        with differentiable_attention():
            return grad(*args)

    return traced


def hvp(inner_loss: Callable, theta, omega, batch, ridge: float = 0.0, *,
        chunk: int | None = None) -> Callable:
    """``v -> (H + ridge I) v``, H the Hessian of ``inner_loss(., omega, batch)`` at theta.

    Forward-over-reverse (one JVP of the gradient). ``v`` may be float32 for bf16 theta: it
    is cast to theta's dtypes for the product, and the product returned in float32, pinned to
    theta's sharding inside a trainer step.

    With ``chunk`` rows (an ``InnerObjective`` over a batch whose leaves all have the rows on
    axis 0), the product is summed over row chunks, one forward-over-reverse pass per chunk:
    the Hessian of a weighted mean is the weighted sum of the rows' Hessians, so the result is
    the same while memory is that of a pass over ``chunk`` rows. A :class:`RowGroups` batch
    is summed the same way, group by group, each with its own loss.
    """
    if isinstance(batch, RowGroups):
        if not isinstance(inner_loss, InnerObjective):
            raise ValueError("hvp: a RowGroups batch needs an InnerObjective (its weighting "
                             "and mu; each group brings its own per-row loss)")
        return _chunked_hvp(inner_loss, theta, omega, batch.groups, ridge, chunk)
    rows = batch["ids"].shape[0] if isinstance(batch, dict) and "ids" in batch else 0
    if (chunk and rows > chunk and isinstance(inner_loss, InnerObjective)
            and _row_aligned(batch)):
        return _chunked_hvp(inner_loss, theta, omega,
                            ((inner_loss.example_loss, batch, None, False),), ridge, chunk)
    grad_g = lambda th: differentiable_grad(inner_loss)(th, omega, batch)

    def matvec(v):
        hv = as_f32(jax.jvp(grad_g, (theta,), (cast_like(v, theta),))[1])
        hv = hv if ridge == 0 else linsolve.tree_axpy(ridge, v, hv)
        return sh.constrain_like_params(hv)

    return matvec


def _chunked_hvp(inner: InnerObjective, theta, omega, groups, ridge, chunk):
    """``(H + ridge I) v`` as a sum over ``groups`` (see :class:`RowGroups`), each cut into
    chunks of ``chunk`` rows (all of its rows when None), one forward-over-reverse pass per
    chunk."""
    parts = [(loss, interleaved_chunks(rows, min(chunk or rows["ids"].shape[0],
                                                 rows["ids"].shape[0])), scale, skippable)
             for loss, rows, scale, skippable in groups]
    n = _valid_total(chunks for _, chunks, _, _ in parts)

    def data_sum(th, rows, *, loss, scale):  # a chunk's share of g's data term (all n rows)
        return _group_share(inner.weighting, omega, n, loss, scale, th, rows)[0]

    def matvec(v):
        v_theta = cast_like(v, theta)
        zero = sh.constrain_like_params(jax.tree.map(jnp.zeros_like, v))

        def group_hv(acc, *, chunks, part):  # acc + this group's product, chunk by chunk
            def one(acc, rows):
                grad_rows = lambda th: differentiable_grad(part)(th, rows)  # noqa: E731
                hv = as_f32(jax.jvp(grad_rows, (theta,), (v_theta,))[1])
                return sh.constrain_like_params(jax.tree.map(jnp.add, acc, hv)), None

            return jax.lax.scan(one, acc, chunks)[0]

        hv = zero
        for loss, chunks, scale, skippable in parts:
            part = functools.partial(data_sum, loss=loss, scale=scale)
            if skippable:  # the sum passes through the branch (if_any_valid)
                hv = if_any_valid(chunks["valid"],
                                  functools.partial(group_hv, chunks=chunks, part=part), hv,
                                  otherwise=lambda acc: acc)
            else:
                hv = group_hv(hv, chunks=chunks, part=part)
        if inner.mu:  # the Hessian of mu/2 |theta - theta_ref|^2
            hv = linsolve.tree_axpy(inner.mu, v, hv)
        hv = hv if ridge == 0 else linsolve.tree_axpy(ridge, v, hv)
        return sh.constrain_like_params(hv)

    return matvec


def linear_solver(method: Implicit | Neumann, matvec: Callable) -> Callable:
    """``rhs -> (v, iterations, residual, negative_curvature)`` solving ``matvec(v) = rhs``."""
    if isinstance(method, Neumann):
        return lambda rhs: linsolve.neumann(matvec, rhs, steps=method.steps, alpha=method.alpha)
    return lambda rhs: linsolve.solve(
        method.solver, matvec, rhs, maxiter=method.maxiter, tol=method.tol,
        constrain=sh.constrain_like_params, stop_on_negative=truncates(method))


def truncates(method: Implicit | Neumann) -> bool:
    """Whether ``method``'s solve stops at negative curvature (truncated CG)."""
    return (isinstance(method, Implicit) and method.solver == "cg"
            and method.on_negative_curvature == "truncate")


def adjoint(inner_loss: Callable, outer_loss: Callable, theta, omega, hessian_batch,
            outer_batch, method: Implicit | Neumann, *, chunk: int | None = None):
    """The adjoint vector ``v`` solving ``(H + ridge I) v = grad_theta f``.

    Args:
      inner_loss: ``g(theta, omega, batch) -> scalar``; H is its Hessian in theta on
        ``hessian_batch`` (g is a mean, so a sample of rows estimates the whole set's H).
      outer_loss: ``f(theta, outer_batch) -> scalar``.
      theta, omega: the inner solution and the data-weight logits.
      hessian_batch, outer_batch: what the two losses read.
      method: ``Implicit`` (Krylov solve) or ``Neumann`` (truncated series).
      chunk: Hessian-vector products, and the gradient of an ``OuterObjective``, over this
        many rows at a time (see :func:`hvp`).

    Returns:
      ``(v, HypergradInfo)``: v float32 with theta's structure (and sharding in a trainer
      step); the info's residual is ``|(H + ridge I) v - grad f| / |grad f|``.
    """
    f_val, grad_f = outer_value_and_grad(outer_loss, theta, outer_batch, chunk=chunk)
    if jnp.ndim(f_val) != 0:
        raise ValueError(
            f"hypergrad: outer_loss must return a scalar, got shape {jnp.shape(f_val)}")
    rhs = sh.constrain_like_params(as_f32(grad_f))
    matvec = hvp(inner_loss, theta, omega, hessian_batch, method.ridge, chunk=chunk)
    v, iterations, residual, negative = linear_solver(method, matvec)(rhs)
    return v, solve_info(method, f_val, iterations, residual, negative)


def solve_info(method: Implicit | Neumann, outer_loss, iterations, residual,
               negative) -> HypergradInfo:
    """The ``HypergradInfo`` of a :func:`linear_solver` result."""
    # iterations counts the product that found the negative direction: 1 means v is still 0
    truncated = negative & (iterations > 1) if truncates(method) else False
    return HypergradInfo(residual, iterations, outer_loss, negative, truncated)


def outer_value_and_grad(outer_loss: Callable, theta, batch, *, chunk: int | None = None):
    """``(f, grad_theta f)``; for an ``OuterObjective`` over a row-aligned batch with more than
    ``chunk`` rows, summed over row chunks (one reverse pass per chunk, the gradient
    accumulated in float32 in theta's sharding): the same value, the memory of a pass over
    ``chunk`` rows."""
    rows = batch["ids"].shape[0] if isinstance(batch, dict) and "ids" in batch else (
        jax.tree.leaves(batch)[0].shape[0] if jax.tree.leaves(batch) else 0)
    if not (chunk and rows > chunk and isinstance(outer_loss, OuterObjective)
            and isinstance(batch, dict) and all(
                jnp.ndim(x) and jnp.shape(x)[0] == rows for x in jax.tree.leaves(batch))):
        return jax.value_and_grad(outer_loss)(theta, batch)
    if "ids" not in batch:  # interleaved_chunks cuts by the rows of "ids"
        batch = {**batch, "ids": jnp.zeros((rows,), jnp.int32)}
    chunks = interleaved_chunks(batch, chunk)
    n = jnp.sum(chunks["valid"])
    n = jnp.where(n > 0, n, 1.0)

    def total(th, part):  # this chunk's share of the mean over all n valid rows
        loss_B = outer_loss.example_loss(th, part)
        valid_B = part["valid"].astype(loss_B.dtype)
        return jnp.sum(jnp.where(valid_B > 0, loss_B, 0.0) * valid_B) / n, None

    first = jax.tree.map(lambda x: x[0], chunks)
    f_zero = jnp.zeros((), at_least_f32(jax.eval_shape(total, theta, first)[0].dtype))
    zero = sh.constrain_like_params(as_f32(jax.tree.map(jnp.zeros_like, theta)))
    (f_val, grad_f), _ = _sum_of_passes(total, theta, chunks, (f_zero, zero))
    return f_val, grad_f


def _sum_of_passes(fn, theta, chunks, acc):
    """``acc`` plus ``value_and_grad(fn, has_aux=True)(theta, chunk)`` over the leading axis
    of ``chunks``, one reverse pass per chunk in a ``lax.scan``: ``acc`` is ``(value,
    grads)`` in at least float32, the running gradient pinned to theta's sharding. Returns
    ``(acc, aux stacked over the chunks)``."""

    def one(acc, part):
        (v, aux), g = jax.value_and_grad(fn, has_aux=True)(theta, part)
        g = sh.constrain_like_params(jax.tree.map(jnp.add, acc[1], as_f32(g)))
        return (acc[0] + v.astype(acc[0].dtype), g), aux

    return jax.lax.scan(one, acc, chunks)


def interleaved_chunks(batch: dict, chunk: int) -> dict:
    """Rows -> ``(K, chunk, ...)``; chunk k holds rows k, k + K, k + 2K, ... (valid=0 padding).

    Interleaved rather than contiguous so that, when the rows are split over a data axis,
    every chunk is split the same way and each step of the loop keeps all devices busy.
    """
    n = batch["ids"].shape[0]
    k = -(-n // chunk)
    pad = k * chunk - n
    valid_B = batch.get("valid")
    valid_B = jnp.ones((n,), jnp.float32) if valid_B is None else valid_B

    def split(x, fill_mode):
        if pad:
            x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), mode=fill_mode)
        return jnp.swapaxes(x.reshape(chunk, k, *x.shape[1:]), 0, 1)

    # Padding repeats the last row (a well-formed input) and marks it invalid.
    out = {name: jax.tree.map(lambda x: split(x, "edge"), value)
           for name, value in batch.items() if name != "valid"}
    out["valid"] = split(valid_B, "constant")
    return out


def chunk_rows(x_KxC, n: int):
    """The inverse of :func:`interleaved_chunks` for one per-row quantity: ``(K, chunk)`` back
    to the batch's ``n`` rows in their order (the padding dropped)."""
    return jnp.swapaxes(x_KxC, 0, 1).reshape(-1)[:n]


def example_u(example_loss: Callable, theta, batch: dict, v, *, chunk: int | None = None):
    """``u_b = <grad l_b(theta), v>`` for every row of ``batch``: forward-mode JVPs of
    ``loss_B``, ``chunk`` rows at a time (None, 0 or >= rows: one JVP over the batch).

    Args:
      example_loss: ``(theta, batch) -> loss_B``.
      theta: where the gradients are taken.
      batch: rows with ``ids`` (B,), optional ``valid`` (B,); when chunked, every leaf must
        have the rows on axis 0.
      v: the adjoint vector (float32 or theta's dtypes).
      chunk: rows per JVP; memory is one JVP over that many rows.

    Returns:
      ``(u_R, ids_R, valid_R)``; R >= B when chunks pad the rows (padding rows are invalid).
    """
    v = cast_like(v, theta)

    def one(rows):
        with differentiable_attention():  # forward mode: no cuDNN attention
            return jax.jvp(lambda th: example_loss(th, rows), (theta,), (v,))[1]

    n = batch["ids"].shape[0]
    valid_B = batch.get("valid")
    if not chunk or chunk >= n:
        valid_B = jnp.ones((n,), jnp.float32) if valid_B is None else valid_B
        return one(batch), batch["ids"], valid_B
    unaligned = [jax.tree_util.keystr(path) for path, x in
                 jax.tree_util.tree_leaves_with_path(batch)
                 if not (jnp.ndim(x) and jnp.shape(x)[0] == n)]
    if unaligned:
        raise ValueError(
            f"example_u: batch leaves {', '.join(unaligned)} do not have one entry per row of "
            f"ids ({n}); chunks are cut by rows, so every leaf needs the rows on axis 0 "
            "(or pass chunk=None for one JVP over the whole batch)")
    chunks = interleaved_chunks(batch, chunk)
    u_KxC = jax.lax.map(one, chunks)
    return u_KxC.reshape(-1), chunks["ids"].reshape(-1), chunks["valid"].reshape(-1)


def weight_vjp(weighting: str, omega, ids_R, u_R, valid_R, n_rows=None) -> jax.Array:
    """``d omega = -(1/n) J_s(omega)^T u_N``, ``u_N`` the valid rows' u scattered onto their ids.

    Args:
      weighting: "softmax" or "sigmoid" (``jbilevel.weights``).
      omega: (N,) logits.
      ids_R, u_R, valid_R: per-row example ids, u values and validity (padding rows: 0).
      n_rows: the n of the mean in g (default: the number of valid rows).

    Returns:
      d_omega (N,), omega's dtype.
    """
    valid_R = valid_R.astype(u_R.dtype)
    n = jnp.sum(valid_R) if n_rows is None else jnp.asarray(n_rows, u_R.dtype)
    scale_R = valid_R / jnp.where(n > 0, n, 1.0)
    # where, not a product: a padding row's u may be anything, even non-finite.
    contrib_R = jnp.where(valid_R > 0, scale_R * u_R, 0.0)
    u_N = jnp.zeros(omega.shape, u_R.dtype).at[ids_R].add(contrib_R, mode="drop")
    return -weights_lib.weights_vjp(omega, u_N.astype(omega.dtype), weighting)

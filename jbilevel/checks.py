"""Input checks for hypergradients: bad input fails loudly, naming what is wrong.

The most dangerous mistake in bilevel code is silent: data weights captured in a closure get
a zero hypergradient (``custom_root`` is a ``custom_vjp``). ``check_omega_used`` finds it by
tracing ``grad_theta g`` and following data dependence from omega through the jaxpr.
"""

from __future__ import annotations

import jax
import jax.extend.core as jcore
import jax.numpy as jnp

from jbilevel.objectives import InnerObjective, check_ids


def is_concrete(tree) -> bool:
    """True when no leaf is a tracer, i.e. values can be inspected and errors raised."""
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def check_float_tree(name: str, tree) -> None:
    """Raise unless every leaf of a differentiated pytree is a float array."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"hypergrad: {name} has no array leaves")
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise ValueError(
                f"hypergrad: {name}{jax.tree_util.keystr(path)} has dtype "
                f"{jnp.result_type(leaf)}; differentiated pytrees need float leaves"
            )


def grad_depends_on_omega(inner_loss, theta, omega, batch) -> bool:
    """Whether ``grad_theta inner_loss`` reads omega, by forward taint through its jaxpr."""
    fun = lambda th, om, b: jax.grad(inner_loss)(th, om, b)
    jaxpr = jax.make_jaxpr(fun)(theta, omega, batch).jaxpr
    n_theta = len(jax.tree.leaves(theta))
    n_omega = len(jax.tree.leaves(omega))
    tainted = set(jaxpr.invars[n_theta : n_theta + n_omega])
    for eqn in jaxpr.eqns:
        # Conservative for nested jaxprs (pjit, custom_jvp, scan): any tainted input taints
        # every output.
        if any(not isinstance(v, jcore.Literal) and v in tainted for v in eqn.invars):
            tainted.update(eqn.outvars)
    return any(not isinstance(v, jcore.Literal) and v in tainted for v in jaxpr.outvars)


def check_omega_used(inner_loss, theta, omega, batch) -> None:
    """Raise if ``grad_theta inner_loss`` ignores omega (weights captured in a closure)."""
    if not grad_depends_on_omega(inner_loss, theta, omega, batch):
        raise ValueError(
            "grad_theta inner_loss(theta, omega, batch) does not depend on omega, so the "
            "hypergradient would be identically zero. If the data weights are captured in a "
            "closure, pass them as omega instead: inner_loss(theta, omega, batch) must compute "
            "its weights from omega (docs/design.md, Conventions)."
        )


def check_inner_batch(inner_loss, omega, batch) -> None:
    """For an ``InnerObjective``: ids present, 1-D omega, ids inside it (when concrete)."""
    if isinstance(inner_loss, InnerObjective):
        check_ids(omega, batch)  # raises on shape / range problems


def raise_non_finite(inner_loss, theta, omega, inner_batch, f_val):
    """Called with concrete values once a non-finite hypergradient is seen: name the cause."""
    if not jnp.isfinite(f_val):
        raise ValueError(f"hypergrad: outer loss is not finite ({float(f_val)}) at theta")
    if isinstance(inner_loss, InnerObjective):
        loss_B = inner_loss.example_loss(theta, inner_batch)
        bad = jnp.nonzero(~jnp.isfinite(loss_B))[0]
        if bad.size:
            ids = inner_batch["ids"][bad]
            raise ValueError(
                f"hypergrad: inner per-example losses are not finite for batch rows "
                f"{bad[:5].tolist()} (example ids {ids[:5].tolist()})"
            )
    g_val = inner_loss(theta, omega, inner_batch)
    if not jnp.isfinite(g_val):
        raise ValueError(f"hypergrad: inner loss is not finite ({float(g_val)}) at theta")
    raise ValueError(
        "hypergrad: the hypergradient is not finite although both losses are: the inner "
        "Hessian is probably singular or indefinite at theta; add ridge > 0 or use "
        "solver='normal_cg'"
    )

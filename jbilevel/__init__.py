"""jbilevel: validation-guided data curation for LLM fine-tuning in JAX.

The public research API (docs/design.md, Public contract) is re-exported here lazily, so that
``import jbilevel`` stays cheap and jaxopt is only imported when a hypergradient is asked for.
"""

__version__ = "0.1.0"

_LAZY = {
    "hypergrad": "jbilevel.implicit",
    "hypergrad_chunked": "jbilevel.chunked",
    "implicit_solver": "jbilevel.implicit",
    "Implicit": "jbilevel.adjoint",
    "Neumann": "jbilevel.adjoint",
    "Unrolled": "jbilevel.implicit",
    "HypergradInfo": "jbilevel.adjoint",
    "adjoint": "jbilevel.adjoint",
    "example_u": "jbilevel.adjoint",
    "weight_vjp": "jbilevel.adjoint",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jbilevel' has no attribute {name!r}")

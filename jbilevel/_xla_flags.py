"""XLA:CPU settings jbilevel adds to ``XLA_FLAGS`` on import, before JAX starts a backend.

YNNPACK, which runs XLA:CPU's matmuls, by default takes one dot at a time. In a training step's
backward pass the weight gradient ``x^T g`` then needs ``g`` transposed, and XLA fuses that
transpose into the elementwise backward of SwiGLU/RMSNorm: a loop that reads its inputs
column-wise, which cost more than all the layer's matmuls (a d=128 layer's backward took 3x
its input-gradient alone). ``LIBRARY_FUSION_TYPE_DOT`` lets YNNPACK take the dot together
with the transposes around it: the tiny quality-task train step runs ~1.4x faster here
(docs/performance.md). Only CPU computations are affected; GPU/TPU programs ignore xla_cpu_*.

Opt out with ``JBILEVEL_XLA_DEFAULTS=0``. A flag the user already put in ``XLA_FLAGS`` wins.
The flags are added only for the jaxlib minor versions they were checked on, because XLA
aborts the process on a flag it does not know.
"""

from __future__ import annotations

import os
from importlib import metadata

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT",)
CHECKED_JAXLIB = ("0.10.",)  # jaxlib versions known to accept CPU_FLAGS
OPT_OUT = "JBILEVEL_XLA_DEFAULTS"


def apply_cpu_defaults(environ=None) -> list[str]:
    """Adds ``CPU_FLAGS`` to ``environ["XLA_FLAGS"]`` (default: ``os.environ``).

    Returns: the flags added (none when opted out, already set, or jaxlib is unchecked).
    """
    environ = os.environ if environ is None else environ
    if environ.get(OPT_OUT, "1") == "0":
        return []
    try:
        jaxlib_version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return []
    if not jaxlib_version.startswith(CHECKED_JAXLIB):
        return []
    current = environ.get("XLA_FLAGS", "")
    added = [f for f in CPU_FLAGS if f.split("=")[0] not in current]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added

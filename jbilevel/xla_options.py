"""XLA compiler options for the training steps (``jax.jit(..., compiler_options=...)``).

On CPU, YNNPACK runs XLA's matmuls and by default takes one dot at a time. In a training
step's backward pass the weight gradient ``x^T g`` then needs ``g`` transposed, and XLA fuses
that transpose into the elementwise SwiGLU backward: a loop reading its inputs column-wise,
which cost more than all the layer's matmuls (docs/performance.md). With
``LIBRARY_FUSION_TYPE_DOT`` YNNPACK takes each dot together with the transposes around it:
the quality task's train step runs ~1.4x faster. The option is set per compilation, for the
training and hypergradient steps only: KV-cache decoding (M=16 dots) was 17-25% slower with
it at d=256.

``JBILEVEL_XLA_DEFAULTS=0`` turns it off. It is only set for the jaxlib minor versions it was
checked on (an unknown option fails the compilation).
"""

from __future__ import annotations

import os
from importlib import metadata

CPU_TRAIN_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
CHECKED_JAXLIB = ("0.10.",)  # jaxlib versions known to accept CPU_TRAIN_OPTIONS
OPT_OUT = "JBILEVEL_XLA_DEFAULTS"


def train_compiler_options(platform: str, environ=None) -> dict | None:
    """Args: the devices' platform ("cpu", "gpu", "tpu"); environ (default ``os.environ``).

    Returns: compiler options for a training step's ``jax.jit``, or None (no change).
    """
    environ = os.environ if environ is None else environ
    if platform != "cpu" or environ.get(OPT_OUT, "1") == "0":
        return None
    try:
        if not metadata.version("jaxlib").startswith(CHECKED_JAXLIB):
            return None
    except metadata.PackageNotFoundError:
        return None
    return dict(CPU_TRAIN_OPTIONS)

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

``tune_host_malloc`` is the host-side counterpart, for processes that compute on the CPU.
XLA:CPU allocates each execution's temporary buffer (521 MB for the d=512 step of
benchmarks/models.py) with malloc and frees it afterwards. glibc serves blocks over 32 MB with
a fresh mmap and returns them with munmap, so every step page-faulted its whole temporary
buffer in again: 142k minor faults and 0.23 s of kernel time in a 0.79 s step. With freed
memory kept in the heap (mallopt: one arena, no mmap, no trimming) the step takes 0.65 s and
faults nothing; the quality task's train step goes from 0.062 to 0.047 s. One arena, because
glibc's per-thread arenas map large blocks themselves whatever M_MMAP_MAX says, and unmap
whole heaps whatever M_TRIM_THRESHOLD says. The costs: the process keeps its peak memory
(RSS does not shrink after a peak), and threads share one malloc lock, which made compiling
20-33% slower here (the d=256 benchmark step on one and on eight CPU devices). So it is a
per-process choice: the jbilevel command, scripts/reproduce.py and the benchmarks make it
first thing, before JAX starts its threads; importing jbilevel never changes the process's
allocator. ``JBILEVEL_HOST_MALLOC=0`` turns it off alone,
``JBILEVEL_XLA_DEFAULTS=0`` both.

``use_compilation_cache`` turns JAX's persistent compilation cache on for a process and the
processes it starts (``--compile-cache`` of ``jbilevel demo | train | eval`` and
``scripts/reproduce.py``): a rerun, a resume or another seed loads its compiled programs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from importlib import metadata
from importlib.util import find_spec

CPU_TRAIN_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
CHECKED_JAXLIB = ("0.10.",)  # jaxlib versions known to accept CPU_TRAIN_OPTIONS
OPT_OUT = "JBILEVEL_XLA_DEFAULTS"  # "0": neither the compiler option nor the malloc tuning
MALLOC_OPT_OUT = "JBILEVEL_HOST_MALLOC"  # "0": no malloc tuning


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


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
HOST_MALLOC = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))


def _accelerator_installed(environ) -> bool:
    """Whether JAX will compute on something other than the CPU (without starting JAX)."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() != "cpu"
    if any(True for _ in metadata.entry_points(group="jax_plugins")):
        return True  # jax-cuda*-plugin, jax-rocm*-plugin, ...
    # libtpu (also as libtpu-nightly), and plugins in the older jax_plugins namespace package
    return any(find_spec(name) is not None for name in ("libtpu", "jax_plugins"))


def _jax_started() -> bool:
    """Whether this process has started a JAX backend (and with it JAX's threads)."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    if bridge is None:
        return False
    started = getattr(bridge, "backends_are_initialized", None)
    return True if started is None else bool(started())


def tune_host_malloc(environ=None, libc=None) -> bool:
    """Keeps freed host memory in glibc's heap, so XLA:CPU's per-call buffers are reused.

    Call it before anything starts JAX's backend: the one-arena limit only binds threads
    that have not allocated yet. The price is that the process does not hand freed memory
    back to the OS (its RSS stays at its peak), so it is skipped when JAX will compute on an
    accelerator (``JAX_PLATFORMS`` names one first, or a JAX plugin or libtpu is installed),
    off Linux/glibc, and with ``JBILEVEL_HOST_MALLOC=0`` or ``JBILEVEL_XLA_DEFAULTS=0``.

    Args:
      environ: environment mapping (default ``os.environ``).
      libc: the C library (``ctypes.CDLL``) to configure (default: this process's glibc).
    Returns:
      True when every ``mallopt`` call was accepted.
    """
    environ = os.environ if environ is None else environ
    if "0" in (environ.get(OPT_OUT), environ.get(MALLOC_OPT_OUT)):
        return False
    if _accelerator_installed(environ) or _jax_started():
        return False
    if libc is None:
        if not sys.platform.startswith("linux"):
            return False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:  # not glibc (e.g. musl)
        return False
    # In this order, stopping at the first refusal: one arena alone changes nothing measurable,
    # while no trimming with mmap still on was worse than the default (docs/performance.md).
    return all(mallopt(param, value) == 1 for param, value in HOST_MALLOC)


CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"  # JAX's own variable: started processes inherit it
CACHE_OFF = "none"


def use_compilation_cache(directory: str | os.PathLike | None, *,
                          default: str | os.PathLike | None = None,
                          make: bool = True) -> str | None:
    """Turns JAX's persistent compilation cache on (or off) for this process and the
    processes it starts: a program compiled once (in this run, an earlier one, another seed
    or method with the same shapes, a resume) is loaded from ``directory`` instead of
    compiled again. The cached program is the compiled one, so results do not change.

    JAX keys every entry on the program, the compiler options and the JAX and XLA versions,
    and caches programs that took at least 1 s to compile
    (``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``). Several processes may share a
    directory; on a multi-host slice give each host a local one or a shared mount.

    Args:
      directory: the cache's directory; ``"none"`` turns the cache off; None keeps what
        ``$JAX_COMPILATION_CACHE_DIR`` says, or where it is unset uses ``default``.
      default: the directory for ``directory=None`` without the variable (None: off).
      make: create the directory now (an unwritable one fails here, not at the first
        compile); False leaves that to JAX, which makes it when it first writes a program.
    Returns: the directory in use, or None.
    """
    if directory is None:
        if os.environ.get(CACHE_ENV) or default is None:
            return os.environ.get(CACHE_ENV) or None
        directory = default
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    path = None if str(directory) == CACHE_OFF else os.path.abspath(directory)
    if path is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        if make:
            os.makedirs(path, exist_ok=True)
        os.environ[CACHE_ENV] = path
    jax.config.update("jax_compilation_cache_dir", path)
    compilation_cache.reset_cache()  # JAX decides once whether to cache: decide again
    return path

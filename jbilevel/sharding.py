"""Device meshes and the one table that maps logical axis names onto them.

Parameters and batches name *logical* axes (``embed``, ``heads``, ``batch``, ``examples``...);
:class:`AxisRules` maps each to zero or more *physical* mesh axes (``data``, ``fsdp``,
``tensor``). Everything that places an array asks this table, so changing the parallelism of a
run is a config change, never a code change.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jbilevel.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Parameters are sharded over fsdp (ZeRO-3 style) on their
# embedding dimension and over tensor on their head / mlp / vocab dimension; activations
# and examples split over data and fsdp. Data weights omega ("examples") are replicated:
# even a million float32 logits is 4 MB, and every step gathers an arbitrary subset of them.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("head_dim", ()),
    ("layers", ()),
    ("length", ()),
    ("examples", ()),
    # The LM loss's output projection: vocabulary split over every parameter axis, rows only
    # over data, so no device holds the whole head or its gradient (a vocab-parallel loss).
    ("loss_rows", ("data",)),
    ("loss_vocab", ("fsdp", "tensor")),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape. One axis may be -1: it takes all devices the others leave."""

    data: int = -1  # pure data parallelism (parameters replicated across it)
    fsdp: int = 1  # data parallelism with parameters and optimizer state sharded across it
    tensor: int = 1  # tensor (model) parallelism inside attention heads and the MLP

    def __post_init__(self):
        sizes = self.sizes_tuple()
        if sum(s == -1 for s in sizes) > 1:
            filled = [n for n, s in zip(MESH_AXES, sizes, strict=True) if s == -1]
            fix = " ".join([*(f"mesh.{n}=1" for n in filled[:-1]), f"mesh.{filled[-1]}=-1"])
            raise ValueError(f"mesh: at most one axis may be -1 (mesh.data is -1 unless set), got "
                             f"{self}; give all but one a size, e.g. {fix}")
        bad = [n for n, s in zip(MESH_AXES, sizes, strict=True) if s == 0 or s < -1]
        if bad:
            raise ValueError(f"mesh: axis sizes must be positive or -1, got {self} (fix: {bad})")

    def sizes_tuple(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    def resolve(self, n_devices: int) -> tuple[int, int, int]:
        """The concrete (data, fsdp, tensor) sizes for ``n_devices`` devices."""
        sizes = list(self.sizes_tuple())
        fixed = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if n_devices % fixed:
                raise ConfigError(
                    f"mesh: {n_devices} devices cannot be split as {self}: the fixed axes "
                    f"multiply to {fixed}, which does not divide {n_devices}"
                )
            sizes[sizes.index(-1)] = n_devices // fixed
        elif fixed != n_devices:
            raise ConfigError(
                f"mesh: {self} needs {fixed} devices but {n_devices} are available; "
                "set one axis to -1 to fill the rest"
            )
        return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a ``(data, fsdp, tensor)`` mesh with Auto axes (sharding by ``jax.jit``).

    Args:
      config: the axis sizes; -1 fills with the remaining devices.
      devices: devices to use (default: all of ``jax.devices()``, every process's).
    Returns:
      A ``jax.sharding.Mesh`` whose axis names are ``MESH_AXES``.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = config.resolve(len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def describe_mesh(mesh: Mesh) -> str:
    """The mesh as a run reports it: ``data 1 x fsdp 4 x tensor 1 over 4 cpu devices`` (and
    the processes when there are several)."""
    sizes = " x ".join(f"{name} {mesh.shape[name]}" for name in MESH_AXES)
    devices = mesh.devices.flat
    processes = len({d.process_index for d in devices})
    return (f"{sizes} over {mesh.devices.size} {devices[0].platform} device"
            f"{'s' if mesh.devices.size > 1 else ''}"
            + (f" in {processes} processes" if processes > 1 else ""))


@dataclasses.dataclass(frozen=True)
class AxisRules:
    """The logical-to-mesh axis table. ``rules`` pairs each logical name with mesh axes."""

    rules: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_RULES

    def __post_init__(self):
        names = [name for name, _ in self.rules]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"axis rules: logical axes listed twice: {dup}")
        for name, axes in self.rules:
            unknown = [a for a in axes if a not in MESH_AXES]
            if unknown:
                raise ValueError(
                    f"axis rules: logical axis {name!r} maps to unknown mesh axes {unknown} "
                    f"(mesh axes are {MESH_AXES})"
                )

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> AxisRules:
        """Default rules updated from ``{logical: mesh_axis | [mesh_axes] | None}``."""
        table = dict(DEFAULT_RULES)
        for name, axes in mapping.items():
            if axes is None:
                axes = ()
            elif isinstance(axes, str):
                axes = (axes,)
            table[name] = tuple(axes)
        return cls(tuple(table.items()))

    def spec(self, logical: Sequence[str | None], shape: Sequence[int] | None = None,
             mesh: Mesh | None = None, what: str = "array") -> PartitionSpec:
        """PartitionSpec for an array whose dimensions carry the names ``logical``.

        Raises when two dimensions would use the same mesh axis (a collision), when a name
        has no rule, or (given ``shape`` and ``mesh``) when a dimension does not divide evenly.
        """
        table = dict(self.rules)
        used: dict[str, str] = {}
        entries = []
        for dim, name in enumerate(logical):
            if name is None:
                entries.append(None)
                continue
            if name not in table:
                raise ValueError(
                    f"{what}: logical axis {name!r} has no sharding rule "
                    f"(known: {sorted(table)}); add it to the axis rules"
                )
            axes = tuple(a for a in table[name] if mesh is None or mesh.shape[a] > 1)
            for axis in axes:
                if axis in used:
                    raise ValueError(
                        f"{what}: mesh axis {axis!r} is used by both logical axes "
                        f"{used[axis]!r} and {name!r}; change the axis rules so each mesh "
                        "axis shards at most one dimension"
                    )
                used[axis] = name
            if shape is not None and mesh is not None and axes:
                ways = math.prod(mesh.shape[a] for a in axes)
                if shape[dim] % ways:
                    raise ValueError(
                        f"{what}: dimension {dim} ({name!r}, size {shape[dim]}) is not "
                        f"divisible by mesh axes {axes} ({ways} ways); change the mesh or "
                        "the axis rules"
                    )
            entries.append(axes[0] if len(axes) == 1 else (axes or None))
        return PartitionSpec(*entries)

    def sharding(self, mesh: Mesh, logical: Sequence[str | None],
                 shape: Sequence[int] | None = None, what: str = "array") -> NamedSharding:
        return NamedSharding(mesh, self.spec(logical, shape, mesh, what))


def tree_shardings(mesh: Mesh, rules: AxisRules, axes_tree: Any, shapes_tree: Any) -> Any:
    """NamedShardings for a pytree, given its logical axes and its shapes.

    Args:
      mesh: the device mesh.
      rules: the logical-to-mesh table.
      axes_tree: pytree whose leaves are tuples of logical names (one per dimension).
      shapes_tree: pytree of the same structure whose leaves have ``.shape`` (arrays or
        ``jax.ShapeDtypeStruct``, e.g. from ``jax.eval_shape``).
    Returns:
      A pytree of ``NamedSharding`` with the structure of ``shapes_tree``.
    """
    paths_shapes, treedef = jax.tree_util.tree_flatten_with_path(shapes_tree)
    axes_leaves = treedef.flatten_up_to(axes_tree)
    out = []
    for (path, leaf), logical in zip(paths_shapes, axes_leaves, strict=True):
        what = "param " + jax.tree_util.keystr(path)
        if len(logical) != len(leaf.shape):
            raise ValueError(
                f"{what}: {len(logical)} logical axes {tuple(logical)} for an array of "
                f"shape {tuple(leaf.shape)}"
            )
        out.append(rules.sharding(mesh, logical, leaf.shape, what))
    return jax.tree_util.tree_unflatten(treedef, out)


def per_device_bytes(shapes: Any, shardings: Any) -> tuple[int, int]:
    """(total bytes, bytes held by the most loaded device) of a pytree of shapes (arrays or
    ``jax.ShapeDtypeStruct``s) laid out by ``shardings``."""
    total = 0
    per_device: dict[Any, int] = {}
    for s, shd in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings), strict=True):
        itemsize = np.dtype(s.dtype).itemsize
        total += math.prod(s.shape) * itemsize
        shard = math.prod(shd.shard_shape(s.shape)) * itemsize
        for d in shd.device_set:
            per_device[d] = per_device.get(d, 0) + shard
    return total, max(per_device.values())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: AxisRules, ndim: int) -> NamedSharding:
    """Sharding for a batch array: leading dimension over ``batch``, the rest whole."""
    return rules.sharding(mesh, ("batch",) + (None,) * (ndim - 1))


def data_parallel_size(mesh: Mesh, rules: AxisRules) -> int:
    """How many ways the ``batch`` axis is split: the batch size must be a multiple."""
    axes = dict(rules.rules)["batch"]
    return int(np.prod([mesh.shape[a] for a in axes]))


def init_sharded(init_fn, mesh: Mesh, rules: AxisRules, axes_tree: Any, *args):
    """Runs ``init_fn(*args)`` so that every leaf is born sharded, never built replicated.

    Returns:
      ``(tree, shardings)``: the initialised pytree and its ``NamedSharding`` pytree.
    """
    shapes = jax.eval_shape(init_fn, *args)
    shardings = tree_shardings(mesh, rules, axes_tree, shapes)
    return jax.jit(init_fn, out_shardings=shardings)(*args), shardings


# (mesh, rules) that model code constrains activations against while a step is traced.
_ACTIVATIONS: contextvars.ContextVar = contextvars.ContextVar("jbilevel_activations",
                                                              default=None)


# The shardings of theta while a step is traced: theta-shaped vectors (CG iterates, HVPs)
# are pinned to them, so they stay split like the parameters instead of held whole.
_PARAMS: contextvars.ContextVar = contextvars.ContextVar("jbilevel_params", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: AxisRules, params: Any = None):
    """Within this context, :func:`constrain` pins activations to ``rules`` on ``mesh`` and
    :func:`constrain_like_params` pins theta-shaped pytrees to ``params`` (theta's shardings,
    a pytree of ``NamedSharding``; None: left alone)."""
    token = _ACTIVATIONS.set((mesh, rules))
    token_params = _PARAMS.set(params)
    try:
        yield
    finally:
        _PARAMS.reset(token_params)
        _ACTIVATIONS.reset(token)


def constrain_like_params(tree: Any) -> Any:
    """``tree`` pinned leaf by leaf to theta's shardings (see :func:`activation_sharding`).

    A pytree with another structure or other shapes (a LoRA-sized vector inside a full-model
    trace, a vmapped row) is returned unchanged, as is everything outside the context.
    """
    shardings = _PARAMS.get()
    if shardings is None:
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    try:
        sh_leaves = treedef.flatten_up_to(shardings)
    except (ValueError, TypeError):
        return tree
    out = []
    for x, s in zip(leaves, sh_leaves, strict=True):
        if not isinstance(s, NamedSharding) or len(s.spec) > x.ndim:
            return tree
        try:
            s.shard_shape(x.shape)
        except ValueError:
            return tree
        out.append(jax.lax.with_sharding_constraint(x, s))
    return jax.tree.unflatten(treedef, out)


def batch_ways() -> int:
    """How many ways the ``batch`` axis splits rows in the current activation context (1
    outside it): what a per-device memory budget divides a global batch by."""
    ctx = _ACTIVATIONS.get()
    if ctx is None:
        return 1
    mesh, rules = ctx
    return data_parallel_size(mesh, rules)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """``x`` with its dimensions pinned to the mesh axes of their logical names.

    FSDP needs this: with the batch and the parameters' embedding dimension both split over
    ``fsdp``, XLA may otherwise gather the activations instead of the (smaller) weights.
    Outside :func:`activation_sharding`, or where a dimension does not divide over its mesh
    axes (a chunk of a batch, a vmapped row), ``x`` is returned unchanged.
    """
    ctx = _ACTIVATIONS.get()
    if ctx is None or x.ndim != len(logical):
        return x
    mesh, rules = ctx
    spec = rules.spec(logical, None, mesh)
    for size, axes in zip(x.shape, spec, strict=True):
        axes = (axes,) if isinstance(axes, str) else (axes or ())
        if size % math.prod(mesh.shape[a] for a in axes):
            return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

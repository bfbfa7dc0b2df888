"""One composite checkpoint per step: an array pytree plus a small JSON record.

The array part holds everything on devices (params, both optimizer states, omega, rng key
data, lambda, step); the JSON part holds host state (the data iterator's position, the online
buffer's bookkeeping, the config). Orbax writes both atomically (a temporary directory renamed
on commit), asynchronously, and keeps the newest ``keep``; a killed run loses at most the
steps since its last finished save. Restores always go through an abstract target carrying
shardings, so a checkpoint written on one mesh restores onto another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves and restores ``(state, meta)`` pairs under ``directory/<step>``.

    Args:
      directory: where step directories live (created if missing).
      keep: how many of the newest checkpoints to keep (older ones are deleted).
      async_save: write in a background thread; ``wait()`` or ``close()`` blocks until done.
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"checkpoint keep={keep}: must keep at least one checkpoint")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def save(self, step: int, state: Any, meta: dict | None = None, *, force: bool = True) -> bool:
        """Starts saving ``state`` (a pytree of arrays) and ``meta`` (JSON-able) at ``step``."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})
        )
        return self._manager.save(step, args=args, force=force)

    def latest_step(self) -> int | None:
        """The newest fully written step, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores ``(state, meta)`` at ``step`` (default: the newest).

        Args:
          abstract_state: a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set (e.g.
            from ``jax.eval_shape`` plus the target mesh's shardings): the arrays are
            restored directly into that layout, whatever mesh wrote them.
          step: which checkpoint; None for the newest.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"{self.directory}: no finished checkpoint to restore")
        missing = [
            jax.tree_util.keystr(p)
            for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
            if getattr(leaf, "sharding", None) is None
        ]
        if missing:
            raise ValueError(
                "restore target must carry a sharding on every leaf (use jax.eval_shape and "
                f"attach the target mesh's shardings); missing on: {missing[:5]}"
            )
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        return restored.state, dict(restored.meta or {})

    def wait(self) -> None:
        """Blocks until any save in flight has been committed to disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` pytree for ``tree`` with the given shardings attached."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )

"""Orbax checkpoints of a training run: the train state plus JSON metadata per step.

``Checkpointer(directory, keep=3)`` wraps ``orbax.checkpoint.CheckpointManager``:

* ``save(step, state, meta)`` writes ``directory/<step>/{state,meta}``; ``meta`` is a JSON
  dict (epoch, position in the epoch, partial-epoch metrics, ...).
* ``restore(like, step=None)`` restores the latest (or given) step into the structure,
  dtypes and shardings of ``like`` (a ``TrainState`` or its ``jax.ShapeDtypeStruct``s).
* Only the last ``keep`` steps are kept.

Atomicity: on a local or POSIX file system Orbax writes a step into
``<step>.orbax-checkpoint-tmp-<n>`` and renames it to ``<step>`` only once every file is
written (``AtomicRenameTemporaryPath``); on object stores (GCS) it writes a
``commit_success.txt`` marker last (``CommitFileTemporaryPath``). Steps that are still
temporary are never listed by ``latest_step`` / ``all_steps``, so a run killed while
saving resumes from the previous complete checkpoint (``tests/test_train.py``
checks this). Saves are synchronous here: a save returns once the step is committed, so
the donated state buffers may be reused right after.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def abstract_like(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct``s (with shardings) describing ``tree``."""

    def describe(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(describe, tree)


class Checkpointer:
    """Keep-last-N Orbax checkpoints of ``(state, meta)`` in ``directory``."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, *, read_only: bool = False):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=False,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> bool:
        """Write ``step`` (a no-op returning False if that step is already saved)."""
        if step in self._manager.all_steps():
            return False
        saved = self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))
            ),
            force=True,
        )
        self._manager.wait_until_finished()
        return bool(saved)

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore ``step`` (default: the latest) into the structure and shardings of ``like``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_like(like)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, dict(restored.meta)

    def restore_raw(self, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore ``step`` (default: the latest) as saved, without a target structure: the
        state as nested dicts of arrays (``{"params": ..., "batch_stats": ..., ...}``, each
        variable under a ``value`` key), and the metadata."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
        )
        return dict(restored.state), dict(restored.meta)

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(
            int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )
        return dict(restored.meta)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

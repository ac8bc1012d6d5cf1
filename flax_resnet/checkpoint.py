"""Orbax checkpoints of a training run: the train state plus JSON metadata per step.

``Checkpointer(directory, keep=3)`` wraps ``orbax.checkpoint.CheckpointManager``:

* ``save(step, state, meta)`` writes ``directory/<step>/{state,meta}``; ``meta`` is a JSON
  dict (epoch, position in the epoch, partial-epoch metrics, ...).
* ``restore(like, step=None)`` restores the latest (or given) step into the structure,
  dtypes and shardings of ``like`` (a ``TrainState`` or its ``jax.ShapeDtypeStruct``s).
* Only the last ``keep`` steps are kept, and only once the new one is verified.

Verification: ``save`` refuses a state with a non-finite float (``NonFiniteStateError``)
and stores a SHA-256 of every array in the metadata (``meta["checksums"]``); after writing it
reads the step back and checks it, and only then lets older steps go. ``restore`` checks the
restored arrays against the stored checksums (``DamagedCheckpointError`` names the step and
the array), and ``restore_good`` walks back from the latest step to the newest one that
restores and verifies, reporting each damaged step it passed.

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

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKSUMS = "checksums"


class DamagedCheckpointError(Exception):
    """A checkpoint step that cannot be read or does not match its checksums."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint of step {step} is damaged: {reason}")
        self.step = step


class NonFiniteStateError(ValueError):
    """A state holding NaN or infinity, which is never written."""


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaves(state: Any) -> list[tuple[str, np.ndarray]]:
    """``(path, array)`` of every leaf; the path (``params/conv1/kernel/value``) is the same
    for a typed ``TrainState`` and the nested dicts of a raw restore."""
    flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(state))
    return [("/".join(_key_name(k) for k in path), np.asarray(leaf)) for path, leaf in flat]


def state_checksums(state: Any) -> dict[str, str]:
    """SHA-256 of each array of ``state`` (its dtype, shape and bytes), by tree path."""
    out = {}
    for name, a in _leaves(state):
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
        out[name] = h.hexdigest()
    return out


def non_finite_leaves(state: Any) -> list[str]:
    """The paths of the float arrays of ``state`` holding NaN or infinity."""
    return [name for name, a in _leaves(state)
            if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all()]


def abstract_like(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct``s (with shardings) describing ``tree``."""

    def describe(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(describe, tree)


def _verify(step: int, state: Any, meta: dict[str, Any]) -> None:
    """Check ``state`` against the checksums ``meta`` stored (and take them out of it)."""
    expected = meta.pop(CHECKSUMS, None)
    if expected is None:
        raise DamagedCheckpointError(step, "its metadata holds no checksums")
    actual = state_checksums(state)
    wrong = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
    if wrong:
        raise DamagedCheckpointError(
            step, f"{len(wrong)} arrays differ from their checksums (e.g. {wrong[0]})")


class _quiet_orbax:
    """Orbax logs (and tensorstore's event loop prints) the failure of a damaged read on top
    of raising it; the caller reports it once, in its own words."""

    def __enter__(self) -> None:
        self.loggers = [logging.getLogger(n) for n in ("absl", "asyncio", "orbax")]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.CRITICAL)

    def __exit__(self, *exc: Any) -> None:
        for lg, level in zip(self.loggers, self.levels, strict=True):
            lg.setLevel(level)


class Checkpointer:
    """Keep-last-N Orbax checkpoints of ``(state, meta)`` in ``directory``."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, *, read_only: bool = False):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep = keep
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # rotation is ours: only after the new step is verified
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
        """Write ``step`` (a no-op returning False if that step is already saved), read it
        back and verify it, then drop the steps beyond ``keep``.

        Raises ``NonFiniteStateError`` (nothing written) for a non-finite state, and
        ``DamagedCheckpointError`` (the written step removed, the older ones kept) if the
        step does not read back as written.
        """
        if step in self._manager.all_steps():
            return False
        bad = non_finite_leaves(state)
        if bad:
            raise NonFiniteStateError(
                f"the state of step {step} holds NaN or infinity (in {len(bad)} arrays, e.g. "
                f"{bad[0]}); it was not saved"
            )
        checksums = state_checksums(state)
        saved = self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave({**meta, CHECKSUMS: checksums}),
            ),
            force=True,
        )
        self._manager.wait_until_finished()
        try:
            self.restore(state, step)
        except DamagedCheckpointError:
            self._delete(step)
            raise
        self._rotate()
        return bool(saved)

    def _rotate(self) -> None:
        for old in sorted(self.all_steps())[: -self.keep]:
            self._delete(old)

    def _delete(self, step: int) -> None:
        try:
            self._manager.delete(int(step))
        except Exception:  # noqa: BLE001 - a damaged step Orbax cannot delete: remove it
            shutil.rmtree(os.path.join(self.directory, str(step)), ignore_errors=True)
        self._manager.reload()

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore ``step`` (default: the latest) into the structure and shardings of
        ``like``, verified against its checksums (``DamagedCheckpointError`` otherwise)."""
        return self._read_verified(step, ocp.args.StandardRestore(abstract_like(like)))

    def _read_verified(self, step: int | None, state_args: Any) -> tuple[Any, dict[str, Any]]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        try:
            with _quiet_orbax():
                restored = self._manager.restore(int(step), args=ocp.args.Composite(
                    state=state_args, meta=ocp.args.JsonRestore()))
            state, meta = restored.state, dict(restored.meta)
        except Exception as e:  # noqa: BLE001 - any failure to read means a damaged step
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise DamagedCheckpointError(step, f"{type(e).__name__}: {first}") from None
        _verify(step, state, meta)
        return state, meta

    def restore_good(
        self, like: Any, report: Callable[[str], None] = print, set_aside: bool = False
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """The newest step that restores and verifies, as ``(step, state, meta)``; each
        damaged step passed on the way is ``report``-ed, and with ``set_aside`` renamed to
        ``<step>.damaged`` (kept for inspection, no longer a checkpoint: the run that resumes
        writes that step anew). None when there is no step at all; ``DamagedCheckpointError``
        (of the oldest) when every step is damaged."""
        steps = sorted(self.all_steps(), reverse=True)
        damaged: DamagedCheckpointError | None = None
        for i, step in enumerate(steps):
            try:
                state, meta = self.restore(like, step)
            except DamagedCheckpointError as e:
                damaged = e
                older = steps[i + 1] if i + 1 < len(steps) else None
                note = ""
                if set_aside:
                    path = os.path.join(self.directory, str(step))
                    aside = f"{path}.damaged"
                    shutil.rmtree(aside, ignore_errors=True)
                    os.replace(path, aside)
                    self._manager.reload()
                    note = f" (moved to {aside})"
                report(f"{e}{note}; " + (f"falling back to step {older}" if older is not None
                                         else "no older checkpoint is left"))
                continue
            return step, state, meta
        if damaged is not None:
            raise damaged
        return None

    def restore_raw(self, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore ``step`` (default: the latest) as saved, without a target structure, and
        verified: the state as nested dicts of arrays (``{"params": ..., "batch_stats": ...,
        ...}``, each variable under a ``value`` key), and the metadata."""
        state, meta = self._read_verified(step, ocp.args.StandardRestore())
        return dict(state), meta

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

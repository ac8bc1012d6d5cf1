"""Orbax checkpoints of a training run: the train state plus JSON metadata per step.

``Checkpointer(directory, keep=3)`` wraps ``orbax.checkpoint.CheckpointManager``:

* ``save(step, state, meta)`` writes ``directory/<step>/{state,meta}``; ``meta`` is a JSON
  dict (epoch, position in the epoch, partial-epoch metrics, ...), to which ``save`` adds
  the versions of the libraries that wrote the step (``meta["versions"]``).
* ``restore(like, step=None)`` restores the latest (or given) step into the structure,
  dtypes and shardings of ``like`` (a ``TrainState`` or its ``jax.ShapeDtypeStruct``s).
* ``restore_raw(step=None)`` restores a step as saved: nested dicts of numpy arrays.
* Only the last ``keep`` steps are kept, and only once the new one is verified.

Verification: ``save`` refuses a state with a non-finite float (``NonFiniteStateError``)
and stores a SHA-256 of every array in the metadata (``meta["checksums"]``); after writing it
reads the step back and checks it, and only then lets older steps go.

Damaged or incompatible: every read first reads the step as saved, into host memory and
without a target structure (so nothing is cast or reshaped), and checks it against its
checksums.

* A step that cannot be read or does not match its checksums is *damaged*
  (``DamagedCheckpointError``). ``restore_good`` walks back from the latest step to the
  newest good one, reporting each damaged step it passed and, when asked, setting it aside
  as ``<step>.damaged`` (kept for inspection, no longer a checkpoint).
* A step that reads and verifies but whose array paths, shapes or dtypes differ from
  ``like`` (an optimizer that gained a state, another architecture or dtype) is
  *incompatible* (``IncompatibleCheckpointError``). It is intact, so it is never renamed,
  skipped or replaced: the error names the differences, the versions that wrote the step
  and the ones running now, and the two ways on (those versions, or a new run initialised
  from its weights, which ``restore_raw`` still reads).
* A directory whose steps are all damaged, or which holds set-aside steps and no step at
  all, raises ``NoGoodCheckpointError`` instead of looking empty: a run never starts over
  by itself.

Each is a ``CheckpointError`` whose message is complete for the user. Only a compatible,
verified state is placed on ``like``'s shardings, from the arrays already read: a step's
arrays are read once.

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

import functools
import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import metadata as ocp_metadata

CHECKSUMS = "checksums"
VERSIONS = "versions"
# Pillow decodes and resizes streamed images: bit-exact resume holds within one build.
VERSIONED_PACKAGES = ("flax_resnet", "jax", "flax", "optax", "orbax-checkpoint", "pillow")
SET_ASIDE_SUFFIX = ".damaged"
SHOWN_PER_KIND = 3  # differing paths shown per kind
_KIND_LABELS = {"missing": "missing", "unexpected": "unexpected",
                "shape": "of another shape", "dtype": "of another dtype"}


@functools.cache
def library_versions() -> dict[str, str]:
    """The installed version of each of ``VERSIONED_PACKAGES`` ("unknown" if missing)."""
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def _versions_text(versions: dict[str, str]) -> str:
    return ", ".join(f"{name} {version}" for name, version in versions.items())


class CheckpointError(Exception):
    """A checkpoint a run cannot go on from; ``str()`` is the whole message for the user."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint step that cannot be read or does not match its checksums."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint of step {step} is damaged: {reason}")
        self.step = step
        self.reason = reason


class IncompatibleCheckpointError(CheckpointError):
    """An intact step whose array paths, shapes or dtypes differ from the program's state.

    ``differences`` maps a kind ("missing", "unexpected", "shape", "dtype") to lines
    ``path: expected ..., found ...``; ``written_by`` is the versions the step recorded
    (None before steps recorded them), ``running`` the ones running now.
    """

    def __init__(self, step: int, directory: str, differences: dict[str, list[str]],
                 written_by: dict[str, str] | None):
        self.step = step
        self.directory = directory
        self.differences = differences
        self.written_by = written_by
        self.running = library_versions()
        super().__init__(self._message())

    def _message(self) -> str:
        counts = ", ".join(f"{len(lines)} {_KIND_LABELS[kind]}"
                           for kind, lines in self.differences.items())
        lines = [f"the checkpoint of step {self.step} in {self.directory} does not fit this "
                 f"program's train state ({counts}); it is intact and was left as it is. "
                 "Expected by this program vs found in the checkpoint:"]
        for kind, found in self.differences.items():
            lines += [f"  {line}" for line in found[:SHOWN_PER_KIND]]
            if len(found) > SHOWN_PER_KIND:
                lines.append(f"  ... and {len(found) - SHOWN_PER_KIND} more "
                             f"{_KIND_LABELS[kind]}")
        running = _versions_text(self.running)
        if self.written_by is None:
            lines.append("The versions that wrote it were not recorded (it predates version "
                         f"records); this program runs {running}.")
            resume = "the versions that wrote it"
        elif self.written_by == self.running:
            lines.append(f"It was written by the versions running now ({running}), so the "
                         "program's code or settings differ from the ones that wrote it.")
            resume = "the code and settings that wrote it"
        else:
            lines.append(f"It was written by {_versions_text(self.written_by)}; this program "
                         f"runs {running}.")
            resume = "those versions"
        workdir = os.path.dirname(self.directory)
        lines.append(f"Two ways on: resume the run with {resume}, or start a new run in "
                     f"another workdir from its weights with --init-from {workdir} (init_from "
                     "in a config), which reads only its parameters and batch statistics.")
        return "\n".join(lines)


class NoGoodCheckpointError(CheckpointError):
    """No step to resume from, although the directory is not empty: every step is damaged,
    or only steps set aside as damaged are left."""

    def __init__(self, directory: str, damaged: list[DamagedCheckpointError],
                 set_aside: list[str]):
        self.directory = directory
        self.damaged = damaged
        self.set_aside = set_aside
        if damaged:
            reasons = "; ".join(f"step {e.step}: {e.reason}" for e in damaged)
            facts = f"every checkpoint in {directory} is damaged ({reasons})"
        else:
            facts = f"{directory} holds no checkpoint to resume from"
        if set_aside:
            facts += f"; steps set aside as damaged: {', '.join(set_aside)}"
        super().__init__(
            f"{facts}. A run does not start over by itself: to train from scratch, move or "
            f"delete {directory} (or use another workdir); to resume, put an intact copy of a "
            f"step back into {directory}.")


class NonFiniteStateError(ValueError):
    """A state holding NaN or infinity, which is never written."""


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_name(path: tuple[Any, ...]) -> str:
    """``params/conv1/kernel/value``: the same for a typed ``TrainState`` (attributes,
    namedtuple fields, tuple indices) and the nested dicts and lists of a raw restore."""
    return "/".join(_key_name(k) for k in path)


def _leaves(state: Any) -> list[tuple[str, np.ndarray]]:
    """``(path, array)`` of every leaf of a state of arrays."""
    flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(state))
    return [(_path_name(path), np.asarray(leaf)) for path, leaf in flat]


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
        leaf = np.asarray(leaf)
    return tuple(leaf.shape), np.dtype(leaf.dtype)


def _spec(shape_dtype: tuple[tuple[int, ...], np.dtype]) -> str:
    shape, dtype = shape_dtype
    return f"{dtype.name}[{','.join(map(str, shape))}]"


def state_differences(
    expected: dict[str, tuple[tuple[int, ...], np.dtype]],
    found: dict[str, tuple[tuple[int, ...], np.dtype]],
) -> dict[str, list[str]]:
    """How ``found`` (path -> shape and dtype) differs from ``expected``, by kind
    ("missing", "unexpected", "shape", "dtype"; only the kinds that occur), in
    ``expected``'s order, then ``found``'s."""
    kinds: dict[str, list[str]] = {kind: [] for kind in _KIND_LABELS}
    for path, want in expected.items():
        have = found.get(path)
        if have is None:
            kinds["missing"].append(f"{path}: expected {_spec(want)}, not in the checkpoint")
        elif have != want:
            kind = "shape" if have[0] != want[0] else "dtype"
            kinds[kind].append(f"{path}: expected {_spec(want)}, found {_spec(have)}")
    kinds["unexpected"] = [f"{path}: found {_spec(have)}, not expected"
                           for path, have in found.items() if path not in expected]
    return {kind: lines for kind, lines in kinds.items() if lines}


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


def _host_device() -> jax.Device:
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        return jax.local_devices()[0]


def _host_target(leaf: Any, device: jax.Device) -> Any:
    """A saved array's target that makes Orbax read it whole, as saved, onto ``device``,
    whatever devices wrote it. (Orbax's numpy reads leave tensorstore callbacks that fire
    on a closed event loop after a failed read, printing "Event loop is closed".)"""
    if isinstance(leaf, ocp_metadata.ArrayMetadata):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                    sharding=jax.sharding.SingleDeviceSharding(device))
    return leaf


def _placed(array: np.ndarray, like: Any) -> Any:
    """``array`` where ``like`` lives: on its sharding (each process placing its own
    shards), on the default device for an array without one, else as numpy."""
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.make_array_from_callback(
            array.shape, sharding, lambda index: np.asarray(array[index]))
    if isinstance(like, (jax.Array, jax.ShapeDtypeStruct)):
        return jax.device_put(array)
    return array


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
        # Handlers named up front, so that a fresh process can read a step's metadata (the
        # raw read's structure) before it has restored anything.
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def set_aside_steps(self) -> list[str]:
        """The paths of the steps set aside as damaged (``<step>.damaged``), newest first."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        pattern = re.compile(rf"(\d+){re.escape(SET_ASIDE_SUFFIX)}")
        steps = sorted((int(m.group(1)) for m in map(pattern.fullmatch, names) if m),
                       reverse=True)
        return [os.path.join(self.directory, f"{step}{SET_ASIDE_SUFFIX}") for step in steps]

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
                meta=ocp.args.JsonSave(
                    {**meta, VERSIONS: library_versions(), CHECKSUMS: checksums}),
            ),
            force=True,
        )
        self._manager.wait_until_finished()
        try:
            self.restore_raw(step)  # the checksums pin every path, shape, dtype and byte
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

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return int(step)

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore ``step`` (default: the latest) into the structure and shardings of
        ``like``: ``DamagedCheckpointError`` if it does not read or verify,
        ``IncompatibleCheckpointError`` if its paths, shapes or dtypes differ from
        ``like``'s (nothing is cast)."""
        step = self._step(step)
        raw, meta = self._read_verified(step)
        found = dict(_leaves(raw))
        flat, treedef = jax.tree_util.tree_flatten_with_path(like)
        named = [(_path_name(path), leaf) for path, leaf in flat]
        differences = state_differences(
            {name: _shape_dtype(leaf) for name, leaf in named},
            {name: _shape_dtype(array) for name, array in found.items()})
        if differences:
            raise IncompatibleCheckpointError(step, self.directory, differences,
                                              meta.get(VERSIONS))
        return treedef.unflatten([_placed(found[name], leaf) for name, leaf in named]), meta

    def _read_verified(self, step: int) -> tuple[Any, dict[str, Any]]:
        """The state of ``step`` as saved (nested dicts and lists of numpy arrays) and its
        metadata, verified against its checksums."""
        try:
            with _quiet_orbax():
                saved = self._manager.item_metadata(step)["state"]
                if saved is None:
                    raise ValueError("its state has no readable metadata")
                device = _host_device()
                target = jax.tree.map(lambda leaf: _host_target(leaf, device), saved.tree)
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
            state, meta = jax.device_get(restored.state), dict(restored.meta)
        except Exception as e:  # noqa: BLE001 - any failure to read means a damaged step
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise DamagedCheckpointError(step, f"{type(e).__name__}: {first}") from None
        _verify(step, state, meta)
        return state, meta

    def restore_good(
        self, like: Any, report: Callable[[str], None] = print, set_aside: bool = False
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """The newest step that restores and verifies, as ``(step, state, meta)``.

        Each damaged step passed on the way is ``report``-ed, and with ``set_aside`` renamed
        to ``<step>.damaged`` (kept for inspection, no longer a checkpoint: the run that
        resumes writes that step anew). An incompatible step stops the walk as it is
        (``IncompatibleCheckpointError``). ``NoGoodCheckpointError`` when every step is
        damaged, or when there is no step but set-aside ones; None only when there is
        nothing at all.
        """
        steps = sorted(self.all_steps(), reverse=True)
        damaged: list[DamagedCheckpointError] = []
        for i, step in enumerate(steps):
            try:
                state, meta = self.restore(like, step)
            except DamagedCheckpointError as e:
                damaged.append(e)
                older = steps[i + 1] if i + 1 < len(steps) else None
                note = f" (moved to {self._set_aside(step)})" if set_aside else ""
                report(f"{e}{note}; " + (f"falling back to step {older}" if older is not None
                                         else "no older checkpoint is left"))
                continue
            return step, state, meta
        aside = self.set_aside_steps()
        if damaged or aside:
            raise NoGoodCheckpointError(self.directory, damaged, aside)
        return None

    def _set_aside(self, step: int) -> str:
        path = os.path.join(self.directory, str(step))
        aside = f"{path}{SET_ASIDE_SUFFIX}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
        self._manager.reload()
        return aside

    def restore_raw(self, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore ``step`` (default: the latest) as saved, without a target structure, and
        verified: the state as nested dicts of numpy arrays (``{"params": ...,
        "batch_stats": ..., ...}``, each variable under a ``value`` key), and the metadata."""
        state, meta = self._read_verified(self._step(step))
        return dict(state), meta

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        restored = self._manager.restore(
            self._step(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )
        return dict(restored.meta)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

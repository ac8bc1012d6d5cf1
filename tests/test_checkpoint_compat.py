"""A checkpoint that does not fit the program is never mistaken for a damaged one, and a run
never starts over by itself: damaged steps are set aside and passed, incompatible ones are
named and left as they are, and a directory with nothing good left stops the run."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flax_resnet import optim
from flax_resnet.checkpoint import (
    CHECKSUMS,
    VERSIONS,
    Checkpointer,
    CheckpointError,
    DamagedCheckpointError,
    IncompatibleCheckpointError,
    NoGoodCheckpointError,
    abstract_like,
    library_versions,
    state_checksums,
)
from flax_resnet.models import create_resnet
from flax_resnet.training import TrainState
from tests.test_reliability import DAMAGE, _flip_bytes, _main, _train_here
from tests.test_train import REPO, _env


def _decay_mask(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


ADAMW = optax.adamw(1e-3, weight_decay=1e-4, mask=_decay_mask)  # a MaskedState inside
SGD = optax.chain(optax.add_decayed_weights(1e-4, _decay_mask), optax.sgd(0.1, momentum=0.9))


def _one_more_leaf(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` and one more stateful transform: what an optax or flax_resnet upgrade does to
    the optimizer state of an existing run (the updates stay the same)."""
    return optax.chain(tx, optax.scale_by_schedule(lambda count: 1.0))


def _state(tx: optax.GradientTransformation, num_classes: int = 3,
           param_dtype=jnp.float32) -> TrainState:
    """The project's TrainState of a tiny ResNet (the fields ``training.new_state`` fills)."""
    model = create_resnet(20, width=0.25, num_classes=num_classes, param_dtype=param_dtype,
                          rngs=nnx.Rngs(0))
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), rng=jax.random.PRNGKey(0))


def _files(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` by relative path, with a hash of its bytes."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _save(directory: Path, state: TrainState, steps=(1,)) -> Checkpointer:
    ckpt = Checkpointer(directory, keep=len(steps))
    for step in steps:
        ckpt.save(step, state, {"global_step": step})
    return ckpt


def _assert_identical(restored, like) -> None:
    assert jax.tree.structure(restored) == jax.tree.structure(like)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(like), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# --------------------------------------------------------------------------- compatible


@pytest.mark.parametrize("tx", [ADAMW, SGD, optax.sgd(0.1)], ids=["adamw", "sgd", "plain sgd"])
def test_a_compatible_step_restores_bit_exact_in_the_like_structure(tx, tmp_path):
    """optax's namedtuple and empty states (EmptyState, MaskedState) restore raw as lists,
    dicts and None; the typed state still comes back as saved, on ``like``'s shardings."""
    state = _state(tx)
    state = state.replace(step=jnp.ones((), jnp.int32))
    ckpt = _save(tmp_path / "c", state)
    device = jax.devices()[0]
    for like in (state, abstract_like(state)):
        _, restored, meta = ckpt.restore_good(like, report=pytest.fail)
        _assert_identical(restored, state)
        assert meta["global_step"] == 1 and CHECKSUMS not in meta
        assert all(leaf.sharding.device_set == {device} for leaf in jax.tree.leaves(restored))
    ckpt.close()


def test_the_versions_that_wrote_a_step_are_recorded(tmp_path):
    ckpt = _save(tmp_path / "c", _state(SGD))
    versions = ckpt.restore_meta(1)[VERSIONS]
    assert list(versions) == ["flax_resnet", "jax", "flax", "optax", "orbax-checkpoint", "pillow"]
    assert versions == library_versions()
    assert versions["jax"] == jax.__version__ and versions["optax"] == optax.__version__
    assert ckpt.restore_raw(1)[1][VERSIONS] == versions
    ckpt.close()


_WRITE_ON_ALL_DEVICES = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from flax_resnet.checkpoint import Checkpointer

    n = jax.device_count()
    mesh = Mesh(np.array(jax.devices()), ("x",))
    rows = np.arange(4 * n, dtype=np.float32).reshape(n, 4)
    state = {"rows": jax.device_put(rows, NamedSharding(mesh, P("x"))),
             "step": jax.device_put(np.int32(5), NamedSharding(mesh, P()))}
    with Checkpointer(sys.argv[1]) as ckpt:
        ckpt.save(5, state, {})
""")


def test_a_step_written_on_other_devices_reads_raw_and_typed(tmp_path, jax_cache):
    """One more device than this process has: the raw read (and --init-from) does not depend
    on the topology that wrote the step."""
    devices = jax.device_count() + 1
    subprocess.run([sys.executable, "-c", _WRITE_ON_ALL_DEVICES, str(tmp_path / "c")], cwd=REPO,
                   env=_env(jax_cache, devices=devices), check=True, timeout=300)
    rows = np.arange(4 * devices, dtype=np.float32).reshape(devices, 4)
    with Checkpointer(tmp_path / "c", read_only=True) as ckpt:
        raw, _ = ckpt.restore_raw(5)
        np.testing.assert_array_equal(raw["rows"], rows)
        like = {"rows": jnp.zeros((devices, 4), jnp.float32), "step": jnp.zeros((), jnp.int32)}
        state, _ = ckpt.restore(like, 5)
    np.testing.assert_array_equal(np.asarray(state["rows"]), rows)
    assert int(state["step"]) == 5 and state["rows"].sharding == like["rows"].sharding


# --------------------------------------------------------------------------- incompatible


def _incompatible(ckpt: Checkpointer, like, directory: Path) -> IncompatibleCheckpointError:
    """restore_good's error for ``like``, after which ``directory`` is exactly as it was."""
    before = _files(directory)
    steps = ckpt.all_steps()
    with pytest.raises(IncompatibleCheckpointError) as caught:
        ckpt.restore_good(like, report=pytest.fail, set_aside=True)
    assert _files(directory) == before  # same files, same bytes, nothing renamed
    assert ckpt.all_steps() == steps and not ckpt.set_aside_steps()
    assert isinstance(caught.value, CheckpointError)
    return caught.value


def test_an_optimizer_that_gained_a_state_leaf_is_incompatible_not_damaged(tmp_path):
    directory = tmp_path / "run" / "checkpoints"
    ckpt = _save(directory, _state(ADAMW), steps=(8, 16))
    like = _state(_one_more_leaf(ADAMW))
    for target in (like, abstract_like(like)):
        error = _incompatible(ckpt, target, directory)
        message = str(error)
        assert error.step == 16 and f"checkpoint of step 16 in {directory}" in message
        # the adam moments moved one level down, and the new transform's count is new
        assert "opt_state/0/0/count: expected int32[], not in the checkpoint" in message
        assert "opt_state/0/count: found int32[], not expected" in message
        assert "... and " in message and "more missing" in message
        assert f"written by the versions running now ({_versions(library_versions())})" \
            in message
        assert f"--init-from {tmp_path / 'run'}" in message
        assert set(error.differences) == {"missing", "unexpected"}
        assert "opt_state/1/count: expected int32[], not in the checkpoint" in \
            error.differences["missing"]  # the new leaf, past the ones shown
    # the weights of the intact step stay readable (what --init-from reads)
    raw, meta = ckpt.restore_raw(16)
    np.testing.assert_array_equal(raw["params"]["fc"]["kernel"]["value"],
                                  np.asarray(like.params["fc"]["kernel"][...]))
    ckpt.close()


def _versions(versions: dict[str, str]) -> str:
    return ", ".join(f"{name} {version}" for name, version in versions.items())


def test_a_parameter_whose_shape_changed_is_incompatible(tmp_path):
    directory = tmp_path / "run" / "checkpoints"
    ckpt = _save(directory, _state(SGD, num_classes=3))
    like = _state(SGD, num_classes=5)
    error = _incompatible(ckpt, like, directory)
    features = like.params["fc"]["kernel"][...].shape[0]
    assert f"params/fc/kernel/value: expected float32[{features},5], found " \
        f"float32[{features},3]" in str(error)
    assert "params/fc/bias/value: expected float32[5], found float32[3]" in str(error)
    assert set(error.differences) == {"shape"}  # the momentum of fc too
    assert len(error.differences["shape"]) == 4
    ckpt.close()


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_a_dtype_change_is_incompatible_and_nothing_is_cast(dtype, tmp_path):
    directory = tmp_path / "run" / "checkpoints"
    ckpt = _save(directory, _state(SGD))
    with jax.enable_x64(dtype == "float64"):
        like = _state(SGD, param_dtype=jnp.dtype(dtype))
        error = _incompatible(ckpt, like, directory)
    assert set(error.differences) == {"dtype"}
    assert f"params/fc/bias/value: expected {dtype}[3], found float32[3]" in \
        error.differences["dtype"]
    assert re.search(rf"\n  params/\S+: expected {dtype}\[[\d,]+\], found float32\[", str(error))
    ckpt.close()


@pytest.mark.parametrize("written_by", [None, {"flax_resnet": "0.0.9", "jax": "0.8.0"}],
                         ids=["not recorded", "older versions"])
def test_the_message_names_the_versions_that_wrote_the_step(written_by, tmp_path):
    """A step written before steps recorded versions, or by other versions."""
    import orbax.checkpoint as ocp

    directory = tmp_path / "run" / "checkpoints"
    state = _state(ADAMW)
    meta = {"global_step": 4, CHECKSUMS: state_checksums(state)}
    if written_by is not None:
        meta[VERSIONS] = written_by
    ckpt = Checkpointer(directory)
    ckpt._manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta)))
    message = str(_incompatible(ckpt, _state(_one_more_leaf(ADAMW)), directory))
    running = f"this program runs {_versions(library_versions())}"
    if written_by is None:
        assert "The versions that wrote it were not recorded" in message and running in message
        assert "resume the run with the versions that wrote it" in message
    else:
        assert f"It was written by flax_resnet 0.0.9, jax 0.8.0; {running}" in message
        assert "resume the run with those versions" in message
    ckpt.close()


# --------------------------------------------------------------------------- damaged


def test_a_damaged_newest_step_falls_back_to_the_older_good_one(tmp_path):
    directory = tmp_path / "checkpoints"
    state = _state(SGD)
    ckpt = _save(directory, state, steps=(8, 16))
    _flip_bytes(directory / "16")
    reports: list[str] = []
    step, restored, _ = ckpt.restore_good(state, report=reports.append, set_aside=True)
    assert step == 8
    _assert_identical(restored, state)
    assert len(reports) == 1 and "checkpoint of step 16 is damaged" in reports[0]
    assert f"moved to {directory / '16.damaged'}" in reports[0]
    assert "falling back to step 8" in reports[0]
    assert ckpt.all_steps() == [8] and ckpt.set_aside_steps() == [str(directory / "16.damaged")]
    assert ckpt.restore_good(state, report=pytest.fail)[0] == 8  # the leftover is no bar
    ckpt.close()


def test_every_step_damaged_then_the_rerun_with_only_set_aside_steps(tmp_path):
    directory = tmp_path / "checkpoints"
    state = _state(SGD)
    ckpt = _save(directory, state, steps=(8, 16))
    DAMAGE["8 flipped bytes"](directory / "16")
    DAMAGE["no state/"](directory / "8")
    reports: list[str] = []
    with pytest.raises(NoGoodCheckpointError) as caught:
        ckpt.restore_good(state, report=reports.append, set_aside=True)
    aside = [str(directory / "16.damaged"), str(directory / "8.damaged")]
    message = str(caught.value)
    assert f"every checkpoint in {directory} is damaged (step 16: " in message
    assert "; step 8: " in message and f"steps set aside as damaged: {', '.join(aside)}" in message
    assert f"to train from scratch, move or delete {directory} (or use another workdir)" \
        in message
    assert "no older checkpoint is left" in reports[-1] and len(reports) == 2
    assert [e.step for e in caught.value.damaged] == [16, 8]
    assert ckpt.all_steps() == [] and ckpt.set_aside_steps() == aside

    ckpt.close()
    ckpt = Checkpointer(directory)  # the rerun: nothing left but the set-aside steps
    with pytest.raises(NoGoodCheckpointError) as caught:
        ckpt.restore_good(state, report=pytest.fail, set_aside=True)
    message = str(caught.value)
    assert message.startswith(f"{directory} holds no checkpoint to resume from; steps set "
                              f"aside as damaged: {', '.join(aside)}. A run does not start over")
    assert isinstance(caught.value, CheckpointError)
    assert sorted(p.name for p in directory.iterdir()) == ["16.damaged", "8.damaged"]
    ckpt.close()


def test_every_step_damaged_without_setting_aside_leaves_them(tmp_path):
    directory = tmp_path / "checkpoints"
    state = _state(SGD)
    ckpt = _save(directory, state, steps=(8,))
    _flip_bytes(directory / "8")
    with pytest.raises(NoGoodCheckpointError, match=r"is damaged \(step 8: 1 arrays differ"):
        ckpt.restore_good(state, report=lambda _: None)
    assert ckpt.all_steps() == [8] and not ckpt.set_aside_steps()
    with pytest.raises(DamagedCheckpointError, match="checkpoint of step 8 is damaged"):
        ckpt.restore(state, 8)
    ckpt.close()


def test_an_empty_directory_is_nothing_to_resume(tmp_path):
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.restore_good(_state(SGD), report=pytest.fail) is None


# --------------------------------------------------------------------------- end to end


RUN = ["--dataset", "synthetic:256:64", "--depth", "18", "--width", "0.125", "--batch-size",
       "32", "--no-progress"]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, jax_cache) -> Path:
    """RUN for 2 epochs: checkpoints of steps 8 and 16."""
    workdir = tmp_path_factory.mktemp("compat") / "run"
    _train_here([*RUN, "--epochs", "2", "--workdir", str(workdir)], jax_cache)
    return workdir


def test_train_py_stops_on_an_incompatible_checkpoint_and_resumes_once_compatible(
        two_epochs, tmp_path, jax_cache, capsys, monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(two_epochs, workdir)
    checkpoints = workdir / "checkpoints"
    before = _files(checkpoints)
    original = optim.make_optimizer
    monkeypatch.setattr(optim, "make_optimizer",
                        lambda *args, **kwargs: _one_more_leaf(original(*args, **kwargs)))
    assert _main([*RUN, "--epochs", "3", "--workdir", str(workdir)], jax_cache) == 2
    out, err = capsys.readouterr()
    assert f"the checkpoint of step 16 in {checkpoints} does not fit" in err
    assert f"--init-from {workdir}" in err and "Traceback" not in out + err
    assert "damaged" not in out + err
    assert _files(checkpoints) == before  # steps 8 and 16, untouched

    # the other way on: a new run of the changed program from the run's weights
    other = tmp_path / "other"
    out = _train_here([*RUN, "--epochs", "1", "--init-from", str(workdir), "--workdir",
                       str(other)], jax_cache, capsys)
    assert re.search(rf"initialised from .*{re.escape(str(workdir))}\b", out)

    monkeypatch.undo()  # the program that wrote the run resumes it
    out = _train_here([*RUN, "--epochs", "3", "--workdir", str(workdir)], jax_cache, capsys)
    assert "resumed from step 16" in out
    assert Checkpointer(checkpoints, read_only=True).all_steps() == [8, 16, 24]


def test_train_py_never_starts_over_after_every_step_was_set_aside(
        two_epochs, tmp_path, jax_cache, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(two_epochs, workdir)
    checkpoints = workdir / "checkpoints"
    for step in (8, 16):
        _flip_bytes(checkpoints / str(step))
    args = [*RUN, "--epochs", "2", "--workdir", str(workdir)]
    assert _main(args, jax_cache) == 2
    err = capsys.readouterr().err
    assert f"every checkpoint in {checkpoints} is damaged" in err and "Traceback" not in err
    aside = f"{checkpoints / '16.damaged'}, {checkpoints / '8.damaged'}"
    assert f"steps set aside as damaged: {aside}" in err

    metrics = (workdir / "metrics.jsonl").read_bytes()
    assert _main(args, jax_cache) == 2  # the rerun, with only the set-aside steps left
    err = capsys.readouterr().err
    assert f"{checkpoints} holds no checkpoint to resume from; steps set aside as damaged: " \
        f"{aside}" in err and "Traceback" not in err
    # nothing trained: no step written, the epochs logged before kept as they were
    assert sorted(p.name for p in checkpoints.iterdir()) == ["16.damaged", "8.damaged"]
    assert (workdir / "metrics.jsonl").read_bytes() == metrics

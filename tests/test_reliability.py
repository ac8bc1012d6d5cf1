"""A run never loses work: divergence, damaged checkpoints, preemption, one run per workdir,
``--init-from`` kept across an early stop, and bad input answered with a message."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from flax_resnet import train_cli
from flax_resnet.checkpoint import Checkpointer, DamagedCheckpointError
from flax_resnet.safety import WorkdirLock
from tests.test_train import REPO, TINY, TRAIN, _env, _final_state, _train


def _main(args: list[str], jax_cache: Path) -> int:
    """train.py in this process (its messages go to capsys)."""
    return train_cli.main([*args, "--compilation-cache", str(jax_cache)])


def _train_here(args: list[str], jax_cache: Path, capsys=None) -> str:
    """train.py in this process, which must succeed; its stdout (with ``capsys``)."""
    code = _main([*args, "--no-progress"], jax_cache)
    captured = capsys.readouterr() if capsys is not None else None
    assert code == 0, captured
    return captured.out if captured is not None else ""


def _finite_checkpoints(workdir: Path) -> list[int]:
    """Every checkpoint step; each restores, verifies and holds only finite values."""
    ckpt = Checkpointer(workdir / "checkpoints", read_only=True)
    steps = sorted(ckpt.all_steps())
    for step in steps:
        state, _ = ckpt.restore_raw(step)
        for leaf in jax.tree.leaves(state):
            a = np.asarray(leaf)
            assert not np.issubdtype(a.dtype, np.floating) or np.isfinite(a).all(), step
    ckpt.close()
    return steps


@pytest.fixture(scope="module")
def finished(tmp_path_factory, jax_cache) -> Path:
    """TINY to the end: checkpoints of steps 8 and 16."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    _train_here([*TINY, "--workdir", str(workdir)], jax_cache)
    return workdir


# --------------------------------------------------------------------------- divergence


def test_a_diverging_run_stops_keeps_the_last_finite_checkpoint_and_valid_json(
        tmp_path, jax_cache, capsys):
    workdir = tmp_path / "nan"
    args = [*TINY, "--lr", "1e5", "--checkpoint-every-steps", "1", "--keep-checkpoints", "2",
            "--log-every", "1", "--workdir", str(workdir)]
    assert _main(args, jax_cache) == train_cli.EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "training diverged at step" in err and "Traceback" not in err
    steps = _finite_checkpoints(workdir)  # rotation never dropped the last finite one
    assert steps and f"the last good checkpoint, step {max(steps)}, is kept" in err
    def no_constants(constant: str) -> None:
        raise AssertionError(f"a bare {constant} in a JSON file")

    written = [p for p in workdir.rglob("*.json*") if p.is_file()]
    assert {p.name for p in written} >= {"config.json", "metrics.jsonl"}
    for path in written:  # strict JSON: no bare NaN or Infinity
        texts = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
        for text in texts:
            json.loads(text, parse_constant=no_constants)


# --------------------------------------------------------------------------- damage


def _largest_array_file(step_dir: Path) -> Path:
    return max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)


def _flip_bytes(step_dir: Path) -> None:
    path = _largest_array_file(step_dir)
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _zero_files(step_dir: Path) -> None:
    for path in step_dir.rglob("*"):
        if path.is_file():
            path.write_bytes(bytes(path.stat().st_size))


DAMAGE = {
    "truncated array file": lambda d: (p := _largest_array_file(d)).write_bytes(
        p.read_bytes()[: p.stat().st_size // 2]),
    "random array file": lambda d: (p := _largest_array_file(d)).write_bytes(
        np.random.default_rng(0).bytes(p.stat().st_size)),
    "no _METADATA": lambda d: (d / "state" / "_METADATA").unlink(),
    "empty _METADATA": lambda d: (d / "state" / "_METADATA").write_bytes(b""),
    "no state/": lambda d: shutil.rmtree(d / "state"),
    "empty step directory": lambda d: [shutil.rmtree(p) if p.is_dir() else p.unlink()
                                       for p in list(d.iterdir())],
    "zeroed files": _zero_files,
    "8 flipped bytes": _flip_bytes,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_is_detected(damage, finished, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(finished / "checkpoints", checkpoints)
    DAMAGE[damage](checkpoints / "16")
    ckpt = Checkpointer(checkpoints, read_only=True)
    with pytest.raises(DamagedCheckpointError, match="checkpoint of step 16 is damaged"):
        ckpt.restore_raw(16)
    assert ckpt.restore_raw(8)[1]["global_step"] == 8


@pytest.mark.parametrize("damage", ["truncated array file", "no state/", "8 flipped bytes"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(
        damage, finished, tmp_path, jax_cache, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    DAMAGE[damage](workdir / "checkpoints" / "16")
    assert _main(["--workdir", str(workdir), "--eval-only", "--no-progress"], jax_cache) == 0
    out, err = capsys.readouterr()
    assert "checkpoint of step 16 is damaged" in out and "falling back to step 8" in out
    assert "Traceback" not in out + err and "Event loop" not in out + err
    assert json.loads((workdir / "eval.json").read_text())["step"] == 8


def test_resuming_past_a_flipped_byte_is_bit_exact(finished, tmp_path, jax_cache, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    _flip_bytes(workdir / "checkpoints" / "16")
    out = _train_here([*TINY, "--workdir", str(workdir)], jax_cache, capsys)  # epoch 2 again
    assert "checkpoint of step 16 is damaged" in out and "resumed from step 8" in out
    jax.tree.map(np.testing.assert_array_equal, _final_state(workdir), _final_state(finished))


# --------------------------------------------------------------------------- preemption


# 64 steps per epoch, so that a signal sent during the first epoch lands inside it.
LONG_EPOCH = [*TINY, "--dataset", "synthetic:2048:64", "--epochs", "1"]


@pytest.fixture(scope="module")
def long_epoch(tmp_path_factory, jax_cache) -> Path:
    workdir = tmp_path_factory.mktemp("long") / "run"
    _train_here([*LONG_EPOCH, "--workdir", str(workdir)], jax_cache)
    return workdir


@pytest.mark.parametrize("signum,during", [(signal.SIGTERM, "steps"),
                                           (signal.SIGINT, "saves")])
def test_a_stop_signal_checkpoints_and_the_rerun_is_bit_exact(
        signum, during, long_epoch, tmp_path, jax_cache, capsys):
    # "saves": a checkpoint after every step (which does not change what is computed), so
    # that the signal most likely lands during one.
    args = list(LONG_EPOCH)
    if during == "saves":
        args += ["--checkpoint-every-steps", "1", "--keep-checkpoints", "2"]
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, TRAIN, *args, "--workdir", str(workdir)],
                            cwd=REPO, env=_env(jax_cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the steps start right after the compile
        if line.startswith("compiled the train and eval steps"):
            break
    time.sleep(0.5)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err[-3000:]
    step = int(err.split("at step ")[1].split(";")[0])
    assert f"interrupted by {signal.Signals(signum).name} at step {step}; rerun" in err
    assert 0 < step < 64 and "Traceback" not in err
    assert step in Checkpointer(workdir / "checkpoints", read_only=True).all_steps()
    out = _train_here([*LONG_EPOCH, "--workdir", str(workdir)], jax_cache, capsys)
    assert f"resumed from step {step}" in out
    jax.tree.map(np.testing.assert_array_equal, _final_state(workdir), _final_state(long_epoch))


def test_a_lost_metrics_history_is_restored_from_the_checkpoint(
        finished, tmp_path, jax_cache, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    shutil.rmtree(workdir / "checkpoints" / "16")  # resume after epoch 1 ...
    (workdir / "metrics.jsonl").unlink()  # ... whose row is gone from the file
    out = _train_here([*TINY, "--workdir", str(workdir)], jax_cache, capsys)
    assert "holds 0 of the 1 epochs the checkpoint recorded" in out
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert json.loads((workdir / "summary.json").read_text())["best_test_acc"] == max(
        row["test_acc"] for row in rows)


# --------------------------------------------------------------------------- one run per workdir


def test_a_second_run_on_a_busy_workdir_is_refused(tmp_path, jax_cache, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with WorkdirLock(workdir):  # a live run (the lock is an flock, as between processes)
        assert _main([*TINY, "--workdir", str(workdir)], jax_cache) == 2
    err = capsys.readouterr().err
    assert f"workdir {workdir} is in use by another run (pid" in err and "Traceback" not in err
    assert not (workdir / "config.json").exists()


def test_a_stale_lock_is_taken_over(tmp_path, jax_cache, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / ".lock").write_text("pid 999999 on gone-host, since 2026-01-01 00:00:00\n")
    assert _main([*TINY, "--epochs", "1", "--workdir", str(workdir)], jax_cache) == 0
    out = capsys.readouterr().out
    assert "taking over the workdir lock of a run that ended without releasing it (pid 999999" \
        in out
    assert (workdir / ".lock").read_text() == ""  # released at the end


def test_two_concurrent_runs_one_workdir(tmp_path, jax_cache):
    workdir = tmp_path / "run"
    args = [*LONG_EPOCH, "--workdir", str(workdir)]
    first = subprocess.Popen([sys.executable, TRAIN, *args], cwd=REPO, env=_env(jax_cache),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in first.stdout:
        if line.startswith("devices:"):
            break
    second = _train(args, jax_cache, check=False)
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert second.returncode == 2 and "is in use by another run (pid" in second.stderr
    assert "Traceback" not in second.stderr
    assert Checkpointer(workdir / "checkpoints", read_only=True).all_steps() == [64]


# --------------------------------------------------------------------------- --init-from


def test_init_from_is_kept_until_the_first_checkpoint(finished, tmp_path, jax_cache, capsys):
    pretrained = str(finished)  # a run directory is a model
    args = [*TINY, "--epochs", "1", "--init-from", pretrained]
    workdir = tmp_path / "run"
    _train_here([*args, "--stop-after-steps", "3", "--workdir", str(workdir)], jax_cache)
    assert json.loads((workdir / "config.json").read_text())["init_from"] == pretrained
    out = _train_here([*TINY, "--epochs", "1", "--workdir", str(workdir)], jax_cache,
                      capsys)  # the flag omitted
    assert re.search(rf"initialised from .*{re.escape(pretrained)}\b", out)
    reference = tmp_path / "reference"
    _train_here([*args, "--workdir", str(reference)], jax_cache)
    jax.tree.map(np.testing.assert_array_equal, _final_state(workdir), _final_state(reference))
    other = _main([*args[:-1], str(tmp_path / "other.pt"), "--workdir", str(workdir)],
                  jax_cache)
    assert other == 2 and "init_from" in capsys.readouterr().err


# --------------------------------------------------------------------------- bad input


def _image_folder(root: Path, classes=("a", "b"), test_classes=None) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, names in (("train", classes), ("test", test_classes or classes)):
        for c in names:
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).save(
                    root / split / c / f"{i}.png")


def _bad_folder(tmp_path: Path, how: str) -> tuple[Path, str]:
    root = tmp_path / "imgs"
    if how == "empty class folder":
        _image_folder(root)
        (root / "train" / "c").mkdir()
        return root, f"class folder {str(root / 'train' / 'c')!r} holds no"
    if how == "test has a class train lacks":
        _image_folder(root, test_classes=("a", "b", "z"))
        return root, "class 'z' in"
    _image_folder(root)
    bad = root / "train" / "a" / "bad.jpg"
    if how == "truncated jpeg":
        from PIL import Image

        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(bad)
        bad.write_bytes(bad.read_bytes()[:60])
    else:
        bad.write_bytes(np.random.default_rng(1).bytes(300))
    return root, f"{str(bad)!r} cannot be decoded"


@pytest.mark.parametrize("how", ["truncated jpeg", "random bytes", "empty class folder",
                                 "test has a class train lacks"])
def test_a_bad_image_folder_is_named(how, tmp_path, jax_cache, capsys):
    root, needle = _bad_folder(tmp_path, how)
    args = ["--dataset", f"folder:{root}", "--depth", "20", "--width", "0.25", "--batch-size",
            "4", "--epochs", "1", "--no-progress", "--workdir", str(tmp_path / "run")]
    assert _main(args, jax_cache) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


@pytest.mark.parametrize("how", ["workdir is a file", "workdir under a file",
                                 "truncated config.json"])
def test_a_bad_workdir_is_named(how, finished, tmp_path, jax_cache, capsys):
    (tmp_path / "file").write_text("")
    if how == "truncated config.json":
        workdir = tmp_path / "run"
        shutil.copytree(finished, workdir)
        text = (workdir / "config.json").read_text()
        (workdir / "config.json").write_text(text[: len(text) // 2])
        needle = f"{workdir / 'config.json'} cannot be read"
    elif how == "workdir is a file":
        workdir = tmp_path / "file"
        needle = f"--workdir {workdir} is a file"
    else:
        workdir = tmp_path / "file" / "sub"
        needle = f"--workdir {workdir} cannot be written"
    assert _main([*TINY, "--workdir", str(workdir)], jax_cache) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_a_full_disk_during_a_save_is_a_message(tmp_path, jax_cache, capsys, monkeypatch):
    import errno

    import orbax.checkpoint as ocp

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    workdir = tmp_path / "run"
    assert _main([*TINY, "--epochs", "1", "--workdir", str(workdir)], jax_cache) == 2
    err = capsys.readouterr().err
    assert "could not write the checkpoint of step 8" in err and "No space left" in err
    assert "Traceback" not in err


def test_an_unwritable_converter_destination_is_a_message(finished, tmp_path, capsys):
    from flax_resnet import convert

    (tmp_path / "file").write_text("")
    dst = tmp_path / "file" / "out.safetensors"
    assert convert.main([str(finished), str(dst)]) == 2
    err = capsys.readouterr().err
    assert str(dst) in err and "Traceback" not in err


# --------------------------------------------------------------------------- units


def test_rotation_drops_old_steps_only_after_the_new_one_reads_back(tmp_path, monkeypatch):
    state = {"w": np.arange(6, dtype=np.float32), "step": np.int32(0)}
    ckpt = Checkpointer(tmp_path / "c", keep=2)
    for step in (1, 2):
        ckpt.save(step, state, {"n": step})

    def unreadable(self, step=None):
        raise DamagedCheckpointError(step, "read back differs (planted)")

    monkeypatch.setattr(Checkpointer, "restore_raw", unreadable)
    with pytest.raises(DamagedCheckpointError, match="step 3"):
        ckpt.save(3, state, {"n": 3})
    assert ckpt.all_steps() == [1, 2]  # the unverified step is gone, the verified ones kept
    monkeypatch.undo()
    ckpt.save(3, state, {"n": 3})
    assert ckpt.all_steps() == [2, 3]
    with pytest.raises(ValueError, match="NaN or infinity"):
        ckpt.save(4, {**state, "w": np.full(6, np.nan, np.float32)}, {"n": 4})
    assert ckpt.all_steps() == [2, 3]
    ckpt.close()


def test_a_second_signal_exits_at_once(tmp_path):
    code = (
        "import os, signal, time\n"
        "from flax_resnet.safety import StopSignals\n"
        "with StopSignals() as s:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    assert s.requested == signal.SIGTERM\n"
        "    print('first: asked to stop', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "print('not reached')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == -signal.SIGTERM and "first: asked to stop" in r.stdout
    assert "not reached" not in r.stdout and "exiting now, without saving" in r.stderr

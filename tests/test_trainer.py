"""The training loop is a library function: no argparse, no train.py."""

from __future__ import annotations

import json

import pytest

from flax_resnet import trainer
from flax_resnet.config import ConfigError, make_config


@pytest.fixture(autouse=True, scope="module")
def _compile_once(jax_cache):
    """The session's persistent compilation cache: a run of a program another run here
    compiled loads it instead of compiling again."""
    import jax

    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(jax_cache))
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def _config(**overrides):
    fields = dict(dataset="synthetic:64:32", depth=20, width=0.25, batch_size=32, epochs=1)
    return make_config("study", **{**fields, **overrides})


def test_train_and_evaluate_from_python(tmp_path):
    options = trainer.RunOptions(progress=False)
    summary = trainer.train_and_evaluate(_config(), tmp_path / "run", options)
    assert summary["epochs"] == 1 and summary["global_step"] == 2
    assert 0.0 <= summary["final_test_acc"] <= 1.0
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["final_test_acc"] == summary["final_test_acc"]
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    evaluation = trainer.train_and_evaluate(
        _config(), tmp_path / "run", trainer.RunOptions(eval_only=True, progress=False))
    assert evaluation["step"] == 2 and evaluation["test_count"] == 32


def test_a_resumed_run_refuses_another_config_in_library_words(tmp_path):
    trainer.train_and_evaluate(_config(), tmp_path / "run", trainer.RunOptions(progress=False))
    with pytest.raises(trainer.RunError, match=r"depth=20 \(this command: 32\)"):
        trainer.train_and_evaluate(_config(depth=32), tmp_path / "run",
                                   trainer.RunOptions(progress=False))


@pytest.mark.parametrize("field,value", [("log_every", 0), ("keep_checkpoints", 0),
                                         ("checkpoint_every_epochs", -1)])
def test_bad_options_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^{field} {value} must be") as info:
        trainer.RunOptions(**{field: value})
    assert info.value.field == field


def _final_state(workdir):
    from flax_resnet.checkpoint import Checkpointer

    with Checkpointer(workdir / "checkpoints", read_only=True) as ckpt:
        return ckpt.restore_raw()[0]


def test_a_float64_run_started_from_python(tmp_path):
    """The float64 program end to end: params, optimizer moments, batch statistics and the
    loss accumulators all float64 (a float32 accumulator would not feed the compiled step)."""
    import jax
    import numpy as np

    with jax.enable_x64(True):
        cfg = make_config("fast", dtype="float64", dataset="synthetic:64:32", depth=20,
                          width=0.25, batch_size=32, epochs=1)
        summary = trainer.train_and_evaluate(cfg, tmp_path / "run",
                                             trainer.RunOptions(progress=False))
        state = _final_state(tmp_path / "run")
    assert summary["global_step"] == 2 and np.isfinite(summary["final_test_loss"])
    floats = [x for x in jax.tree.leaves({k: state[k] for k in ("params", "batch_stats",
                                                                 "opt_state")})
              if np.asarray(x).dtype.kind == "f"]
    assert floats and {np.asarray(x).dtype for x in floats} == {np.dtype("float64")}


def test_a_checkpoint_without_a_data_position_resumes_from_its_step(tmp_path):
    """Checkpoints written before positions were saved (``epoch`` / ``step_in_epoch`` in
    their metadata, no ``data``) resume on the batch their step implies, bit-exact."""
    import numpy as np

    from flax_resnet.checkpoint import state_checksums

    cfg = _config(epochs=2)  # 2 steps an epoch: the program of the first test here
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    trainer.train_and_evaluate(cfg, whole, trainer.RunOptions(progress=False))
    trainer.train_and_evaluate(cfg, cut, trainer.RunOptions(
        progress=False, checkpoint_every_steps=1, stop_after_steps=1))
    meta_file = cut / "checkpoints" / "1" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    assert meta.pop("data") == {"epoch": 0, "index": 32, "seed": 0}
    meta_file.write_text(json.dumps({**meta, "epoch": 0, "step_in_epoch": 1}))
    summary = trainer.train_and_evaluate(cfg, cut, trainer.RunOptions(progress=False))
    assert summary["global_step"] == 4
    assert state_checksums(_final_state(cut)) == state_checksums(_final_state(whole))
    first, second = _final_state(cut), _final_state(whole)
    assert np.array_equal(first["rng"], second["rng"])

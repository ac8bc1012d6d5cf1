"""The training loop is a library function: no argparse, no train.py."""

from __future__ import annotations

import json

import pytest

from flax_resnet import trainer
from flax_resnet.config import ConfigError, make_config


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

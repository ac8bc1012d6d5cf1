"""The one configuration: ``ModelConfig`` nested in ``TrainConfig``, and the flags made from it."""

from __future__ import annotations

import dataclasses

import pytest

from flax_resnet.config import (
    MODEL_FIELDS,
    ConfigError,
    ModelConfig,
    TrainConfig,
    make_config,
)
from flax_resnet.distributed import ProcessOptions
from flax_resnet.train_cli import _fields, build_parser, main
from flax_resnet.trainer import RunOptions


def test_train_config_nests_the_model_config():
    cfg = make_config("he", norm="group", norm_groups=4, lr=0.05)
    assert cfg.model == ModelConfig(depth=32, norm="gn", norm_groups=4, init="kaiming_normal")
    assert cfg.model.stem == "cifar" and cfg.model.shortcut == "A"  # the depth's defaults
    flat = cfg.flat()
    assert set(flat) == set(MODEL_FIELDS) | {f.name for f in dataclasses.fields(TrainConfig)
                                             if f.name != "model"}
    assert cfg.replace(depth=56, lr=0.1).model.depth == 56
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["model"]["norm_groups"] == 4


def test_flat_run_configs_of_older_runs_still_read():
    """Runs written before the model was nested stored every field at the top level."""
    old = {**make_config("fast").flat(), "lr_milestones": [0.5, 0.75], "init": "seed"}
    old.pop("num_classes"), old.pop("in_channels")
    cfg = TrainConfig.from_dict(old)
    assert cfg == make_config("fast", init="study")


@pytest.mark.parametrize("fields,field,needle", [
    ({"momentum": 1.5}, "momentum", "momentum 1.5 is not allowed"),
    ({"depth": 33}, "depth", "depth 33 is not allowed; choose from 18, 34"),
    ({"batch_size": 0}, "batch_size", "batch_size 0 is not allowed"),
    ({"nesterov": True, "optimizer": "adamw"}, "nesterov", "needs optimizer sgd"),
    ({"norm": "gn", "norm_groups": 0}, "norm_groups", "norm_groups 0 is not allowed"),
    ({"schedule": "cosine", "warmup_epochs": 9, "epochs": 9}, "warmup_epochs", "below"),
    ({"colour": "red"}, "colour", "unknown config fields ['colour']"),
])
def test_library_errors_name_the_field_in_its_own_words(fields, field, needle):
    with pytest.raises(ConfigError) as e:
        make_config(**fields)
    assert e.value.field == field and needle in str(e.value) and "--" not in str(e.value)


def test_every_field_is_a_flag_and_every_flag_a_field():
    parser = build_parser()
    dests = {a.dest for a in parser._actions} - {"help", "recipe", "workdir"}
    fields = {f.name for cls in (TrainConfig, RunOptions, ProcessOptions)
              for f, _, _ in _fields(cls, "")}
    no_flag = {"model", "num_classes", "in_channels"}  # the data set decides the last two
    every = {f.name for cls in (TrainConfig, ModelConfig, RunOptions, ProcessOptions)
             for f in dataclasses.fields(cls)} - no_flag
    assert dests == fields == every
    args = parser.parse_args(["--norm", "rms", "--no-decay-norm-bias", "--lr-milestones",
                              "0.3,0.6", "--shortcut", "a"])
    assert (args.norm, args.decay_norm_and_bias, args.lr_milestones) == ("rms", False,
                                                                         (0.3, 0.6))
    assert args.depth is None  # not given: the recipe's value holds


@pytest.mark.parametrize("argv,needle", [
    (["--momentum", "1.5"], "--momentum 1.5 is not allowed"),
    (["--norm", "gn", "--norm-groups", "7", "--depth", "20"], "--norm-groups 7 does not divide"),
    (["--nesterov", "--optimizer", "adam"], "--nesterov needs optimizer sgd"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints 0"),
    (["--process-id", "3", "--num-processes", "2"], "--process-id 3 is not allowed"),
])
def test_the_command_line_names_the_flag(argv, needle, capsys, tmp_path):
    assert main([*argv, "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err

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


@pytest.mark.parametrize("stored,found", [
    (make_config("fast").flat(), "has ['avg_down', 'bottleneck_stride', 'depth'"),
    ({**make_config("fast").to_dict(), "depth": 34}, "has ['depth'] at its top level"),
    ({"lr": 0.1, "epochs": 3}, "has no 'model' mapping"),
])
def test_flat_run_configs_are_refused_by_name(stored, found):
    """The flat form (every field at the top level) predates the first release: a run config
    read back must hold the model's fields under "model", as ``to_dict()`` writes it."""
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(stored)
    assert e.value.field == "model"
    assert found in str(e.value) and "holds the model's fields under 'model'" in str(e.value)


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
    dests = {a.dest for a in parser._actions} - {"help", "recipe", "workdir", "model"}  # presets
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


@pytest.mark.parametrize("fields, field, says", [
    ({"depth": 18, "groups": 32}, "groups", "groups 32 applies to bottleneck blocks only"),
    ({"depth": 34, "width_per_group": 4}, "width_per_group", "bottleneck blocks only"),
    ({"depth": 18, "bottleneck_stride": "1x1"}, "bottleneck_stride", "bottleneck blocks only"),
    ({"depth": 50, "bottleneck_stride": "2x2"}, "bottleneck_stride",
     "bottleneck_stride '2x2' is not allowed; choose from 3x3, 1x1"),
    ({"depth": 50, "groups": 0}, "groups", "groups 0 is not allowed"),
    ({"depth": 50, "width": 0.125, "width_per_group": 4}, "width_per_group",
     "leaves a bottleneck without channels"),
    ({"depth": 50, "stem": "deepest"}, "stem", "stem 'deepest' is not allowed; choose from "
     "imagenet, cifar, deep, deep_tiered"),
    ({"depth": 50, "stem": "deep_tiered", "stem_width": 2}, "stem_width", "stem_width 2"),
    ({"depth": 20, "avg_down": True}, "avg_down", "needs shortcut B"),
    ({"depth": 50, "avg_down": "yes"}, "avg_down", "avg_down 'yes' is not allowed"),
    ({"depth": 50, "norm": "gn", "stem": "deep_tiered", "stem_width": 20}, "norm_groups",
     "does not divide the 15 channels"),
])
def test_architecture_options_are_validated_by_name(fields, field, says):
    with pytest.raises(ConfigError, match=None) as info:
        ModelConfig(**fields)
    assert info.value.field == field and says in str(info.value), str(info.value)


def test_named_models_are_the_library_architectures():
    from flax_resnet.config import named_model

    wide = named_model("wide_resnet50_2")
    assert wide.inner_widths() == (128, 256, 512, 1024) and wide.num_classes == 1000
    d = named_model("resnet50d.ra2_in1k", num_classes=10)
    assert (d.stem, d.stem_widths(), d.avg_down, d.num_classes) == ("deep", (32, 32, 64), True, 10)
    assert named_model("resnet50t").stem_widths() == (24, 32, 64)
    with pytest.raises(ConfigError, match="model 'resnet51' is not allowed"):
        named_model("resnet51")


def test_model_flag_takes_a_named_architecture_under_explicit_flags():
    from flax_resnet.train_cli import configure

    args = build_parser().parse_args(["--model", "resnet50d", "--width", "0.125"])
    config, _, asked = configure(args)
    m = config.model
    assert (m.depth, m.stem, m.stem_width, m.avg_down, m.width) == (50, "deep", 32, True, 0.125)
    assert {"depth", "stem", "avg_down", "width"} <= asked  # a resumed run must agree
    assert main(["--model", "resnext50_32x4d", "--groups", "0"]) == 2

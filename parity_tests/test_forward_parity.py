"""End-to-end parity of flax_resnet with torch_ref: logits, running stats and gradients.

For each configuration torch_ref builds the model, randomises its norm layers (so eval mode
uses real running statistics), saves the state_dict to a ``.pt`` or ``.safetensors`` FILE,
and flax_resnet loads that file. Both get the same input; we compare eval logits, train
logits, BatchNorm running mean/var after that train-mode forward, and the gradient of a
cross-entropy loss w.r.t. every parameter (mapped to PyTorch names/layouts through
``flax_resnet.convert``). The comparison logic and the tolerances, with their justification,
live in ``harness.py``; ``scripts/parity_report.py`` prints the same numbers as a table.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from harness import (
    GRAD_RTOL,
    NORMS,
    STATS_RTOL,
    Config,
    blockwise_grads,
    build_flax,
    build_pair,
    build_torch,
    flax_step,
    make_inputs,
    matrix_configs,
    nhwc,
    rel_err,
    whole_model_grads,
)

import flax_resnet
import torch_ref
from flax_resnet import convert


def _ids(configs: list[Config]) -> list[str]:
    return [c.label for c in configs]


# ------------------------------------------------------------------------------------------
# every norm x depth x stem

MATRIX = matrix_configs()


@pytest.mark.parametrize("cfg", MATRIX, ids=_ids(MATRIX))
def test_parity_matrix(cfg, run_parity):
    run_parity(cfg).assert_ok()


# ------------------------------------------------------------------------------------------
# shortcuts, zero-init residual, input sizes, batch size 1, number of classes

SHORTCUTS = [
    Config(depth=18, norm="bn", shortcut="A"),  # default B
    Config(depth=50, norm="gn", shortcut="A"),  # bottleneck: zero-pads 8 -> 32 channels
    Config(depth=34, norm="rms", stem="cifar", shortcut="A"),
    Config(depth=20, norm="bn", shortcut="B"),  # default A
    Config(depth=56, norm="ln", shortcut="B"),
    Config(depth=110, norm="in", stem="imagenet", shortcut="B"),
]


@pytest.mark.parametrize("cfg", SHORTCUTS, ids=_ids(SHORTCUTS))
def test_parity_shortcuts(cfg, run_parity):
    run_parity(cfg).assert_ok()


@pytest.mark.parametrize("depth,shortcut", [(18, "A"), (18, "B"), (20, "A"), (20, "B")])
def test_shortcut_parameters_match(depth, shortcut):
    """Option A has no parameters; option B adds a 1x1 conv + norm where the shape changes."""
    cfg = Config(depth=depth, norm="bn", shortcut=shortcut)
    torch_keys = set(build_torch(cfg).state_dict())
    flax_keys = {k for k, _, _ in convert.model_variables(build_flax(cfg))}
    assert torch_keys == flax_keys
    has_projection = any(".shortcut." in k for k in torch_keys)
    assert has_projection == (shortcut == "B")


ZERO_INIT = [Config(depth=d, norm=n, zero_init_residual=True) for d in (18, 50, 20) for n in NORMS]


@pytest.mark.parametrize("cfg", ZERO_INIT, ids=_ids(ZERO_INIT))
def test_zero_init_residual_zeroes_the_same_scales(cfg):
    torch.manual_seed(0)
    torch_sd = torch_ref.create_resnet(cfg.depth, **cfg.factory_kwargs()).state_dict()
    flax_sd = convert.to_numpy_state_dict(build_flax(cfg))
    zero = {k for k, v in torch_sd.items() if v.ndim == 1 and not v.any()}
    zero_flax = {k for k, v in flax_sd.items() if v.ndim == 1 and not v.any()}
    zero_weights = {k for k in zero if k.endswith(".weight")}
    assert zero_weights == {k for k in zero_flax if k.endswith(".weight")}
    # exactly one zeroed scale per block: the norm closing the residual branch
    last = 4 if cfg.block == "basic" else 7
    suffix = f"residual_function.{last}.{'norm.' if cfg.norm == 'rms' else ''}weight"
    n_blocks = sum(flax_resnet.ARCHS[cfg.depth].blocks_per_stage)
    assert len(zero_weights) == n_blocks and all(k.endswith(suffix) for k in zero_weights)


@pytest.mark.parametrize("cfg", ZERO_INIT[::2], ids=_ids(ZERO_INIT[::2]))
def test_parity_zero_init_residual(cfg, run_parity):
    run_parity(cfg).assert_ok()


INPUT_SIZES = [
    Config(depth=20, norm="bn", hw=(33, 47)),  # the CIFAR nets at odd, non-square 33x47
    Config(depth=32, norm="gn", hw=(32, 32)),  # ... and at their native 32x32
    Config(depth=18, norm="rms", stem="imagenet", hw=(32, 32)),  # 1x1 maps in the last stage
]


@pytest.mark.parametrize("cfg", INPUT_SIZES, ids=_ids(INPUT_SIZES))
def test_parity_input_sizes(cfg, run_parity):
    run_parity(cfg).assert_ok()


BATCH_ONE = [Config(depth=20, norm=n, batch=1) for n in NORMS]


@pytest.mark.parametrize("cfg", BATCH_ONE, ids=_ids(BATCH_ONE))
def test_parity_batch_size_one(cfg, run_parity):
    """Batch size 1 in train mode: fine for every norm, and for BatchNorm too as long as the
    maps have more than one value (the 9x12 input ends at 3x3)."""
    run_parity(cfg).assert_ok()


@pytest.mark.parametrize("depth,hw", [(18, (32, 32)), (20, (1, 1))], ids=["18-32x32", "20-1x1"])
def test_batchnorm_batch_one_with_1x1_maps_raises_in_train_mode(depth, hw, tmp_path):
    """One value per channel somewhere in the net: PyTorch raises ValueError in train mode,
    and so must Flax; eval mode works in both and agrees."""
    cfg = Config(depth=depth, norm="bn", batch=1, hw=hw)
    torch_model, flax_model, _ = build_pair(cfg, tmp_path)
    x, _ = make_inputs(cfg)
    torch_model.train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        torch_model(torch.from_numpy(x))
    flax_model.train()
    with pytest.raises(ValueError, match="1 value per channel"):
        flax_model(nhwc(x))
    torch_model.eval()
    flax_model.eval()
    with torch.no_grad():
        y_torch = torch_model(torch.from_numpy(x)).numpy()
    assert rel_err(np.asarray(flax_model(nhwc(x))), y_torch) <= 1e-4


CLASSES = [
    Config(depth=20, norm="bn", num_classes=1),
    Config(depth=20, norm="gn", num_classes=7),
    Config(depth=18, norm="rms", num_classes=100),
    Config(depth=50, norm="bn", num_classes=1000),
]


@pytest.mark.parametrize("cfg", CLASSES, ids=_ids(CLASSES))
def test_parity_num_classes(cfg, run_parity):
    result = run_parity(cfg)
    result.assert_ok()
    if cfg.num_classes == 1:  # softmax over one class: the loss is constant, grads are 0
        assert result.worst_grad == 0.0


def test_in_channels_other_than_three():
    cfg = Config(depth=20, norm="bn")
    torch.manual_seed(0)
    torch_model = torch_ref.create_resnet(20, width=0.5, in_channels=1)
    flax_model = flax_resnet.create_resnet(20, width=0.5, in_channels=1, rngs=nnx.Rngs(0))
    convert.load_torch_state_dict(flax_model, torch_model.state_dict())
    x = make_inputs(cfg)[0][:, :1]
    torch_model.eval()
    flax_model.eval()
    with torch.no_grad():
        y_torch = torch_model(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    assert rel_err(np.asarray(flax_model(nhwc(x))), y_torch) <= 1e-4
    with pytest.raises(ValueError, match=r"1 channels.*\(2, 9, 12, 3\)"):
        flax_model(jnp.zeros((2, 9, 12, 3)))


# ------------------------------------------------------------------------------------------
# the harness itself


@pytest.mark.parametrize("cfg", [Config(depth=20, norm="bn", shortcut="B")], ids=lambda c: c.label)
def test_blockwise_gradients_equal_whole_model_autodiff(cfg, tmp_path):
    """The harness differentiates block by block (jitted); ``nnx.value_and_grad`` of the whole
    model must give the same train logits and running stats (same eager ops: bit-exact) and
    the same gradients (jitted vs eager XLA: rounding only, so the parity tolerance)."""
    _, model, path = build_pair(cfg, tmp_path)
    twin = build_flax(cfg, path)
    x, labels = make_inputs(cfg)
    _, y_a, state_a, grads_a = flax_step(model, x, labels, grads_fn=blockwise_grads)
    _, y_b, state_b, grads_b = flax_step(twin, x, labels, grads_fn=whole_model_grads)
    assert np.array_equal(y_a, y_b)
    assert all(np.array_equal(state_a[k], state_b[k]) for k in state_a)
    assert grads_a.keys() == grads_b.keys()
    assert max(rel_err(grads_a[k], grads_b[k]) for k in grads_a) <= GRAD_RTOL


def test_parity_detects_a_wrong_running_var_convention(run_parity, monkeypatch):
    """Sanity check that the comparison has teeth: a biased running variance (Flax's own
    convention) instead of PyTorch's unbiased one must fail the running-stats check."""
    from flax_resnet import norms

    original = norms.BatchNorm2d._update_running_stats

    def biased(self, mean, var, x):
        n = x.shape[0] * x.shape[1] * x.shape[2]
        original(self, mean, var * (n - 1) / n, x)

    monkeypatch.setattr(norms.BatchNorm2d, "_update_running_stats", biased)
    result = run_parity(dataclasses.replace(Config(depth=20, norm="bn"), seed=3))
    assert result.worst_stats > 10 * STATS_RTOL
    assert result.eval_logits <= 1e-4 and result.worst_grad <= GRAD_RTOL

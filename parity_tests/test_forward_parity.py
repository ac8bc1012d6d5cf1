"""End-to-end parity of flax_resnet with torch_ref: logits, running stats and gradients.

For each configuration torch_ref builds the model, randomises its norm layers (so eval mode
uses real running statistics), saves the state_dict to a ``.pt`` or ``.safetensors`` FILE,
and flax_resnet loads that file, in float32 and in float64. All get the same input; we
compare eval logits, train logits, BatchNorm running mean/var after that train-mode forward,
and the gradient of a cross-entropy loss w.r.t. every parameter (mapped to PyTorch
names/layouts through ``flax_resnet.convert``): float64 against float64 at 1e-10 (the proof),
float32 against PyTorch's own float32 error (the claim). The comparison logic and the
tolerances, with their justification, live in ``harness.py``; ``scripts/parity_report.py``
prints the same numbers as a table. ``test_planted_slip`` shows that each known semantic
slip fails the float64 proof by orders of magnitude.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_resnet
import torch_ref
from flax_resnet import convert, norms
from flax_resnet import state_dict as fr_state_dict
from parity_tests.harness import (
    F64_RTOL,
    GRAD_RTOL,
    NORMS,
    Config,
    ReluProbe,
    blockwise_grads,
    build_flax,
    build_models,
    build_pair,
    build_torch,
    compare,
    flax_relu_inputs,
    flax_step,
    float32_ok,
    full_precision,
    make_inputs,
    matrix_configs,
    nhwc,
    rel_err,
    torch_step,
    torch_unit_run,
    unit_decisions,
    unit_errors,
    whole_model_grads,
)


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
    torch_sd = torch_ref.from_config(cfg.model).state_dict()
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
        grads = {k: v for k, v in result.abs32.items() if k.startswith("grad/")}
        assert grads and max(grads.values()) == 0.0


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
    a = flax_step(model, x, labels, grads_fn=blockwise_grads)
    b = flax_step(twin, x, labels, grads_fn=whole_model_grads)
    assert np.array_equal(a.train_logits, b.train_logits)
    assert all(np.array_equal(a.state[k], b.state[k]) for k in a.state)
    assert a.grads.keys() == b.grads.keys()
    assert max(rel_err(a.grads[k], b.grads[k]) for k in a.grads) <= GRAD_RTOL


WALK_CONFIGS = [Config(depth=18, norm="bn"), Config(depth=50, norm="gn", shortcut="A"),
                Config(depth=20, norm="rms")]


@pytest.mark.parametrize("cfg", WALK_CONFIGS, ids=lambda c: c.label)
def test_flax_relu_walk_is_the_model(cfg, tmp_path):
    """``flax_relu_inputs`` walks the blocks itself: its logits must be the model's train
    logits bit for bit, and it must see the ReLUs torch_ref calls, in the same order."""
    torch_model, model, _ = build_pair(cfg, tmp_path)
    x, labels = make_inputs(cfg)
    relu_inputs, logits = flax_relu_inputs(model, x)
    model.train()
    assert np.array_equal(logits, np.asarray(model(nhwc(x))))
    with full_precision():
        reference = torch_step(torch_model, x, labels)
    assert [a.shape for a in relu_inputs] == [a.shape for a in reference.relu_inputs]
    assert max(rel_err(a, b) for a, b in zip(relu_inputs, reference.relu_inputs,
                                               strict=True)) < 1e-5


def test_relu_flip_is_recognised(tmp_path):
    """A ReLU input within float32 rounding of zero may land on either side: the gradient
    changes at that element, and the float32 criterion must not fail on it. Planted here on
    the torch float32 units: the ReLU input nearest zero (in float64) of the model is forced
    to the other side; the units are then judged against the plain float64 reference (fails)
    and against the float64 reference re-decided there (passes)."""
    cfg = Config(depth=20, norm="bn")
    models = build_models(cfg, tmp_path)
    x32, labels = make_inputs(cfg)
    with full_precision():
        ref = torch_unit_run(models.torch64, x32.astype(np.float64), labels)
        # (unit, call, flat index) of the positive ReLU input nearest zero
        unit, call, flat = min(
            ((i, j, int(np.argmin(np.where(a > 0, a, np.inf))))
             for i, calls in enumerate(ref.relu_inputs) for j, a in enumerate(calls)),
            key=lambda ijk: ref.relu_inputs[ijk[0]][ijk[1]].flat[ijk[2]],
        )
        inputs = ref.relu_inputs[unit][call]
        where = np.zeros(inputs.shape, bool)
        where.flat[flat] = True
        flipped = {unit: {call: (where, np.zeros_like(where))}}  # block it: derivative 0
        args32 = ([a.astype(np.float32) for a in ref.inputs],
                  [g.astype(np.float32) for g in ref.output_grads])
        clean32 = torch_unit_run(models.torch32, *args32)
        flipped32 = torch_unit_run(models.torch32, *args32, decisions=flipped)
        rerun = torch_unit_run(models.torch64, ref.inputs, ref.output_grads, flipped)
        same = torch_unit_run(models.torch64, ref.inputs, ref.output_grads,
                              {unit: {call: (where, np.ones_like(where))}})
    # The decisions found from a float32 model that took the other side are that flip.
    seen = [[a.copy() for a in calls] for calls in clean32.relu_inputs]
    seen[unit][call].flat[flat] = -abs(seen[unit][call].flat[flat])
    found = unit_decisions(dataclasses.replace(clean32, relu_inputs=seen), ref)
    assert found.keys() == {unit} and found[unit].keys() >= {call}
    assert found[unit][call][0].flat[flat] and not found[unit][call][1].flat[flat]

    clean = unit_errors(clean32, ref)
    plain = unit_errors(flipped32, ref)
    redecided = unit_errors(flipped32, rerun)
    bad_plain = [k for k, v in plain.items() if not float32_ok(v, clean[k])]
    bad_redecided = [k for k, v in redecided.items() if not float32_ok(v, clean[k])]
    print(f"\nReLU input {inputs.flat[flat]:.2e} flipped in unit {unit}: fails against the "
          f"plain reference at {bad_plain}, against the re-decided one at {bad_redecided}")
    assert bad_plain and not bad_redecided
    # Re-deciding a ReLU the way the reference decided it changes nothing.
    assert all(np.array_equal(same.grads[k], ref.grads[k]) for k in ref.grads)


def test_float32_slip_is_not_redecided_away(tmp_path):
    """A slip in the float32 model alone (BatchNorm eps 1e-4, float64 model intact) moves
    ReLU inputs across zero too; re-deciding them must not make it pass."""
    cfg = Config(depth=20, norm="bn")
    models = build_models(cfg, tmp_path)
    for _, module in nnx.iter_modules(models.flax32):
        if isinstance(module, norms.BatchNorm2d):
            module.eps = 1e-4
    result = compare(models, cfg)
    print(f"\nflips re-decided {result.relu_flips}; {result.failures()[:3]}")
    assert result.worst_f64[0] <= F64_RTOL
    assert any(f.startswith("float32 logits/") for f in result.failures())


def test_relu_probe_sees_every_relu_once():
    torch_model = torch_ref.create_resnet(18, width=1 / 8)
    probe = ReluProbe()
    with probe:
        torch_model(torch.zeros(1, 3, 33, 47))
    assert len(probe.inputs) == 1 + 2 * 8  # stem, and 2 per BasicBlock (inner + after the add)


# ------------------------------------------------------------------------------------------
# proof that it can fail: each known semantic slip, planted into the Flax side


def _flax_modules(models, kind):
    for model in (models.flax32, models.flax64):
        for _, module in nnx.iter_modules(model):
            if isinstance(module, kind):
                yield module


def _set_all(kind, **attrs):
    def plant(models, monkeypatch):
        for module in _flax_modules(models, kind):
            for name, value in attrs.items():
                setattr(module, name, value)
    return plant


def _biased_running_var(models, monkeypatch):
    original = norms.BatchNorm2d._update_running_stats

    def biased(self, mean, var, x):
        n = x.shape[0] * x.shape[1] * x.shape[2]
        original(self, mean, var * (n - 1) / n, x)

    monkeypatch.setattr(norms.BatchNorm2d, "_update_running_stats", biased)


def _same_padding_on_stride_2(models, monkeypatch):
    for conv in _flax_modules(models, nnx.Conv):
        if tuple(conv.strides) == (2, 2):
            conv.padding = "SAME"


def _skip_counter(models, monkeypatch):
    original = norms.BatchNorm2d._update_running_stats

    def frozen(self, mean, var, x):
        count = self.num_batches_tracked[...]
        original(self, mean, var, x)
        self.num_batches_tracked[...] = count

    monkeypatch.setattr(norms.BatchNorm2d, "_update_running_stats", frozen)


# name -> (config, how to plant it after the models are built, or before loading the weights)
SLIPS = {
    "bn-momentum-0.9": (Config(depth=20, norm="bn"), _set_all(norms.BatchNorm2d, momentum=0.9)),
    "bn-biased-running-var": (Config(depth=20, norm="bn"), _biased_running_var),
    "bn-eps-1e-6": (Config(depth=20, norm="bn"), _set_all(norms.BatchNorm2d, eps=1e-6)),
    "gn-eps-1e-6": (Config(depth=20, norm="gn"), _set_all(norms.GroupNorm, eps=1e-6)),
    "same-padding-stride-2": (Config(depth=20, norm="bn", shortcut="B"),
                              _same_padding_on_stride_2),
    "kernel-hw-transposed": (Config(depth=20, norm="bn"), None),
    "no-num-batches-tracked-update": (Config(depth=20, norm="bn"), _skip_counter),
}


@pytest.mark.parametrize("slip", list(SLIPS))
def test_planted_slip(slip, weights_dir, monkeypatch):
    """Each slip fails the float64 proof, by at least 1e3 x its tolerance (printed)."""
    cfg, plant = SLIPS[slip]
    if slip == "kernel-hw-transposed":  # the converter permutes OIHW -> WHIO, not HWIO
        monkeypatch.setattr(fr_state_dict, "_TO_FLAX_AXES", {4: (3, 2, 1, 0), 2: (1, 0)})
    models = build_models(cfg, weights_dir)
    if plant is not None:
        plant(models, monkeypatch)
    result = compare(models, cfg)
    worst, key = result.worst_f64
    print(f"\n{slip}: float64 error {worst:.2e} ({key}) = {worst / F64_RTOL:.1e} x the bar; "
          f"counters equal: {result.counters_ok}")
    assert result.failures()
    if slip == "no-num-batches-tracked-update":
        assert not result.counters_ok
    else:
        assert worst > 1e3 * F64_RTOL

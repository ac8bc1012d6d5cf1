"""Training in Flax is the same computation as training the PyTorch reference.

Both sides start from the same weights (a ``torch_ref`` model loaded into the Flax model with
``load_torch_state_dict``) and see the very same batches: the crops and flips are drawn by the
Flax step's own ``augment_params(fold_in(PRNGKey(seed), step))`` and replayed in torch by
``torch_ref.training.augment``. The Flax side is the product's jitted
``flax_resnet.training.make_train_step`` with ``make_optimizer`` / ``make_schedule``; the torch
side is ``torch_ref.training`` (``torch.optim``, ``torch.optim.lr_scheduler`` objects,
``nn.CrossEntropyLoss``). Compared: the loss, every parameter, every norm running statistic
and every optimizer moment (optax's adam ``mu``/``nu`` and sgd ``trace`` against torch's
``exp_avg``/``exp_avg_sq``/``momentum_buffer``, read back through ``flax_resnet.convert``'s
name map and layout transposes), over ``STEPS`` = 50 updates, in two modes:

* **free**: each framework trains on its own for 50 steps, as users run it (the product's
  state threading: step counter, optimizer counts, schedule by update count, augmentation
  keys, BatchNorm running statistics). The loss is compared at every step, the whole state
  at the end.
* **shadow**: at every one of the 50 steps the product's step is applied to the *torch*
  state (params, running stats, optimizer moments and counts converted to a Flax
  ``TrainState``) and the result compared with torch's next state.

Why two modes: float32 training of these small ReLU networks is chaotic. Rounding-level
differences (the frameworks sum convolutions in different orders) flip a ReLU, a max-pool
argmax or the sign of an Adam step somewhere, and the trajectories separate exponentially.
Measured on these models, PyTorch against *itself* with the initial weights perturbed by
1e-7 (relative, the size of float32 rounding) reaches 1e-3..3e-1 loss differences within 50
steps: at batch 8 for SGD even at lr 1e-5 (for some perturbations), at batch 32 for SGD from
lr ~2e-3 and for AdamW from lr 1e-5 (ResNet-50 / GroupNorm) or 1e-4 (ResNet-18 / BatchNorm).
No 1e-4 tolerance can hold on such a trajectory, whatever the port. So the free run uses a
well-conditioned configuration, whose own noise floor (torch vs perturbed torch) is measured
by ``test_free_run_is_well_conditioned``, and the shadow runs prove each of the 50 steps at
realistic hyper-parameters (the seed's AdamW lr 1e-3, SGD lr 0.1), where chaos cannot build
up because every step starts from the same state.

Relative error of a tensor: ``max|flax - torch| / max|torch|``. Tolerances, float32 on both
sides (measured values in brackets, printed with ``-s``):

* ``LOSS_STEP1_RTOL`` = 1e-5 for a loss computed from identical weights (free step 1, every
  shadow step) [≤ 9e-7]: one forward pass, a few tens of layers each rounding ~1e-7. A
  semantic slip (padding, eps, loss reduction, label smoothing, augmentation) is ≥ 1e-3.
* ``LOSS_RTOL`` = 1e-4 for the free run's loss at every step [≤ 4e-7; noise floor 6e-7].
* ``STATE_RTOL`` = 1e-4 for parameters, running statistics and optimizer moments (free: after
  50 steps [≤ 6e-6; noise floor ≤ 1.1e-5]; shadow: after each step [≤ 7.3e-5]). The largest
  errors are gradients that are sums with heavy cancellation, e.g. a norm scale's gradient
  Σ dy·x̂ over N·H·W = 2048 terms, whose float32 value is only good to ~κ·1e-7.
* ``UPDATE_RTOL`` = 1e-3 for the *update* of every parameter and running statistic (its
  change over the step, or over the 50 free steps), relative to that tensor's largest change
  [shadow ≤ 2.5e-5, free ≤ 6e-6; free noise floor 1.2e-4]. One step moves a weight by only
  1e-3..1e-2 of its size, so comparing weights at 1e-4 alone could not see a wrong update;
  float32's resolution of ``p + Δ`` (2 ulp) is not counted, and for Adam neither is the change
  the already-checked moment differences imply (``adam_update_slack``). The update inherits
  the moments' error (≤ 1e-4), hence 10x that.

Each check was shown to catch a wrong semantic by mutating the torch side while writing this
test (the first violation, or the largest error): AdamW without decay (a weight 1.2e-4 off
after one step), Adam's coupled L2 instead of AdamW (4e-3), AdamW eps 1e-7 instead of 1e-8
(1.9e-4), SGD without weight decay (momentum buffer 1.4e-3), decay on norm params and biases
(3e-2), SGD without Nesterov (loss 1.5e-3), no label smoothing (loss 1.3e-2), the seed
schedule stepped per batch instead of per epoch (loss 5e-2), cosine without warmup (5e-2),
RMSNorm eps 1e-6 instead of float32's 1.2e-7 (momentum buffer 1.1e-3).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
import pytest
import torch
from flax import nnx

import torch_ref
from flax_resnet import data as data_lib
from flax_resnet import training as ftrain
from flax_resnet.convert import (
    load_torch_state_dict,
    model_variables,
    to_numpy_state_dict,
    torch_key,
)
from flax_resnet.models import ARCHS
from torch_ref import training as ttrain

STEPS = 50
NUM_CLASSES = 10
LOSS_STEP1_RTOL = 1e-5
LOSS_RTOL = 1e-4
STATE_RTOL = 1e-4
UPDATE_RTOL = 1e-3
NOISE_PERTURBATION = 1e-7  # relative perturbation of the weights for the noise floor
NOISE_MARGIN = 5.0  # the free run's noise floor must be this far below the tolerances


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """torch's intra-op threads fight XLA's (and other jobs') for the cores: for these tiny
    models one thread is ~10x faster on a busy 2-core machine. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(actual: Any, expected: Any) -> float:
    """``max|actual - expected| / max|expected|`` (absolute when ``expected`` is all 0)."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    diff = float(np.max(np.abs(a - e), initial=0.0))
    scale = float(np.max(np.abs(e), initial=0.0))
    return diff / scale if scale > 0 else diff


def update_err(new: Any, expected_new: Any, before: Any, slack: Any = 0.0) -> float:
    """Relative error of the update ``new - before`` against ``expected_new - before``.

    Not counted as error: float32's resolution of the stored results (each side rounds
    ``p + Δ`` to float32, torch's AdamW twice: decay, then step — so 2 ulp of the tensor's
    largest value), and an elementwise ``slack`` (see ``adam_update_slack``).
    """
    before = np.asarray(before, np.float64)
    got = np.asarray(new, np.float64) - before
    want = np.asarray(expected_new, np.float64) - before
    ulps = 2 * float(np.spacing(np.float32(np.max(np.abs(expected_new), initial=0.0))))
    diff = max(0.0, float(np.max(np.abs(got - want) - slack, initial=0.0)) - ulps)
    scale = float(np.max(np.abs(want), initial=0.0))
    return diff / scale if scale > 0 else diff


def adam_update_slack(
    m: np.ndarray, v: np.ndarray, dm: np.ndarray, dv: np.ndarray, lr: float, step: int,
    betas: tuple[float, float], eps: float,
) -> np.ndarray:
    """How much an Adam update moves because its moments differ by ``dm``, ``dv``.

    The update is ``-lr · m̂ / (√v̂ + eps)`` (``m̂ = m / (1 - β1^t)``, ``v̂ = v / (1 - β2^t)``),
    so to first order a moment difference moves it by
    ``lr · (|dm̂| / (√v̂ + eps) + |m̂| · |dv̂| / (2 √v̂ (√v̂ + eps)²))``. Where the gradient is
    tiny (``√v̂`` near eps) that factor is huge: an element with |g| = 4e-7 in a tensor whose
    largest gradient is 1.3 has moments that agree to 4e-8 of the tensor's scale (well inside
    the moment tolerance) and updates that differ by 2e-3·lr. The moments are checked on
    their own; the update check then asks that the update differ by no more than its moments
    imply — a wrong update rule (eps inside the square root, bias correction, decay, lr) does not
    hide there, since it moves elements whose moments agree.
    """
    bc1, bc2 = 1 - betas[0] ** step, 1 - betas[1] ** step
    m_hat, v_hat = np.abs(m.astype(np.float64)) / bc1, v.astype(np.float64) / bc2
    root = np.sqrt(v_hat)
    ratio = np.divide(m_hat, root, out=np.zeros_like(root), where=root > 0)  # |m̂| / √v̂
    return lr * (np.abs(dm) / bc1 / (root + eps)
                 + ratio * (np.abs(dv) / bc2) / (2 * (root + eps) ** 2))


# --------------------------------------------------------------------------------------------
# the cases: few compiled variants, each covering several features
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    mode: str  # "free" or "shadow"
    image_size: int
    batch: int
    steps_per_epoch: int
    config: dict[str, Any]

    def cfg(self) -> ftrain.TrainConfig:
        return ftrain.make_config("seed", dataset="synthetic", **self.config)


CASES = [
    # Free run, SGD. BasicBlock (ResNet-18 at 1/16 width: 4-8-16-32 channels, imagenet
    # stem), BatchNorm (running mean and unbiased running var over 50 steps), SGD + Nesterov
    # + coupled weight decay without decay on norm scales / biases (param groups vs optax
    # mask), label smoothing, the seed's lr / 3 every 20 epochs at 2 steps per epoch
    # (per-epoch stepping, a boundary at step 40). Well conditioned at batch 32 and lr 1e-4
    # (noise floor ≤ 8e-6 for 3 perturbation seeds); batch 8-16, or lr ≥ 1e-3, or a cifar
    # stem / ResNet-20 at batch 8 are chaotic (noise floor 1e-3..1).
    Case(
        "free-sgd-nesterov-bn-basic18",
        mode="free",
        image_size=32,
        batch=32,
        steps_per_epoch=2,
        config=dict(
            depth=18, width=1 / 16, norm="bn", optimizer="sgd", lr=1e-4, momentum=0.9,
            nesterov=True, weight_decay=5e-4, decay_norm_and_bias=False, schedule="seed",
            epochs=25, label_smoothing=0.1,
        ),
    ),
    # Shadow. BottleNeck (ResNet-50 at 1/16 width), GroupNorm (4 groups), the seed's AdamW
    # (lr 1e-3, weight decay 1e-2 on every parameter), lr / 3 every 20 steps.
    Case(
        "shadow-adamw-gn-bottleneck50",
        mode="shadow",
        image_size=32,
        batch=8,
        steps_per_epoch=1,
        config=dict(
            depth=50, width=1 / 16, norm="gn", norm_groups=4, optimizer="adamw", lr=1e-3,
            weight_decay=1e-2, decay_norm_and_bias=True, schedule="seed", epochs=50,
        ),
    ),
    # Shadow. He et al.'s CIFAR ResNet-20 at half width (8-16-32, 3x3 stem, option-A
    # shortcuts), RMSNorm, SGD lr 0.1 with plain momentum and decay on everything, label
    # smoothing, per-step cosine with 5 warmup steps (1 epoch of 5 steps, 10 epochs = 50).
    Case(
        "shadow-sgd-rms-he20-cosine",
        mode="shadow",
        image_size=16,
        batch=8,
        steps_per_epoch=5,
        config=dict(
            depth=20, width=0.5, norm="rms", optimizer="sgd", lr=0.1, momentum=0.9,
            nesterov=False, weight_decay=1e-4, decay_norm_and_bias=True, schedule="cosine",
            warmup_epochs=1.0, epochs=10, label_smoothing=0.1,
        ),
    ),
]
CASES_BY_ID = {c.id: c for c in CASES}
FREE_IDS = [c.id for c in CASES if c.mode == "free"]
SHADOW_IDS = [c.id for c in CASES if c.mode == "shadow"]


# --------------------------------------------------------------------------------------------
# the two sides
# --------------------------------------------------------------------------------------------


def torch_model(cfg: ftrain.TrainConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch_ref.create_resnet(
        cfg.depth, norm=cfg.norm, stem=cfg.stem, num_classes=NUM_CLASSES, width=cfg.width,
        shortcut=cfg.shortcut, norm_groups=cfg.norm_groups,
    )


def flax_model_from(tmodel: torch.nn.Module, cfg: ftrain.TrainConfig) -> nnx.Module:
    """The Flax model of ``cfg`` holding ``tmodel``'s weights.

    Built abstractly (``nnx.eval_shape``: no initialiser runs, which would only compile
    dozens of eager ops to draw values that are overwritten anyway), then every variable is
    set from the torch state_dict; ``load_torch_state_dict`` rejects a missing key.
    """
    fmodel = nnx.eval_shape(lambda: ftrain.create_model(cfg, NUM_CLASSES))
    return load_torch_state_dict(fmodel, tmodel.state_dict())


def moment_names(cfg: ftrain.TrainConfig) -> dict[str, str]:
    """torch optimizer.state name -> optax state field."""
    if cfg.optimizer == "sgd":
        return {"momentum_buffer": "trace"}
    return {"exp_avg": "mu", "exp_avg_sq": "nu"}


def batches(case: Case) -> list[tuple[np.ndarray, np.ndarray]]:
    """``STEPS`` uint8 NHWC batches of learnable synthetic images, and their labels."""
    ds = data_lib.synthetic_dataset(case.batch * STEPS, 1, image_size=case.image_size, seed=1)
    b = case.batch
    return [(ds.train.images[s * b : (s + 1) * b], ds.train.labels[s * b : (s + 1) * b])
            for s in range(STEPS)]


Snapshot = tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray] | None]]


class TorchSide:
    """The reference: ``torch_ref`` model, optimizer, scheduler and loss."""

    def __init__(self, case: Case, perturbation: float = 0.0):
        self.case = case
        self.cfg = case.cfg()
        self.model = torch_model(self.cfg)
        if perturbation:
            gen = torch.Generator().manual_seed(1234)
            with torch.no_grad():
                for p in self.model.parameters():
                    p.mul_(1 + perturbation * torch.randn(p.shape, generator=gen))
        self.optimizer = ttrain.make_optimizer(self.model, self.cfg)
        self.scheduler = ttrain.make_scheduler(self.optimizer, self.cfg, case.steps_per_epoch)
        self.criterion = ttrain.make_criterion(self.cfg)

    def step(self, s: int, images: np.ndarray, labels: np.ndarray) -> float:
        # The crops and flips the Flax step draws at update s (its documented key).
        key = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), s)
        offsets, flips = data_lib.augment_params(key, images.shape[0], self.cfg.augment_pad)
        x = ttrain.augment(ttrain.nhwc_to_nchw(images), offsets, flips, self.cfg.augment_pad)
        x = ttrain.normalize(x, data_lib.CIFAR10_MEAN, data_lib.CIFAR10_STD)
        y = torch.as_tensor(labels, dtype=torch.long)
        return float(ttrain.train_step(self.model, self.optimizer, self.scheduler, x, y,
                                       self.criterion))

    def snapshot(self) -> Snapshot:
        sd = {k: v.detach().numpy().copy() for k, v in self.model.state_dict().items()}
        moments: dict[str, dict[str, np.ndarray] | None] = {}
        for name in moment_names(self.cfg):
            states = [(k, self.optimizer.state.get(p, {})) for k, p in
                      self.model.named_parameters()]
            moments[name] = (
                {k: st[name].detach().numpy().copy() for k, st in states}
                if all(name in st for _, st in states) else None  # None: before step 1
            )
        return sd, moments

    def adam_step(self) -> int | None:
        if moment_names(self.cfg) != {"exp_avg": "mu", "exp_avg_sq": "nu"}:
            return None
        p = next(self.model.parameters())
        return int(self.optimizer.state[p]["step"]) if p in self.optimizer.state else 0


class FlaxSide:
    """The product: ``make_optimizer``, ``init_train_state`` and the jitted train step."""

    def __init__(self, case: Case, tmodel: torch.nn.Module):
        self.case = case
        self.cfg = case.cfg()
        self.template = flax_model_from(tmodel, self.cfg)
        self.tx = ftrain.make_optimizer(self.cfg, case.steps_per_epoch)
        self.defs, self.state = ftrain.init_train_state(self.template, self.tx, self.cfg.seed)
        self.mesh = ftrain.make_mesh(jax.devices()[:1])
        self.train_step = ftrain.make_train_step(
            self.defs.train, self.tx, self.cfg, data_lib.CIFAR10_MEAN, data_lib.CIFAR10_STD,
            self.mesh,
        )

    def initial_state(self) -> ftrain.TrainState:
        # A host copy: the step donates its input, and the template model shares its arrays
        # with ``init_train_state``'s state (it is reloaded in shadow mode).
        return jax.tree.map(np.array, self.state)

    def step(self, state: Any, images: np.ndarray, labels: np.ndarray) -> tuple[Any, float]:
        batch = ftrain.put_batch(self.mesh, images.shape[0], images, labels)
        state, metrics = self.train_step(state, ftrain.zero_metrics(), *batch)
        return state, float(metrics["loss_sum"]) / images.shape[0]

    def _params_as_torch(self, tree: Any, batch_stats: Any) -> dict[str, np.ndarray]:
        """A params-shaped tree (params or an optax moment) as torch-layout Param entries,
        read back through the product's ``to_numpy_state_dict``."""
        model = nnx.merge(self.defs.train, tree, batch_stats)
        names = {key for key, _, var in model_variables(model) if isinstance(var, nnx.Param)}
        return {k: v for k, v in to_numpy_state_dict(model).items() if k in names}

    def snapshot(self, state: Any) -> Snapshot:
        state = jax.device_get(state)
        sd = to_numpy_state_dict(nnx.merge(self.defs.train, state.params, state.batch_stats))
        moments = {
            name: self._params_as_torch(otu.tree_get(state.opt_state, field), state.batch_stats)
            for name, field in moment_names(self.cfg).items()
        }
        return sd, moments

    def adam_counts(self, state: Any) -> list[int]:
        return [int(v) for _, v in otu.tree_get_all_with_path(state.opt_state, "count")]

    def _split_copy(self, state_dict: dict[str, Any]) -> tuple[Any, Any]:
        load_torch_state_dict(self.template, state_dict)
        _, params, stats = nnx.split(self.template, nnx.Param, nnx.BatchStat)
        # split shares the module's Variables: copy before the template is loaded again
        # (to numpy: a jnp.copy would compile one eager op per distinct shape).
        return jax.tree.map(np.array, params), jax.tree.map(np.array, stats)

    def state_from_torch(self, step: int, snapshot: Snapshot) -> ftrain.TrainState:
        """The ``TrainState`` torch is in before update ``step``: params, running stats,
        optimizer moments and every optax count (adam's bias correction, the schedule's)."""
        sd, moments = snapshot
        params, stats = self._split_copy(sd)
        opt_state = self.tx.init(params)
        fields: dict[str, Any] = {"count": jnp.asarray(step, jnp.int32)}
        for name, field in moment_names(self.cfg).items():
            if moments[name] is not None:
                fields[field], _ = self._split_copy({**sd, **moments[name]})
        state = ftrain.TrainState(
            step=jnp.asarray(step, jnp.int32),
            params=params,
            batch_stats=stats,
            opt_state=otu.tree_set(opt_state, **fields),
            rng=jax.random.PRNGKey(self.cfg.seed),
        )
        # Host copies: optax may hand out one zeros buffer for several leaves, and the step
        # donates its input (a buffer donated twice is an error).
        return jax.tree.map(np.array, state)


def compare(
    flax: Snapshot, torch_: Snapshot, before: dict[str, np.ndarray],
    slack: dict[str, np.ndarray] | None = None,
) -> dict:
    """Relative errors by category: ``state`` (params and running stats), ``update`` (their
    change since ``before``, less ``slack[key]``), one entry per optimizer moment;
    ``counters`` holds (flax, torch) ``num_batches_tracked`` pairs."""
    (fsd, fmom), (tsd, tmom) = flax, torch_
    slack = slack or {}
    assert fsd.keys() == tsd.keys()
    errors: dict[str, dict[str, Any]] = {"state": {}, "update": {}, "counters": {}}
    for key, t in tsd.items():
        if key.endswith("num_batches_tracked"):
            errors["counters"][key] = (int(fsd[key]), int(t))
            continue
        errors["state"][key] = rel_err(fsd[key], t)
        errors["update"][key] = update_err(fsd[key], t, before[key], slack.get(key, 0.0))
    for name, t_moments in tmom.items():
        assert t_moments is not None and fmom[name].keys() == t_moments.keys()
        errors[name] = {k: rel_err(fmom[name][k], v) for k, v in t_moments.items()}
    return errors


def check(errors: dict, where: str, update_tol: float) -> list[str]:
    """Messages for every tolerance violation in ``compare``'s result."""
    bad = []
    for category, errs in errors.items():
        if category == "counters":
            bad += [f"{where} {k}: num_batches_tracked flax {f} torch {t}"
                    for k, (f, t) in errs.items() if f != t]
            continue
        tol = update_tol if category == "update" else STATE_RTOL
        bad += [f"{where} {category} {k}: {v:.3e} > {tol:g}" for k, v in errs.items()
                if not v <= tol]
    return bad


def worst(errors: dict) -> dict[str, tuple[float, str]]:
    return {c: max((v, k) for k, v in e.items()) for c, e in errors.items()
            if c != "counters" and e}


def report(title: str, worst_errors: dict[str, tuple[float, str]]) -> str:
    return "\n".join([title] + [f"  {c:18s} {v:.2e}  {k}" for c, (v, k) in worst_errors.items()])


# --------------------------------------------------------------------------------------------
# running the cases (cached: several tests read one run)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FreeRun:
    flax_losses: np.ndarray
    torch_losses: np.ndarray
    errors: dict  # ``compare`` of the final states, updates relative to the initial weights
    flax_counts: list[int]
    torch_adam_step: int | None


@functools.cache
def free_run(case_id: str) -> FreeRun:
    case = CASES_BY_ID[case_id]
    torch_side = TorchSide(case)
    flax_side = FlaxSide(case, torch_side.model)
    initial, _ = torch_side.snapshot()
    state = flax_side.initial_state()
    flax_losses, torch_losses = [], []
    for s, (images, labels) in enumerate(batches(case)):
        state, loss = flax_side.step(state, images, labels)
        flax_losses.append(loss)
        torch_losses.append(torch_side.step(s, images, labels))
    errors = compare(flax_side.snapshot(state), torch_side.snapshot(), initial)
    return FreeRun(np.array(flax_losses), np.array(torch_losses), errors,
                   flax_side.adam_counts(jax.device_get(state)), torch_side.adam_step())


@functools.cache
def torch_noise_floor(case_id: str) -> tuple[np.ndarray, dict]:
    """torch against torch with 1e-7-perturbed initial weights: the conditioning of the run."""
    case = CASES_BY_ID[case_id]
    a, b = TorchSide(case), TorchSide(case, NOISE_PERTURBATION)
    initial, _ = a.snapshot()
    la, lb = [], []
    for s, (images, labels) in enumerate(batches(case)):
        la.append(a.step(s, images, labels))
        lb.append(b.step(s, images, labels))
    rel = np.abs(np.array(lb) - np.array(la)) / np.abs(np.array(la))
    return rel, compare(b.snapshot(), a.snapshot(), initial)


@dataclasses.dataclass
class ShadowRun:
    loss_rel: np.ndarray  # per step
    worst: list[dict[str, tuple[float, str]]]  # per step
    violations: list[str]


@functools.cache
def shadow_run(case_id: str) -> ShadowRun:
    case = CASES_BY_ID[case_id]
    torch_side = TorchSide(case)
    flax_side = FlaxSide(case, torch_side.model)
    loss_rel, worst_by_step, violations = [], [], []
    for s, (images, labels) in enumerate(batches(case)):
        before = torch_side.snapshot()
        state, flax_loss = flax_side.step(flax_side.state_from_torch(s, before), images, labels)
        group = torch_side.optimizer.param_groups[0]
        lr = group["lr"]  # the lr of this update (schedulers step after it)
        torch_loss = torch_side.step(s, images, labels)
        after = torch_side.snapshot()
        loss_rel.append(abs(flax_loss - torch_loss) / abs(torch_loss))
        flax_after = flax_side.snapshot(state)
        slack = None
        if "exp_avg" in after[1]:
            (_, fmom), (_, tmom) = flax_after, after
            slack = {
                k: adam_update_slack(
                    m, tmom["exp_avg_sq"][k], fmom["exp_avg"][k] - m,
                    fmom["exp_avg_sq"][k] - tmom["exp_avg_sq"][k], lr, s + 1, group["betas"],
                    group["eps"],
                )
                for k, m in tmom["exp_avg"].items()
            }
        errors = compare(flax_after, after, before[0], slack)
        worst_by_step.append(worst(errors))
        violations += check(errors, f"step {s + 1}", UPDATE_RTOL)
        counts = flax_side.adam_counts(jax.device_get(state))
        if any(c != s + 1 for c in counts):
            violations.append(f"step {s + 1}: optax counts {counts}")
    return ShadowRun(np.array(loss_rel), worst_by_step, violations)


# --------------------------------------------------------------------------------------------
# pieces: augmentation, schedules, decay groups (no training, fast)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad", [4, 0])
def test_augment_and_normalize_match(pad):
    """torch's replay of a JAX-drawn crop/flip batch is the Flax step's input.

    The crop/flip is a gather of uint8 pixels: bitwise equal. Normalization is
    ``(x / 255 - mean) / std`` on both sides, but XLA may turn a division by a constant into
    a multiplication by its reciprocal: ≤ 1 ulp (float32 eps 1.2e-7 relative to |x| ≤ 2.6).
    """
    ds = data_lib.synthetic_dataset(16, 1, image_size=32)
    images = ds.train.images[:16]
    key = jax.random.fold_in(jax.random.PRNGKey(3), 7)
    offsets, flips = data_lib.augment_params(key, 16, pad)
    assert np.asarray(flips).any() and not np.asarray(flips).all()
    if pad:
        assert len({tuple(o) for o in np.asarray(offsets).tolist()}) > 1
    jax_augmented = np.asarray(data_lib.apply_augment(images, offsets, flips, pad))
    torch_augmented = ttrain.augment(ttrain.nhwc_to_nchw(images), offsets, flips, pad)
    np.testing.assert_array_equal(torch_augmented.permute(0, 2, 3, 1).numpy(), jax_augmented)

    expected = np.asarray(data_lib.normalize(jax_augmented, ds.mean, ds.std))
    actual = ttrain.normalize(torch_augmented, ds.mean, ds.std).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=np.spacing(np.float32(4.0)))


SCHEDULE_CASES = [
    # (config overrides, steps per epoch)
    (dict(schedule="seed", epochs=80), 1),
    (dict(schedule="seed", epochs=45), 3),
    (dict(schedule="multistep", epochs=10, lr_milestones=(0.5, 0.75), lr_gamma=0.1), 3),
    (dict(schedule="step", epochs=8, lr_milestones=(0.3, 0.3, 0.9), lr_gamma=0.5), 2),
    (dict(schedule="constant", epochs=4), 3),
    (dict(schedule="cosine", epochs=10, warmup_epochs=0.0), 3),
    (dict(schedule="cosine", epochs=10, warmup_epochs=2.0), 3),
    (dict(schedule="cosine", epochs=10, warmup_epochs=0.5), 3),
    (dict(schedule="cosine", epochs=6, warmup_epochs=1.0), 1),
    (dict(schedule="onecycle", epochs=10), 3),
    (dict(schedule="onecycle", epochs=10, warmup_epochs=2.0), 3),
    (dict(schedule="onecycle", epochs=7, warmup_epochs=1.5), 1),
]


@pytest.mark.parametrize(("overrides", "spe"), SCHEDULE_CASES)
def test_schedule_matches_torch_scheduler(overrides, spe):
    """The lr of every update: the optax schedule of the update count against the torch
    scheduler stepped as ``LRSchedule`` steps it (per epoch or per batch). float32 vs
    float64 arithmetic: ≤ 1e-6 of the peak lr."""
    cfg = ftrain.make_config("seed", lr=0.1, **overrides)
    n = spe * cfg.epochs
    schedule = ftrain.make_schedule(cfg, spe)
    flax_lr = np.asarray(jax.vmap(schedule)(jnp.arange(n)), np.float64)
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([p], lr=cfg.lr)
    scheduler = ttrain.make_scheduler(optimizer, cfg, spe)
    torch_lr = []
    for _ in range(n):
        torch_lr.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no grad: a no-op that keeps torch's step-order check quiet
        scheduler.step()
    torch_lr = np.array(torch_lr)
    bad = np.flatnonzero(np.abs(flax_lr - torch_lr) > 1e-6 * np.abs(torch_lr).max())
    assert bad.size == 0, (
        f"lr differs at updates {bad[:8].tolist()}: flax {flax_lr[bad[:4]]} vs torch "
        f"{torch_lr[bad[:4]]}"
    )


def test_decay_groups_match_flax_mask():
    """``decay_norm_and_bias=False``: torch's no-decay group is exactly optax's masked-out set."""
    cfg = ftrain.make_config("seed", depth=18, width=1 / 16, decay_norm_and_bias=False)
    tmodel = torch_model(cfg)
    groups = ttrain.param_groups(tmodel, 0.1, decay_norm_and_bias=False)
    ids = {id(p): g["weight_decay"] > 0 for g in groups for p in g["params"]}
    torch_decays = {k: ids[id(p)] for k, p in tmodel.named_parameters()}

    fmodel = flax_model_from(tmodel, cfg)
    _, params, _ = nnx.split(fmodel, nnx.Param, ...)
    mask = ftrain.decay_mask(params)
    flax_decays = {torch_key(path): bool(m.get_value()) for path, m in nnx.to_flat_state(mask)}
    assert flax_decays == torch_decays
    assert any(torch_decays.values()) and not all(torch_decays.values())


# --------------------------------------------------------------------------------------------
# free run: 50 steps each on its own
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", FREE_IDS)
def test_free_run_loss_trajectory(case_id):
    run = free_run(case_id)
    rel = np.abs(run.flax_losses - run.torch_losses) / np.abs(run.torch_losses)
    print(f"\n{case_id}: loss {run.torch_losses[0]:.4f} -> {run.torch_losses[-1]:.4f}; "
          f"step-1 rel {rel[0]:.2e}, max rel {rel.max():.2e} (step {int(rel.argmax()) + 1})")
    assert rel[0] <= LOSS_STEP1_RTOL, (
        f"step-1 loss: flax {run.flax_losses[0]} torch {run.torch_losses[0]} rel {rel[0]:.3e}"
    )
    assert rel.max() <= LOSS_RTOL, (
        f"loss trajectory: max rel {rel.max():.3e} at step {int(rel.argmax()) + 1}; per step "
        f"{np.array2string(rel, precision=1)}"
    )


@pytest.mark.parametrize("case_id", FREE_IDS)
def test_free_run_final_state(case_id):
    """Every parameter, running statistic and optimizer moment after 50 steps, and every
    parameter's total movement (``update``, relative to its initial value)."""
    run = free_run(case_id)
    print("\n" + report(f"{case_id}: worst relative errors after {STEPS} steps",
                        worst(run.errors)))
    assert all(f == t == STEPS for f, t in run.errors["counters"].values()), \
        run.errors["counters"]
    if run.torch_adam_step is not None:
        assert run.flax_counts and all(c == run.torch_adam_step == STEPS for c in run.flax_counts)
    bad = check(run.errors, "final", UPDATE_RTOL)
    assert not bad, "\n".join(bad[:20])


@pytest.mark.parametrize("case_id", FREE_IDS)
def test_free_run_is_well_conditioned(case_id):
    """The free run's own noise floor — torch against torch with 1e-7-perturbed initial
    weights — stays ``NOISE_MARGIN`` below the tolerances, so the free-run tolerances test
    the port and not the chaos of float32 training (and a failure here, after changing a
    case, means the case is ill-conditioned, not that the port broke)."""
    rel, errors = torch_noise_floor(case_id)
    w = worst(errors)
    print(f"\n{case_id}: noise floor loss {rel.max():.2e}; "
          + ", ".join(f"{c} {v:.2e}" for c, (v, _) in w.items()))
    assert rel.max() <= LOSS_RTOL / NOISE_MARGIN
    for category, (value, key) in w.items():
        tol = UPDATE_RTOL if category == "update" else STATE_RTOL
        assert value <= tol / NOISE_MARGIN, (category, key, value)


# --------------------------------------------------------------------------------------------
# shadow: every one of the 50 steps from torch's state, at realistic hyper-parameters
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", SHADOW_IDS)
def test_shadow_every_step(case_id):
    run = shadow_run(case_id)
    categories = run.worst[0].keys()
    summary = {c: max((w[c][0], f"step {s + 1} {w[c][1]}") for s, w in enumerate(run.worst))
               for c in categories}
    print(f"\n{case_id}: loss max rel {run.loss_rel.max():.2e} "
          f"(step {int(run.loss_rel.argmax()) + 1})\n"
          + report("worst over the steps", summary))
    assert run.loss_rel.max() <= LOSS_STEP1_RTOL, np.array2string(run.loss_rel, precision=1)
    assert not run.violations, "\n".join(run.violations[:20])


def test_cases_cover_the_issue():
    """Guard against a refactor silently dropping a feature the cases are meant to cover."""
    cfgs = [c.cfg() for c in CASES]
    assert {c.norm for c in cfgs} >= {"bn", "gn", "rms"}
    assert {ARCHS[c.depth].block for c in cfgs} == {"basic", "bottleneck"}
    assert any(c.optimizer == "sgd" and c.nesterov and c.weight_decay > 0 for c in cfgs)
    assert any(c.optimizer == "adamw" and c.weight_decay == 1e-2 for c in cfgs)
    assert any(c.label_smoothing > 0 for c in cfgs)
    assert any(not c.decay_norm_and_bias for c in cfgs)
    assert {c.schedule for c in cfgs} >= {"seed", "cosine"}
    for case in CASES:
        if case.config["schedule"] == "seed":  # a ÷3 boundary inside the steps
            assert STEPS > 20 * case.steps_per_epoch

"""The PyTorch side of training: the reference that ``flax_resnet.training`` must reproduce.

Plain PyTorch, written the way a PyTorch user would train the seed's ResNets, with every
choice that ``flax_resnet.training`` makes spelled out so both sides compute the same thing:

* optimizers: ``torch.optim.AdamW`` / ``SGD`` (momentum, Nesterov, coupled weight decay) /
  ``Adam``; with ``decay_norm_and_bias=False`` the 1-D parameters (norm scales, biases) go to
  a param group with ``weight_decay=0`` (Flax: an optax ``mask``);
* schedules: ``torch.optim.lr_scheduler`` objects. ``study`` / ``multistep`` / ``constant``
  and torchvision's ``steplr`` / ``cosine-epoch`` are stepped **once per epoch** (after the
  epoch's last batch), ``cosine`` (with linear warmup) and ``onecycle`` **once per batch**,
  which is what ``flax_resnet.optim``'s ``make_schedule`` documents; ``LRSchedule`` does that
  bookkeeping so ``train_step`` can call ``scheduler.step()`` after every batch;
* loss: ``nn.CrossEntropyLoss(label_smoothing=ε)`` (mean over the batch);
* augmentation: the seed's ``Pad(4) + RandomHorizontalFlip + RandomCrop(32)`` given explicit
  crop offsets and flips (``augment``), then ``ToTensor + Normalize`` (``normalize``), on
  NCHW batches — so a batch augmented by ``flax_resnet.data.augment_params`` can be replayed
  here bit for bit.

Functions that need hyper-parameters take a ``cfg``: any object with the attribute names of
``flax_resnet.config.TrainConfig`` (``optimizer``, ``lr``, ``weight_decay``, ``momentum``,
``nesterov``, ``decay_norm_and_bias``, ``schedule``, ``epochs``, ``warmup_epochs``,
``lr_milestones``, ``lr_gamma``, ``lr_step_epochs``, ``warmup_start_factor``,
``label_smoothing``), e.g. the very ``TrainConfig`` the
Flax side trains with, or a ``types.SimpleNamespace``. This module does not import JAX.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler

from flax_resnet.config import (
    OPTIMIZERS,
    PER_EPOCH_SCHEDULES,
    SCHEDULES,
    canonical_schedule,
    check_choice,
)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

PER_BATCH_SCHEDULES = tuple(s for s in SCHEDULES if s not in PER_EPOCH_SCHEDULES)


# --------------------------------------------------------------------------- data


def augment(
    images: torch.Tensor, offsets: Any, flips: Any, pad: int = 4
) -> torch.Tensor:
    """Zero-pad by ``pad``, crop back to ``H×W`` at ``offsets``, mirror where ``flips``.

    ``images``: ``(N, C, H, W)``, any dtype (uint8 for the seed's pipeline: padded pixels are
    0 before normalization, like torchvision's ``Pad(4)`` on a PIL image). ``offsets``:
    ``(N, 2)`` (row, column) crop corners in ``[0, 2·pad]`` of the padded image; ``flips``:
    ``(N,)`` booleans. Arrays of any kind (numpy, JAX, torch) are accepted.
    """
    n, _, h, w = images.shape
    offsets = torch.as_tensor(np.array(offsets), dtype=torch.long, device=images.device)
    flips = torch.as_tensor(np.array(flips), dtype=torch.bool, device=images.device)
    if pad > 0:
        images = F.pad(images, (pad, pad, pad, pad))  # (left, right, top, bottom), zeros
    else:
        offsets = torch.zeros_like(offsets)
    # For every sample, the padded-image rows and columns its crop reads. A flipped sample
    # reads its columns right to left: crop-then-flip in one gather.
    rows = offsets[:, 0, None] + torch.arange(h, device=images.device)  # (N, H)
    cols = offsets[:, 1, None] + torch.arange(w, device=images.device)  # (N, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return images[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def normalize(
    images: torch.Tensor,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """torchvision's ``ToTensor`` + ``Normalize`` on uint8 NCHW: ``(x / 255 - mean) / std``,
    computed in ``dtype`` (float32 as torchvision; float64 for a float64 model)."""
    x = images.to(dtype) / 255.0
    mean_t = torch.tensor(mean, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def nhwc_to_nchw(images: Any) -> torch.Tensor:
    """A channel-last batch (numpy / JAX / torch) as a contiguous NCHW torch tensor."""
    return torch.as_tensor(np.array(images)).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- optimization


def param_groups(
    model: nn.Module, weight_decay: float, decay_norm_and_bias: bool = True
) -> list[dict[str, Any]]:
    """Optimizer param groups: everything decays, or only conv/linear weights (ndim > 1).

    ``decay_norm_and_bias=False`` puts norm scales and biases (the 1-D parameters) in a group
    with ``weight_decay=0``: ``flax_resnet.optim.decay_mask`` as torch param groups.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_norm_and_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` / ``SGD`` / ``Adam`` as ``cfg`` says (betas 0.9/0.999, eps 1e-8).

    The lr is ``cfg.lr``; the scheduler (``make_scheduler``) sets the per-step value.
    """
    check_choice("optimizer", cfg.optimizer, OPTIMIZERS)
    groups = param_groups(model, float(cfg.weight_decay), bool(cfg.decay_norm_and_bias))
    return OPTIMIZER_BUILDERS[cfg.optimizer](groups, float(cfg.lr), cfg)


# optimizer name (flax_resnet.config.OPTIMIZERS) -> (param groups, lr, config) -> optimizer
OPTIMIZER_BUILDERS: dict[str, Callable[[list, float, Any], torch.optim.Optimizer]] = {
    "adamw": lambda groups, lr, cfg: torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999),
                                                       eps=1e-8),
    "sgd": lambda groups, lr, cfg: torch.optim.SGD(groups, lr=lr, momentum=float(cfg.momentum),
                                                   nesterov=bool(cfg.nesterov)),
    "adam": lambda groups, lr, cfg: torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999),
                                                     eps=1e-8),
}


class LRSchedule:
    """A ``torch.optim.lr_scheduler`` object plus *when* to step it.

    Call ``step()`` after every batch: per-batch schedules (``cosine``, ``onecycle``) step the
    torch scheduler every time, per-epoch ones (``PER_EPOCH_SCHEDULES``: ``study``,
    ``multistep``, ``constant``, ``steplr``, ``cosine-epoch``) after the last batch of each
    epoch — the usual PyTorch loops, and what ``make_schedule`` of
    ``flax_resnet.optim`` computes from the update count.
    """

    def __init__(
        self, scheduler: lr_scheduler.LRScheduler, steps_per_epoch: int, per_batch: bool
    ):
        self.scheduler = scheduler
        self.steps_per_epoch = int(steps_per_epoch)
        self.per_batch = per_batch
        self.batches = 0

    def step(self) -> None:
        self.batches += 1
        if self.per_batch or self.batches % self.steps_per_epoch == 0:
            self.scheduler.step()

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Any, steps_per_epoch: int
) -> LRSchedule:
    """The learning-rate schedule of ``cfg.schedule`` as torch scheduler objects.

    * ``study``: ``StepLR(step_size=20, gamma=1/3)`` per epoch (the study divides by 3 after
      every 20th epoch);
    * ``step`` / ``multistep``: ``MultiStepLR(milestones=round(fraction · epochs),
      gamma=lr_gamma)`` per epoch;
    * ``constant``: ``LambdaLR(1)``;
    * ``cosine``: ``LinearLR`` warmup over ``round(warmup_epochs · steps_per_epoch)`` batches
      (first batch at ``lr / warmup``, the last at ``lr``) then ``CosineAnnealingLR`` to 0 at
      the end of training, per batch (``SequentialLR``);
    * ``onecycle``: ``OneCycleLR`` (cosine, ``div_factor=25``, ``final_div_factor=1e4``,
      rising for ``warmup_epochs``, 30 % when 0) per batch, with ``cycle_momentum=False``:
      PyTorch's default also cycles the momentum / beta1, which optax's onecycle does not;
    * ``steplr``: ``StepLR(step_size=lr_step_epochs, gamma=lr_gamma)`` per epoch
      (torchvision's ``--lr-scheduler steplr``);
    * ``cosine-epoch``: per epoch, as torchvision's ``--lr-scheduler cosineannealinglr
      --lr-warmup-method linear``: ``SequentialLR([LinearLR(start_factor=
      warmup_start_factor, total_iters=W), CosineAnnealingLR(T_max=epochs - W,
      eta_min=0)], milestones=[W])`` for ``W = warmup_epochs`` whole epochs, the cosine
      alone when ``W`` is 0.
    """
    spe = int(steps_per_epoch)
    if spe < 1:
        raise ValueError("steps_per_epoch must be >= 1")
    schedule = canonical_schedule(cfg.schedule)
    total = max(1, spe * int(cfg.epochs))
    warmup = int(round(float(cfg.warmup_epochs) * spe))
    scheduler = SCHEDULE_BUILDERS[schedule](optimizer, cfg, total, warmup)
    return LRSchedule(scheduler, spe, schedule in PER_BATCH_SCHEDULES)


def _multistep(optimizer: Any, cfg: Any, total: int, warmup: int) -> lr_scheduler.LRScheduler:
    milestones = sorted(round(m * int(cfg.epochs)) for m in cfg.lr_milestones)
    return lr_scheduler.MultiStepLR(optimizer, milestones, gamma=float(cfg.lr_gamma))


def _cosine(optimizer: Any, cfg: Any, total: int, warmup: int) -> lr_scheduler.LRScheduler:
    cosine = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    if warmup == 0:
        return cosine
    # LinearLR's factor at batch i is start + (1 - start) · i / total_iters; with
    # start = 1/warmup and total_iters = warmup - 1 that is (i + 1) / warmup.
    warm = lr_scheduler.LinearLR(
        optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup - 1
    )
    return lr_scheduler.SequentialLR(optimizer, [warm, cosine], milestones=[warmup])


def _onecycle(optimizer: Any, cfg: Any, total: int, warmup: int) -> lr_scheduler.LRScheduler:
    return lr_scheduler.OneCycleLR(
        optimizer, max_lr=float(cfg.lr), total_steps=total,
        pct_start=warmup / total if warmup > 0 else 0.3, anneal_strategy="cos",
        cycle_momentum=False, div_factor=25.0, final_div_factor=1e4,
    )


def _cosine_epoch(optimizer: Any, cfg: Any, total: int, warmup: int
                  ) -> lr_scheduler.LRScheduler:
    # torchvision's train.py, with epochs instead of batches (``total``/``warmup`` unused)
    epochs, warmup_epochs = int(cfg.epochs), int(cfg.warmup_epochs)
    cosine = lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs - warmup_epochs,
                                            eta_min=0.0)
    if warmup_epochs == 0:
        return cosine
    warm = lr_scheduler.LinearLR(optimizer, start_factor=float(cfg.warmup_start_factor),
                                 total_iters=warmup_epochs)
    return lr_scheduler.SequentialLR(optimizer, [warm, cosine], milestones=[warmup_epochs])


# canonical schedule name (flax_resnet.config.SCHEDULES) -> (optimizer, config, total
# batches, warmup batches) -> torch scheduler; PER_BATCH_SCHEDULES step every batch
SCHEDULE_BUILDERS: dict[str, Callable[..., lr_scheduler.LRScheduler]] = {
    "study": lambda opt, cfg, total, warmup: lr_scheduler.StepLR(opt, step_size=20,
                                                                 gamma=1 / 3),
    "multistep": _multistep,
    "cosine": _cosine,
    "onecycle": _onecycle,
    "constant": lambda opt, cfg, total, warmup: lr_scheduler.LambdaLR(opt, lambda _: 1.0),
    "steplr": lambda opt, cfg, total, warmup: lr_scheduler.StepLR(
        opt, step_size=int(cfg.lr_step_epochs), gamma=float(cfg.lr_gamma)),
    "cosine-epoch": _cosine_epoch,
}
assert tuple(SCHEDULE_BUILDERS) == SCHEDULES


def make_criterion(cfg: Any) -> nn.CrossEntropyLoss:
    """Mean cross entropy with ``cfg.label_smoothing`` (target ``(1-ε)·onehot + ε/K``)."""
    return nn.CrossEntropyLoss(label_smoothing=float(cfg.label_smoothing))


# --------------------------------------------------------------------------- steps


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRSchedule | None,
    images: torch.Tensor,
    labels: torch.Tensor,
    criterion: nn.Module | None = None,
) -> torch.Tensor:
    """One update on a normalized NCHW batch; returns the (detached) mean loss.

    ``criterion`` defaults to ``nn.CrossEntropyLoss()``. The scheduler, if any, is stepped
    after the optimizer (``LRSchedule`` decides whether the lr changes at this batch).
    """
    criterion = nn.CrossEntropyLoss() if criterion is None else criterion
    model.train()
    loss = criterion(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.detach()


@torch.no_grad()
def evaluate(
    model: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    flip: bool = False,
) -> dict[str, float]:
    """Mean cross entropy (no smoothing) and accuracy over normalized NCHW batches.

    ``model`` is the network (put in eval mode here) or any callable to logits, e.g. one
    under autocast. ``flip`` adds ``acc_flip``: the argmax of the summed logits of each image
    and its horizontal mirror (flip test-time augmentation, ``flax_resnet``'s ``eval_flip``).
    Sums stay on the device (float64 loss): one host sync, at the end.
    """
    if isinstance(model, nn.Module):
        model.eval()
    losses, hits, hits_flip, count = [], [], [], 0
    for images, labels in batches:
        logits = model(images).float()
        losses.append(F.cross_entropy(logits, labels, reduction="sum").double())
        hits.append((logits.argmax(1) == labels).sum())
        if flip:
            both = logits + model(images.flip(3)).float()  # NCHW: dim 3 is the width
            hits_flip.append((both.argmax(1) == labels).sum())
        count += int(labels.shape[0])
    n = max(count, 1)
    out = {"loss": float(sum(losses, 0.0)) / n, "acc": int(sum(hits, 0)) / n, "count": count}
    if flip:
        out["acc_flip"] = int(sum(hits_flip, 0)) / n
    return out


__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "LRSchedule", "OPTIMIZERS", "PER_BATCH_SCHEDULES",
    "SCHEDULES", "augment", "evaluate", "make_criterion", "make_optimizer", "make_scheduler",
    "nhwc_to_nchw", "normalize", "param_groups", "train_step",
]

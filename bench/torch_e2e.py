"""PyTorch end to end on a JPEG folder: DataLoader workers feeding a torch_ref ResNet.

    python -m bench.torch_e2e --root DIR [--config resnet50-b256-bf16-in224] [--workers 12]
                              [--steps 400] [--time-limit 60] [--epoch-images N] [--json FILE]

What a PyTorch user runs: ``torchvision.datasets.ImageFolder(DIR/train)`` with
``RandomResizedCrop(size) + RandomHorizontalFlip + PILToTensor`` (uint8) in a
``DataLoader(num_workers=W, pin_memory=True, persistent_workers=True, drop_last=True)``,
shuffled; each batch copied to the GPU (``non_blocking``), made channels_last, normalised
there (ImageNet's mean/std), then the step of ``bench/torch_side.py`` for the same config:
``torch_ref`` from the TrainConfig of ``--recipe`` (default fast) at the config's
depth/width with the ImageNet stem and 1000 classes, channels_last, bf16 autocast for
``bf16``, the recipe's cross-entropy (fast: label smoothing 0.1), SGD with momentum
(``fused=True`` on the GPU), the per-batch scheduler, ``cudnn.benchmark``. Timed as
bench/e2e.py says; the result is one JSON.

Epochs: the shuffled sampler draws ``--epoch-images`` indices per epoch (default ImageNet's
1,281,167: reshuffled passes over the folder), so that a small folder does not put an epoch
boundary, where the loader's workers restart their prefetching, every few steps; a real
ImageNet epoch has ~5,000 steps of 256. ``--epoch-images 0``: the folder's own epochs
(``shuffle=True``), boundaries included (counted as ``epochs_started``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from bench.configs import IMAGENET_TRAIN_IMAGES
from bench.e2e import finish, parse_args, parser, timed_run


def run(args: Any, cfg: Any) -> dict[str, Any]:
    import torch
    import torchvision
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    import torch_ref
    from bench.run import train_config
    from bench.torch_side import (
        environment,
        make_forward_loss,
        make_optimizer,
        make_update,
    )
    from flax_resnet.config import TrainConfig
    from torch_ref.training import make_criterion, make_scheduler

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    bf16 = cfg.precision == "bf16"
    if bf16 and not cuda:
        raise SystemExit("torch_e2e: bf16 needs a GPU here (CPU autocast is not benchmarked); "
                         "give an fp32 config")

    ds = ImageFolder(str(args.root / "train"), transform=T.Compose(
        [T.RandomResizedCrop(cfg.image_size), T.RandomHorizontalFlip(), T.PILToTensor()]))
    if len(ds) < cfg.batch:
        raise SystemExit(f"torch_e2e: {len(ds)} training images under {args.root}/train, "
                         f"fewer than one batch of {cfg.batch}")
    epoch_images = args.epoch_images
    if epoch_images:
        sampler = torch.utils.data.RandomSampler(ds, num_samples=max(epoch_images, cfg.batch))
        shuffle = None
    else:
        sampler, shuffle = None, True
    loader = torch.utils.data.DataLoader(
        ds, batch_size=cfg.batch, shuffle=shuffle, sampler=sampler, drop_last=True,
        num_workers=args.workers, pin_memory=cuda, persistent_workers=args.workers > 0)

    tc = TrainConfig.from_dict(train_config(cfg, args.recipe, None))
    spe = len(ds) // cfg.batch
    model = torch_ref.from_config(tc.model)
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    model = model.to(dev, memory_format=memory_format).train()
    opt = make_optimizer(model, tc, cuda)
    sched = make_scheduler(opt, tc, spe)
    criterion = make_criterion(tc)
    mean, std = cfg.mean_std
    forward_loss = make_forward_loss(model, criterion, mean, std, bf16=bf16, augment=False)

    state = {"it": iter(loader), "epochs": 1}

    def next_batch():
        try:
            images, labels = next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            state["epochs"] += 1
            images, labels = next(state["it"])
        # NCHW uint8 from PILToTensor -> NHWC memory on the device (channels_last), passed as
        # the NHWC view make_forward_loss takes (its float output is channels_last as is).
        images = images.to(dev, non_blocking=True).contiguous(memory_format=memory_format)
        return images.permute(0, 2, 3, 1), labels.to(dev, non_blocking=True)

    update, sync = make_update(forward_loss, opt, sched, cuda)

    def step(batch):
        return update(*batch)

    result = timed_run(next_batch, step, sync, batch=cfg.batch, warmup=args.warmup,
                       warmup_s=args.warmup_s, steps=args.steps, time_limit=args.time_limit)
    loss = float(step(next_batch()).item())
    return {
        "framework": "torch", "train_images": len(ds), "classes": len(ds.classes),
        "epoch_images": epoch_images or len(ds), "epochs_started": state["epochs"],
        "loss": loss, "device": environment().get("device_kind"),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
        "pipeline": "torchvision ImageFolder + RandomResizedCrop + RandomHorizontalFlip + "
                    "PILToTensor in a DataLoader" + (" (pin_memory)" if cuda else ""),
        "step": "torch_ref, " + ("channels_last, " if cuda else "NCHW (CPU), ") +
                ("bf16 autocast, " if bf16 else "") + ("fused " if cuda else "") +
                "SGD (bench.torch_side)",
        **result,
    }


def main(argv: list[str] | None = None) -> int:
    # Before torch loads OpenMP: spinning OpenMP threads make the CPU ops of the main
    # process several times slower while the loader's workers share its cores (as in
    # bench/run.py's torch workers); waiting passively costs nothing measurable on a GPU.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    p = parser("python -m bench.torch_e2e", __doc__.split("\n\n")[0])
    p.add_argument("--epoch-images", type=int, default=IMAGENET_TRAIN_IMAGES,
                   help="indices the shuffled sampler draws per epoch (default ImageNet's); "
                        "0: the folder's own epochs")
    args, cfg = parse_args(p, argv)
    if args.epoch_images < 0:
        p.error(f"--epoch-images {args.epoch_images} must be >= 0")
    return finish(run(args, cfg), args, cfg)


if __name__ == "__main__":
    sys.exit(main())

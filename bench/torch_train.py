"""The PyTorch side of time-to-accuracy: ``torch_ref`` trained with a ``flax_resnet`` recipe.

    python bench/torch_train.py --recipe fast --dataset folder:data/cifar10-jpeg --workdir W
        [--dtype bfloat16] [--compile] [--epochs N] [--depth D] [--width W] [--batch-size B]

The recipe (optimizer, schedule, label smoothing, weight-decay mask, init, zero-init-residual,
data order) is ``flax_resnet.training.make_config``'s, so both frameworks train the same
thing; the step is the benchmark's PyTorch best practice (``bench.torch_side``): model and
input in ``channels_last``, bf16 through ``torch.autocast`` with float32 parameters, the
fused optimizer, the whole data set on the device and the augmentation there in tensor ops,
one host sync per epoch. ``W/metrics.jsonl`` gets one line per epoch with the fields of
``train.py``'s (``epoch``, ``test_acc``, ``elapsed_s`` = cumulative train + eval seconds, ...),
so ``bench/time_to_accuracy.py --train-script bench/torch_train.py`` times both the same way.
No checkpoints: this is a benchmark, not a product entry point.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="fast", help="flax_resnet.training recipe")
    p.add_argument("--dataset", required=True, help="flax_resnet.data spec, e.g. folder:PATH")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--workdir", required=True, help="metrics.jsonl goes here")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the forward + loss")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--width", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--eval-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="flip test-time augmentation, as train.py (default: the recipe's)")
    p.add_argument("--eval-batch-size", type=int, default=1000)
    p.add_argument("--no-progress", action="store_true", help="accepted for train.py parity")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # flax_resnet supplies the recipe and the data only: keep JAX off the GPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np
    import torch

    import torch_ref
    from bench.augment import normalize_coeffs
    from bench.torch_side import make_forward_loss, make_optimizer, set_tf32
    from flax_resnet import data as data_lib
    from flax_resnet.batches import steps_per_epoch
    from flax_resnet.config import make_config
    from torch_ref.training import evaluate, make_criterion, make_scheduler

    try:
        cfg = make_config(
            args.recipe, dataset=args.dataset, dtype=args.dtype, epochs=args.epochs,
            depth=args.depth, width=args.width, batch_size=args.batch_size, seed=args.seed,
            eval_flip=args.eval_flip,
        )
    except ValueError as e:
        print(f"torch_train: error: {e}", file=sys.stderr)
        return 2
    ds = data_lib.load_dataset(args.dataset, args.data_dir)
    cfg = cfg.replace(num_classes=ds.num_classes)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    bf16 = cfg.dtype == "bfloat16"
    if bf16 and not cuda:
        print("torch_train: error: --dtype bfloat16 needs a GPU here", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    set_tf32(True)  # JAX's default for float32 on GPU
    torch.manual_seed(cfg.seed)

    model = torch_ref.from_config(cfg.model)
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    model = model.to(dev, memory_format=memory_format)
    spe = steps_per_epoch(len(ds.train), cfg.batch_size)
    opt = make_optimizer(model, cfg, cuda)
    sched = make_scheduler(opt, cfg, spe)
    criterion = make_criterion(cfg)

    train_x = torch.from_numpy(ds.train.images).to(dev)
    train_y = torch.from_numpy(ds.train.labels.astype(np.int64)).to(dev)
    test_x = torch.from_numpy(ds.test.images).to(dev)
    test_y = torch.from_numpy(ds.test.labels.astype(np.int64)).to(dev)

    train_logits_loss = make_forward_loss(model, criterion, ds.mean, ds.std, bf16=bf16,
                                          compile=args.compile)

    # Device-side constants: torch_ref's normalize would copy mean/std to the GPU per batch.
    scale, shift = (torch.tensor(v, device=dev) for v in normalize_coeffs(ds.mean, ds.std))

    def test_batches():
        for i in range(0, len(test_x), args.eval_batch_size):
            x = (test_x[i : i + args.eval_batch_size].float() * scale + shift).permute(0, 3, 1, 2)
            yield x.contiguous(memory_format=memory_format), test_y[i : i + args.eval_batch_size]

    def test_logits(x):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            return model(x)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    metrics_path = workdir / "metrics.jsonl"
    metrics_path.write_text("")
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(f"torch {torch.__version__} on {name}: {args.recipe} recipe, depth {cfg.model.depth}, "
          f"width {cfg.model.width}, {cfg.dtype}, batch {cfg.batch_size}, {cfg.epochs} epochs, "
          f"compile {args.compile}", flush=True)
    elapsed = 0.0
    for epoch in range(cfg.epochs):
        sync()
        t0 = time.perf_counter()
        model.train()
        order = torch.from_numpy(data_lib.epoch_permutation(cfg.seed, epoch, len(ds.train)))
        order = order.to(dev)
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        lr = float("nan")
        for i in range(spe):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            labels = train_y[idx]
            logits, loss = train_logits_loss(train_x[idx], labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            loss_sum += loss.detach() * cfg.batch_size
            correct += (logits.argmax(1) == labels).sum()
        sync()
        train_time = time.perf_counter() - t0
        model.eval()
        test = evaluate(test_logits, test_batches(), flip=cfg.eval_flip)
        n_train = spe * cfg.batch_size
        row = {
            "epoch": epoch + 1, "step": (epoch + 1) * spe,
            "train_loss": float(loss_sum) / n_train, "train_acc": int(correct) / n_train,
            "test_loss": test["loss"], "test_acc": test["acc"], "lr": lr,
        }
        if cfg.eval_flip:
            row["test_acc_flip"] = test["acc_flip"]
        epoch_time = time.perf_counter() - t0
        elapsed += epoch_time
        row.update(epoch_time_s=epoch_time, train_images_per_s=n_train / train_time,
                   elapsed_s=elapsed)
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f} acc "
              f"{100 * row['train_acc']:.2f}% | test loss {row['test_loss']:.4f} acc "
              f"{100 * row['test_acc']:.2f}%"
              + (f" (flip TTA {100 * row['test_acc_flip']:.2f}%)" if cfg.eval_flip else "")
              + f" | lr {lr:.3g} | {epoch_time:.1f}s "
              f"({row['train_images_per_s']:,.0f} img/s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

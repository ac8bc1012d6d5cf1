#!/usr/bin/env python
"""Train the Flax ResNet and the PyTorch reference side by side on the same data.

Both frameworks start from the same initial weights (the ``torch_ref`` model's, loaded into
the Flax model), see the same batches in the same order (``flax_resnet.data``'s epoch
permutation) with the same augmentation (the crops and flips the Flax step draws, replayed in
torch), and follow the same recipe (``flax_resnet.training.TrainConfig``: optimizer, schedule,
label smoothing, weight-decay mask). It prints both loss curves as a table, both test
accuracies, the date and the library versions.

    python scripts/train_side_by_side.py --depth 20 --width 0.5 --steps 200 --batch 64 \\
        --test-subset 2000 --device cpu

Expect the two loss columns to agree to ~1e-6 for the first steps and then to drift apart:
float32 training of a ReLU network is chaotic, so rounding-level differences (the frameworks
sum convolutions in different orders) grow until the two runs are different samples of the
same training process. The curves and the accuracies should agree statistically; exact
step-for-step parity is what ``parity_tests/test_training_parity.py`` proves.

On a GPU (``--device cuda``) TF32 is switched off on both sides (``torch.backends`` flags,
``jax_default_matmul_precision='highest'``) so both compute in true float32.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", default="folder:data/cifar10-jpeg",
                   help="flax_resnet.data spec: folder:PATH, cifar10, synthetic[:N[:M]]")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--norm", default="bn", help="bn, ln, gn, in, rms")
    p.add_argument("--norm-groups", type=int, default=None,
                   help="GroupNorm groups (default: the recipe's, 32)")
    p.add_argument("--stem", default=None, help="imagenet or cifar (default: the depth's)")
    p.add_argument("--init", default="torch", help="init scheme of the torch_ref model")
    p.add_argument("--recipe", default="study", help="flax_resnet.training recipe: study, he, fast")
    p.add_argument("--optimizer", default=None, help="adamw, sgd, adam (default: the recipe's)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--decay-norm-bias", dest="decay_norm_and_bias",
                   action=argparse.BooleanOptionalAction, default=None,
                   help="weight decay on norm scales and biases too (default: the recipe's)")
    p.add_argument("--schedule", default=None,
                   help="seed, multistep, cosine, onecycle, constant (default: the recipe's)")
    p.add_argument("--epochs", type=int, default=None,
                   help="schedule horizon in epochs (default: the epochs the steps span)")
    p.add_argument("--warmup-epochs", type=float, default=None)
    p.add_argument("--label-smoothing", type=float, default=None)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", "--batch-size", dest="batch", type=int, default=64)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--test-subset", type=int, default=2000,
                   help="evaluate on this many test images (a fixed random subset); 0 = all")
    p.add_argument("--eval-batch", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch intra-op threads (on a busy CPU, 1 is often fastest)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Pick JAX's platform before JAX is imported.
    os.environ.setdefault("JAX_PLATFORMS", "cpu" if args.device == "cpu" else "cuda")

    import jax
    import numpy as np
    import torch

    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 in JAX
    torch.backends.cuda.matmul.allow_tf32 = False  # no TF32 in torch
    torch.backends.cudnn.allow_tf32 = False
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    tdev = torch.device(args.device)

    import flax
    import optax
    from flax import nnx

    import torch_ref
    from flax_resnet import data as data_lib
    from flax_resnet import training as ftrain
    from flax_resnet.batches import eval_batches, steps_per_epoch
    from flax_resnet.config import make_config
    from flax_resnet.convert import load_torch_state_dict
    from flax_resnet.program import DataSpec, build_program
    from flax_resnet.sharding import make_mesh, put_batch
    from torch_ref import training as ttrain

    jdev = jax.devices()[0]
    if args.device == "cuda" and jdev.platform != "gpu":
        print(f"error: --device cuda but JAX runs on {jdev.platform}", file=sys.stderr)
        return 2

    ds = data_lib.load_dataset(args.dataset, args.data_dir)
    spe = steps_per_epoch(len(ds.train), args.batch)
    epochs = args.epochs or max(1, math.ceil(args.steps / spe))
    cfg = make_config(
        args.recipe, dataset=args.dataset, depth=args.depth, width=args.width, norm=args.norm,
        norm_groups=args.norm_groups, stem=args.stem, init=args.init,
        optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
        momentum=args.momentum, nesterov=args.nesterov,
        decay_norm_and_bias=args.decay_norm_and_bias, schedule=args.schedule, epochs=epochs,
        warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
        batch_size=args.batch, seed=args.seed, num_classes=ds.num_classes,
    )

    # --- the same initial weights: torch_ref's, loaded into the Flax model
    torch.manual_seed(args.seed)
    tmodel = torch_ref.from_config(cfg.model)
    fmodel = nnx.eval_shape(lambda: ftrain.create_model(cfg))
    load_torch_state_dict(fmodel, tmodel.state_dict())
    tmodel.to(tdev)

    # --- Flax: the product's optimizer, state and jitted steps
    mesh = make_mesh([jdev])
    program, state = build_program(cfg, mesh, DataSpec(spe, ds.image_shape, ds.mean, ds.std),
                                   initial=fmodel)
    train_step, eval_step = program.train_step, program.eval_step

    # --- torch: the reference optimizer, scheduler and loss
    optimizer = ttrain.make_optimizer(tmodel, cfg)
    scheduler = ttrain.make_scheduler(optimizer, cfg, spe)
    criterion = ttrain.make_criterion(cfg)

    now = datetime.datetime.now().astimezone().isoformat(" ", "seconds")
    print(f"# Flax (NNX) vs PyTorch, side by side — {now}")
    print(f"# python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, "
          f"optax {optax.__version__}, torch {torch.__version__}, numpy {np.__version__}")
    tname = torch.cuda.get_device_name(tdev) if tdev.type == "cuda" else platform.processor() \
        or platform.machine()
    print(f"# devices: jax {jdev.platform}:{jdev.device_kind}, torch {tdev} ({tname}); "
          f"TF32 off on both sides; torch threads {torch.get_num_threads()}")
    print(f"# data {ds.name}: {len(ds.train)} train / {len(ds.test)} test, batch {args.batch}, "
          f"{spe} steps per epoch, {args.steps} steps")
    m = cfg.model
    print(f"# model: depth {m.depth}, width {m.width}, norm {m.norm}, stem {m.stem}, init "
          f"{m.init} (torch_ref's weights copied to Flax)")
    print(f"# recipe {args.recipe}: {cfg.optimizer} lr {cfg.lr} wd {cfg.weight_decay} "
          f"momentum {cfg.momentum} nesterov {cfg.nesterov} decay_norm_and_bias "
          f"{cfg.decay_norm_and_bias}, schedule {cfg.schedule} over {cfg.epochs} epochs "
          f"(warmup {cfg.warmup_epochs}), label smoothing {cfg.label_smoothing}")
    print()
    header = (f"{'step':>6} {'lr':>10} {'torch loss':>11} {'flax loss':>11} "
              f"{'max rel diff':>13}  (losses: mean over the last {args.log_every} steps)")
    print(header)
    print("-" * len(header))

    t_losses: list[float] = []
    f_losses: list[float] = []
    t_time = f_time = 0.0
    step = 0
    epoch = 0
    while step < args.steps:
        order = data_lib.epoch_permutation(cfg.seed, epoch, len(ds.train))
        for i in range(spe):
            if step >= args.steps:
                break
            idx = order[i * args.batch : (i + 1) * args.batch]
            images, labels = ds.train.images[idx], ds.train.labels[idx]
            lr = optimizer.param_groups[0]["lr"]

            t0 = time.perf_counter()
            batch = put_batch(mesh, args.batch, images, labels)
            state, metrics = train_step(state, ftrain.zero_metrics(), *batch)
            f_losses.append(float(metrics["loss_sum"]) / args.batch)
            t1 = time.perf_counter()

            # The crops and flips the Flax step drew at this step (its documented key).
            key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), step)
            offsets, flips = data_lib.augment_params(key, args.batch, cfg.augment_pad)
            x = ttrain.nhwc_to_nchw(images).to(tdev)
            if cfg.augment:
                x = ttrain.augment(x, offsets, flips, cfg.augment_pad)
            x = ttrain.normalize(x, ds.mean, ds.std)
            y = torch.as_tensor(labels, dtype=torch.long, device=tdev)
            t_losses.append(float(ttrain.train_step(tmodel, optimizer, scheduler, x, y,
                                                    criterion)))
            t2 = time.perf_counter()
            f_time += t1 - t0
            t_time += t2 - t1
            step += 1
            if step % args.log_every == 0 or step == args.steps:
                k = (step - 1) % args.log_every + 1
                tl, fl = np.array(t_losses[-k:]), np.array(f_losses[-k:])
                rel = np.max(np.abs(fl - tl) / np.abs(tl))
                print(f"{step:6d} {lr:10.3e} {tl.mean():11.5f} {fl.mean():11.5f} {rel:13.2e}")
        epoch += 1

    t_all, f_all = np.array(t_losses), np.array(f_losses)
    rel_all = np.abs(f_all - t_all) / np.abs(t_all)
    above = np.flatnonzero(rel_all > 1e-3)
    onset = f"step {above[0] + 1}" if above.size else "never"
    print()
    print(f"per-step loss, |flax - torch| / torch: step 1 {rel_all[0]:.1e}, median of the first "
          f"10 steps {np.median(rel_all[:10]):.1e}; first above 1e-3: {onset}")

    # --- test accuracy on the same (fixed random) subset
    n_test = len(ds.test) if args.test_subset <= 0 else min(args.test_subset, len(ds.test))
    pick = np.sort(np.random.default_rng(1234).permutation(len(ds.test))[:n_test])
    test = data_lib.ArraySource(ds.test.images[pick], ds.test.labels[pick])
    f_eval = ftrain.evaluate(eval_step, state, mesh, eval_batches(test, args.eval_batch, mesh))

    def torch_batches():
        for start in range(0, n_test, args.eval_batch):
            imgs = ttrain.nhwc_to_nchw(test.images[start : start + args.eval_batch]).to(tdev)
            yield (ttrain.normalize(imgs, ds.mean, ds.std),
                   torch.as_tensor(test.labels[start : start + args.eval_batch],
                                   dtype=torch.long, device=tdev))

    t_eval = ttrain.evaluate(tmodel, torch_batches())
    print(f"test subset ({n_test} images):   torch acc {100 * t_eval['acc']:6.2f} %  "
          f"loss {t_eval['loss']:.4f}   |   flax acc {100 * f_eval['acc']:6.2f} %  "
          f"loss {f_eval['loss']:.4f}")
    print(f"train time (incl. the first-step compile): torch {t_time:.1f} s, flax {f_time:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

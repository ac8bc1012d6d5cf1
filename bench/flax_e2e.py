"""flax_resnet end to end on a JPEG folder: train.py's pipeline feeding train.py's step.

    python -m bench.flax_e2e --root DIR [--config resnet50-b256-bf16-in224] [--workers 12]
                             [--steps 400] [--time-limit 60] [--json FILE]

The objects ``train.py --dataset folder:DIR --image-size S --data-workers W`` runs, without
its evaluation, checkpoints and logging: ``flax_resnet.run_data.open_run_data`` (the streamed
folder, ``RandomResizedCropFlip`` in ``W`` grain worker processes), its ``train_batches``
(``pipeline.StreamedBatches``: uint8 NHWC batches put on the device) and the train step of
``program.build_program`` for the TrainConfig of ``--recipe`` (default fast) at the config's
depth/width, the ImageNet stem, 1000 classes, batch and dtype (the step normalises only:
augment random-resized-crop), the config bench/torch_e2e.py builds its PyTorch step from.
Timed as bench/e2e.py says, ``data_wait`` counted where the trainer counts it (the
``next`` of the batches). The data order runs on over the folder's epochs without a pause
(one stream of global steps), as in ``train.py``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.e2e import finish, parse_args, parser, timed_run


def run(args: Any, cfg: Any) -> dict[str, Any]:
    import flax
    import jax

    from bench.flax_side import environment
    from bench.run import train_config
    from flax_resnet import training as T
    from flax_resnet.batches import DataPosition, steps_per_epoch
    from flax_resnet.config import TrainConfig
    from flax_resnet.program import DataSpec, build_program
    from flax_resnet.run_data import open_run_data
    from flax_resnet.sharding import make_mesh

    tc = TrainConfig.from_dict(train_config(cfg, args.recipe, None)).replace(
        dataset=f"folder:{args.root}", seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="flax-e2e-") as workdir:
        data = open_run_data(tc, None, args.workers, False, None, Path(workdir),
                             lambda line: print(f"[flax_e2e] {line}", file=sys.stderr))
        # The folder's classes label the images; the head keeps the config's 1000 classes,
        # as torch_e2e's does (its cost, not the labels, is what is measured).
        run_cfg = data.cfg.replace(num_classes=cfg.num_classes)
        n = len(data.ds.train)
        spe = steps_per_epoch(n, cfg.batch)
        if spe < 1:
            raise SystemExit(f"flax_e2e: {n} training images under {args.root}/train, fewer "
                             f"than one batch of {cfg.batch}")
        mesh = make_mesh()
        stats = data.stats
        program, state = build_program(
            run_cfg, mesh, DataSpec(spe, data.image_shape, tuple(stats.mean), tuple(stats.std)))
        holder: dict[str, Any] = {"state": state, "metrics": program.zero_metrics(),
                                  "batches": None}
        del state

        def next_batch():
            if holder["batches"] is None:  # made at the first call, as torch_e2e's iterator
                holder["batches"] = data.train_batches(
                    mesh, DataPosition(0, 0, run_cfg.seed), 10**9)  # no end: the protocol stops
            return next(holder["batches"])

        def step(batch):
            holder["state"], holder["metrics"] = program.train_step(
                holder["state"], holder["metrics"], *batch)
            return holder["metrics"]

        try:
            result = timed_run(next_batch, step, jax.block_until_ready, batch=cfg.batch,
                               warmup=args.warmup, warmup_s=args.warmup_s, steps=args.steps,
                               time_limit=args.time_limit)
        finally:
            if holder["batches"] is not None:
                holder["batches"].close()
        loss = T.summarize(holder["metrics"])["loss"]
        epochs = holder["batches"].position.epoch + 1
    env = environment()
    return {
        "framework": "flax", "train_images": n, "classes": data.ds.num_classes,
        "epoch_images": n, "epochs_started": epochs, "loss": loss,
        "device": env["device_kind"], "backend": env["backend"],
        "versions": {"jax": jax.__version__, "flax": flax.__version__},
        "pipeline": "flax_resnet.run_data.open_run_data -> pipeline.StreamedBatches "
                    f"(RandomResizedCropFlip in grain workers, augment {run_cfg.augment})",
        "step": "program.build_program's train_step (flax_resnet.training.make_train_step), "
                f"dtype {run_cfg.dtype}",
        **result,
    }


def main(argv: list[str] | None = None) -> int:
    p = parser("python -m bench.flax_e2e", __doc__.split("\n\n")[0])
    args, cfg = parse_args(p, argv)
    return finish(run(args, cfg), args, cfg)


if __name__ == "__main__":
    sys.exit(main())

"""flax-resnet-eval: the accuracy of weights on a data set's evaluation split.

    flax-resnet-eval WEIGHTS --dataset folder:PATH|imagenet2012|cifar10 [--json FILE]

WEIGHTS is any source ``flax_resnet.load`` reads (a PyTorch file in any naming, a timm or
Hugging Face directory, a Flax checkpoint, a ``train.py`` run directory). Prints top-1,
top-5 and images/s; ``--json`` writes them with the per-class accuracy (and, with
``--per-image``, every image's top-5). Exit status: 0 done; 2 bad input (weights, data or a
flag), with a message naming it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flax_resnet.config import INTERPOLATIONS

PROG = "flax-resnet-eval"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("weights", help="weights: a file, a directory or a train.py run")
    p.add_argument("--dataset", required=True,
                   help="cifar10, cifar100, imagenet2012, folder:PATH (its val/ or test/)")
    p.add_argument("--data-dir", default="data", help="tensorflow-datasets' data directory")
    p.add_argument("--step", type=int, default=None, help="a run's checkpoint (default: "
                   "the latest)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=None,
                   help="center crop (default: the weights' input size, else 224)")
    p.add_argument("--resize-size", type=int, default=None,
                   help="resize of the shorter side (default: image size / crop pct)")
    p.add_argument("--crop-pct", type=float, default=None,
                   help="image size / resize size (default: the weights', else 0.875)")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, default=None,
                   help="resampling filter (default: the weights', else bilinear)")
    p.add_argument("--data-workers", type=int, default=None,
                   help="loader processes (default: the cores but one, at most 16)")
    p.add_argument("--per-image", action="store_true",
                   help="also write every image's top-5 into the JSON")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flax_resnet.evaluation import EvalSettings, evaluate_weights
    from flax_resnet.sources import DataError
    from flax_resnet.weights import resolve

    for flag, value, least in (("--batch-size", args.batch_size, 1),
                               ("--image-size", args.image_size, 1),
                               ("--resize-size", args.resize_size, 1),
                               ("--data-workers", args.data_workers, 0)):
        if value is not None and value < least:
            print(f"{PROG}: error: {flag} {value} must be >= {least}", file=sys.stderr)
            return 2
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        print(f"{PROG}: error: --crop-pct {args.crop_pct} must be in (0, 1]", file=sys.stderr)
        return 2
    settings = EvalSettings(args.batch_size, args.image_size, args.resize_size,
                            args.crop_pct, args.interpolation, args.data_workers,
                            args.per_image, args.progress)
    try:
        weights = resolve(args.weights, step=args.step)
        result = evaluate_weights(weights, args.dataset, args.data_dir, settings,
                                  say=lambda line: print(line, file=sys.stderr))
    except (OSError, ValueError, DataError) as e:  # ConversionError, BadImagesError, ...
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    rate = result["images_per_s"]
    print(f"top-1 {100 * result['top1']:.3f}%  top-5 {100 * result['top5']:.3f}%  "
          f"({result['images']} images" + (f", {rate:,.0f} images/s)" if rate else ")"))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

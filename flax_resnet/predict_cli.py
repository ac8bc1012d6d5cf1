"""flax-resnet-predict: the top-k classes of images, with names, from any weights.

    flax-resnet-predict WEIGHTS IMAGE... [--top-k 5] [--json FILE]

WEIGHTS is any source ``flax_resnet.load`` reads; the images go through the weights' own
evaluation transform. Names: a run's folder names, Hugging Face's id2label, ImageNet-1k's
for 1000-class weights. Exit status: 0 done; 2 bad input, with a message naming it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "flax-resnet-predict"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("weights", help="weights: a file, a directory or a train.py run")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, any size and mode)")
    p.add_argument("--step", type=int, default=None, help="a run's checkpoint (default: "
                   "the latest)")
    p.add_argument("--top-k", type=int, default=5, help="classes shown per image")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flax_resnet.prediction import predict
    from flax_resnet.sources import DataError
    from flax_resnet.weights import resolve

    if args.top_k < 1:
        print(f"{PROG}: error: --top-k {args.top_k} must be >= 1", file=sys.stderr)
        return 2
    try:
        results = predict(resolve(args.weights, step=args.step), args.images, args.top_k)
    except (OSError, ValueError, DataError) as e:  # BadImageError names the image
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(r["image"])
        for t in r["top"]:
            print(f"  {100 * t['probability']:6.2f}%  {t['class']:>4}  {t['name']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

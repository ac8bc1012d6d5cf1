"""flax-resnet-export: weights' eval-mode forward as a serving artifact.

    flax-resnet-export WEIGHTS OUT_DIR [--format stablehlo|onnx] [--platforms cpu,cuda]
                       [--with-preprocessing] [--image-size S] [--dtype float32] [--no-check]

WEIGHTS is any source ``flax_resnet.load`` reads (a file, a directory, a train.py run, an
``hf-hub:`` or ``torchvision:`` name). Writes OUT_DIR/model.jax (a serialized jax.export
artifact: ``jax.export.deserialize``) or OUT_DIR/model.onnx, and OUT_DIR/export.json (inputs,
outputs, the host's preprocessing, class names, the check). The artifact is checked against
the float64 model before the command succeeds. Exit status: 0 done; 2 bad input or a failed
check, with a message naming it.
"""

from __future__ import annotations

import argparse
import sys

from flax_resnet.export import DTYPES, FORMATS, PLATFORMS

PROG = "flax-resnet-export"


def build_parser() -> argparse.ArgumentParser:
    # Defaults are said in each help text: several are "the weights'" rather than a value.
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("weights", help="weights: a file, a directory, a train.py run or a name "
                   "(hf-hub:ORG/NAME, torchvision:MODEL.ENTRY)")
    p.add_argument("out_dir", help="output directory (created if missing)")
    p.add_argument("--step", type=int, default=None, help="a run's checkpoint (default: "
                   "the latest)")
    p.add_argument("--format", choices=FORMATS, default="stablehlo",
                   help="stablehlo (default): a jax.export artifact, model.jax; onnx: model.onnx "
                   "through the PyTorch twin (needs pip install 'flax_resnet[onnx]')")
    p.add_argument("--platforms", default=None,
                   help=f"comma-separated, of {', '.join(PLATFORMS)} (stablehlo only; "
                   "default: this machine's)")
    p.add_argument("--with-preprocessing", action="store_true",
                   help="take uint8 images of --image-size and normalise inside with the "
                   "weights' mean/std")
    p.add_argument("--image-size", type=int, default=None,
                   help="fix height and width (default: the weights' input size with "
                   "--with-preprocessing, else symbolic where the architecture allows)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="compute dtype inside the artifact (default float32; input and logits "
                   "stay float32; onnx: float32 only)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip running the artifact against the float64 model")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flax_resnet.export import ExportError, check_options, export, parse_platforms
    from flax_resnet.sources import DataError
    from flax_resnet.weights import resolve

    def fail(message: str) -> int:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2

    if args.image_size is not None and args.image_size < 1:
        return fail(f"--image-size {args.image_size} must be >= 1")
    try:
        platforms = parse_platforms(args.platforms) if args.platforms is not None else None
    except ExportError as e:
        return fail(f"--platforms: {e}")
    try:
        check_options(args.format, platforms, args.dtype)  # before reading any weights
        weights = resolve(args.weights, step=args.step)
        meta = export(weights, args.out_dir, format=args.format, platforms=platforms,
                      with_preprocessing=args.with_preprocessing, image_size=args.image_size,
                      dtype=args.dtype, check=args.check,
                      say=lambda line: print(line, file=sys.stderr))
    except (OSError, ValueError, DataError) as e:  # ExportError, ConversionError, ...
        return fail(str(e))
    spec = meta["input"]
    print(f"{args.out_dir}/{meta['file']}: {spec['dtype']}{spec['shape']} {spec['layout']} -> "
          f"logits float32{meta['output']['shape']}"
          + (f", platforms {','.join(meta['platforms'])}" if "platforms" in meta else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

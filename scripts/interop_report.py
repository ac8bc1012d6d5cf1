#!/usr/bin/env python
"""torchvision / timm / Hugging Face ResNets through the converter: the interop table.

Runs every case of ``parity_tests/libraries.py`` (the cases ``parity_tests/test_libraries.py``
tests) as the tests do: the library's model with random weights and norms, saved as the
library saves it, converted (``convert.load``, float32 and float64), and compared in eval
mode with the library's own float32 and float64 outputs (logits and every stage's features).

    python scripts/interop_report.py                         # prints the table (~2 min)
    python scripts/interop_report.py --out docs/interop-table.md

The exit status is 1 if any check fails.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import platform
import sys
import tempfile

from parity_report import device  # the sibling script (this directory is on sys.path)

from parity_tests import harness
from parity_tests import libraries as L

COMMANDS = {
    "torchvision": "`python -m flax_resnet.convert resnext50.pth out/`",
    "timm": "`python -m flax_resnet.convert resnet50d.pth out/` (or a `save_for_hf` directory; "
            "`--model NAME` for what the keys do not show)",
    "hf": "`python -m flax_resnet.convert path/to/save_pretrained_dir out/`",
}
BEGIN, END = "<!-- interop-table -->", "<!-- /interop-table -->"
SOURCES = {"torchvision": "torchvision", "timm": "timm", "hf": "Hugging Face transformers"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", metavar="FILE",
                        help=f"replace the text between {BEGIN} and {END} in FILE (the docs' "
                             "table) with the report")
    args = parser.parse_args(argv)
    versions = " · ".join(f"{p} {md.version(p)}" for p in
                          ("jax", "flax", "torch", "torchvision", "timm", "transformers"))
    command = "python scripts/interop_report.py " + " ".join(argv if argv is not None
                                                               else sys.argv[1:])
    lines = [
        f"`{command.strip()}` · {datetime.date.today().isoformat()} · python "
        f"{platform.python_version()} · {versions} · {device()}",
        "",
        f"Input {'x'.join(map(str, L.INPUT_SHAPE))} (NCHW), eval mode. Relative error "
        "max|x - ref| / max|ref| against the library's float64 model, worst over the logits "
        "and the stage features (`stem`, `stage1`...). Bars: float64 <= "
        f"{harness.F64_RTOL:g}; float32 <= {harness.F32_K:g} x PyTorch's own float32 error + "
        f"{harness.F32_FLOOR:g}.",
        "",
        "| source | model | saved as | reduced | config read | float64 | float32 (flax) | "
        "float32 (PyTorch) | result |",
        "|---|---|---|---|---|---:|---:|---:|---|",
    ]
    failed = 0
    per_source: dict[str, list[tuple[str, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in L.CASES:
            model = L.build(case)
            src = L.save(case, model, tmp)
            r = L.compare(case, src, model)
            failed += bool(r.failures())
            shown = {k: v for k, v in r.config.items()
                     if k not in ("num_classes", "in_channels", "norm", "shortcut")}
            saved = "state_dict (.pth)" if case.saved_as == "file" else (
                "save_pretrained dir" if case.source == "hf" else "save_for_hf dir")
            reduced = ", ".join(f"{k}={v}" for k, v in case.kwargs.items()
                                if k in ("channels", "stem_width", "hidden_sizes",
                                         "embedding_size")) or "full size"
            lines.append(
                f"| {SOURCES[case.source]} | `{case.name}` | {saved} | {reduced} | "
                f"{', '.join(f'{k}={v}' for k, v in shown.items())} | "
                f"{max(r.f64.values()):.1e} | {max(r.flax32.values()):.1e} | "
                f"{max(r.torch32.values()):.1e} | {'FAIL' if r.failures() else 'pass'} |")
            print(lines[-1], flush=True)
            per_source.setdefault(case.source, []).append(
                (case.name, max(r.f64.values()),
                 max(v / max(r.torch32[k], harness.F32_FLOOR) for k, v in r.flax32.items())))
    lines += ["", f"{len(L.CASES)} models, {failed} failing.", "",
              "| source | models | command | worst float64 | worst float32 / PyTorch's |",
              "|---|---|---|---:|---:|"]
    for source, rows in per_source.items():
        lines.append(f"| {SOURCES[source]} | {', '.join(f'`{n}`' for n, _, _ in rows)} | "
                     f"{COMMANDS[source]} | {max(f for _, f, _ in rows):.1e} | "
                     f"{max(q for _, _, q in rows):.2f} |")
    print("\n".join(lines[-len(per_source) - 5:]))
    if args.update:
        text = open(args.update).read()
        if BEGIN not in text or END not in text:
            print(f"{args.update} has no {BEGIN} ... {END} section", file=sys.stderr)
            return 2
        head, rest = text.split(BEGIN, 1)
        with open(args.update, "w") as f:
            f.write(head + BEGIN + "\n" + "\n".join(lines) + "\n" + END + rest.split(END, 1)[1])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

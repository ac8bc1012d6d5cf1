"""Fingerprints of the compiled train and eval steps, for proving a refactor changed nothing.

    python scripts/step_fingerprint.py            # run at two commits and compare the lines

Each line is a recipe (at a reduced width) and the SHA-256 of its compiled train and eval
step's HLO (CPU), with the source locations (file names, line numbers, stack frames) taken
out: two commits that print the same lines compile to the same program, so they compute the
same thing at the same speed.
"""

from __future__ import annotations

import hashlib
import re

from flax_resnet import data
from flax_resnet.config import make_config
from flax_resnet.program import DataSpec, build_program
from flax_resnet.sharding import make_mesh

CASES = {
    "fast": {"depth": 18, "width": 0.125, "batch_size": 16},
    "study": {"depth": 50, "width": 0.125, "batch_size": 8, "norm": "gn", "norm_groups": 4},
    "he": {"depth": 20, "width": 0.25, "batch_size": 8, "schedule": "onecycle"},
}


def _program(hlo: str) -> str:
    hlo = re.sub(r", metadata=\{[^}]*\}", "", hlo)
    hlo = re.sub(r'source_file="[^"]*"|source_line=\d+|, stack_frame_id=\d+', "", hlo)
    return "\n".join(line for line in hlo.split("\n") if not re.match(r'^\d+ ("|\{)', line))


def fingerprint(hlo: str) -> str:
    return hashlib.sha256(_program(hlo).encode()).hexdigest()[:16]


def main() -> None:
    mesh = make_mesh()
    for recipe, fields in CASES.items():
        cfg = make_config(recipe, **fields)
        spec = DataSpec(10, (32, 32, 3), data.CIFAR10_MEAN, data.CIFAR10_STD)
        program, state = build_program(cfg, mesh, spec)
        compiled = program.compile(state, cfg.batch_size, cfg.batch_size)
        train, evaluate = compiled.train_step, compiled.eval_step
        print(recipe, fingerprint(train.as_text()), fingerprint(evaluate.fn.as_text()))


if __name__ == "__main__":
    main()

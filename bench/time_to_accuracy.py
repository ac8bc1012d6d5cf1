"""Wall time until ``train.py`` first reaches a test accuracy (default 94%).

    python bench/time_to_accuracy.py --dataset folder:data/cifar10-jpeg [--target 0.94]
        [--recipe fast] [--workdir W] [--stop-at-target] [--json FILE] [-- TRAIN.PY ARGS...]
    python bench/time_to_accuracy.py --metrics W/metrics.jsonl [--target 0.94]   # parse only
    python bench/time_to_accuracy.py --metrics Flax=A.jsonl --metrics PyTorch=B.jsonl  # table

``--metric test_acc_flip`` times the flip test-time-augmented accuracy (``--eval-flip``, on in
the fast recipe) instead of the plain ``test_acc``.

``--train-script bench/torch_train.py`` runs the PyTorch reference with the same recipe and
the same metrics contract instead of ``train.py``. ``--metrics LABEL=FILE`` (one or several)
prints a Markdown table, runs side by side (the README's).

A thin wrapper over train.py's contract: ``python train.py --recipe R --dataset D --workdir W``
appends one JSON line per epoch to ``W/metrics.jsonl`` with ``epoch``, ``test_acc`` and the
cumulative training wall time ``elapsed_s`` (train + eval of the epochs so far, train.py's own
clock). The report gives, for the first epoch whose ``test_acc >= target``:

* ``train_elapsed_s``: that row's ``elapsed_s`` (excludes process start and data loading;
  includes the first step's compilation, which falls in epoch 1);
* ``wall_s``: seconds from launching train.py until the row appeared in metrics.jsonl
  (everything: interpreter start, data decoding, compilation, training, evaluation), measured
  by polling the file (resolution ``--poll`` seconds). Only in launch mode.

A fresh ``--workdir`` is used by default (train.py resumes from a workdir's checkpoints).
Exit status: 0 if the target was reached, 1 if not, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TIME_KEYS = ("elapsed_s", "wall_time_s", "wall_time", "time_s")
MILESTONES = (0.80, 0.85, 0.88, 0.90, 0.91, 0.92, 0.93, 0.94)
METRICS = {"test_acc": "test acc", "test_acc_flip": "flip-TTA test acc"}


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of a metrics.jsonl (a partly written last line is skipped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def row_time(row: dict[str, Any]) -> float | None:
    for key in TIME_KEYS:
        if key in row and row[key] is not None:
            return float(row[key])
    return None


def first_reaching(
    rows: list[dict[str, Any]], target: float, metric: str = "test_acc"
) -> dict[str, Any] | None:
    for row in rows:
        acc = row.get(metric)
        if acc is not None and float(acc) >= target:
            return row
    return None


def summarize(
    rows: list[dict[str, Any]], target: float, seen_at: dict[int, float] | None = None,
    metric: str = "test_acc",
) -> dict[str, Any]:
    """``best_test_acc`` / ``final_test_acc`` / ``test_acc`` are of ``metric``."""
    hit = first_reaching(rows, target, metric)
    accs = [float(r[metric]) for r in rows if r.get(metric) is not None]
    out: dict[str, Any] = {
        "metric": metric,
        "target": target,
        "reached": hit is not None,
        "epochs_logged": len(rows),
        "best_test_acc": max(accs) if accs else None,
        "final_test_acc": accs[-1] if accs else None,
        "final_train_elapsed_s": row_time(rows[-1]) if rows else None,
        # The same clock for lower bars: what a run that misses the target still shows.
        "milestones": {
            f"{t:.2f}": (None if (r := first_reaching(rows, t, metric)) is None
                         else {"epoch": r.get("epoch"), "train_elapsed_s": row_time(r)})
            for t in MILESTONES
        },
    }
    if hit is not None:
        out.update(
            epoch=hit.get("epoch"),
            test_acc=float(hit[metric]),
            train_elapsed_s=row_time(hit),
        )
        if seen_at is not None and hit.get("epoch") in seen_at:
            out["wall_s"] = seen_at[hit["epoch"]]
    return out


def _labelled(spec: str) -> tuple[str, str]:
    label, sep, path = spec.partition("=")
    return (label, path) if sep else (Path(spec).stem, spec)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def _first_cell(rows: list[dict[str, Any]], bar: float, metric: str) -> str:
    hit = first_reaching(rows, bar, metric)
    return "not reached" if hit is None else f"{hit['epoch']} ({row_time(hit):.1f})"


def _median_after_first(rows: list[dict[str, Any]], key: str, spec: str) -> str:
    values = sorted(float(r[key]) for r in rows[1:] if key in r)  # epoch 1 compiles
    return format(values[len(values) // 2], spec) if values else "—"


def compare_markdown(
    runs: list[tuple[str, list[dict[str, Any]]]], target: float, metric: str = "test_acc"
) -> str:
    """One row per run: accuracy, the first epoch (and its cumulative seconds) at each of a
    few bars up to ``target``, epoch 1 (compilation included), the compilation alone
    (``train.py`` logs it; PyTorch eager has none to separate) and the steady epoch time."""
    bars = [b for b in (0.85, 0.88, 0.90) if b < target] + [target]
    name = METRICS[metric]
    head = (f"| run | epochs | best {name} | final {name} | "
            + " | ".join(f"first ≥ {100 * b:g}%: epoch (s)" for b in bars)
            + " | epoch 1 s (incl. compile) | compile s | median epoch s | median train img/s |")
    lines = [head, "|---|---:|---:|---:|" + "---:|" * len(bars) + "---:|---:|---:|---:|"]
    for label, rows in runs:
        s = summarize(rows, target, metric=metric)
        first = f"{rows[0]['epoch_time_s']:.1f}" if rows and "epoch_time_s" in rows[0] else "—"
        compiled = f"{rows[0]['compile_s']:.1f}" if rows and "compile_s" in rows[0] else "—"
        lines.append(
            f"| {label} | {s['epochs_logged']} | {_pct(s['best_test_acc'])} | "
            f"{_pct(s['final_test_acc'])} | "
            + " | ".join(_first_cell(rows, b, metric) for b in bars)
            + f" | {first} | {compiled} | {_median_after_first(rows, 'epoch_time_s', '.2f')} | "
            f"{_median_after_first(rows, 'train_images_per_s', ',.0f')} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(
        prog="time_to_accuracy", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--target", type=float, default=0.94, help="test accuracy in [0, 1]")
    p.add_argument("--metric", choices=tuple(METRICS), default="test_acc",
                   help="the metrics.jsonl accuracy to time; test_acc_flip needs --eval-flip "
                   "(on in the fast recipe)")
    p.add_argument("--metrics", action="append", default=None, metavar="[LABEL=]FILE",
                   help="only parse this metrics.jsonl (no training run); with LABEL= or "
                        "repeated: a Markdown table, one row per file")
    p.add_argument("--dataset", default=None, help="train.py --dataset (e.g. folder:PATH)")
    p.add_argument("--recipe", default="fast", help="train.py --recipe")
    p.add_argument("--workdir", default=None,
                   help="train.py --workdir (default: a fresh runs/tta-<time>)")
    p.add_argument("--train-script", default=str(ROOT / "train.py"))
    p.add_argument("--stop-at-target", action="store_true",
                   help="stop train.py once the target is reached")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="stop the run after S seconds since launch and report what it logged")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between metrics reads")
    p.add_argument("--json", dest="json_path", default=None, help="write the report here")
    args = p.parse_args(argv)
    if not 0.0 < args.target <= 1.0:
        p.error(f"--target {args.target} must be in (0, 1] (a fraction, e.g. 0.94)")
    if args.metrics is None and args.dataset is None:
        p.error("give --dataset to run train.py, or --metrics FILE to parse a finished run")
    return args, extra


def run_training(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    workdir = Path(args.workdir or ROOT / "runs" / time.strftime("tta-%Y%m%d-%H%M%S"))
    metrics_path = workdir / "metrics.jsonl"
    if metrics_path.exists():
        print(f"[tta] note: {metrics_path} exists; train.py will resume that run",
              file=sys.stderr)
    cmd = [sys.executable, args.train_script, "--recipe", args.recipe,
           "--dataset", args.dataset, "--workdir", str(workdir), *extra]
    print("[tta] " + " ".join(cmd), file=sys.stderr, flush=True)
    seen_at: dict[int, float] = {}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    stopped_early = timed_out = False
    try:
        while True:
            done = proc.poll() is not None
            rows = read_rows(metrics_path)
            now = time.monotonic() - t0
            for row in rows:
                if row.get("epoch") is not None:
                    seen_at.setdefault(row["epoch"], now)
            reached = first_reaching(rows, args.target, args.metric) is not None
            if args.stop_at_target and reached and not done:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=120)
                stopped_early = True
                break
            if done:
                break
            if args.time_limit is not None and now > args.time_limit:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                timed_out = True
                break
            time.sleep(args.poll)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    rows = read_rows(metrics_path)
    report = summarize(rows, args.target, seen_at, args.metric)
    report.update(
        command=cmd, workdir=str(workdir), returncode=proc.returncode,
        stopped_at_target=stopped_early, timed_out=timed_out,
        total_wall_s=time.monotonic() - t0,
    )
    return report


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    if args.metrics is not None and (len(args.metrics) > 1 or "=" in args.metrics[0]):
        print(compare_markdown(
            [(label, read_rows(Path(path))) for label, path in map(_labelled, args.metrics)],
            args.target, args.metric))
        return 0
    if args.metrics is not None:
        _, path = _labelled(args.metrics[0])
        report = summarize(read_rows(Path(path)), args.target, metric=args.metric)
        report["metrics"] = path
    else:
        report = run_training(args, extra)
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(report, indent=2))
    target = f"{100 * args.target:.1f}% {METRICS[args.metric]}"
    if report["reached"]:
        wall = f", {report['wall_s']:.0f} s since launch" if "wall_s" in report else ""
        print(f"reached {target} at epoch {report['epoch']} "
              f"({100 * report['test_acc']:.2f}%): {report['train_elapsed_s']:.1f} s of "
              f"training{wall}")
    else:
        best = report["best_test_acc"]
        cut = " (stopped by --time-limit)" if report.get("timed_out") else ""
        print(f"did not reach {target} in {report['epochs_logged']} epochs{cut} (best "
              f"{'n/a' if best is None else f'{100 * best:.2f}%'})")
    reached = {k: v for k, v in report["milestones"].items() if v is not None}
    if reached:
        print("first epoch at or above: " + ", ".join(
            f"{100 * float(k):.0f}% ep {v['epoch']} ({v['train_elapsed_s']:.1f} s)"
            for k, v in reached.items()))
    return 0 if report["reached"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())

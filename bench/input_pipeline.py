"""The input pipeline's throughput and memory, flax_resnet's against PyTorch's, in one run.

    python -m bench.input_pipeline [--images 2000,8000] [--workers 1,2] [--batch-size 64]
                                   [--size 224] [--batches 30] [--root DIR]
                                   [--json FILE] [--markdown FILE]

Both sides read the same folder of generated JPEGs (ImageNet-like sizes, 300–500 px a side,
about 110 KB each, like ImageNet's photos,
``--root`` to keep or reuse it) and produce the same thing: uint8 batches of the training
transform (RandomResizedCrop to ``--size`` + horizontal flip) on the host.

* flax_resnet: the streamed folder source and the grain pipeline of ``train.py``
  (``flax_resnet.pipeline``), ``--data-workers W``, without the device transfer;
* PyTorch: ``torchvision.datasets.ImageFolder`` with ``RandomResizedCrop`` +
  ``RandomHorizontalFlip`` + ``PILToTensor`` in a ``torch.utils.data.DataLoader`` with
  ``num_workers=W``, shuffled, ``drop_last``, default prefetching.

Each measurement runs in a fresh process (so the peak memory is its own): images/s over
``--batches`` batches after the first (worker start-up excluded, reported apart), and the
peak of the summed resident memory of the process and its workers, sampled every 20 ms.
With W workers each side uses W processes besides the main one.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def make_folder(root: Path, n: int, seed: int = 0, classes: int = 10) -> Path:
    """``n`` JPEGs of random ImageNet-like sizes under ``root/train/cNN`` (and a small
    ``val``), made once: an existing complete folder is reused."""
    import numpy as np
    from PIL import Image

    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", classes)):
        for i in range(count):
            c = i % classes
            folder = root / split / f"c{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = (int(v) for v in rng.integers(300, 501, 2))
            # Smooth shapes plus grain: about the bytes per pixel (and decode time) of a photo.
            low = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            smooth = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), np.int16)
            noisy = smooth + rng.integers(-24, 25, (h, w, 3), dtype=np.int16)
            image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
            image.save(folder / f"{i:06d}.JPEG", quality=90)
    done.touch()
    return root


def _rss_tree_kib(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants, KiB (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ppid = int(fields[1])
            with open(f"/proc/{entry}/statm") as f:
                pages = int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = pages * os.sysconf("SC_PAGE_SIZE") // 1024
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


class PeakMemory:
    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_tree_kib(os.getpid()))
            self._stop.wait(0.02)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _flax_batches(root: Path, workers: int, batch: int, size: int, count: int) -> Any:
    from flax_resnet.folder import load_image_folder
    from flax_resnet.pipeline import _iterate, _Reader
    from flax_resnet.transforms import RandomResizedCropFlip

    ds = load_image_folder(root, stream=True, say=lambda line: None)
    steps = len(ds.train) // batch
    reader = _Reader(ds.train, RandomResizedCropFlip(size), batch, slice(0, batch), 0, steps,
                     False)
    it = iter(_iterate(reader, 0, count, workers))
    for element in it:
        yield element["images"]
    getattr(it, "close", lambda: None)()


def _torch_batches(root: Path, workers: int, batch: int, size: int, count: int) -> Any:
    import torch
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    torch.manual_seed(0)
    ds = ImageFolder(os.fspath(root / "train"), transform=T.Compose(
        [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.PILToTensor()]))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=workers,
                                         persistent_workers=False)
    for i, (images, _) in enumerate(loader):
        if i >= count:
            break
        yield images


def measure(side: str, root: Path, workers: int, batch: int, size: int, batches: int
            ) -> dict[str, Any]:
    make = _flax_batches if side == "flax_resnet" else _torch_batches
    with PeakMemory() as memory:
        t0 = time.perf_counter()
        it = make(root, workers, batch, size, batches + 1)
        first = next(it)
        t1 = time.perf_counter()
        shape = tuple(first.shape)
        n, t2 = 0, t1
        for _ in it:  # the clock stops at the last batch, not after the workers' shutdown
            n += 1
            t2 = time.perf_counter()
    return {"side": side, "workers": workers, "batch": batch, "size": size,
            "batch_shape": list(shape), "first_batch_s": t1 - t0,
            "images_per_s": n * batch / max(t2 - t1, 1e-9), "batches_timed": n,
            "peak_rss_mib": memory.peak / 1024}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default="2000,8000", help="training images per folder (comma "
                   "list: one folder each, for the memory comparison)")
    p.add_argument("--workers", default="1,2", help="worker counts (comma list)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=int, default=30, help="timed batches per measurement")
    p.add_argument("--root", type=Path, default=None, help="where the folders are made "
                   "(default: a temporary directory)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # side:root:workers
    args = p.parse_args(argv)
    if args.one:
        side, root, workers = args.one.split(":")
        print(json.dumps(measure(side, Path(root), int(workers), args.batch_size, args.size,
                                 args.batches)))
        return 0
    report = run_input_benchmark(
        [int(n) for n in args.images.split(",")], [int(w) for w in args.workers.split(",")],
        args.batch_size, args.size, args.batches, args.root,
        " ".join(["python -m bench.input_pipeline", *(argv or sys.argv[1:])]))
    if report is None:
        return 1
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.markdown:
        args.markdown.write_text(render(report))
    print(render(report))
    return 0


def run_input_benchmark(images: list[int], workers: list[int], batch_size: int = 64,
                        size: int = 224, batches: int = 30, root: Path | None = None,
                        command: str = "") -> dict | None:
    """flax_resnet's streamed pipeline against DataLoader + torchvision, each measurement in a
    process of its own, on generated JPEG folders of ``images`` files (made under ``root``,
    default a temporary directory); the report, or None if a measurement failed."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) if root is None else root
        rows = []
        for n in images:
            folder = make_folder(root / f"jpeg-{n}", n)
            for count in workers:
                for side in ("flax_resnet", "torch"):
                    cmd = [sys.executable, "-m", "bench.input_pipeline", "--one",
                           f"{side}:{folder}:{count}", "--batch-size", str(batch_size),
                           "--size", str(size), "--batches", str(batches)]
                    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
                    if done.returncode:
                        print(done.stderr[-3000:], file=sys.stderr)
                        return None
                    row = {"images": n, **json.loads(done.stdout.strip().splitlines()[-1])}
                    rows.append(row)
                    print(f"{n:>6} images  {side:<11} workers {count}: "
                          f"{row['images_per_s']:8.1f} img/s "
                          f"({row['images_per_s'] / count:6.1f} per worker), first batch "
                          f"{row['first_batch_s']:.1f} s, peak {row['peak_rss_mib']:,.0f} MiB",
                          file=sys.stderr, flush=True)
    return {"date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "command": command, "machine": f"{_cpu_model()}, {os.cpu_count()} cores",
            "versions": _versions(), "rows": rows}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("flax_resnet", "grain", "pillow", "torch", "torchvision"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    return out


def render(report: dict[str, Any]) -> str:
    lines = [f"Input pipeline, {report['date']}, {report['machine']}; "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             f"`{report['command']}`", "",
             "| images | workers | flax_resnet img/s | torch img/s | ratio | flax_resnet "
             "peak MiB | torch peak MiB |", "|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["images"], r["workers"], r["side"]): r for r in report["rows"]}
    for (n, w, side), r in by.items():
        if side != "flax_resnet":
            continue
        t = by[(n, w, "torch")]
        lines.append(f"| {n} | {w} | {r['images_per_s']:.1f} | {t['images_per_s']:.1f} | "
                     f"{r['images_per_s'] / t['images_per_s']:.2f} | "
                     f"{r['peak_rss_mib']:,.0f} | {t['peak_rss_mib']:,.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

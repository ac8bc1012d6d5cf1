"""The streamed input pipeline: encoded images → host transforms (uint8) → global batches.

Built on grain's ``MapDataset``: one element per global step, ``step → (epoch, batch)``;
every epoch one seeded global permutation (``sources.epoch_permutation``), of which global
batch ``b`` is the slice ``[b·B, (b+1)·B)`` and each process reads only its rows
(``sharding.process_rows``), so N processes together see exactly what one sees. The
transform of example ``i`` in ``epoch`` draws from ``transforms.example_rng(seed, epoch,
i)``: no worker, host or resume point changes a pixel. Batches are built in worker
processes (``workers``; 0 builds them in threads of this process) and prefetched; the
position a checkpoint saves is ``batches.DataPosition``'s plain numbers, never grain's own
iterator state, so a run resumes with any worker or host count.

An image that cannot be decoded stops the run naming the file (``BadImagesError``), or with
``skip_bad`` is replaced by the next good example of the epoch's order (train) or masked
out (evaluation), and listed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from flax_resnet.sources import DataError, ImageSource, epoch_permutation


class BadImagesError(DataError):
    """Images that cannot be decoded; ``names`` lists them."""

    def __init__(self, names: list[str], causes: list[str]):
        self.names = names
        listed = "\n".join(f"  {c}" for c in causes)
        super().__init__(
            f"{len(names)} image{'s' if len(names) > 1 else ''} cannot be decoded:\n{listed}\n"
            "replace or remove them, or pass --skip-bad-images to skip such images (they "
            "are then listed in the workdir's bad_images.txt)")


def default_workers() -> int:
    """Loader processes when not told: all cores but one for the training process, at most
    16 (beyond that a ResNet step is rarely input-bound per host)."""
    return max(1, min(16, (os.cpu_count() or 2) - 1))


@dataclasses.dataclass
class _Reader:
    """Builds this process's rows of one global batch (runs in the loader's workers)."""

    source: ImageSource
    transform: Callable[..., np.ndarray]
    batch_size: int
    rows: slice
    seed: int
    steps_per_epoch: int  # 0: evaluation, element = batch index over the split in order
    skip_bad: bool

    def __post_init__(self) -> None:
        self._order: tuple[int, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_permutation(self.seed, epoch, len(self.source)))
        return self._order[1]

    def _load(self, index: int, epoch: int) -> np.ndarray:
        from flax_resnet.transforms import example_rng

        image = self.source.image(int(index))
        if self.steps_per_epoch:
            return self.transform(image, example_rng(self.seed, epoch, int(index)))
        return self.transform(image)

    def __call__(self, element: int) -> dict[str, Any]:
        from flax_resnet.transforms import BadImageError

        n = len(self.source)
        if self.steps_per_epoch:
            epoch, batch = divmod(int(element), self.steps_per_epoch)
            order = self._epoch_order(epoch)
            positions = np.arange(batch * self.batch_size,
                                  (batch + 1) * self.batch_size)[self.rows]
            indices = order[positions]
            valid = np.ones(len(indices), bool)
        else:
            epoch = 0
            indices = np.arange(element * self.batch_size,
                                (element + 1) * self.batch_size)[self.rows]
            valid = indices < n
            indices = np.where(valid, indices, 0)
        images, labels, bad, causes = [], [], [], []
        for k, index in enumerate(indices):
            if not valid[k]:  # padding of the last evaluation batch: masked, never decoded
                size = self.transform.size  # type: ignore[attr-defined]
                images.append(np.zeros((size, size, 3), np.uint8))
                labels.append(0)
                continue
            tries = 0
            while True:
                try:
                    images.append(self._load(index, epoch))
                    break
                except BadImageError as e:
                    bad.append(self.source.name(int(index)))
                    causes.append(str(e))
                    if not self.skip_bad:
                        images.append(None)
                        break
                    if not self.steps_per_epoch:  # evaluation: mask it out
                        valid[k] = False
                        size = self.transform.size  # type: ignore[attr-defined]
                        images.append(np.zeros((size, size, 3), np.uint8))
                        break
                    tries += 1  # train: the next example of the epoch's order
                    if tries >= n:
                        raise DataError("no image of the training split can be decoded") \
                            from None
                    index = order[(positions[k] + tries) % n]
            labels.append(self.source.label(int(index)))
        if any(image is None for image in images):
            return {"bad": bad, "causes": causes}
        return {"images": np.stack(images), "labels": np.asarray(labels, np.int32),
                "mask": valid.astype(np.float32), "bad": bad, "causes": causes}


def _iterate(reader: _Reader, first: int, stop: int, workers: int) -> Any:
    import grain

    ds = grain.MapDataset.range(first, stop).map(reader)
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags' defaults
            flags.FLAGS.mark_as_parsed()
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
        return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                           per_worker_buffer_size=2))
    threads = max(1, min(8, os.cpu_count() or 1))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                prefetch_buffer_size=threads))


class _Stream:
    def __init__(self, on_bad: Callable[[list[str]], None] | None):
        self.on_bad = on_bad
        self._it: Any = None

    def _element(self) -> dict[str, Any]:
        element = next(self._it)
        if element["bad"]:
            if "images" not in element:
                raise BadImagesError(element["bad"], element["causes"])
            if self.on_bad is not None:
                self.on_bad(element["bad"])
        return element

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        self._it = None


class StreamedBatches(_Stream):
    """Global training batches (uint8 NHWC at the transform's size, int32 labels; sharded
    over the mesh) from ``position`` on, as ``batches.TrainBatches`` does for data in memory;
    ``position`` is always that of the next batch."""

    def __init__(self, source: ImageSource, transform: Callable[..., np.ndarray],
                 batch_size: int, mesh: Any, position: Any, workers: int = 0,
                 skip_bad: bool = False, on_bad: Callable[[list[str]], None] | None = None,
                 total_steps: int | None = None):
        from flax_resnet.batches import steps_per_epoch
        from flax_resnet.sharding import process_rows

        super().__init__(on_bad)
        self.batch_size, self.mesh = int(batch_size), mesh
        self.steps_per_epoch = steps_per_epoch(len(source), self.batch_size)
        if self.steps_per_epoch < 1:
            raise ValueError(f"batch_size {batch_size} is larger than the {len(source)} "
                             "training examples")
        if position.index % self.batch_size:
            raise ValueError(f"{position} is not the start of a batch of {batch_size}")
        self.position = position
        first = position.epoch * self.steps_per_epoch + position.index // self.batch_size
        stop = total_steps if total_steps is not None else first + 10**12
        reader = _Reader(source, transform, self.batch_size,
                         process_rows(mesh, self.batch_size), position.seed,
                         self.steps_per_epoch, skip_bad)
        self._it = iter(_iterate(reader, first, max(stop, first), workers))

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return self

    def __next__(self) -> tuple[Any, Any]:
        from flax_resnet.batches import DataPosition
        from flax_resnet.sharding import put_batch

        element = self._element()
        p = self.position
        index = p.index + self.batch_size
        done = index // self.batch_size == self.steps_per_epoch
        self.position = DataPosition(p.epoch + 1, 0, p.seed) if done else \
            DataPosition(p.epoch, index, p.seed)
        return put_batch(self.mesh, self.batch_size, element["images"],  # type: ignore[return-value]
                         element["labels"])


def streamed_eval_batches(source: ImageSource, transform: Callable[[Any], np.ndarray],
                          batch_size: int, mesh: Any, workers: int = 0, skip_bad: bool = False,
                          on_bad: Callable[[list[str]], None] | None = None
                          ) -> Iterator[tuple[Any, Any, Any]]:
    """The whole split in order as global batches ``(images, labels, mask)``; the last one
    padded and masked, as ``batches.eval_batches``; images that cannot be decoded are
    masked out with ``skip_bad``."""
    from flax_resnet.sharding import process_rows, put_batch

    reader = _Reader(source, transform, batch_size, process_rows(mesh, batch_size), 0, 0,
                     skip_bad)
    stream = _Stream(on_bad)
    stream._it = iter(_iterate(reader, 0, -(-len(source) // batch_size), workers))
    try:
        while True:
            try:
                element = stream._element()
            except StopIteration:
                return
            yield put_batch(mesh, batch_size, element["images"],  # type: ignore[misc]
                            element["labels"], element["mask"])
    finally:
        stream.close()

"""The training batches and their position in the data, which a checkpoint saves.

Every epoch visits the training split in one seeded global permutation
(``data.epoch_permutation``); global batch ``i`` of the epoch is the permutation's slice
``[i·B, (i+1)·B)``, and each process reads only its rows of it (``sharding.process_rows``).
Where the run stands is three plain numbers, ``DataPosition(epoch, index, seed)``: they do
not depend on the number of hosts, of loader workers or on where the data lives, so a run
stopped anywhere resumes on the very batch it would have seen next, after any of those
changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from flax_resnet.data import DataSource, epoch_permutation, read_batch
from flax_resnet.sharding import process_rows, put_batch


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """The next example to train on: ``index`` examples of ``epoch``'s order are done."""

    epoch: int
    index: int
    seed: int

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPosition:
        return cls(int(d["epoch"]), int(d["index"]), int(d["seed"]))

    @classmethod
    def at_step(cls, step: int, steps_per_epoch: int, batch_size: int, seed: int
                ) -> DataPosition:
        """Where ``step`` updates of ``batch_size`` leave a run that drops each epoch's last
        partial batch."""
        epoch, batch = divmod(int(step), int(steps_per_epoch))
        return cls(epoch, batch * int(batch_size), int(seed))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped)."""
    return num_examples // batch_size


class TrainBatches(Iterator[tuple[jax.Array, jax.Array]]):
    """Global training batches (uint8 images, int32 labels, sharded over the mesh) from
    ``position`` on, epoch after epoch; ``position`` is always that of the next batch."""

    def __init__(self, source: DataSource, batch_size: int, mesh: Mesh,
                 position: DataPosition):
        self.source, self.batch_size, self.mesh = source, int(batch_size), mesh
        self.steps_per_epoch = steps_per_epoch(len(source), self.batch_size)
        if self.steps_per_epoch < 1:
            raise ValueError(f"batch_size {batch_size} is larger than the {len(source)} "
                             "training examples")
        if position.index % self.batch_size or position.index // self.batch_size >= \
                self.steps_per_epoch:
            raise ValueError(f"{position} is not the start of a batch of {batch_size} in an "
                             f"epoch of {self.steps_per_epoch} batches")
        self.position = position
        self._rows = process_rows(mesh, self.batch_size)
        self._order: tuple[int, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_permutation(self.position.seed, epoch, len(self.source)))
        return self._order[1]

    def __next__(self) -> tuple[jax.Array, jax.Array]:
        p = self.position
        rows = self._epoch_order(p.epoch)[p.index : p.index + self.batch_size][self._rows]
        images, labels = read_batch(self.source, rows)
        index = p.index + self.batch_size
        done = index // self.batch_size == self.steps_per_epoch
        self.position = DataPosition(p.epoch + 1, 0, p.seed) if done else \
            DataPosition(p.epoch, index, p.seed)
        return put_batch(self.mesh, self.batch_size, images, labels)  # type: ignore[return-value]


def eval_batches(source: DataSource, batch_size: int, mesh: Mesh
                 ) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
    """The whole split in order as global batches ``(images, labels, mask)``; the last one
    is padded (with record 0) and masked (``mask`` 0.0), so one compiled shape serves."""
    n = len(source)
    rows = process_rows(mesh, batch_size)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)[rows]
        valid = idx < n
        images, labels = read_batch(source, np.where(valid, idx, 0))
        yield put_batch(mesh, batch_size, images, labels,  # type: ignore[misc]
                        valid.astype(np.float32))

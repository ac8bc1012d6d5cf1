"""The training batches and their saved position: a run resumed from a position sees exactly
the batches an uninterrupted run sees, across epoch boundaries."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from flax_resnet.batches import DataPosition, TrainBatches, eval_batches
from flax_resnet.data import ArraySource, epoch_permutation, read_batch
from flax_resnet.sharding import make_mesh


def _source(n: int = 40) -> ArraySource:
    images = np.arange(n * 2 * 2 * 3, dtype=np.uint8).reshape(n, 2, 2, 3)
    return ArraySource(images, np.arange(n, dtype=np.int32))


class _IndexedOnly:
    """A source offering only ``__len__`` / ``__getitem__``, as grain's data sources do."""

    def __init__(self, inner: ArraySource):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.inner[index]


def _labels(batches: TrainBatches, n: int) -> list[list[int]]:
    return [np.asarray(jax.device_get(next(batches)[1])).tolist() for _ in range(n)]


def test_batches_follow_the_seeded_epoch_order():
    source, mesh = _source(), make_mesh(jax.devices()[:1])
    batches = TrainBatches(source, 8, mesh, DataPosition(0, 0, seed=3))
    got = _labels(batches, 10)  # 5 batches an epoch (40 / 8): two epochs
    for epoch in (0, 1):
        order = epoch_permutation(3, epoch, 40)
        assert got[5 * epoch: 5 * epoch + 5] == [order[i:i + 8].tolist()
                                                 for i in range(0, 40, 8)]
    assert got[:5] != got[5:]  # another order each epoch
    assert batches.position == DataPosition(2, 0, 3)


def test_a_resumed_position_continues_exactly_and_drops_the_partial_batch():
    source, mesh = _source(43), make_mesh(jax.devices()[:1])  # 5 full batches, 3 left over
    whole = _labels(TrainBatches(source, 8, mesh, DataPosition(0, 0, 7)), 12)
    for stop in (1, 4, 5, 6, 9):
        first = TrainBatches(source, 8, mesh, DataPosition(0, 0, 7))
        head = _labels(first, stop)
        saved = DataPosition.from_dict(dict(first.position.to_dict()))
        assert saved == DataPosition.at_step(stop, 5, 8, 7)
        tail = _labels(TrainBatches(source, 8, mesh, saved), 12 - stop)
        assert head + tail == whole, stop


def test_a_source_read_by_index_gives_the_same_batches():
    source = _source()
    indexed = _IndexedOnly(source)
    rows = np.array([5, 0, 39, 5])
    for a, b in zip(read_batch(source, rows), read_batch(indexed, rows), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    mesh = make_mesh(jax.devices()[:1])
    assert _labels(TrainBatches(indexed, 8, mesh, DataPosition(1, 16, 0)), 4) == \
        _labels(TrainBatches(source, 8, mesh, DataPosition(1, 16, 0)), 4)


@pytest.mark.parametrize("position", [DataPosition(0, 4, 0), DataPosition(0, 40, 0)])
def test_a_position_off_the_batch_grid_is_refused(position):
    with pytest.raises(ValueError, match="is not the start of a batch of 8"):
        TrainBatches(_source(), 8, make_mesh(jax.devices()[:1]), position)


def test_eval_batches_pad_and_mask_the_last_batch():
    mesh = make_mesh(jax.devices()[:1])
    got = [jax.device_get(b) for b in eval_batches(_source(20), 8, mesh)]
    labels = np.concatenate([b[1] for b in got])
    mask = np.concatenate([b[2] for b in got])
    assert labels.shape == (24,) and mask.tolist() == [1.0] * 20 + [0.0] * 4
    np.testing.assert_array_equal(labels[:20], np.arange(20))

"""The device mesh, shardings and batch placement of data-parallel training.

One 1-D ``'data'`` mesh over every device of every host: the batch is sharded over it,
params and optimizer state are replicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D ``'data'`` mesh over ``devices`` (default: every device of every host)."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh(
        (len(devices),),
        (DATA_AXIS,),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=devices,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"{what} {batch_size} does not divide over the {n} devices of the mesh; use a "
            f"multiple of {n} (e.g. {max(n, batch_size // n * n)} or {(batch_size // n + 1) * n})"
        )


def process_rows(mesh: Mesh, global_batch: int) -> slice:
    """The rows of a global batch whose shards live on this process's devices.

    Each process feeds only these rows (``jax.make_array_from_process_local_data``).
    """
    sharding = batch_sharding(mesh)
    indices = sharding.addressable_devices_indices_map((global_batch,))
    spans = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop)
                    for s in indices.values()})
    start, stop = spans[0][0], spans[-1][1]
    covered = sum(b - a for a, b in spans)
    if covered != stop - start:
        raise RuntimeError(
            f"this process's devices hold non-contiguous rows {spans} of the batch; "
            "feeding needs contiguous rows per process"
        )
    return slice(start, stop)


def put_batch(mesh: Mesh, global_batch: int, *local: np.ndarray) -> tuple[jax.Array, ...]:
    """Host arrays holding this process's rows (``process_rows``) -> global sharded arrays."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return tuple(jax.device_put(a, sharding) for a in local)
    return tuple(
        jax.make_array_from_process_local_data(sharding, a, (global_batch, *a.shape[1:]))
        for a in local
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a host pytree (same values on every host) replicated on the mesh."""
    sharding = replicated(mesh)

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree)

"""Evaluate weights on a data set's evaluation split: top-1, top-5 and per-class accuracy.

``evaluate_weights(weights, dataset)`` takes any ``weights.resolve`` source and a data set
spec of ``flax_resnet.data`` (its ``val/`` split, else ``test/``). Images read from files go
through the weights' own evaluation transform (``transforms.EvalTransform`` from their
preprocessing: torchvision's / timm's Resize + CenterCrop, pixel for pixel), in memory data
sets keep their size; the mean/std are the weights' (else the data set's). The forward pass
runs in eval mode, jitted and sharded over every device; per batch only the top-5 indices
come back to the host.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from flax_resnet.sources import DataError


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How the images are prepared; None: the weights' preprocessing, else the defaults."""

    batch_size: int = 64
    image_size: int | None = None
    resize_size: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    workers: int | None = None
    per_image: bool = False
    progress: bool = True


def _forward(model: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
    import jax
    from flax import nnx

    from flax_resnet.data import normalize

    model.eval()
    graphdef, state = nnx.split(model)
    dtype = jax.tree.leaves(state)[0].dtype

    @jax.jit
    def top5(state: Any, images: jax.Array) -> jax.Array:
        logits = nnx.merge(graphdef, state)(normalize(images, mean, std, dtype))
        k = min(5, logits.shape[-1])
        return jax.lax.top_k(logits.astype(np.float32), k)[1]

    return lambda images: top5(state, images)


def _host(x: Any) -> np.ndarray:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def evaluate_weights(weights: Any, dataset: str, data_dir: str | None = None,
                     settings: EvalSettings | None = None,
                     say: Callable[[str], None] = print) -> dict[str, Any]:
    """Top-1 / top-5 / per-class accuracy of ``weights`` (a ``weights.Weights``) on the
    evaluation split of ``dataset``; with ``settings.per_image`` also every image's top-5.
    Raises ``DataError`` for data that does not fit the weights."""
    import jax
    from tqdm import tqdm

    from flax_resnet.batches import eval_batches
    from flax_resnet.data import load_dataset
    from flax_resnet.pipeline import default_workers, streamed_eval_batches
    from flax_resnet.sharding import check_batch_size, make_mesh
    from flax_resnet.transforms import EvalTransform

    settings = settings or EvalSettings()
    files = dataset.startswith("folder:") or dataset == "imagenet2012"
    ds = load_dataset(dataset, data_dir, stream=files, say=say, eval_only=True)
    outputs = weights.classifier_size
    if outputs is not None and outputs != ds.num_classes:
        no_train = dataset.startswith("folder:") and len(ds.train) == 0
        raise DataError(f"the weights {weights.source} have {outputs} outputs but {dataset} has "
                        f"{ds.num_classes} classes; evaluate them on a data set of "
                        f"{outputs} classes" + (
                            " (without train/, the classes are the evaluation split's folders:"
                            " every class needs one, or add train/ with all of them)"
                            if no_train else ""))
    pre = weights.preprocessing
    mean, std = (tuple(pre.mean), tuple(pre.std)) if pre is not None else (ds.mean, ds.std)
    mesh = make_mesh()
    check_batch_size(settings.batch_size, mesh, "batch_size")
    if ds.in_memory:
        batches = eval_batches(ds.test, settings.batch_size, mesh)
        how = f"{ds.image_shape[0]}x{ds.image_shape[1]} as stored"
    else:
        transform = EvalTransform.from_preprocessing(
            pre, settings.image_size, settings.resize_size, settings.crop_pct,
            settings.interpolation)
        workers = default_workers() if settings.workers is None else settings.workers
        batches = streamed_eval_batches(ds.test, transform, settings.batch_size, mesh, workers)
        how = (f"resize {transform.resize_size} + center crop {transform.size} "
               f"({transform.interpolation}), {workers} loader process(es)")
    say(f"evaluating {weights.description} on {ds.name}: {len(ds.test)} images, {how}, "
        f"mean/std {mean} / {std}")
    forward = _forward(weights.build(), mean, std)
    n = len(ds.test)
    top = np.full((n, 5), -1, np.int64)  # fewer than 5 classes: -1 never matches
    labels_all = np.zeros((n,), np.int64)
    done, first, start = 0, 0, time.perf_counter()
    bar = tqdm(total=n, disable=not settings.progress or jax.process_index() != 0,
               unit="img", desc="eval")
    for images, labels, mask in batches:
        idx, lab, keep = _host(forward(images)), _host(labels), _host(mask) > 0
        k = int(keep.sum())
        top[done:done + k, :idx.shape[1]] = idx[keep]
        labels_all[done:done + k] = lab[keep]
        done += k
        bar.update(k)
        if first == 0:  # the rate leaves out the first batch, which waits for the compile
            first, start = done, time.perf_counter()
    bar.close()
    seconds = max(time.perf_counter() - start, 1e-9)
    hit1 = top[:, 0] == labels_all
    hit5 = (top == labels_all[:, None]).any(1)
    names = ds.class_names or tuple(str(c) for c in range(ds.num_classes))
    per_class = {names[c]: float(hit1[labels_all == c].mean())
                 for c in range(ds.num_classes) if (labels_all == c).any()}
    result: dict[str, Any] = {
        "weights": weights.description, "dataset": ds.name, "images": n,
        "top1": float(hit1.mean()), "top5": float(hit5.mean()), "per_class_top1": per_class,
        "images_per_s": (n - first) / seconds if n > first else None,
        "mean": list(mean), "std": list(std), "transform": how,
    }
    if settings.per_image:
        name = getattr(ds.test, "name", None)
        result["predictions"] = [
            {"image": name(i) if name else i, "label": int(labels_all[i]),
             "top5": [int(c) for c in top[i]]} for i in range(n)]
    return result

"""A training run's data: the data set, how its images become batches, and its statistics.

``open_run_data(cfg, options, weights, workdir, say)`` loads the data set and settles what
the config left open, from the data and the ``init_from`` weights:

* in memory (CIFAR, folders of one small size, synthetic): the images keep their size;
  ``augment auto`` is the on-device pad-crop-flip.
* streamed (folders of any sizes, ImageNet): every image goes through the host transforms
  of ``flax_resnet.transforms`` in the loader's workers: training, torchvision's
  RandomResizedCrop + flip (``augment auto``) or, for pad-crop-flip, the evaluation
  transform followed by the device's; evaluation, Resize + CenterCrop with the weights'
  interpolation and crop. ``image_size``, ``resize_size`` and ``interpolation`` default to
  the ``init_from`` weights' preprocessing, else 224, 256 (crop_pct 0.875) and bilinear.

The settled values are written into the run's config, so a resumed run never depends on
the weights or the defaults again. Input mean/std: as the workdir recorded them; else the
weights' (``input_stats auto``/``weights``), the data set's (``data``: for a streamed set an
estimate from a fixed, seeded sample of ``STATS_SAMPLE`` images, never a full pass).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from flax_resnet.config import TrainConfig
from flax_resnet.workdir import PREPROCESSING_FILE, RunError, read_json

STATS_SAMPLE = 512
BAD_IMAGES_FILE = "bad_images.txt"


@dataclasses.dataclass
class RunData:
    """The data side of a run; ``cfg`` is the config with the data's choices settled."""

    cfg: TrainConfig
    ds: Any
    image_shape: tuple[int, int, int]
    stats: Any  # preprocessing.Preprocessing
    train_transform: Callable[..., np.ndarray] | None
    eval_transform: Callable[[Any], np.ndarray] | None
    workers: int
    skip_bad: bool
    workdir: Path

    def _record_bad(self, names: list[str]) -> None:
        with open(self.workdir / BAD_IMAGES_FILE, "a") as f:
            f.write("".join(f"{n}\n" for n in names))

    def train_batches(self, mesh: Any, position: Any, total_steps: int) -> Any:
        from flax_resnet.batches import TrainBatches
        from flax_resnet.pipeline import StreamedBatches

        if self.train_transform is None:
            return TrainBatches(self.ds.train, self.cfg.batch_size, mesh, position)
        return StreamedBatches(self.ds.train, self.train_transform, self.cfg.batch_size, mesh,
                               position, self.workers, self.skip_bad, self._record_bad,
                               total_steps)

    def eval_batches(self, mesh: Any, batch_size: int) -> Iterator[Any]:
        from flax_resnet.batches import eval_batches
        from flax_resnet.pipeline import streamed_eval_batches

        if self.eval_transform is None:
            return eval_batches(self.ds.test, batch_size, mesh)
        return streamed_eval_batches(self.ds.test, self.eval_transform, batch_size, mesh,
                                     self.workers, self.skip_bad, self._record_bad)


def _weights_pre(weights: Any) -> Any:
    return None if weights is None else weights.preprocessing


def _settle_streamed(cfg: TrainConfig, weights: Any) -> tuple[TrainConfig, list[str]]:
    pre = _weights_pre(weights)
    notes = []
    size = cfg.image_size
    if size is None:
        size = pre.input_size[-1] if pre is not None and pre.input_size else 224
        whence = "the init_from weights'" if pre is not None and pre.input_size else "default"
        notes.append(f"image_size {size} ({whence})")
    interpolation = cfg.interpolation or (pre.interpolation if pre and pre.interpolation
                                          else "bilinear")
    resize = cfg.resize_size
    if resize is None:  # the weights' exact resize, else timm's rule over the crop ratio
        from flax_resnet.transforms import EvalTransform

        given_size = pre is not None and pre.input_size and pre.input_size[-1] == size
        resize = EvalTransform.from_preprocessing(
            pre if given_size or cfg.crop_pct else None, size, None,
            cfg.crop_pct or (pre.crop_pct if pre is not None else None)).resize_size
    augment = "random-resized-crop" if cfg.augment == "auto" else cfg.augment
    if cfg.augment == "auto":
        notes.append("augment auto: random-resized-crop (images read from files, of any size)")
    return cfg.replace(image_size=size, resize_size=resize, crop_pct=None,
                       interpolation=interpolation, augment=augment), notes


def _input_stats(cfg: TrainConfig, ds: Any, workdir: Path, weights: Any,
                 image_shape: tuple[int, int, int], sample: Callable[[], Any]) -> Any:
    """The run's input preprocessing: as recorded in the workdir; else, for a run that
    checkpointed before runs recorded it (``weights`` None then), the data set's; else as
    ``cfg.input_stats`` says."""
    from flax_resnet.preprocessing import Preprocessing

    recorded = workdir / PREPROCESSING_FILE
    if recorded.exists():
        return Preprocessing.from_dict(read_json(recorded))
    channels = image_shape[-1]
    # In memory, evaluation takes the images as they are (crop_pct 1); streamed, the
    # settled resize and crop.
    own = Preprocessing(tuple(ds.mean), tuple(ds.std), (channels, *image_shape[:2]),
                        cfg.interpolation or "bilinear", 1.0 if ds.in_memory else None,
                        resize_size=None if ds.in_memory else cfg.resize_size,
                        source=f"the data set {ds.name} ({ds.stats_source})"
                        if ds.stats_source else f"the data set {ds.name}")
    if cfg.input_stats == "data" and not ds.in_memory:
        own = sample()
    if weights is None or cfg.input_stats == "data":
        return own
    theirs = weights.preprocessing
    fits = theirs is not None and len(theirs.mean) == len(theirs.std) == channels
    if cfg.input_stats == "weights" and not fits:
        what = "carry no preprocessing" if theirs is None else \
            f"expect {len(theirs.mean)} channels, the data has {channels}"
        raise RunError(f"input_stats weights: the init_from weights {cfg.init_from} {what}; "
                       "use input_stats data", "input_stats")
    return theirs if fits else own


def sample_stats(source: Any, transform: Callable[[Any], np.ndarray], n: int, seed: int,
                 name: str) -> Any:
    """Mean/std of the evaluation-transformed pixels of ``n`` examples drawn with ``seed``."""
    from flax_resnet.folder import channel_stats
    from flax_resnet.preprocessing import Preprocessing

    rng = np.random.default_rng([seed, 0x57A75])
    picks = np.sort(rng.choice(len(source), size=min(n, len(source)), replace=False))
    images = np.stack([transform(source.image(int(i))) for i in picks])
    mean, std = channel_stats(images)
    return Preprocessing(mean, std, (3, *images.shape[1:3]), None, None,
                         source=f"a sample of {len(picks)} images of {name} (seed {seed})")


def open_run_data(cfg: TrainConfig, data_dir: str | None, workers: int | None,
                  skip_bad: bool, weights: Any, workdir: Path,
                  say: Callable[[str], None]) -> RunData:
    """Load ``cfg.dataset`` and settle the config's open data choices (see the module)."""
    from flax_resnet.data import DataError, load_dataset
    from flax_resnet.pipeline import default_workers
    from flax_resnet.transforms import EvalTransform, RandomResizedCropFlip

    wants_files = cfg.augment == "random-resized-crop"
    try:
        ds = load_dataset(cfg.dataset, data_dir, stream=wants_files, say=say)
    except DataError as e:
        raise RunError(str(e), "dataset") from None
    workers = default_workers() if workers is None else workers
    if ds.in_memory:
        shape = ds.image_shape
        own = shape[0] if shape[0] == shape[1] else None
        if wants_files or (cfg.image_size is not None and cfg.image_size != own):
            what = "augment random-resized-crop" if wants_files else \
                f"image_size {cfg.image_size}"
            raise RunError(f"{what} needs images read from files (--dataset folder:PATH or "
                           f"imagenet2012); {ds.name} is held in memory as "
                           f"{shape[0]}x{shape[1]} images", "augment" if wants_files
                           else "image_size")
        if cfg.augment == "auto":
            cfg = cfg.replace(augment="pad-crop-flip")
        cfg = cfg.replace(num_classes=ds.num_classes, in_channels=shape[-1])
        stats = _input_stats(cfg, ds, workdir, weights, shape, lambda: None)
        return RunData(cfg, ds, shape, stats, None, None, workers, skip_bad, workdir)

    cfg, notes = _settle_streamed(cfg, weights)
    for note in notes:
        say(note)
    size, interpolation = int(cfg.image_size), str(cfg.interpolation)
    evaluation = EvalTransform(size, int(cfg.resize_size), interpolation)
    if cfg.augment == "random-resized-crop":
        train: Callable[..., np.ndarray] = RandomResizedCropFlip(size,
                                                                 interpolation=interpolation)
    else:  # pad-crop-flip (on the device) or none: the images at the evaluation crop
        train = _Unrandom(evaluation)
    say(f"transforms: train {cfg.augment} to {size}x{size}, eval resize {cfg.resize_size} + "
        f"center crop {size} ({interpolation}); {workers} loader "
        f"process{'es' if workers != 1 else ''}" + (", Pillow " + _pillow()))
    cfg = cfg.replace(num_classes=ds.num_classes, in_channels=3)
    shape = (size, size, 3)
    stats = _input_stats(cfg, ds, workdir, weights, shape, lambda: sample_stats(
        ds.train, evaluation, STATS_SAMPLE, cfg.seed, ds.name))
    return RunData(cfg, ds, shape, stats, train, evaluation, workers, skip_bad, workdir)


@dataclasses.dataclass(frozen=True)
class _Unrandom:
    """A deterministic transform called as a training one (``f(image, rng)``)."""

    transform: Any  # an EvalTransform

    @property
    def size(self) -> int:
        return self.transform.size

    def __call__(self, image: Any, rng: Any = None) -> np.ndarray:
        return self.transform(image)


def _pillow() -> str:
    import PIL

    return PIL.__version__


__all__ = ["BAD_IMAGES_FILE", "RunData", "open_run_data", "sample_stats"]


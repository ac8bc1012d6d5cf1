"""The top-k classes of images, with names, from any weights.

Class names, in this order: a ``train.py`` run's own (``classes.json`` in its workdir: the
folder names it trained on), a Hugging Face directory's ``id2label`` (unless only
``LABEL_i`` placeholders), ImageNet-1k's for 1000-output weights (torchvision's category
names, shipped as ``imagenet_classes.txt``), else ``class i``.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

CLASSES_FILE = "classes.json"  # a run's class names, beside its config.json


def imagenet_class_names() -> tuple[str, ...]:
    text = resources.files("flax_resnet").joinpath("imagenet_classes.txt").read_text()
    return tuple(text.splitlines())


def class_names(weights: Any) -> tuple[str, ...]:
    """The names of ``weights``' outputs (see the module)."""
    outputs = int(weights.classifier_size or 0)
    where = Path(weights.path or weights.source)  # a Hub name: its cached snapshot
    if where.is_dir():
        for candidate in (where / CLASSES_FILE, where / "config.json"):
            if not candidate.is_file():
                continue
            data = json.loads(candidate.read_text())
            names = data.get("classes") if candidate.name == CLASSES_FILE else \
                data.get("id2label")
            if isinstance(names, dict):
                names = [names.get(str(i)) for i in range(len(names))]
            if names and len(names) == outputs and not all(
                    str(n) == f"LABEL_{i}" for i, n in enumerate(names)):
                return tuple(str(n) for n in names)
    if outputs == 1000:
        return imagenet_class_names()
    return tuple(f"class {i}" for i in range(outputs))


def predict(weights: Any, images: list[str | os.PathLike], top_k: int = 5,
            transform: Any = None) -> list[dict[str, Any]]:
    """Per image: its ``top_k`` classes as (index, name, probability), from the weights'
    evaluation transform (``transform``, default from their preprocessing) and eval mode."""
    import jax
    from flax import nnx

    from flax_resnet.data import normalize
    from flax_resnet.preprocessing import IMAGENET_MEAN, IMAGENET_STD
    from flax_resnet.transforms import EvalTransform, load_rgb

    pre = weights.preprocessing
    transform = transform or EvalTransform.from_preprocessing(pre)
    mean, std = (pre.mean, pre.std) if pre is not None else (IMAGENET_MEAN, IMAGENET_STD)
    model = weights.build()
    model.eval()
    names = class_names(weights)
    batch = np.stack([transform(load_rgb(p)) for p in images])
    logits = nnx.jit(lambda m, x: m(normalize(x, mean, std)))(model, batch)
    probs = np.asarray(jax.nn.softmax(logits.astype(np.float32), -1))
    out = []
    for path, p in zip(images, probs, strict=True):
        order = np.argsort(-p, kind="stable")[:top_k]
        out.append({"image": os.fspath(path), "top": [
            {"class": int(c), "name": names[c], "probability": float(p[c])} for c in order]})
    return out

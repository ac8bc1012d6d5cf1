"""flax_resnet.transforms: torchvision's and timm's pixels exactly, torchvision's crop law."""

from __future__ import annotations

import functools
import math
import pickle
import types

import numpy as np
import pytest
from PIL import Image, ImageFile

from flax_resnet import transforms as X
from flax_resnet.preprocessing import from_timm_cfg

# (width, height) as PIL sizes them: ImageNet-like landscape and portrait, a thin strip
# (RandomResizedCrop's fallback is frequent), one smaller than every crop below.
SHAPES = ((500, 375), (333, 500), (64, 900), (120, 100))


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth content with noise, like a photo: resampling filters then differ visibly."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), np.int16)
    return Image.fromarray(np.clip(smooth + rng.integers(-20, 21, (h, w, 3)), 0, 255)
                           .astype(np.uint8))


@pytest.fixture(scope="module")
def rgb_files(tmp_path_factory) -> list:
    """RGB JPEG and PNG files of every shape."""
    root = tmp_path_factory.mktemp("rgb")
    paths = []
    for i, (w, h) in enumerate(SHAPES):
        for ext in ("jpg", "png"):
            path = root / f"{w}x{h}.{ext}"
            _photo(w, h, i).save(path)
            paths.append(path)
    return paths


@pytest.fixture(scope="module")
def mode_files(tmp_path_factory) -> dict:
    """Files of every mode ImageFolder meets, keyed by the mode PIL opens them in."""
    root = tmp_path_factory.mktemp("modes")
    base = _photo(160, 120, 7)
    deep = (np.asarray(base.convert("L"), np.uint16) * 257)  # 16-bit values, most above 255
    made = {}
    for mode, ext, image, kw in (
            ("RGB", "jpg", base, {}),
            ("L", "jpg", base.convert("L"), {}),
            ("P", "png", base.convert("P"), {}),
            ("P+transparency", "png", base.convert("P"), {"transparency": 3}),
            ("P+alphas", "png", base.convert("P"), {"transparency": bytes(range(256))}),
            ("CMYK", "jpg", base.convert("CMYK"), {}),
            ("RGBA", "png", base.convert("RGBA"), {}),
            ("LA", "png", base.convert("LA"), {}),
            ("I;16", "png", Image.fromarray(deep), {}),
            ("1", "png", base.convert("1"), {})):
        path = root / f"{mode.replace(';', '').replace('+', '_')}.{ext}"
        image.save(path, **kw)
        made[mode] = path
    return made


# Pillow's advice for per-entry palette alphas; torchvision's loader gets it just the same.
@pytest.mark.filterwarnings("ignore:Palette images with Transparency:UserWarning")
def test_load_rgb_equals_torchvision_pil_loader(mode_files, rgb_files):
    from torchvision.datasets.folder import pil_loader

    cases = list(mode_files.items()) + [("RGB", p) for p in rgb_files]
    for mode, path in cases:
        with Image.open(path) as opened:  # the file really is of that mode
            assert opened.mode == mode.split("+")[0], (mode, opened.mode)
            assert ("transparency" in opened.info) == ("+" in mode), mode
        theirs = np.asarray(pil_loader(path))
        ours = X.load_rgb(path)
        assert ours.mode == "RGB" and np.array_equal(np.asarray(ours), theirs), mode
        assert np.array_equal(np.asarray(X.decode_rgb(path.read_bytes())), theirs), mode


def test_pil_filters_are_torchvisions():
    import torchvision.transforms.functional as F

    for name, code in X.PIL_FILTERS.items():
        assert F.pil_modes_mapping[F.InterpolationMode(name)] == code, name


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("resize, crop", [(256, 224), (232, 224), (200, 224)])
def test_eval_transform_equals_torchvision(rgb_files, interpolation, resize, crop):
    """(200, 224): the resized image is smaller than the crop, torchvision zero-pads."""
    import torchvision.transforms as T

    mode = T.InterpolationMode(interpolation)
    reference = T.Compose([T.Resize(resize, interpolation=mode), T.CenterCrop(crop)])
    ours = X.EvalTransform(crop, resize, interpolation)
    for path in rgb_files:
        image = X.load_rgb(path)
        expected = np.asarray(reference(image))
        got = ours(image)
        assert got.dtype == np.uint8 and got.shape == (crop, crop, 3), path.name
        assert np.array_equal(got, expected), path.name


def test_center_crop_pads_a_small_image_as_torchvision():
    import torchvision.transforms.functional as F

    for w, h in ((20, 40), (40, 20), (10, 10), (31, 33), (33, 31), (32, 40)):
        image = _photo(w, h)
        ours, theirs = X.center_crop(image, 32), F.center_crop(image, [32, 32])
        assert ours.size == (32, 32) and np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_resize_shorter_sizes_as_torchvision():
    import torchvision.transforms.functional as F

    for w, h in ((500, 375), (333, 500), (64, 900), (7, 1000), (224, 300)):
        image = Image.new("RGB", (w, h))
        for size in (224, 232, 256):
            assert X.resize_shorter(image, size).size == F.resize(image, size).size
    same = _photo(224, 300)
    assert X.resize_shorter(same, 224) is same  # torchvision's no-op: not resampled


TIMM_CFGS = ("resnet50.a1_in1k", "resnet50.tv_in1k", "resnet18.a1_in1k", "resnet50.tv2_in1k")


@pytest.mark.parametrize("name", TIMM_CFGS)
def test_eval_transform_equals_timm(rgb_files, name):
    import timm
    from timm.data import create_transform, resolve_data_config

    cfg = timm.models.get_pretrained_cfg(name).to_dict()  # in timm's registry: no download
    data_cfg = resolve_data_config({}, pretrained_cfg=cfg)
    assert data_cfg["crop_mode"] == "center"
    reference = create_transform(**data_cfg, is_training=False)
    steps = [t for t in reference.transforms if type(t).__name__ not in
             ("ToTensor", "Normalize", "MaybeToTensor")]
    from_meta = X.EvalTransform.from_preprocessing(from_timm_cfg(cfg, name))
    by_pct = X.EvalTransform.from_crop_pct(data_cfg["input_size"][-1], data_cfg["crop_pct"],
                                           data_cfg["interpolation"])
    assert from_meta == by_pct
    for path in rgb_files:
        image = X.load_rgb(path)
        expected = image
        for step in steps:
            expected = step(expected)
        assert np.array_equal(from_meta(image), np.asarray(expected)), (name, path.name)


def test_from_preprocessing_explicit_values_win_and_exact_resize_is_kept():
    pre = from_timm_cfg({"input_size": (3, 288, 288), "interpolation": "bicubic",
                         "crop_pct": 1.0}, "test")
    assert X.EvalTransform.from_preprocessing(None) == X.EvalTransform(224, 256, "bilinear")
    assert X.EvalTransform.from_preprocessing(pre) == X.EvalTransform(288, 288, "bicubic")
    assert (X.EvalTransform.from_preprocessing(pre, size=224, crop_pct=0.875,
                                               interpolation="bilinear")
            == X.EvalTransform(224, 256, "bilinear"))
    assert X.EvalTransform.from_preprocessing(pre, resize_size=300).resize_size == 300
    # A crop_pct made from a known resize can floor one short under timm's rule; the exact
    # resize, given or carried by the metadata, is kept as it is.
    short = [r for r in range(224, 400) if math.floor(224 / (224 / r)) != r][0]
    assert X.EvalTransform.from_crop_pct(224, 224 / short).resize_size == short - 1
    carried = types.SimpleNamespace(input_size=(3, 224, 224), interpolation="bilinear",
                                    crop_pct=224 / short, resize_size=short)
    assert X.EvalTransform.from_preprocessing(carried).resize_size == short
    assert X.EvalTransform.from_preprocessing(pre, resize_size=short).resize_size == short
    with pytest.raises(ValueError, match="not square"):
        X.EvalTransform.from_preprocessing(from_timm_cfg({"input_size": (3, 224, 320)}, "t"))


def test_weights_transforms_on_pil_equal_eval_transform_normalized(rgb_files):
    """torchvision's ``Weights.transforms()`` on a PIL image: our pixels, then normalized."""
    from torchvision.models import ResNet50_Weights

    preset = ResNet50_Weights.IMAGENET1K_V2.transforms()
    ours = X.EvalTransform(preset.crop_size[0], preset.resize_size[0],
                           preset.interpolation.value)
    mean, std = np.asarray(preset.mean), np.asarray(preset.std)
    for path in rgb_files[:2]:
        image = X.load_rgb(path)
        theirs = preset(image).numpy().transpose(1, 2, 0)
        # float32 rounding of (x / 255 - mean) / std: ~1e-6; one pixel level is ~0.017
        np.testing.assert_allclose((ours(image) / 255.0 - mean) / std, theirs, atol=1e-5)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_random_resized_crop_pixels_equal_torchvision_given_the_box(rgb_files, interpolation):
    import torchvision.transforms.functional as F

    transform = X.RandomResizedCropFlip(64, interpolation=interpolation)
    rng = np.random.default_rng(0)
    flips = 0
    for path in rgb_files[::2]:
        image = X.load_rgb(path)
        for _ in range(8):
            state = rng.bit_generator.state
            top, left, h, w = transform.crop_box(image.height, image.width, rng)
            flip = rng.random() < 0.5
            rng.bit_generator.state = state
            ours = transform(image, rng)
            theirs = F.resized_crop(image, top, left, h, w, [64, 64],
                                    interpolation=F.InterpolationMode(interpolation))
            if flip:
                theirs = F.hflip(theirs)
            flips += flip
            assert ours.shape == (64, 64, 3) and np.array_equal(ours, np.asarray(theirs))
    assert 0 < flips < 8 * len(rgb_files[::2])  # both branches were compared
    whole = X.RandomResizedCropFlip(64, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    square = _photo(64, 64)  # the box is the image: torchvision returns it unresized
    assert np.array_equal(whole(square, np.random.default_rng(1)), np.asarray(square))


# --- the law of the boxes ---------------------------------------------------------------------

N_DRAWS = 20_000
# (height, width): ordinary; thin, where ~70% of the boxes are the fallback's.
LAW_SHAPES = ((375, 500), (100, 900))
# Five comparisons per shape; Bonferroni: the whole test fails falsely with probability
# below 1e-4 (less still: KS and Fisher's test are conservative on discrete values).
ALPHA = 1e-4 / (5 * len(LAW_SHAPES))


def _fallback_box(height: int, width: int) -> tuple[int, int, int, int]:
    never = types.SimpleNamespace(uniform=lambda lo, hi: 1e3 if hi > 0.5 else 0.0)
    return X.RandomResizedCropFlip(8).crop_box(height, width, never)  # every try too big


def _features(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area fraction, log aspect ratio, relative top and left of each box."""
    top, left, h, w = boxes.T.astype(np.float64)
    return np.stack([h * w / (height * width), np.log(w / h), top / height, left / width], 1)


def _torch_boxes(height: int, width: int) -> np.ndarray:
    import torch
    import torchvision.transforms as T

    torch.manual_seed(0)
    image = Image.new("RGB", (width, height))
    return np.array([T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                     for _ in range(N_DRAWS)])


def _buggy_box(height: int, width: int, rng: np.random.Generator, *, tries: int = 10,
               log_uniform: bool = True) -> tuple[int, int, int, int]:
    """get_params with one planted bug: fewer tries, or a uniform aspect ratio."""
    area = height * width
    for _ in range(tries):
        target = area * rng.uniform(0.08, 1.0)
        ratio = (math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3))) if log_uniform
                 else rng.uniform(3 / 4, 4 / 3))
        w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return _fallback_box(height, width)


def _pvalues(box, theirs: np.ndarray, height: int, width: int, seed: int) -> list[float]:
    """The five p-values of ``box(height, width, rng)``'s draws against ``theirs``."""
    from scipy.stats import fisher_exact, ks_2samp

    rng = np.random.default_rng(seed)
    ours = np.array([box(height, width, rng) for _ in range(N_DRAWS)])
    a, b = _features(ours, height, width), _features(theirs, height, width)
    fallback = np.asarray(_fallback_box(height, width))
    fa, fb = (int(np.all(x == fallback, axis=1).sum()) for x in (ours, theirs))
    table = [[fa, N_DRAWS - fa], [fb, N_DRAWS - fb]]
    return [ks_2samp(a[:, k], b[:, k]).pvalue for k in range(4)] + [fisher_exact(table).pvalue]


def test_crop_boxes_follow_torchvision_law():
    """Our boxes (numpy draws) against torchvision's ``get_params`` (torch draws), 20k
    each: two-sample KS on area fraction, log aspect ratio, relative top and left, and
    Fisher's exact test on the fallback frequency. The same comparisons must reject a
    uniform aspect ratio and a single try."""
    transform = X.RandomResizedCropFlip(224)
    theirs = {shape: _torch_boxes(*shape) for shape in LAW_SHAPES}
    for shape in LAW_SHAPES:
        p = _pvalues(transform.crop_box, theirs[shape], *shape, seed=12345)
        assert min(p) > ALPHA, (shape, p)
    thin = LAW_SHAPES[1]
    fallbacks = np.all(theirs[thin] == np.asarray(_fallback_box(*thin)), axis=1).mean()
    assert 0.2 < fallbacks < 0.95  # the thin shape exercises both the tries and the fallback
    for bug, shape in (({"log_uniform": False}, LAW_SHAPES[0]), ({"tries": 1}, thin)):
        p = _pvalues(functools.partial(_buggy_box, **bug), theirs[shape], *shape, seed=1)
        assert min(p) < ALPHA, (bug, p)


def test_example_rng_is_a_function_of_seed_epoch_index():
    def draw(*args: int) -> list[int]:
        return X.example_rng(*args).integers(0, 2**31, 4).tolist()

    assert draw(0, 1, 2) == draw(0, 1, 2)
    others = ((0, 1, 2), (0, 1, 3), (0, 2, 2), (1, 1, 2), (0, 2, 1), (2, 1, 0))
    assert len({tuple(draw(*a)) for a in others}) == len(others)
    image, transform = _photo(500, 375), X.RandomResizedCropFlip(32)
    assert np.array_equal(transform(image, X.example_rng(3, 4, 5)),
                          transform(image, X.example_rng(3, 4, 5)))


def test_bad_images_raise_naming_the_file(tmp_path, monkeypatch):
    good = tmp_path / "good.jpg"
    _photo(500, 375).save(good)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    fake = tmp_path / "fake.jpg"
    fake.write_text("not an image")
    for path in (cut, fake, tmp_path / "missing.jpg"):
        with pytest.raises(X.BadImageError, match=path.name) as caught:
            X.load_rgb(path)
        assert caught.value.path == str(path)
        again = pickle.loads(pickle.dumps(caught.value))  # crosses from worker processes
        assert (type(again), str(again)) == (X.BadImageError, str(caught.value))
    with pytest.raises(X.BadImageError, match="truncated"):
        X.load_rgb(cut)
    with pytest.raises(X.BadImageError, match="record 7"):
        X.decode_rgb(cut.read_bytes(), "record 7")
    # Why the guard: with the flag PIL hands back the cut file padded, without a word.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with Image.open(cut) as padded:
        padded.load()
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        X.load_rgb(cut)


def test_bad_parameters_name_the_allowed_values():
    with pytest.raises(ValueError, match="lanczos"):
        X.EvalTransform(32, 36, "linear")
    with pytest.raises(ValueError, match="resize_size"):
        X.EvalTransform(32, 0)
    with pytest.raises(ValueError, match="crop_pct"):
        X.EvalTransform.from_crop_pct(224, 0.0)
    with pytest.raises(ValueError, match="scale"):
        X.RandomResizedCropFlip(32, scale=(1.0, 0.5))
    with pytest.raises(ValueError, match="ratio"):
        X.RandomResizedCropFlip(32, ratio=(0.0, 1.0))

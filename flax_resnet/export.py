"""Export weights for serving: the eval-mode forward as a serialized ``jax.export`` artifact
(StableHLO), or as ONNX through the PyTorch twin.

``export(weights, out_dir)`` writes ``model.jax`` (``Exported.serialize()``: load it with
``jax.export.deserialize`` in any JAX process, no flax_resnet needed) or ``model.onnx``, and
``export.json``: what the artifact takes and returns, the preprocessing the host still has to
do, the class names, where the weights came from and the artifact's check.

The artifact takes NHWC images (float32, normalised; or uint8 with ``with_preprocessing``,
which bakes in ``(x / 255 - mean) / std`` with the weights' mean/std) and returns float32
logits. The batch is symbolic; so are height and width where the architecture's forward
allows it (not for ResNet-D's ``avg_down`` nor a zero-padded ``A`` shortcut, whose shapes
are worked out in Python, and not with ``with_preprocessing``: then they are fixed at
``image_size``). The parameters are constants of the program, unsharded.

The check (on by default) runs the written artifact on random images and holds it to the
float32 criterion of the parity suite (``parity_tests/harness.py``): its relative error
against the Flax model in float64 at most ``F32_K`` times that of a float32 reference
implementation, plus ``F32_FLOOR``. The reference is PyTorch's float32 for ONNX (the graph
is PyTorch's) and the Flax model's own eval forward, at the export's dtype, for StableHLO.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flax_resnet.named_weights import sha256_of

FORMATS: tuple[str, ...] = ("stablehlo", "onnx")
PLATFORMS: tuple[str, ...] = ("cpu", "cuda", "rocm", "tpu")
DTYPES: tuple[str, ...] = ("float32", "bfloat16")
MODEL_FILES = {"stablehlo": "model.jax", "onnx": "model.onnx"}
METADATA_FILE = "export.json"
ONNX_EXTRA = "pip install 'flax_resnet[onnx]'"
LAYOUT = "NHWC"
# The parity suite's float32 criterion (parity_tests/harness.py F32_K, F32_FLOOR; measured
# and justified there): err(ours vs float64) <= F32_K * err(reference float32 vs float64)
# + F32_FLOOR, relative to the largest reference logit.
F32_K = 6.0
F32_FLOOR = 2e-6
# Checked batch sizes: two, so that a batch dimension that is not really symbolic fails.
CHECK_BATCHES: tuple[int, ...] = (1, 3)
CHECK_SEED = 0


class ExportError(ValueError):
    """An export that cannot be made as asked (a format, platform, dtype, size or output
    directory that is not allowed, or an artifact that fails its check)."""


def _choice(what: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ExportError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
    return value


def parse_platforms(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"cpu,cuda"`` (or a sequence) as platforms, each one of ``PLATFORMS``."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names = tuple(p.strip().lower() for p in items if p.strip())
    if not names:
        raise ExportError(f"no platform given in {text!r}; allowed: {', '.join(PLATFORMS)}")
    for name in names:
        _choice("platform", name, PLATFORMS)
    return tuple(dict.fromkeys(names))


def rel_err(actual: Any, expected: Any) -> float:
    """max|actual - expected| / max|expected|, in float64 (as the parity suite measures)."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    if a.shape != e.shape:
        raise ExportError(f"the artifact's output has shape {a.shape}, expected {e.shape}")
    scale = float(np.max(np.abs(e), initial=0.0))
    diff = float(np.max(np.abs(a - e), initial=0.0))
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


@dataclasses.dataclass(frozen=True)
class Float32Check:
    """An artifact's relative error against the float64 reference, and the bar it must meet:
    ``F32_K`` times the error of ``yardstick`` (a float32 implementation) + ``F32_FLOOR``."""

    artifact: float
    yardstick_error: float
    yardstick: str
    shapes: tuple[tuple[int, ...], ...] = ()

    @property
    def bound(self) -> float:
        return F32_K * self.yardstick_error + F32_FLOOR

    @property
    def passed(self) -> bool:
        return bool(self.artifact <= self.bound)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "artifact_rel_err": self.artifact,
                "yardstick": self.yardstick, "yardstick_rel_err": self.yardstick_error,
                "bound": self.bound, "criterion": f"artifact <= {F32_K:g} x yardstick + "
                f"{F32_FLOOR:g}, relative to the largest float64 logit",
                "input_shapes": [list(s) for s in self.shapes]}

    def summary(self) -> str:
        return (f"relative error {self.artifact:.2e} against the float64 model; "
                f"{self.yardstick} {self.yardstick_error:.2e}; bound {self.bound:.2e}: "
                + ("passed" if self.passed else "FAILED"))


def float32_check(artifact: Sequence[Any], reference64: Sequence[Any],
                  yardstick: Sequence[Any], name: str,
                  shapes: Sequence[tuple[int, ...]] = ()) -> Float32Check:
    """The float32 criterion over batches: each a (artifact logits, float64 reference logits,
    float32 yardstick logits) triple; the worst error of each side counts."""
    ours = max(rel_err(a, r) for a, r in zip(artifact, reference64, strict=True))
    theirs = max(rel_err(y, r) for y, r in zip(yardstick, reference64, strict=True))
    return Float32Check(ours, theirs, name, tuple(tuple(s) for s in shapes))


# --- what the artifact takes ------------------------------------------------------------------


def default_image_size(weights: Any) -> int:
    """The weights' input size (their preprocessing), else 32 for a CIFAR stem, else 224."""
    pre = weights.preprocessing
    if pre is not None and pre.input_size:
        return int(pre.input_size[-1])
    return 32 if weights.config.get("stem") == "cifar" else 224


def mean_std(weights: Any) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, where they came from): the weights' own, else ImageNet's (as
    ``flax-resnet-predict`` assumes)."""
    from flax_resnet.preprocessing import IMAGENET_MEAN, IMAGENET_STD

    pre = weights.preprocessing
    if pre is not None:
        return tuple(pre.mean), tuple(pre.std), pre.source or "the weights' preprocessing"
    return IMAGENET_MEAN, IMAGENET_STD, "ImageNet's (the weights state none)"


def host_transform(weights: Any, size: int) -> dict[str, Any]:
    """The evaluation resize and crop (``transforms.EvalTransform``) that the host applies
    before the artifact."""
    from flax_resnet.transforms import EvalTransform

    t = EvalTransform.from_preprocessing(weights.preprocessing, size)
    return {"resize_shorter_side": t.resize_size, "center_crop": t.size,
            "interpolation": t.interpolation, "then": "RGB uint8 HWC, stacked to NHWC"}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The artifact's input: ``(b, height, width, 3)``; None height/width: symbolic."""

    dtype: str  # float32 (normalised) or uint8 (preprocessing baked in)
    height: int | None
    width: int | None
    channels: int = 3

    @property
    def symbolic_spatial(self) -> bool:
        return self.height is None

    def shape(self) -> list[Any]:
        return ["b", self.height or "h", self.width or "w", self.channels]

    def fixed(self, size: int) -> InputSpec:
        return dataclasses.replace(self, height=size, width=size)


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ExportError(f"image size {size!r} must be a whole number >= 1")
    return size


# --- StableHLO --------------------------------------------------------------------------------


def eval_forward(weights: Any, *, with_preprocessing: bool = False, dtype: str = "float32"
                 ) -> Callable[[Any], Any]:
    """The eval-mode forward of ``weights`` as a pure function of the images, parameters
    closed over (so that ``jax.export`` makes them constants): NHWC float32 normalised (or
    uint8, normalised inside with the weights' mean/std) in, float32 logits out."""
    import jax.numpy as jnp
    from flax import nnx

    from flax_resnet.data import normalize

    _choice("dtype", dtype, DTYPES)
    compute = jnp.dtype(dtype)
    model = weights.build(dtype=compute)
    model.eval()
    graphdef, state = nnx.split(model)
    mean, std, _ = mean_std(weights)

    def forward(images: Any) -> Any:
        x = normalize(images, mean, std, compute) if with_preprocessing else \
            images.astype(compute)
        return nnx.merge(graphdef, state)(x).astype(jnp.float32)

    return forward


def _export_jax(forward: Callable, spec: InputSpec, platforms: Sequence[str]) -> Any:
    import jax
    from jax import export as jexport

    shape = jexport.symbolic_shape(", ".join(str(d) for d in spec.shape()))
    return jexport.export(jax.jit(forward), platforms=list(platforms))(
        jax.ShapeDtypeStruct(shape, np.dtype(spec.dtype)))


def export_stablehlo(weights: Any, *, platforms: Sequence[str] = ("cpu",),
                     with_preprocessing: bool = False, image_size: int | None = None,
                     dtype: str = "float32") -> tuple[Any, InputSpec, str | None]:
    """(the ``jax.export.Exported``, its input spec, why height/width are not symbolic or
    None). Height and width are fixed at ``image_size`` (default the weights' size) with
    ``with_preprocessing`` or a given ``image_size``, else symbolic where the architecture's
    forward traces that way."""
    platforms = parse_platforms(platforms)
    forward = eval_forward(weights, with_preprocessing=with_preprocessing, dtype=dtype)
    size = _check_size(image_size if image_size is not None else default_image_size(weights))
    spec = InputSpec("uint8" if with_preprocessing else "float32", None, None,
                     int(weights.config.get("in_channels", 3)))
    if with_preprocessing or image_size is not None:
        return _export_jax(forward, spec.fixed(size), platforms), spec.fixed(size), None
    try:
        return _export_jax(forward, spec, platforms), spec, None
    except Exception as err:  # shape polymorphism refused: any shape-dependent Python code
        why = (f"this architecture's forward does not trace with a symbolic height/width "
               f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); fixed at {size}")
    return _export_jax(forward, spec.fixed(size), platforms), spec.fixed(size), why


# --- the check --------------------------------------------------------------------------------


def check_images(spec: InputSpec, size: int) -> list[np.ndarray]:
    """Random uint8 NHWC images, one batch per ``CHECK_BATCHES``; with symbolic height and
    width the second batch is not square and not ``size``, so both really vary."""
    rng = np.random.default_rng(CHECK_SEED)
    shapes = [(CHECK_BATCHES[0], spec.height or size, spec.width or size)]
    if spec.symbolic_spatial:
        shapes.append((CHECK_BATCHES[1], size + 5, max(1, size - 3)))
    else:
        shapes.append((CHECK_BATCHES[1], spec.height, spec.width))
    return [rng.integers(0, 256, (*s, spec.channels), dtype=np.uint8) for s in shapes]


def _normalized(images: np.ndarray, mean: Sequence[float], std: Sequence[float],
                dtype: Any = np.float32) -> np.ndarray:
    """``flax_resnet.data.normalize`` in numpy (float32 rounding as there)."""
    x = images.astype(dtype) / dtype(255.0)
    return ((x - np.asarray(mean, dtype)) / np.asarray(std, dtype)).astype(dtype)


def reference64(weights: Any, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The Flax model's eval logits in float64 on uint8 ``batches`` (normalised in float64)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    mean, std, _ = mean_std(weights)
    with jax.enable_x64(True):
        model = weights.build(dtype=jnp.float64)
        model.eval()
        forward = nnx.jit(lambda m, x: m(x))
        return [np.asarray(forward(model, _normalized(b, mean, std, np.float64)))
                for b in batches]


def flax_logits(weights: Any, batches: Sequence[np.ndarray], dtype: str = "float32"
                ) -> list[np.ndarray]:
    """The Flax model's eval forward as the library runs it (``nnx.jit``, parameters as
    arguments) on uint8 ``batches`` normalised in float32."""
    import jax.numpy as jnp
    from flax import nnx

    mean, std, _ = mean_std(weights)
    model = weights.build(dtype=jnp.dtype(dtype))
    model.eval()
    compute = jnp.dtype(dtype)
    forward = nnx.jit(lambda m, x: m(x.astype(compute)).astype(jnp.float32))
    return [np.asarray(forward(model, _normalized(b, mean, std))) for b in batches]


def _artifact_input(batch: np.ndarray, spec: InputSpec, weights: Any) -> np.ndarray:
    if spec.dtype == "uint8":
        return batch
    mean, std, _ = mean_std(weights)
    return _normalized(batch, mean, std)


def check_stablehlo(blob: bytes | bytearray, weights: Any, spec: InputSpec,
                    dtype: str = "float32", size: int | None = None) -> Float32Check:
    """The serialized artifact ``blob``, deserialized and run here, against the float64
    model, with the Flax eval forward at ``dtype`` as the yardstick."""
    from jax import export as jexport

    exported = jexport.deserialize(bytearray(blob))
    batches = check_images(spec, size or default_image_size(weights))
    ours = [np.asarray(exported.call(_artifact_input(b, spec, weights))) for b in batches]
    return float32_check(ours, reference64(weights, batches), flax_logits(weights, batches, dtype),
                         f"Flax {dtype} eval forward", [b.shape for b in batches])


# --- ONNX -------------------------------------------------------------------------------------


def _require_onnx() -> None:
    import importlib.util

    missing = [m for m in ("torch", "onnx", "onnxscript", "onnxruntime")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"--format onnx needs {', '.join(missing)}: {ONNX_EXTRA}")


def torch_twin(weights: Any) -> Any:
    """The ``torch_ref`` model of ``weights`` in eval mode (float32), loaded strictly from
    the Flax model's own export (``convert.to_torch_state_dict``)."""
    import torch_ref
    from flax_resnet.state_dict import to_torch_state_dict

    twin = torch_ref.from_config(weights.model_config())
    twin.load_state_dict(to_torch_state_dict(weights.build()))
    return twin.eval()


def _serving_module(twin: Any, mean: Sequence[float], std: Sequence[float],
                    with_preprocessing: bool) -> Any:
    import torch

    class Serving(torch.nn.Module):
        """NHWC in (as the StableHLO artifact), optionally uint8 normalised here."""

        def __init__(self) -> None:
            super().__init__()
            self.net = twin
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = images
            if with_preprocessing:
                x = (x.to(torch.float32) / 255.0 - self.mean) / self.std
            return self.net(x.permute(0, 3, 1, 2))

    return Serving().eval()


def export_onnx(weights: Any, path: str | os.PathLike, *, with_preprocessing: bool = False,
                image_size: int | None = None) -> tuple[InputSpec, str | None, int | None]:
    """Write ``weights``' eval forward as ONNX to ``path`` through the PyTorch twin
    (``torch.onnx.export(dynamo=True)``, which needs onnxscript). Returns (input spec, why
    height/width are fixed or None, the ONNX opset). Shapes as ``export_stablehlo``."""
    _require_onnx()
    import torch

    mean, std, _ = mean_std(weights)
    module = _serving_module(torch_twin(weights), mean, std, with_preprocessing)
    size = _check_size(image_size if image_size is not None else default_image_size(weights))
    spec = InputSpec("uint8" if with_preprocessing else "float32", None, None,
                     int(weights.config.get("in_channels", 3)))
    example = torch.from_numpy(_artifact_input(check_images(spec.fixed(size), size)[1],
                                               spec, weights))

    def write(spec: InputSpec) -> Any:
        dims: dict[int, Any] = {0: torch.export.Dim("batch")}
        if spec.symbolic_spatial:
            dims.update({1: torch.export.Dim("height"), 2: torch.export.Dim("width")})
        with torch.no_grad():
            program = torch.onnx.export(module, (example,), dynamo=True, verbose=False,
                                        input_names=["images"], output_names=["logits"],
                                        dynamic_shapes={"images": dims})
        program.save(os.fspath(path))
        return program

    why = None
    if with_preprocessing or image_size is not None:
        spec = spec.fixed(size)
        program = write(spec)
    else:
        try:
            program = write(spec)
        except Exception as err:  # torch.export's guards refused a symbolic height/width
            why = (f"PyTorch's exporter does not take a symbolic height/width for this "
                   f"architecture ({type(err).__name__}: "
                   f"{str(err).splitlines()[0][:200] if str(err) else ''}); fixed at {size}")
            spec = spec.fixed(size)
            program = write(spec)
    opset = None
    model = getattr(program, "model_proto", None)
    if model is not None:
        opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")),
                     None)
    return spec, why, opset


def twin_logits(weights: Any, batches: Sequence[np.ndarray], dtype: Any = None
                ) -> list[np.ndarray]:
    """PyTorch's eval logits of the twin on uint8 ``batches`` (float32, or float64 with
    ``dtype=torch.float64``), normalised in that dtype."""
    import torch

    twin = torch_twin(weights)
    dtype = dtype or torch.float32
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    twin = twin.to(dtype)
    mean, std, _ = mean_std(weights)
    out = []
    with torch.no_grad():
        for b in batches:
            x = torch.from_numpy(_normalized(b, mean, std, np_dtype).transpose(0, 3, 1, 2).copy())
            out.append(twin(x).numpy())
    return out


def onnx_logits(path: str | os.PathLike, batches: Sequence[np.ndarray], spec: InputSpec,
                weights: Any) -> list[np.ndarray]:
    """onnxruntime's (CPU) logits of the ONNX file on uint8 ``batches``."""
    import onnxruntime as ort

    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [session.run(None, {name: _artifact_input(b, spec, weights)})[0] for b in batches]


def check_onnx(path: str | os.PathLike, weights: Any, spec: InputSpec,
               size: int | None = None) -> Float32Check:
    """The ONNX file run by onnxruntime against the float64 Flax model, with PyTorch's own
    float32 as the yardstick."""
    batches = check_images(spec, size or default_image_size(weights))
    return float32_check(onnx_logits(path, batches, spec, weights), reference64(weights, batches),
                         twin_logits(weights, batches), "PyTorch float32",
                         [b.shape for b in batches])


# --- the whole export -------------------------------------------------------------------------


def check_options(format: str, platforms: Sequence[str] | str | None = None,
                  dtype: str = "float32", image_size: int | None = None) -> None:
    """``ExportError`` for options that do not go together or a missing ONNX extra, before
    any weights are read."""
    _choice("format", format, FORMATS)
    _choice("dtype", dtype, DTYPES)
    if image_size is not None:
        _check_size(image_size)
    if platforms is not None:
        parse_platforms(platforms)
    if format == "onnx":
        if platforms is not None:
            raise ExportError("--platforms applies to --format stablehlo; an ONNX file runs "
                              "wherever onnxruntime does")
        if dtype != "float32":
            raise ExportError(f"--format onnx exports float32 (PyTorch's twin); dtype {dtype!r} "
                              "is for --format stablehlo")
        _require_onnx()


def _out_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"the output directory {out} is a file; give a directory (it is "
                          "created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def export(weights: Any, out_dir: str | os.PathLike, *, format: str = "stablehlo",
           platforms: Sequence[str] | str | None = None, with_preprocessing: bool = False,
           image_size: int | None = None, dtype: str = "float32", check: bool = True,
           say: Callable[[str], None] = print) -> dict[str, Any]:
    """Export ``weights`` (a ``weights.Weights``) into ``out_dir``: ``model.jax`` or
    ``model.onnx``, and ``export.json`` (returned). With ``check``, the artifact is run here
    and must meet the float32 criterion (``ExportError`` otherwise, the files stay for a
    look); a StableHLO artifact not exported for this machine's platform is not run."""
    import jax
    from jax import export as jexport

    from flax_resnet.prediction import class_names

    check_options(format, platforms, dtype, image_size)
    platforms = parse_platforms(platforms if platforms is not None else
                                (jexport.default_export_platform(),))
    out = _out_dir(out_dir)
    size = image_size if image_size is not None else default_image_size(weights)
    model_path = out / MODEL_FILES[format]
    extra: dict[str, Any] = {}
    result: Float32Check | None = None
    if format == "stablehlo":
        exported, spec, why = export_stablehlo(
            weights, platforms=platforms, with_preprocessing=with_preprocessing,
            image_size=image_size, dtype=dtype)
        blob = exported.serialize()
        model_path.write_bytes(blob)
        extra = {"platforms": list(platforms), "jax_version": jax.__version__,
                 "jaxlib_version": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
                 "calling_convention_version": getattr(exported, "calling_convention_version",
                                                       None),
                 "compute_dtype": dtype}
        here = jexport.default_export_platform()
        if check and here in platforms:
            result = check_stablehlo(blob, weights, spec, dtype, size)
        elif check:
            extra["check_skipped"] = (f"exported for {', '.join(platforms)}; this machine runs "
                                      f"{here}")
    else:
        spec, why, opset = export_onnx(weights, model_path,
                                       with_preprocessing=with_preprocessing,
                                       image_size=image_size)
        extra = {"opset": opset, **_versions("torch", "onnx", "onnxscript", "onnxruntime"),
                 "compute_dtype": "float32"}
        if check:
            result = check_onnx(model_path, weights, spec, size)
    mean, std, stats_source = mean_std(weights)
    meta: dict[str, Any] = {
        "format": format, "file": model_path.name, "sha256": sha256_of(model_path),
        "source": weights.source, "description": weights.description, "step": weights.step,
        "origin": weights.provenance(), "architecture": dict(weights.config),
        "input": {"shape": spec.shape(), "dtype": spec.dtype, "layout": LAYOUT,
                  "symbolic": ["b"] + (["h", "w"] if spec.symbolic_spatial else []),
                  **({"fixed_size_reason": why} if why else {})},
        "output": {"shape": ["b", weights.classifier_size], "dtype": "float32",
                   "what": "logits (no softmax)"},
        "preprocessing_baked_in": with_preprocessing,
        "mean": list(mean), "std": list(std), "mean_std_source": stats_source,
        "host_transform": host_transform(weights, size),
        "host_normalizes": not with_preprocessing,
        "class_names": list(class_names(weights)),
        **extra,
        "check": result.to_dict() if result is not None else None,
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=1))
    if "check_skipped" in extra:
        say(f"{model_path}: not checked: {extra['check_skipped']}")
    if result is not None:
        say(f"{model_path}: {result.summary()}")
        if not result.passed:
            raise ExportError(f"{model_path} fails its check: {result.summary()}")
    return meta


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return None


def _versions(*modules: str) -> dict[str, str | None]:
    import importlib

    out: dict[str, str | None] = {}
    for name in modules:
        try:
            out[f"{name}_version"] = importlib.import_module(name).__version__
        except (ImportError, AttributeError):
            out[f"{name}_version"] = None
    return out

"""Flax NNX side: the product's train step on synthetic on-device data, timed.

The step is ``flax_resnet.training.make_train_step`` itself (what ``train.py`` runs): a pure
``jax.jit`` over the ``TrainState`` (``nnx.split(model, nnx.Param, nnx.BatchStat)``), state and
metrics donated, augmentation (``flax_resnet.data.augment``) and normalization on the device,
cross-entropy with label smoothing, the optax optimizer of the config, BatchNorm running
stats updated. The config is the ``fast`` recipe with the bench config's depth, width, batch
and dtype (``bench.run.train_config``). For an ``-in{size}`` config the config's augment is
``random-resized-crop`` (made on the host by ``train.py``'s pipeline), so the step normalises
only, with ImageNet's mean/std.

Best practice as the product does it: NHWC (native), ``dtype=bfloat16`` compute with float32
parameters for ``bf16`` (the input is cast to bf16 by ``normalize``), BatchNorm statistics
in float32 (``flax_resnet.norms``), donated state, the uint8 batch already on the device.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from typing import Any

from bench.configs import BenchConfig


def set_bn_variance(kind: str) -> None:
    """``auto``: the product's moments (one pass for 16-bit activations, two for float32);
    ``twopass``: two passes for every dtype, the comparison the bench reports. A bench-only
    switch of this process; it takes effect for steps traced afterwards."""
    from flax_resnet import norms

    if not hasattr(norms, "_bench_product_moments"):
        norms._bench_product_moments = norms._moments
    if kind == "auto":
        norms._moments = norms._bench_product_moments
    elif kind == "twopass":
        norms._moments = norms._moments_two_pass
    else:
        raise ValueError(f"bn variance must be auto or twopass, got {kind!r}")


def build_step(train_cfg: dict[str, Any], num_classes: int, steps_per_epoch: int,
               image_size: int, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None):
    """(step, state, metrics, mesh): the product's jitted step (``program.build_program``'s)
    and its placed inputs. ``mean`` / ``std``: the input statistics, CIFAR-10's by default.

    ``step(state, metrics, images_u8, labels) -> (state, metrics)``, both donated.
    """
    from flax_resnet import data as data_lib
    from flax_resnet.config import TrainConfig
    from flax_resnet.program import DataSpec, build_program
    from flax_resnet.sharding import make_mesh

    cfg = TrainConfig.from_dict(train_cfg)
    cfg = cfg.replace(num_classes=num_classes)
    mesh = make_mesh()
    image_shape = (image_size, image_size, 3)
    spec = DataSpec(steps_per_epoch, image_shape,
                    data_lib.CIFAR10_MEAN if mean is None else tuple(mean),
                    data_lib.CIFAR10_STD if std is None else tuple(std))
    program, state = build_program(cfg, mesh, spec)
    return program.train_step, state, program.zero_metrics(), mesh


def _roofline(hlo_text: str, precision: str, tf32: bool) -> dict[str, Any]:
    """The compiled step's kernel count, modeled HBM traffic and, on a device with known
    peaks, its roofline step time (bench/hlo_kernels.py; ``python -m bench.roofline``)."""
    import jax

    from bench.flops import device_rates
    from bench.hlo_kernels import parse_kernels, roofline_time

    kernels = parse_kernels(hlo_text)
    rates = device_rates(str(getattr(jax.devices()[0], "device_kind", "")), precision, tf32)
    # Both peaks, so that bench tables never mix bandwidth-only ceilings with full ones.
    roofline = (roofline_time(kernels, rates.flops_per_s, rates.bytes_per_s)
                if rates.flops_per_s else None)
    return {
        "kernels": len(kernels),
        "hbm_traffic_bytes": sum(k.bytes for k in kernels),
        "roofline_step_s": roofline,
    }


def _cost_and_memory(step, *args, precision: str, tf32: bool) -> dict[str, Any]:
    """XLA's own FLOP count and buffer-assignment peak for the compiled step (AOT, no run),
    and its kernels against the roofline."""
    out: dict[str, Any] = {"flops_xla_per_step": None, "peak_mem_bytes": None}
    try:
        compiled = step.lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - diagnostics only
        out["xla_analysis_error"] = repr(e)[:300]
        return out
    try:
        out.update(_roofline(compiled.as_text(), precision, tf32))
    except ValueError as e:  # an HLO the kernel model cannot read: say so, keep the run
        out["roofline_error"] = repr(e)[:300]
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else {}
        if cost and cost.get("flops"):
            out["flops_xla_per_step"] = float(cost["flops"])
    except Exception as e:  # noqa: BLE001
        out["xla_cost_error"] = repr(e)[:300]
    try:
        mem = compiled.memory_analysis()
        if mem is not None:
            peak = (
                mem.argument_size_in_bytes
                + mem.output_size_in_bytes
                - mem.alias_size_in_bytes
                + mem.temp_size_in_bytes
            )
            out["peak_mem_bytes"] = int(peak)
            out["peak_mem_source"] = "xla buffer assignment (args+outputs-aliased+temps)"
    except Exception as e:  # noqa: BLE001
        out["xla_memory_error"] = repr(e)[:300]
    return out


def environment() -> dict[str, Any]:
    import flax
    import jax

    dev = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "backend": jax.default_backend(),
        "device_kind": getattr(dev, "device_kind", str(dev)),
        "device_count": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "python": platform.python_version(),
    }


def run_job(
    cfg: BenchConfig,
    train_cfg: dict[str, Any],
    *,
    steps: int,
    warmup: int,
    min_warmup_s: float = 0.0,
    windows: int,
    tf32: bool,
    steps_per_epoch: int,
    bn_variance: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    import jax
    import numpy as np

    from bench.timing import run_protocol
    from flax_resnet import training as T
    from flax_resnet.config import TrainConfig
    from flax_resnet.sharding import put_batch

    # JAX's default fp32 precision on GPU lets convs/matmuls use TF32; "highest" forbids it.
    jax.config.update("jax_default_matmul_precision", None if tf32 else "highest")
    set_bn_variance(bn_variance)
    mean, std = cfg.mean_std
    step, state, metrics, mesh = build_step(train_cfg, cfg.num_classes, steps_per_epoch,
                                            cfg.image_size, mean, std)
    rng = np.random.default_rng(seed)
    shape = (cfg.batch, cfg.image_size, cfg.image_size, 3)
    images, labels = put_batch(
        mesh,
        cfg.batch,
        rng.integers(0, 256, shape, dtype=np.uint8),
        rng.integers(0, cfg.num_classes, (cfg.batch,), dtype=np.int32),
    )
    holder = {"state": state, "metrics": metrics}

    def one_step():
        holder["state"], holder["metrics"] = step(
            holder["state"], holder["metrics"], images, labels
        )
        return holder["state"], holder["metrics"]

    result = run_protocol(
        one_step, jax.block_until_ready, batch=cfg.batch, steps=steps, warmup=warmup,
        windows=windows, min_warmup_s=min_warmup_s,
    )
    summary = T.summarize(holder["metrics"])
    result["final_loss"] = summary["loss"]  # mean over every step run
    result["step_source"] = "flax_resnet.training.make_train_step"
    result["device_augment"] = T.device_augment(TrainConfig.from_dict(train_cfg))
    result["bn_variance"] = bn_variance
    # After timing, so that the first call above really included the compilation.
    t = time.perf_counter()
    result.update(_cost_and_memory(step, holder["state"], holder["metrics"], images, labels,
                                   precision=cfg.precision, tf32=tf32))
    result["xla_analysis_s"] = time.perf_counter() - t
    if result.get("roofline_step_s"):
        # Measured images/s over the ceiling batch / roofline_step_s.
        result["of_roofline"] = result["images_per_s"] * result["roofline_step_s"] / cfg.batch
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        # Allocator high-water mark of this worker so far (cumulative over its jobs).
        result["allocator_peak_bytes"] = int(stats["peak_bytes_in_use"])
    return result

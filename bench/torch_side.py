"""torch_ref side: PyTorch eager and ``torch.compile`` train steps, timed like the Flax one.

The step mirrors ``flax_resnet.training``'s for the same config (``train_cfg``, the dict of a
``TrainConfig``): ``torch_ref.from_config`` with the same init and zero-init-residual,
``torch_ref.training.param_groups`` (no decay on 1-D params when the recipe says so),
``make_criterion`` (label smoothing) and ``make_scheduler`` (stepped every batch), the
optimizer's hyper-parameters from the config, the same on-device augmentation algorithm.

Best practice on GPU, for both modes: ``cudnn.benchmark = True``, the model and input in
``channels_last`` (on CPU: NCHW, PyTorch's fast CPU layout), bf16 via ``torch.autocast``
with float32 parameters (``bf16`` configs), a fused optimizer (``fused=True``),
``zero_grad(set_to_none=True)``, data already on the device with the augmentation in GPU
tensor ops (``bench.augment.torch_augment``).
``torch_compile`` compiles augment + forward + loss with ``torch.compile`` (mode default,
``dynamic=False``; ``python -m bench --torch-compile-mode max-autotune`` for Inductor's
autotuned kernels, minutes of compilation more); AOTAutograd compiles the backward too; the
fused optimizer step stays eager (one multi-tensor kernel already).

``-in{size}`` configs (ImageNet's step): the crop and flip are the host pipeline's
(torchvision's ``RandomResizedCrop`` in a DataLoader), so the timed step only normalises
(ImageNet's mean/std), as the Flax step does for them.

TF32 (fp32 configs): ``--tf32 on`` (default) lets cuDNN convs and cuBLAS matmuls use TF32,
which is what JAX does by default for float32 on GPU; ``--tf32 off`` forbids it on both sides
(JAX: ``jax_default_matmul_precision=highest``).
"""

from __future__ import annotations

import platform
from typing import Any

from bench.configs import BenchConfig


def set_tf32(enabled: bool) -> None:
    import torch

    prec = "tf32" if enabled else "ieee"
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    if cudnn_conv is not None and hasattr(cudnn_conv, "fp32_precision"):
        # torch >= 2.9 API; the allow_tf32 flags below are its deprecated aliases.
        torch.backends.cudnn.conv.fp32_precision = prec
        torch.backends.cuda.matmul.fp32_precision = prec
    else:
        torch.backends.cudnn.allow_tf32 = enabled
        torch.backends.cuda.matmul.allow_tf32 = enabled


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        env["device_kind"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["device_kind"] = "cpu"
        env["threads"] = torch.get_num_threads()
    return env


def make_optimizer(model: Any, cfg: Any, cuda: bool) -> Any:
    """``torch_ref.training.make_optimizer``'s optimizer, fused on GPU (best practice)."""
    import torch

    from torch_ref.training import param_groups

    groups = param_groups(model, float(cfg.weight_decay), bool(cfg.decay_norm_and_bias))
    kw: dict[str, Any] = {"lr": float(cfg.lr)}
    if cuda:
        kw["fused"] = True
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, momentum=float(cfg.momentum), nesterov=bool(cfg.nesterov), **kw
        )
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[cfg.optimizer]
    return cls(groups, betas=(0.9, 0.999), eps=1e-8, **kw)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def make_forward_loss(model: Any, criterion: Any, mean: Any, std: Any, *, bf16: bool,
                      compile: bool = False, augment: bool = True,
                      compile_mode: str = "default") -> Any:
    """``f(images_u8_nhwc, labels) -> (logits, loss)``: on-device augmentation (pad-crop-flip;
    ``augment=False``: normalisation only), the model in its memory format under bf16
    autocast when ``bf16``, the loss in float32; optionally ``torch.compile``d (in
    ``compile_mode``). The PyTorch step of the benchmark, ``bench/torch_train.py`` and
    ``bench/torch_e2e.py`` (which passes its NCHW batches as NHWC views)."""
    import torch

    from bench.augment import normalize_coeffs, torch_augment

    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {compile_mode!r}; allowed: {', '.join(COMPILE_MODES)}")
    dev = next(model.parameters()).device
    memory_format = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    scale, shift = (torch.tensor(v, device=dev) for v in normalize_coeffs(mean, std))

    def prepare(images_u8):
        if augment:
            return torch_augment(images_u8, scale, shift)
        return (images_u8.float() * scale + shift).permute(0, 3, 1, 2)

    def forward_loss(images_u8, labels):
        x = prepare(images_u8).contiguous(memory_format=memory_format)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        return logits, criterion(logits.float(), labels)

    if not compile:
        return forward_loss
    if compile_mode == "default":  # the call of record, unchanged
        return torch.compile(forward_loss, dynamic=False)
    return torch.compile(forward_loss, dynamic=False, mode=compile_mode)


def make_update(forward_loss: Any, opt: Any, sched: Any, cuda: bool) -> tuple[Any, Any]:
    """``(update(images, labels) -> loss, sync(_))``: one training update as both torch
    benchmarks time it, and the wait for the device that ends a timed window."""
    import torch

    def update(images: Any, labels: Any) -> Any:
        _, loss = forward_loss(images, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss

    def sync(_: Any) -> None:
        if cuda:
            torch.cuda.synchronize()

    return update, sync


def run_job(
    cfg: BenchConfig,
    train_cfg: dict[str, Any],
    *,
    compile: bool,
    steps: int,
    warmup: int,
    min_warmup_s: float = 0.0,
    windows: int,
    tf32: bool,
    steps_per_epoch: int,
    seed: int = 0,
    compile_mode: str = "default",
) -> dict[str, Any]:
    import gc

    import numpy as np
    import torch

    import torch_ref
    from bench.timing import run_protocol
    from flax_resnet.config import TrainConfig
    from torch_ref.training import make_criterion, make_scheduler

    tc = TrainConfig.from_dict(train_cfg)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    set_tf32(tf32)
    torch.manual_seed(seed)
    # No recompiles / automatic-dynamic shapes from earlier jobs, and their memory freed.
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()

    model = torch_ref.from_config(tc.replace(num_classes=cfg.num_classes).model)
    # channels_last is the GPU best practice (NHWC tensor-core kernels); on CPU PyTorch's
    # best layout is its default NCHW (mkldnn convs), so the CPU run keeps that.
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    model = model.to(dev, memory_format=memory_format).train()
    opt = make_optimizer(model, tc, cuda)
    sched = make_scheduler(opt, tc, steps_per_epoch)
    criterion = make_criterion(tc)
    bf16 = tc.dtype == "bfloat16"
    if bf16 and not cuda:
        raise RuntimeError("bf16 torch runs need a GPU here (CPU autocast is not benchmarked)")

    mean, std = cfg.mean_std
    forward_loss = make_forward_loss(model, criterion, mean, std, bf16=bf16, compile=compile,
                                     augment=cfg.device_augment, compile_mode=compile_mode)

    update, sync = make_update(forward_loss, opt, sched, cuda)

    def step():
        return update(images, labels)

    rng = np.random.default_rng(seed)
    shape = (cfg.batch, cfg.image_size, cfg.image_size, 3)
    images = torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8)).to(dev)
    labels = torch.from_numpy(rng.integers(0, cfg.num_classes, (cfg.batch,))).to(dev)

    result = run_protocol(step, sync, batch=cfg.batch, steps=steps, warmup=warmup,
                          windows=windows, min_warmup_s=min_warmup_s)
    result["final_loss"] = float(step().item())
    if cuda:
        result["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated() - baseline)
        result["peak_mem_source"] = "torch.cuda.max_memory_allocated (this job's)"
    else:
        result["peak_mem_bytes"] = None
    result["step_source"] = "torch_ref + torch_ref.training pieces" + (
        " (torch.compile)" if compile else " (eager)"
    )
    result["device_augment"] = cfg.device_augment
    if compile:
        result["compile_mode"] = compile_mode
    return result

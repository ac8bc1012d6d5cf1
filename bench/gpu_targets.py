"""XLA GPU target descriptions for compiling without the GPU (deviceless ahead-of-time).

XLA:GPU takes a ``GpuTargetConfig`` in text proto form in place of a live device; JAX passes
it through ``jax.experimental.topologies.get_topology_desc(platform="cuda",
target_config=...)``. The fusion decisions, layouts and kernel list of the compiled program
are those for the named GPU; cuDNN algorithm choice (autotuning) needs the device and is
left at XLA's default. Numbers are the SXM parts' datasheets.
"""

from __future__ import annotations

_TEMPLATE = """
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: {core_count}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {memory_bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {device_memory_size}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{
    major: 9
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 8
}}
runtime_version {{
  major: 12
  minor: 9
}}
device_description_str: "{name}"
"""

GPU_TARGETS: dict[str, dict[str, object]] = {
    "h100": {
        "name": "NVIDIA H100 80GB HBM3",
        "core_count": 132,
        "memory_bandwidth": 3_352_320_000_000,
        "device_memory_size": 84_929_347_584,
    },
    "h200": {
        "name": "NVIDIA H200",
        "core_count": 132,
        "memory_bandwidth": 4_800_000_000_000,
        "device_memory_size": 150_754_820_096,
    },
}


def target_config(target: str) -> str:
    """The ``GpuTargetConfig`` text proto of ``target`` (``h100`` or ``h200``)."""
    if target not in GPU_TARGETS:
        raise ValueError(f"unknown GPU target {target!r}; allowed: {', '.join(GPU_TARGETS)}")
    return _TEMPLATE.format(**GPU_TARGETS[target])

"""Process setup before any device is used: multi-host JAX and the compilation cache."""

from __future__ import annotations

import dataclasses
import os

from flax_resnet.config import ConfigError, option


def _cluster_detected() -> bool:
    env = os.environ

    def more_than_one(name: str) -> bool:
        try:
            return int(env.get(name, "1")) > 1
        except ValueError:
            return False

    return (
        ("SLURM_JOB_ID" in env and more_than_one("SLURM_NTASKS"))
        or more_than_one("OMPI_COMM_WORLD_SIZE")
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or "," in env.get("TPU_PROCESS_ADDRESSES", "")
    )


def init_distributed(
    coordinator: str | None = None, num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """``jax.distributed.initialize`` for a multi-process run (arguments, else
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, else a detected
    SLURM, Open MPI or Cloud TPU job); nothing for a single process."""
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    num, pid = num_processes, process_id
    if num is None and env.get("JAX_NUM_PROCESSES"):
        num = int(env["JAX_NUM_PROCESSES"])
    if pid is None and env.get("JAX_PROCESS_ID"):
        pid = int(env["JAX_PROCESS_ID"])
    if num is not None and num < 1:
        raise ConfigError("num_processes", f"num_processes {num} is not allowed; it must be >= 1")
    if pid is not None and num is not None and not 0 <= pid < num:
        raise ConfigError("process_id",
                          f"process_id {pid} is not allowed; it must be in [0, {num})")
    if coordinator:
        if num == 1:
            return
        import jax

        jax.distributed.initialize(coordinator, num, pid)
    elif num not in (None, 1) or pid not in (None, 0):
        raise ConfigError("coordinator",
                          "coordinator HOST:PORT is needed with num_processes / process_id")
    elif _cluster_detected():
        import jax

        jax.distributed.initialize()


def compilation_cache_dir(requested: str | None) -> str | None:
    """The persistent compilation cache directory: ``requested``, else JAX's own environment
    variable, else one under the user's cache folder; ``''`` disables it."""
    if requested is not None:
        return requested or None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flax_resnet", "jax")


@dataclasses.dataclass(frozen=True)
class ProcessOptions:
    """This process's place in a multi-host run and its compilation cache (``start``)."""

    coordinator: str | None = option(
        None, "multi-host: address of process 0 (jax.distributed.initialize); default "
        "$JAX_COORDINATOR_ADDRESS, or detected under SLURM/Open MPI/Cloud TPU",
        group="parallelism", metavar="HOST:PORT")
    num_processes: int | None = option(None, "multi-host: process count", group="parallelism")
    process_id: int | None = option(None, "multi-host: this process", group="parallelism")
    compilation_cache: str | None = option(
        None, "JAX persistent compilation cache: a rerun of the same model, batch and devices "
        "loads its compiled steps. Default $JAX_COMPILATION_CACHE_DIR, else "
        "~/.cache/flax_resnet/jax; '' disables it", group="run", metavar="DIR")

    def start(self) -> None:
        """Join the multi-host run, if any, and set the compilation cache: process-wide JAX
        state, so call it once the rest of the configuration is known to be good."""
        init_distributed(self.coordinator, self.num_processes, self.process_id)
        import jax

        jax.config.update("jax_compilation_cache_dir",
                          compilation_cache_dir(self.compilation_cache))

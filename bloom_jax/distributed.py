"""Multi-host start-up: `jax.distributed` on TPU pods (automatic) or with an explicit coordinator."""

from __future__ import annotations

import jax

from bloom_jax.errors import BloomJaxError


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_devices_per_process: int | None = None) -> None:
    """Joins this process to a multi-process JAX run; call it before any other JAX work.

    With no arguments, JAX finds the other hosts itself (TPU pods, and clusters it knows such as SLURM).
    Otherwise give all three of `coordinator_address` ("host:port" of process 0), `num_processes` and
    `process_id`. On CPU, collectives go through gloo and `cpu_devices_per_process` simulates devices.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(x is not None for x in explicit) and not all(x is not None for x in explicit):
        raise BloomJaxError("distributed: give the coordinator address, process count and process id together")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise BloomJaxError(f"distributed: process id {process_id} is not in [0, {num_processes})")
    if cpu_devices_per_process is not None:
        jax.config.update("jax_num_cpu_devices", cpu_devices_per_process)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except (RuntimeError, ValueError) as e:
        raise BloomJaxError(f"distributed: cannot initialize ({str(e).strip().splitlines()[0]})") from None


"""Which JAX platforms start: a machine with libtpu installed (to compile plans for TPUs) but no TPU must not start
a TPU backend, which takes 2-20 s and prints libtpu's complaints about the TPU it cannot find."""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

_CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")


def skip_absent_tpu() -> None:
    """Leaves JAX to the CPU (and CUDA, when its plugin is installed) when libtpu is installed without a TPU; a
    no-op when JAX_PLATFORMS is set, libtpu absent, or a TPU's device files exist (/dev/accel*, /dev/vfio/N)."""
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    platforms = "cuda,cpu" if any(importlib.util.find_spec(p) for p in _CUDA_PLUGINS) else "cpu"
    os.environ["JAX_PLATFORMS"] = platforms
    if "jax" in sys.modules:  # imported already: its flag was read from the environment at import
        sys.modules["jax"].config.update("jax_platforms", platforms)


__all__ = ["skip_absent_tpu"]

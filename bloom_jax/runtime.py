"""Process-wide settings of the JAX runtime: the persistent compilation cache, and host memory reuse on CPU."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import jax

from bloom_jax.errors import BloomJaxError

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache in `directory`, or in $BLOOM_JAX_COMPILATION_CACHE when None;
    every compiled program is kept, however fast it compiled. Returns the directory used (None: left off)."""
    directory = directory or os.environ.get("BLOOM_JAX_COMPILATION_CACHE")
    if not directory:
        return None
    directory = os.path.abspath(os.path.expanduser(str(directory)))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise BloomJaxError(f"cannot use {directory} as the compilation cache: {e.strerror}") from None
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return directory


def reuse_host_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse instead of returning it to the OS. Returns whether it did.

    XLA:CPU allocates every temporary buffer of a step afresh. glibc serves large blocks with mmap and unmaps
    them on free, so each step touches its buffers' pages for the first time again: a training step of the
    bloom-560m architecture spent 3-4 s of 20-35 in page faults. With mmap off and no trimming, freed blocks go
    back to the heap and the next step finds them mapped. The cost is that memory freed by the process is not
    returned to the OS, so only long-running steady jobs (training, generation) should call this, not conversion
    with its memory bound. A no-op (False) off Linux/glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


__all__ = ["enable_compilation_cache", "reuse_host_memory"]

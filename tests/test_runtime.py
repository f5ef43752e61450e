"""bloom_jax.runtime: the persistent compilation cache flags and host memory reuse."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import pytest

from bloom_jax.errors import BloomJaxError
from bloom_jax.runtime import enable_compilation_cache

CACHE_FLAGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
               "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture
def restore_cache_config():
    before = {name: getattr(jax.config, name) for name in CACHE_FLAGS}
    yield before
    for name, value in before.items():
        jax.config.update(name, value)


def test_enable_compilation_cache(tmp_path, monkeypatch, restore_cache_config):
    monkeypatch.delenv("BLOOM_JAX_COMPILATION_CACHE", raising=False)
    assert enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir == restore_cache_config["jax_compilation_cache_dir"]

    directory = tmp_path / "cache" / "nested"
    assert enable_compilation_cache(directory) == str(directory)
    assert jax.config.jax_compilation_cache_dir == str(directory) and directory.is_dir()
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0

    from_env = tmp_path / "from_env"
    monkeypatch.setenv("BLOOM_JAX_COMPILATION_CACHE", str(from_env))
    assert enable_compilation_cache() == str(from_env) == jax.config.jax_compilation_cache_dir


def test_enable_compilation_cache_on_a_file_is_a_clear_error(tmp_path, restore_cache_config):
    path = tmp_path / "a_file"
    path.write_text("")
    with pytest.raises(BloomJaxError, match="cannot use .* as the compilation cache"):
        enable_compilation_cache(path / "cache")
    assert jax.config.jax_compilation_cache_dir == restore_cache_config["jax_compilation_cache_dir"]


# Frees a 256 MiB array and reports how much of it stays resident (MiB), with or without reuse_host_memory.
FREED_RESIDENT = textwrap.dedent("""
    import os, sys
    import numpy as np
    from bloom_jax.runtime import reuse_host_memory
    reused = reuse_host_memory() if sys.argv[1] == "reuse" else False
    def rss_mib():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    before = rss_mib()
    block = np.ones(256 * 2**20, np.uint8)
    del block
    print(reused, round(rss_mib() - before))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reuse_host_memory_keeps_freed_blocks_mapped():
    def run(mode):
        out = subprocess.run([sys.executable, "-c", FREED_RESIDENT, mode], capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0] == "True", int(out[1])

    assert run("default") == (False, pytest.approx(0, abs=16))  # glibc unmaps a large freed block at once
    reused, resident_mib = run("reuse")
    assert reused and resident_mib >= 250  # kept for the next allocation: no fresh page faults

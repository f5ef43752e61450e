"""Shared fixtures: transformers reference checkpoints built once per session, and the default one loaded."""

from __future__ import annotations

import os

# Eight simulated CPU devices for the mesh tests; must precede the first import of jax.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# libtpu takes /tmp/libtpu_lockfile for the life of any process that loads it, a compile-only TPU topology
# included: without this, the second of two processes compiling for a TPU at once (`bloom-jax plan --device`,
# tpu_compile_worker.py: one per pytest-xdist worker) fails with "Internal error when accessing libtpu
# multi-process lockfile". On CPU, where the tests run, no process holds a TPU chip: only the compiler is shared.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from reference import PROMPT_LENGTHS, hf_logits, hf_model, left_padded, save_hf, tiny_config  # noqa: E402

from bloom_jax.checkpoints import from_pretrained  # noqa: E402
from bloom_jax.config import BloomConfig  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A random transformers `BloomForCausalLM` and the directory its `save_pretrained` wrote."""

    config: BloomConfig
    torch_model: Any
    directory: Path


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A checkpoint loaded by us, with the standard batch and the reference logits on it."""

    checkpoint: Checkpoint
    model: Any
    params: Any
    ids: np.ndarray
    mask: np.ndarray
    ref: np.ndarray

    @property
    def config(self) -> BloomConfig:
        return self.checkpoint.config


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory) -> Callable[..., Checkpoint]:
    """`make_checkpoint(**config_overrides)`: a saved reference model, built once per distinct config.

    Same shapes give the same weights (one seed), so configs that differ only in behaviour (e.g.
    `slow_but_exact`) share their parameters. Tests must not modify the returned directory.
    """
    cache: dict[tuple, Checkpoint] = {}

    def make(**overrides) -> Checkpoint:
        key = tuple(sorted(overrides.items()))
        if key not in cache:
            config = tiny_config(**overrides)
            model = hf_model(config)
            cache[key] = Checkpoint(config, model, save_hf(model, tmp_path_factory.mktemp("checkpoint")))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny(make_checkpoint) -> Loaded:
    """The default tiny checkpoint (8 heads, hidden 64, 2 layers) loaded in float32, with reference logits."""
    checkpoint = make_checkpoint()
    model, params = from_pretrained(checkpoint.directory)
    ids, mask = left_padded(checkpoint.config, PROMPT_LENGTHS)
    return Loaded(checkpoint, model, params, ids, mask, hf_logits(checkpoint.torch_model, ids, mask))
